#!/usr/bin/env bash
# The second CI leg: every test not marked `vllm`, from the repository root, in the
# environment of .ci/install_newest.sh (newest transformers / TRL / peft, no vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
py="$(bash .ci/install_newest.sh "$@" | tail -n 1)"
"$py" -m pytest -q -m "not vllm"
