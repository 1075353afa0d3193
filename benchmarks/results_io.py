"""What every benchmark script shares: run a case in a fresh process, append rows to a CSV,
render Markdown + PNG.

    result = run_case_in_subprocess("benchmarks.packing", ["--worker", ...], threads=1)
    rows = [make_row(op, impl, mode, shape, samples_ms, peak_mb, extra), ...]
    write_results(rows, "benchmarks/results/x.csv", "Title")    # CSV + .md + .png

Row columns (house rule): op, impl, mode, shape, ms_p20, ms_p50, ms_p80, peak_mb, device,
commit, date, plus free-form ``extra`` (a short ``key=value;...`` string, e.g. tokens/s;
:func:`extra_value` reads one back).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence

import torch

COLUMNS = ["op", "impl", "mode", "shape", "ms_p20", "ms_p50", "ms_p80", "peak_mb",
           "device", "commit", "date", "extra"]
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a PNG panel: (title, value of a row); the default panel is the p50 time
Panel = tuple[str, Callable[[dict], float]]


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


def run_case_in_subprocess(module: str, args: Sequence[str], *, threads: int | None = None,
                           nice: bool = False, env: dict | None = None,
                           cwd: str | None = REPO_ROOT, check: bool = True) -> dict:
    """``python -m module *args`` in a fresh process (its peak memory and imports are its own);
    returns its last stdout line parsed as JSON. ``module`` ending in ``.py`` runs that file by
    path instead (with ``cwd=None``, from the caller's directory, so an installed prefix_rft is
    not shadowed by the source checkout). ``threads`` pins OMP/MKL threads; ``nice`` lowers its
    priority; a failure raises with the end of its stderr, or with ``check=False`` prints that
    and returns ``{"failed": its last stderr line}`` (``;`` made ``,``, for an ``extra``)."""
    full_env = dict(os.environ if env is None else env)
    if threads is not None:
        full_env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    target = [module] if module.endswith(".py") else ["-m", module]
    cmd = (["nice"] if nice else []) + [sys.executable, *target, *args]
    out = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if out.returncode != 0:
        what = f"benchmark case {os.path.basename(module)} {' '.join(args)}"
        if check:
            raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        print(f"{what} failed:\n{out.stderr[-3000:]}", flush=True)
        tail = [line for line in out.stderr.strip().splitlines() if line.strip()]
        return {"failed": (tail[-1] if tail else f"exit {out.returncode}")
                .replace(";", ",")[:160]}
    lines = out.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"benchmark case {module} {' '.join(args)} printed nothing")
    return json.loads(lines[-1])


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


def extra_value(row: dict, key: str) -> float:
    """One ``key=value`` of a row's ``extra`` column, as a float."""
    return float(dict(kv.split("=", 1) for kv in row["extra"].split(";") if kv)[key])


def _p50(row: dict) -> float:
    return float(row["ms_p50"]) if row["ms_p50"] not in ("", "nan") else float("nan")


def render_png(rows: Sequence[dict], png_path: str, title: str,
               panels: Sequence[Panel] | None = None) -> None:
    """Grouped bar chart per (shape, mode), one bar per impl (the latest row of each), one
    panel per ``(panel title, value of a row)``; default one panel of p50 ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(panels) if panels else [("ms (p50)", _p50)]
    groups = sorted({(r["shape"], r["mode"]) for r in rows})
    impls = sorted({r["impl"] for r in rows})
    width = 0.8 / max(len(impls), 1)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 1.6 * len(groups)) * len(panels), 4),
                             squeeze=False)
    for ax, (panel_title, value) in zip(axes[0], panels):
        for i, impl in enumerate(impls):
            ys = []
            for shape, mode in groups:
                match = [r for r in rows if r["impl"] == impl and r["shape"] == shape
                         and r["mode"] == mode]
                y = value(match[-1]) if match else 0.0
                ys.append(0.0 if y != y else y)  # NaN (no timing) draws as no bar
            ax.bar([g + i * width for g in range(len(groups))], ys, width, label=impl)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{s}\n{m}" for s, m in groups], fontsize=7)
        ax.set_title(panel_title if len(panels) > 1 else title, fontsize=9)
        if len(panels) == 1:
            ax.set_ylabel(panel_title)
        ax.legend(fontsize=7)
    if len(panels) > 1:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def write_results(rows: Sequence[dict], csv_path: str, title: str, *,
                  panels: Sequence[Panel] | None = None, png: bool = True,
                  png_title: str | None = None,
                  png_rows: Callable[[list[dict]], list[dict]] | None = None,
                  markdown: Callable[[list[dict]], str] | None = None,
                  render: Callable[[list[dict], str], None] | None = None) -> list[dict]:
    """Append ``rows`` to ``csv_path``, then render every row of it to ``<stem>.md`` and (when
    ``png``) ``<stem>.png`` (:func:`render_png` with ``panels``, titled ``png_title`` or
    ``title``, of ``png_rows(every row)`` when given; no PNG when that selects nothing).
    A script whose table or chart is its own passes ``markdown(rows) -> text`` (instead of
    :func:`render_markdown`) or ``render(rows, png_path)`` (instead of :func:`render_png`).
    Returns all rows."""
    append_rows(csv_path, rows)
    every = read_rows(csv_path)
    stem = os.path.splitext(csv_path)[0]
    with open(stem + ".md", "w") as f:
        f.write(markdown(every) if markdown else render_markdown(every, title))
    plotted = png_rows(every) if png_rows else every
    if png and plotted:
        if render:
            render(plotted, stem + ".png")
        else:
            render_png(plotted, stem + ".png", png_title or title, panels)
    print(f"appended {len(rows)} rows to {csv_path} ({stem}.md{', .png' if png else ''})")
    return every
