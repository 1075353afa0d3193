"""One results format for every benchmark script: append rows to a CSV, render Markdown + PNG.

Row columns (house rule): op, impl, mode, shape, ms_p20, ms_p50, ms_p80, peak_mb, device,
commit, date, plus free-form ``extra`` (a short ``key=value;...`` string, e.g. tokens/s).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence

import torch

COLUMNS = ["op", "impl", "mode", "shape", "ms_p20", "ms_p50", "ms_p80", "peak_mb",
           "device", "commit", "date", "extra"]
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_commit() -> str:
    """Short commit of the working tree, '+dirty' when there are uncommitted changes.

    ``PREFIX_RFT_COMMIT`` overrides it (a copy of the tree without ``.git``, e.g. on a
    rented GPU machine: benchmarks/gpu_check.sh sets it)."""
    if os.environ.get("PREFIX_RFT_COMMIT"):
        return os.environ["PREFIX_RFT_COMMIT"]
    try:
        root = os.path.dirname(RESULTS_DIR)
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def require_kernels():
    """Import ``prefix_rft.kernels`` or exit with why (never skip our own impls silently).

    A source checkout's ``prefix_rft/`` has no ``kernels`` subpackage (``kernels/`` is mapped
    in at install time), so with the repository root first on ``sys.path`` (``python -m``
    from the root) it shadows an installed prefix-rft.
    """
    try:
        import prefix_rft.kernels as kernels
    except ImportError as err:
        import prefix_rft

        raise SystemExit(
            f"cannot import prefix_rft.kernels ({err}); prefix_rft came from "
            f"{os.path.dirname(prefix_rft.__file__)}. Install the package (pip install . or "
            "pip install -e .) and run the script by path from outside the repository root "
            "(python /path/to/benchmarks/NAME.py), not `python -m` from the root."
        ) from err
    return kernels


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def percentiles(samples_ms: Sequence[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of timing samples in milliseconds."""
    t = torch.tensor(list(samples_ms), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def make_row(op: str, impl: str, mode: str, shape: str, samples_ms: Sequence[float] | None,
             peak_mb: float | None, extra: str = "") -> dict:
    p20 = p50 = p80 = float("nan")
    if samples_ms:
        p20, p50, p80 = percentiles(samples_ms)
    return {"op": op, "impl": impl, "mode": mode, "shape": shape,
            "ms_p20": f"{p20:.3f}", "ms_p50": f"{p50:.3f}", "ms_p80": f"{p80:.3f}",
            "peak_mb": "" if peak_mb is None else f"{peak_mb:.1f}",
            "device": device_name(), "commit": git_commit(),
            "date": _dt.date.today().isoformat(), "extra": extra}


def append_rows(csv_path: str, rows: Iterable[dict]) -> None:
    """Append rows to ``csv_path`` (header written when the file is new)."""
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})


def read_rows(csv_path: str) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def render_markdown(rows: Sequence[dict], title: str) -> str:
    """A Markdown table of the given rows (device, commit and date in each row)."""
    head = ["op", "impl", "mode", "shape", "ms_p50", "ms_p20", "ms_p80", "peak_mb", "extra",
            "device", "commit", "date"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_png(rows: Sequence[dict], png_path: str, title: str) -> None:
    """Grouped bar chart of p50 ms per (shape, mode) with one bar per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["shape"], r["mode"]) for r in rows})
    impls = sorted({r["impl"] for r in rows})
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, impl in enumerate(impls):
        ys = []
        for shape, mode in groups:
            match = [r for r in rows if r["impl"] == impl and r["shape"] == shape
                     and r["mode"] == mode and r["ms_p50"] not in ("", "nan")]
            ys.append(float(match[-1]["ms_p50"]) if match else 0.0)
        ax.bar([g + i * width for g in range(len(groups))], ys, width, label=impl)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{s}\n{m}" for s, m in groups], fontsize=7)
    ax.set_ylabel("ms (p50)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
