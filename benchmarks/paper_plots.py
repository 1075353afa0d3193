"""The two PNGs of ``benchmarks/paper_repro.py``'s report: test accuracy per method and slice
(bars), and validation curves (avg@k vs training step, mean and min-max band over seeds)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from benchmarks.paper_analysis import methods_of, score_matrix, slice_mask
from prefix_rft.metrics_log import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_bars(table, header, rows, slices, path: Path) -> None:
    """Per variant (one panel each): test avg@k per method on all and base-unsolvable
    questions, ± std over seeds."""
    plt = _pyplot()
    variants = header["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(6.5 * len(variants), 4), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        methods = methods_of(table, variant)
        for j, name in enumerate(("all", "unsolvable")):
            mask = slice_mask(slices, "test", name)
            stats = []
            for m in methods:
                _, scores = score_matrix(rows, variant, m, "test", mask)
                per_seed = scores.mean(axis=1) if scores.size else np.array([math.nan])
                stats.append((100 * np.mean(per_seed), 100 * np.std(per_seed, ddof=0)))
            ax.bar([i + (j - 0.5) * 0.4 for i in range(len(methods))],
                   [0 if math.isnan(m) else m for m, _ in stats], 0.4,
                   yerr=[0 if math.isnan(s) else s for _, s in stats], capsize=3,
                   label=f"{name} questions")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, fontsize=7, rotation=25)
        ax.set_ylabel(f"test avg@{table['eval']['k']}, %")
        ax.set_title(f"{variant}, seeds {header['seeds']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def method_curve(run_dirs: list[str], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over a method's chained stages (steps continue across)."""
    steps, values, offset = [], [], 0
    for run_dir in run_dirs:
        metrics = read_metrics(Path(run_dir) / "metrics.jsonl")
        for m in metrics:
            if key in m and m[key] is not None:
                steps.append(offset + int(m["step"]))
                values.append(float(m[key]))
        offset += max((int(m["step"]) for m in metrics), default=0)
    return steps, values


def render_curves(table, header, rows, path: Path) -> None:
    """Per variant: validation avg@k (logged during training) vs step for every trained method,
    the mean over seeds as a line and the min-max over seeds as a band."""
    plt = _pyplot()
    curve = table["eval"].get("curve") or {}
    key = f"eval/validation/avg@{curve.get('k', 1)}"
    variants = header["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for method in methods_of(table, variant):
            runs = {}
            for r in rows:
                if (r["status"] == "ok" and r["variant"] == variant and r["method"] == method
                        and r.get("run_dirs")):
                    runs[r["seed"]] = r["run_dirs"]
            series = [method_curve(d, key) for d in runs.values()]
            series = [s for s in series if s[0]]
            if not series:
                continue
            width = min(len(s[0]) for s in series)
            values = 100 * np.array([s[1][:width] for s in series])
            steps = series[0][0][:width]
            ax.plot(steps, values.mean(axis=0), label=method, linewidth=1.2)
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"validation avg@{curve.get('k', 1)}, %")
        ax.set_title(f"{variant}: mean and min-max over seeds", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
