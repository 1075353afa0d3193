"""benchmarks/gpu_check.sh runs every stage end to end on CPU in its dry-run mode.

Tiny shapes, the Triton interpreter, the package installed with --no-deps into the output
folder: what a lent GPU will run, minus the GPU. A broken stage shows up here first.
"""

from __future__ import annotations

import csv
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["env", "install", "tests", "correctness", "kernels", "train_step", "summary"]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PREFIX_RFT_DRY_RUN"] = "1"
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "stages.tsv") as f:
        stages = {r["stage"]: r["status"] for r in csv.DictReader(f, delimiter="\t")}
    assert list(stages) == STAGES, stages
    bad = {k: v for k, v in stages.items() if v != "ok"}
    logs = {k: (out / f"{k}.log").read_text()[-1500:] for k in bad}
    assert not bad, f"failed stages {bad}: {logs}"
    for name in ("kernels.csv", "kernels.md", "kernels.png", "correctness.csv", "correctness.md",
                 "train_step.csv", "train_step.md", "summary.md", "env.txt"):
        assert (out / name).stat().st_size > 0, name
    impls = {r["impl"] for r in csv.DictReader(open(out / "kernels.csv"))}
    assert {"gemm", "naive", "torch", "triton-split", "triton-atomic"} <= impls, impls
    correctness = list(csv.DictReader(open(out / "correctness.csv")))
    assert {r["bwd"] for r in correctness} == {"split", "atomic"}
    assert all(r["pass"] == "True" for r in correctness), correctness
    summary = (out / "summary.md").read_text()
    assert "the bare GEMMs" in summary and "commit:" in summary and "device:" in summary
