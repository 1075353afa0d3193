"""benchmarks/gpu_fused_head.py --dry-run (the GPU stage on tiny CPU shapes, Triton through
the interpreter): every row lands in OUT/kernels.csv and the fp64 check writes PASS."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_fused_head_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_fused_head.py"),
                           "--out-dir", str(tmp_path), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "kernels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == ["gemm6_bare", "fused6_triton", "fused6_torch",
                                         "split8_triton"]
    assert all(r["op"] == "fused_head_loss" and r["mode"] == "fwd+bwd"
               and r["shape"].startswith("N=") for r in rows)
    assert (tmp_path / "fused_head_check.txt").read_text().startswith("PASS")
