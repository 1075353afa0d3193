"""The report of ``benchmarks/paper_repro.py``: Markdown tables, a CSV and two PNGs.

Per variant: the learning-rate sweep on validation (the base's validation score beside it,
whether each selected lr is interior), test / OOD / phrasing avg@k per method on all,
base-solvable and base-unsolvable questions (mean ± sample std over seeds), and the paired
differences against the reference method (``benchmarks/paper_analysis.py``,
``benchmarks/paper_stats.py``). Then the analysis of each claim. The CSV keeps every
question's correct count per (variant, method, seed, split) and the base-solvable mask, so
every number and CI can be recomputed from it (``read_csv_scores``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from benchmarks.paper_analysis import (
    SLICES,
    analysis_text,
    methods_of,
    paired_family,
    robustness,
    score_matrix,
    slice_mask,
)
from benchmarks.paper_stats import mean_std
from benchmarks.results_io import device_name, git_commit

CSV_COLUMNS = ["variant", "method", "seed", "split", "temperature", "top_p", "status", "k",
               "avg", "pass", "length", "seconds", "correct", "base_solvable", "error"]


def read_csv_scores(path) -> list[dict]:
    """The CSV's rows with ``correct`` (list of per-question counts), ``base_solvable`` (list
    of bools) and numbers parsed: what ``score_matrix`` / ``slice_mask`` read."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["status"] != "ok":
                continue
            out.append({**r, "seed": int(r["seed"]), "k": int(r["k"]),
                        "correct": [int(c) for c in r["correct"].split()],
                        "base_solvable": [c == "1" for c in r["base_solvable"]]})
    return out


def _header(table, header, slices) -> list[str]:
    ev, k, t = table["eval"], table["eval"]["k"], header["timings"]
    setting = ev["settings"][0]
    sl = table["slices"]
    lines = ["# Prefix-RFT vs SFT and RFT in the hard regime (embedded task)", "",
             f"- command: `{header['command']}`",
             f"- device: {device_name()}; commit {git_commit()}; date {header['date']}; wall "
             f"time of this invocation {header['wall_s'] / 60:.1f} min "
             f"({header['counts']['train']} new trainings {t['train']:.0f} s, "
             f"{header['counts']['eval']} new evaluations {t['eval']:.0f} s, assets "
             f"{t['assets']:.0f} s); the whole cache (all invocations and processes): "
             f"{header['cache']['trainings']} trainings {header['cache']['train_s'] / 60:.0f} "
             f"min, {header['cache']['evaluations']} evaluations "
             f"{header['cache']['eval_s'] / 60:.0f} min of process time",
             f"- seeds {header['seeds']}; budget per run: "
             + ", ".join(f"{a}={b}" for a, b in table["budget"].items()),
             f"- unit: a question's score is the fraction of its k = {k} samples correct at "
             f"T={setting['temperature']:g}, top-p {setting['top_p']:g} (mean over questions = "
             f"avg@{k}, in percent); mean ± sample std over seeds",
             f"- slices: a question is *base-unsolvable* when the base model's pass@{sl['k']} at "
             f"T={sl['temperature']:g} is 0 (seed {sl['seed']}); base-unsolvable share per "
             "split: " + ", ".join(f"{s} {100 * v['unsolvable_share']:.0f}%"
                                   for s, v in slices.items()),
             f"- paired differences: method - {table['reference']} per seed and question, "
             f"{100 * (1 - ev['bootstrap']['alpha']):.0f}% CI from a bootstrap over seeds x "
             f"questions (seeds resampled, then questions; {ev['bootstrap']['n_boot']} draws), "
             "p-values Holm-adjusted over each variant's family of differences", ""]
    return lines


def _sweep_lines(table, sweep_rows, variant) -> list[str]:
    sel = table["sweep"]["select"]
    lines = [f"### Learning rates (validation avg@{sel['k']}, T={sel['temperature']:g}, "
             f"seed {table['sweep']['seed']})", "",
             "| method | lr | validation avg | selected | interior |", "|---|---:|---:|---|---|"]
    mine = [r for r in sweep_rows if r["variant"] == variant]
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in mine))}
    for r in sorted(mine, key=lambda r: (order[r["method"]], -1 if math.isnan(r["lr"])
                                         else r["lr"])):
        lr = "--" if math.isnan(r["lr"]) else f"{r['lr']:g}"
        mark = "yes" if r.get("selected") else ""
        interior = ("yes" if r.get("bracketed") else "NO") if r.get("selected") else ""
        lines.append(f"| {r['method']} | {lr} | {100 * r['val_avg']:.1f} | {mark} | "
                     f"{interior} |")
    return lines


def _accuracy_lines(table, rows, variant, slices) -> list[str]:
    cols = [(s, name) for s in table["eval"]["splits"] for name in SLICES]
    lines = ["", "### Accuracy (scored once, with the selected lrs)", "",
             "| method | " + " | ".join(f"{s} {name}" for s, name in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for method in methods_of(table, variant):
        cells = []
        for split, name in cols:
            _, scores = score_matrix(rows, variant, method, split,
                                     slice_mask(slices, split, name))
            mean, std = mean_std(list(scores.mean(axis=1)) if scores.size else [])
            cells.append("--" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _paired_lines(table, family) -> list[str]:
    lines = ["", f"### Paired differences vs {table['reference']} (points of avg@"
             f"{table['eval']['k']})", "",
             "| method | split | slice | diff | CI | Holm p | n (seeds x questions) | per seed |",
             "|---|---|---|---:|---|---:|---|---|"]
    for p in family:
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in p["per_seed"])
        lines.append(f"| {p['method']} | {p['split']} | {p['slice']} | {100 * p['diff']:+.1f} | "
                     f"[{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}] | {p['p_holm']:.3f} | "
                     f"{p['seeds']} x {p['questions']} | [{per_seed}] |")
    return lines


def render_markdown(table, header, sweep_rows, rows, slices) -> tuple[str, dict]:
    lines, families = _header(table, header, slices), {}
    for variant in header["variants"]:
        lines += [f"## Variant `{variant}`", ""] + _sweep_lines(table, sweep_rows, variant)
        lines += _accuracy_lines(table, rows, variant, slices)
        families[variant] = paired_family(rows, table, variant, methods_of(table, variant), slices)
        lines += _paired_lines(table, families[variant]) + [""]
    robust = robustness(rows, table, header["variants"], slices)
    lines += ["## Analysis", "", analysis_text(families, robust, table)]
    failed = [r for r in rows + sweep_rows if r["status"] != "ok"]
    if failed:
        lines += ["Failed runs:"] + [f"- {r['variant']} {r['method']}: `{r.get('error')}`"
                                     for r in failed]
    return "\n".join(lines) + "\n", families


def write_csv(path: Path, rows, slices) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            out = {c: r.get(c, "") for c in CSV_COLUMNS}
            if r["status"] == "ok":
                out["correct"] = " ".join(str(c) for c in r["correct"])
                out["base_solvable"] = "".join("1" if s else "0"
                                               for s in slices[r["split"]]["solvable"])
            writer.writerow(out)


def write_report(out: Path, table, header, selected, sweep_rows, rows, slices) -> None:
    from benchmarks.paper_plots import render_bars, render_curves

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text, _ = render_markdown(table, header, sweep_rows, rows, slices)
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    write_csv(out.with_suffix(".csv"), rows, slices)
    render_bars(table, header, rows, slices, out.with_suffix(".png"))
    render_curves(table, header, rows, out.with_name(out.name + "_curves.png"))


def recompute_ci(csv_path, variant: str, method: str, reference: str, split: str,
                 name: str = "all", n_boot: int = 2000, alpha: float = 0.05) -> dict:
    """A paired difference recomputed from the CSV alone (what the report's table shows)."""
    from benchmarks.paper_stats import paired_bootstrap

    rows = read_csv_scores(csv_path)
    row = next(r for r in rows if r["split"] == split)
    mask = {"all": np.ones(len(row["base_solvable"]), bool),
            "solvable": np.array(row["base_solvable"]),
            "unsolvable": ~np.array(row["base_solvable"])}[name]
    _, a = score_matrix(rows, variant, method, split, mask)
    _, b = score_matrix(rows, variant, reference, split, mask)
    return paired_bootstrap(a, b, n_boot=n_boot, alpha=alpha)
