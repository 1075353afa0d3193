"""The report of ``benchmarks/paper_repro.py``: Markdown tables, a CSV and a PNG.

Per variant: the learning-rate sweep on validation (the selected lr per method), the test /
OOD / phrasing avg@k per method (mean ± sample std over seeds) at each eval setting, and the
paired differences against the reference method (Prefix-RFT): the mean difference with its
bootstrap CI over questions and the per-seed differences (``benchmarks/paper_stats.py``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from benchmarks.paper_stats import mean_std, paired_bootstrap
from benchmarks.results_io import device_name, git_commit

CSV_COLUMNS = ["variant", "method", "seed", "split", "temperature", "top_p", "status", "avg",
               "pass", "k", "length", "seconds", "error"]


def _setting_name(temperature, top_p) -> str:
    return f"T={float(temperature):g}/p={float(top_p):g}"


def _cells(rows, variant, method, split, temperature):
    return [r for r in rows if r["status"] == "ok" and r["variant"] == variant
            and r["method"] == method and r["split"] == split
            and float(r["temperature"]) == float(temperature)]


def paired_table(rows: list[dict], table: dict, variant: str) -> list[dict]:
    """One dict per (method != reference, split, setting): the bootstrap result."""
    ref, ev, out = table["reference"], table["eval"], []
    boot = ev.get("bootstrap", {})
    for method in table["methods"]:
        if method == ref:
            continue
        for split in ev["splits"]:
            for setting in ev["settings"]:
                mine = {r["seed"]: r for r in _cells(rows, variant, method, split,
                                                     setting["temperature"])}
                theirs = {r["seed"]: r for r in _cells(rows, variant, ref, split,
                                                       setting["temperature"])}
                seeds = sorted(set(mine) & set(theirs))
                if not seeds:
                    continue
                result = paired_bootstrap([mine[s]["scores"] for s in seeds],
                                          [theirs[s]["scores"] for s in seeds],
                                          n_boot=int(boot.get("n_boot", 2000)),
                                          alpha=float(boot.get("alpha", 0.05)))
                out.append({"method": method, "split": split, "seeds": seeds,
                            "setting": _setting_name(setting["temperature"], setting["top_p"]),
                            **result})
    return out


def render_markdown(table, header, selected, sweep_rows, rows) -> str:
    ev, k = table["eval"], table["eval"]["k"]
    t = header["timings"]
    lines = ["# Paper comparison, fair miniature (embedded task; issue 15)", "",
             f"- command: `{header['command']}`",
             f"- device: {device_name()}; commit {git_commit()}; date {header['date']}; wall "
             f"time {header['wall_s'] / 60:.1f} min (this invocation: "
             f"{header['counts']['train']} new trainings {t['train']:.0f} s, "
             f"{header['counts']['eval']} new evaluations {t['eval']:.0f} s, assets "
             f"{t['assets']:.0f} s)",
             f"- seeds {header['seeds']}; budget per run: "
             + ", ".join(f"{a}={b}" for a, b in table["budget"].items()),
             f"- avg@{k} in percent over {ev['splits']} (k = {k} samples per question); "
             "mean ± sample std over seeds; paired differences are method - "
             f"{table['reference']} with a {100 * (1 - ev['bootstrap']['alpha']):.0f}% "
             "bootstrap CI over questions (seeds averaged per question), per-seed differences "
             "in brackets", ""]
    for variant in header["variants"]:
        lines += [f"## Variant `{variant}`", "", "### Learning rates (validation, seed "
                  f"{table['sweep']['seed']})", "", "| method | lr | validation avg | selected |",
                  "|---|---:|---:|---|"]
        for r in (r for r in sweep_rows if r["variant"] == variant):
            mark = "yes" if selected[variant][r["method"]] == r["lr"] else ""
            lines.append(f"| {r['method']} | {r['lr']:g} | {100 * r['val_avg']:.1f} | {mark} |")
        cols = [(s, st) for s in ev["splits"] for st in ev["settings"]]
        lines += ["", "### Accuracy (scored once, with the selected lrs)", "",
                  "| method | " + " | ".join(f"{s} {_setting_name(st['temperature'], st['top_p'])}"
                                             for s, st in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for method in table["methods"]:
            cells = []
            for split, st in cols:
                mean, std = mean_std([r["avg"] for r in _cells(rows, variant, method, split,
                                                                st["temperature"])])
                cells.append("--" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", f"### Paired differences vs {table['reference']} (points of avg@{k})", "",
                  "| method | split | setting | diff | CI | per seed |",
                  "|---|---|---|---:|---|---|"]
        for p in paired_table(rows, table, variant):
            per_seed = ", ".join(f"{100 * d:+.1f}" for d in p["per_seed"])
            lines.append(f"| {p['method']} | {p['split']} | {p['setting']} | "
                         f"{100 * p['diff']:+.1f} | [{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}] "
                         f"| [{per_seed}] |")
        lines.append("")
    failed = [r for r in rows + sweep_rows if r["status"] != "ok"]
    if failed:
        lines += ["Failed runs:"] + [f"- {r['variant']} {r['method']}: `{r.get('error')}`"
                                     for r in failed]
    return "\n".join(lines) + "\n"


def render_png(table, header, rows, path: Path) -> None:
    """Per variant: test avg@k per method at the first eval setting, ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setting = table["eval"]["settings"][0]
    methods = list(table["methods"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(methods)), 4))
    width = 0.8 / max(1, len(header["variants"]))
    for j, variant in enumerate(header["variants"]):
        stats = [mean_std([r["avg"] for r in _cells(rows, variant, m, "test",
                                                      setting["temperature"])]) for m in methods]
        ax.bar([i + (j - 0.5 * (len(header["variants"]) - 1)) * width for i in range(len(methods))],
               [0 if math.isnan(m) else 100 * m for m, _ in stats], width,
               yerr=[0 if math.isnan(s) else 100 * s for _, s in stats], capsize=3, label=variant)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, fontsize=8, rotation=15)
    ax.set_ylabel(f"test avg@{table['eval']['k']}, %")
    ax.set_title(f"test, {_setting_name(setting['temperature'], setting['top_p'])}, "
                 f"seeds {header['seeds']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, table, header, selected, sweep_rows, rows, analysis=None) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render_markdown(table, header, selected, sweep_rows, rows)
    if analysis:
        text += "\n## Analysis\n\n" + Path(analysis).read_text(encoding="utf-8").strip() + "\n"
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    with open(out.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in CSV_COLUMNS})
    render_png(table, header, rows, out.with_suffix(".png"))
