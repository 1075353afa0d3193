"""Importing prefix_rft, prefix_rft.kernels and prefix_rft.loss stays light (torch + triton)."""

import subprocess
import sys

HEAVY = ("transformers", "datasets", "vllm", "math_verify", "triton")


def test_kernels_import_pulls_no_heavy_dependency():
    code = ("import sys, prefix_rft, prefix_rft.kernels, prefix_rft.loss\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # triton is imported lazily, only when impl="triton" runs
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"
