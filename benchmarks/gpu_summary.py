"""Summary of a benchmarks/gpu_check.sh run: stage statuses and ratios against the goals.

    python benchmarks/gpu_summary.py OUT_DIR          # reads the stage outputs, writes summary.md
    python benchmarks/gpu_summary.py --env OUT_DIR    # writes env.txt (device, versions, commit)

Goals (the fused kernel's reason to exist): fused fwd+bwd within 1.3-1.8x the bare lm_head
GEMMs, peak memory <= 1/20 of the naive full-logits path; the train step's fused path should
fit more tokens and not be slower than full logits.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys

if __package__ in (None, ""):  # run as a file: `benchmarks.*` from the source tree, appended
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_env(out_dir: str) -> str:
    import torch

    from benchmarks.results_io import device_name, git_commit

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"commit: {git_commit()}", f"device: {device_name()}",
             f"torch: {torch.__version__} (cuda {torch.version.cuda})", f"triton: {triton_version}",
             f"python: {platform.python_version()}",
             f"dry_run: {os.environ.get('TRITON_INTERPRET') == '1'}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"sms: {props.multi_processor_count}, memory: {props.total_memory >> 20} MiB")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "env.txt"), "w") as f:
        f.write(text)
    return text


def train_step_lines(rows: list[dict]) -> list[str]:
    """Fused vs full logits per micro-batch size: time and peak memory ratios."""
    out = []
    for shape in sorted({r["shape"] for r in rows}):
        by = {r["impl"]: r for r in rows if r["shape"] == shape}
        fused, full = by.get("fused"), by.get("full_logits")
        if not fused or not full:
            continue
        parts = [f"- {shape}: fused {fused['ms_p50']} ms / {fused['peak_mb']} MiB, "
                 f"full logits {full['ms_p50']} ms / {full['peak_mb']} MiB {full['extra']}"]
        try:
            parts.append(f"time ratio {float(fused['ms_p50']) / float(full['ms_p50']):.2f}, "
                         f"memory ratio {float(fused['peak_mb']) / float(full['peak_mb']):.2f}")
        except (ValueError, ZeroDivisionError):
            pass  # OOM / failed rows have no numbers
        out.append("; ".join(parts))
    return out


def write_summary(out_dir: str) -> str:
    j = lambda name: os.path.join(out_dir, name)  # noqa: E731
    env = open(j("env.txt")).read() if os.path.exists(j("env.txt")) else "(no env.txt)\n"
    parts = ["# GPU check summary", "", "```", env.rstrip(), "```", "", "## Stages", "",
             "| stage | status | seconds |", "|---|---|---|"]
    with open(j("stages.tsv")) as f:
        parts += [f"| {' | '.join(line.rstrip(chr(10)).split(chr(9)))} |" for line in f][1:]
    parts += ["", "## Correctness (relative RMS vs fp32 reference)", ""]
    for r in _rows(j("correctness.csv")):
        parts.append(f"- {r['shape']} bwd={r['bwd']}: pass={r['pass']} lp {r['err_lp']} "
                     f"ent {r['err_ent']} dX {r['err_dX']} dW {r['err_dW']} (bf16 torch: "
                     f"{r['torch_lp']} {r['torch_ent']} {r['torch_dX']} {r['torch_dW']}); "
                     f"deterministic={r['deterministic'] or '-'}")
    parts += ["", "## Kernels against the goals", ""]
    kern = j("kernels_summary.md")
    parts += (open(kern).read().splitlines()[2:] if os.path.exists(kern) else ["(no kernel rows)"])
    parts += ["", "## Train step (fused vs full logits)", ""]
    parts += train_step_lines(_rows(j("train_step.csv"))) or ["(no train-step rows)"]
    text = "\n".join(parts) + "\n"
    with open(j("summary.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--env", action="store_true", help="write env.txt instead of summary.md")
    args = p.parse_args(argv)
    print(write_env(args.out_dir) if args.env else write_summary(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
