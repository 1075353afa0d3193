"""The fused head-and-loss's Triton pass compiles for sm_90 and sm_80 without register spills
(benchmarks/compile_check_policy_loss.py, real ptxas, no GPU, outside the interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_compile_check import ROOT, _ptxas_bundled


@pytest.mark.skipif(not _ptxas_bundled(), reason="no ptxas bundled with this triton install")
def test_policy_loss_pass_compiles_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks",
                                                        "compile_check_policy_loss.py")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| sm")]
    assert len(rows) == 16 and all(line.rstrip().endswith("| ok |") for line in rows), done.stdout
