"""benchmarks/gpu_check.sh --dry-run runs every stage end to end on CPU, from a bare copy.

Tiny shapes, the Triton interpreter, and a copy of the tracked tree without ``.git`` (what
the device tool sends): what a lent GPU will run, minus the GPU. A broken stage, a row that
is not written, or a summary that is not written shows up here first.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["install", "env", "floor", "correctness", "dz_sweep", "train_step", "tests", "summary"]


def _bare_copy(dst) -> str:
    """The tracked files (plus kernels/) copied without .git, as the device tool sends them."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for rel in files:
        if rel.startswith(("benchmarks/results/", "docs/")) or not os.path.isfile(
                os.path.join(ROOT, rel)):
            continue
        os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dst, rel))
    return str(dst)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_from_a_copy_without_git(tmp_path):
    repo = _bare_copy(tmp_path / "repo")
    assert not os.path.exists(os.path.join(repo, ".git"))
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PREFIX_RFT_COMMIT")}
    done = subprocess.run(["bash", os.path.join(repo, "benchmarks", "gpu_check.sh"), str(out),
                           "--dry-run"], env=env, capture_output=True, text=True, timeout=1500,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "stages.tsv") as f:
        stages = {r["stage"]: r["status"] for r in csv.DictReader(f, delimiter="\t")}
    expected = STAGES[:5] + (["fused_head"] if os.path.exists(
        os.path.join(repo, "benchmarks", "gpu_fused_head.py")) else []) + STAGES[5:]
    assert list(stages) == expected, stages
    bad = {k: v for k, v in stages.items() if v != "ok"}
    logs = {k: (out / f"{k}.log").read_text()[-1500:] for k in bad}
    assert not bad, f"failed stages {bad}: {logs}"
    kern = list(csv.DictReader(open(out / "kernels.csv")))
    impls = {r["impl"] for r in kern}
    assert {"gemm_fwd", "gemm", "floor8", "triton-split", "split-dz", "split-dX", "split-dW",
            "split-rest", "triton-atomic", "naive", "dz-sweep"} <= impls, impls
    assert {r["mode"] for r in kern if r["impl"] == "triton-split"} == {"fwd", "bwd", "fwd+bwd"}
    correctness = list(csv.DictReader(open(out / "correctness.csv")))
    assert {r["check"] for r in correctness} == {"fp64", "determinism", "split_vs_atomic",
                                                 "ignored_rows", "n_v_over_2^31"}
    assert all(r["pass"] == "PASS" for r in correctness), correctness
    train = list(csv.DictReader(open(out / "train_step.csv")))
    assert train and all("plan_update_gib=" in r["extra"] or "skipped" in r["extra"]
                         for r in train), train
    env_txt = (out / "env.txt").read_text()
    assert "unknown (no .git)" in env_txt and "dX path:" in env_txt and "tf32:" in env_txt
    summary = (out / "summary.md").read_text()
    assert "verdict: " in summary and "correctness: PASS" in summary, summary[:2000]


def test_summary_is_written_when_every_stage_failed(tmp_path):
    """No CSV at all, no env.txt: the summary still comes out and says what is missing."""
    (tmp_path / "stages.tsv").write_text("stage\tstatus\tseconds\nfloor\ttimeout\t100\n")
    done = subprocess.run(["python3", os.path.join(ROOT, "benchmarks", "gpu_summary.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "verdict: NONE" in text and "correctness: NONE" in text and "| floor | timeout" in text


def _kernel_rows(g, parts, split):
    rows = [{"op": "linear_logprob_entropy", "impl": "gemm_fwd", "mode": "fwd", "ms_p50": str(g)},
            {"op": "linear_logprob_entropy", "impl": "triton-split", "mode": "fwd+bwd",
             "ms_p50": str(split)}]
    names = {"forward": ("triton-split", "fwd"), "dz": ("split-dz", "bwd"),
             "dX": ("split-dX", "bwd"), "dW": ("split-dW", "bwd"), "rest": ("split-rest", "bwd")}
    for key, ms in parts.items():
        impl, mode = names[key]
        rows.append({"op": "linear_logprob_entropy", "impl": impl, "mode": mode,
                     "ms_p50": str(ms)})
    return [dict(r, shape="S", extra="") for r in rows]


def test_verdict_at_floor_and_names_the_largest_gap():
    from benchmarks.gpu_summary import verdict

    at = _kernel_rows(10.0, {"forward": 11.0, "dz": 11.5, "dX": 10.0, "dW": 10.0, "rest": 1.0},
                      43.0)
    assert verdict(at, "S").startswith("verdict: AT FLOOR")
    slow_dz = _kernel_rows(10.0, {"forward": 11.0, "dz": 20.0, "dX": 10.5, "dW": 10.0,
                                  "rest": 1.0}, 52.0)
    assert "largest gap: dz kernel" in verdict(slow_dz, "S")
    # within 1.10 x floor8 but the forward under 85 % of the cuBLAS rate: not at the floor
    slow_fwd = _kernel_rows(10.0, {"forward": 12.5, "dz": 10.0, "dX": 10.0, "dW": 10.0,
                                   "rest": 0.5}, 43.0)
    assert "NOT AT FLOOR, largest gap: forward" in verdict(slow_fwd, "S")
