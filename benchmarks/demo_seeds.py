"""The demo's README figures: the default command at seeds 0-2, mean and range.

    python -m benchmarks.demo_seeds                 # runs the three demos (~10 min each, idle)
    python -m benchmarks.demo_seeds --reuse         # reads runs that already finished

Each seed runs ``prefix-rft demo --threads 1 --seed S --workdir runs/demo_seedS`` (one thread:
the sampled rollouts depend on the reduction order, so the figures hold for that thread count
only); the seed also builds that run's embedded task and base model, so the base differs per
seed. Held-out avg@8 / pass@8 before and after training go to
``benchmarks/results/demo_seeds.{csv,md}`` with the mean and the min-max range over the seeds,
the commit, date and load.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.results_io import git_commit

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("seed", "threads", "base_avg8", "base_pass8", "after_avg8", "after_pass8",
          "train_s", "total_s", "load", "commit", "date")


def run_demo(seed: int, workdir: Path) -> dict:
    """One default demo run (one thread); returns its ``demo_results.json``."""
    cmd = [sys.executable, "-m", "prefix_rft.cli", "demo", "--threads", "1", "--seed", str(seed),
           "--workdir", str(workdir)]
    print(f"[demo_seeds] {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return read_demo(workdir)


def read_demo(workdir: Path) -> dict:
    path = workdir / "run" / "demo_results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no finished demo there (run without --reuse)")
    return json.loads(path.read_text())


def row_of(seed: int, result: dict, load: str) -> dict:
    if result.get("overrides"):
        raise SystemExit(f"seed {seed}: the run has overrides {result['overrides']}, not the "
                         "default command")
    before, after = result["before"], result["after"]
    return {"seed": seed, "threads": result["torch_threads"],
            "base_avg8": 100 * before["avg@8"], "base_pass8": 100 * before["pass@8"],
            "after_avg8": 100 * after["avg@8"], "after_pass8": 100 * after["pass@8"],
            "train_s": result["timings_s"]["train"], "total_s": result["timings_s"]["total"],
            "load": load, "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}


def summary(rows: list[dict]) -> dict[str, tuple[float, float, float]]:
    """``{column: (mean, min, max)}`` over the seeds for the four accuracy columns."""
    out = {}
    for key in ("base_avg8", "base_pass8", "after_avg8", "after_pass8"):
        values = [float(r[key]) for r in rows]
        out[key] = (sum(values) / len(values), min(values), max(values))
    return out


def render_markdown(rows: list[dict]) -> str:
    stats = summary(rows)
    lines = ["# The demo at seeds " + ", ".join(str(r["seed"]) for r in rows), "",
             "`prefix-rft demo --threads 1 --seed S` (the default config), held-out hard "
             "problems, 200 questions x 8 samples at T = 1.0, percent. The seed also builds "
             "the task and the base model. Figures hold for one thread: another thread count "
             "changes the reduction order and so the sampled rollouts.", "",
             "| seed | base avg@8 | base pass@8 | after avg@8 | after pass@8 | train s | "
             "total s | load | commit | date |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {float(r['base_avg8']):.1f} | {float(r['base_pass8']):.1f}"
                     f" | {float(r['after_avg8']):.1f} | {float(r['after_pass8']):.1f} | "
                     f"{float(r['train_s']):.0f} | {float(r['total_s']):.0f} | {r['load']} | "
                     f"{r['commit']} | {r['date']} |")
    cells = " | ".join(f"{m:.1f} ({lo:.1f}-{hi:.1f})" for m, lo, hi in stats.values())
    lines.append(f"| mean (range) | {cells} | | | | | |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".md").write_text(render_markdown(rows))
    print(f"[demo_seeds] wrote {out.with_suffix('.csv')} and .md", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.demo_seeds",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workdir", default="runs", help="runs go to WORKDIR/demo_seedS")
    ap.add_argument("--reuse", action="store_true", help="read finished runs, run nothing")
    ap.add_argument("--load", default=None,
                    help="the load during the runs, as recorded (default: the 1-min load now)")
    ap.add_argument("--out", default=str(RESULTS / "demo_seeds"), help="output prefix")
    args = ap.parse_args(argv)
    load = args.load or f"{os.getloadavg()[0]:.2f}"
    rows = []
    for seed in args.seeds:
        workdir = Path(args.workdir) / f"demo_seed{seed}"
        result = read_demo(workdir) if args.reuse else run_demo(seed, workdir)
        rows.append(row_of(seed, result, load))
    write(rows, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
