"""The ratios ``benchmarks/trl.py`` states, computed from the rows of one run only.

A ratio is stated only between two cases of the same op (policy update, whole step,
generation) measured in the same run (``run=<id>`` in the row's ``extra``), with the cases
interleaved and at least ``MIN_REPEATS`` timed repeats each. Speed ratios divide the cases'
``tokens_per_s``, which is ``tokens / ms_p50`` of the same row, so a ratio and the table's
``ms_p50`` column can be checked against each other.
"""

from __future__ import annotations

MIN_REPEATS = 3
# (what the ratio says, numerator case, denominator case)
RATIOS = (
    ("drop-in vs TRL's own head (policy update)", "trl_prefix_rft", "trl"),
    ("drop-in vs TRL + Liger's GRPO loss (policy update)", "trl_prefix_rft", "trl_liger"),
    ("this trainer's update vs TRL's (policy update)", "prefix_rft_trainer", "trl"),
    ("this trainer's update vs TRL + Liger's GRPO loss (policy update)", "prefix_rft_trainer",
     "trl_liger"),
    ("this trainer's update vs the drop-in (policy update)", "prefix_rft_trainer",
     "trl_prefix_rft"),
    ("old-log-prob pass cost: trainer without vs with it", "prefix_rft_trainer",
     "prefix_rft_trainer+old"),
    ("this trainer's step vs TRL's trainer.train() step", "prefix_rft_e2e", "trl_e2e"),
    ("TRL trainer.train() with the drop-in vs stock", "trl_prefix_rft_e2e", "trl_e2e"),
    ("hf engine generation vs TRL's model.generate", "gen_hf_engine", "gen_trl"),
    ("hf engine, one shared random stream vs TRL's generate", "gen_hf_engine_unseeded",
     "gen_trl"),
)


def extra_fields(row: dict) -> dict[str, str]:
    """``"a=1;b=x"`` -> ``{"a": "1", "b": "x"}`` (the ``extra`` column of a results row)."""
    return dict(kv.split("=", 1) for kv in str(row.get("extra", "")).split(";") if "=" in kv)


def tokens_per_s(tokens: int, ms_p50: float) -> float:
    """Tokens per second at the median step time: the statistic of the ``ms_p50`` column."""
    return tokens / (ms_p50 / 1e3)


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows of the last run in ``rows`` (same ``run=`` id as the last row that has one)."""
    runs = [extra_fields(r).get("run") for r in rows]
    last = next((run for run in reversed(runs) if run), None)
    return [r for r, run in zip(rows, runs) if last is not None and run == last]


def run_ratios(rows: list[dict]) -> list[dict]:
    """Every ratio of ``RATIOS`` whose two cases are in ``rows`` (one run: the rows must share
    one ``run`` id, op and shape per pair) with >= ``MIN_REPEATS`` repeats each.

    Returns ``[{"what", "num", "den", "speed", "memory", "repeats"}]``: speed = tokens/s
    ratio (> 1: the numerator is faster), memory = step peak ratio (< 1: it uses less)."""
    run_ids = {extra_fields(r).get("run") for r in rows}
    if len(run_ids) != 1 or None in run_ids:
        raise ValueError(f"ratios need the rows of exactly one run, got run ids {run_ids}")
    by_case = {r["impl"]: r for r in rows}
    out = []
    for what, num, den in RATIOS:
        if num not in by_case or den not in by_case:
            continue
        a, b = by_case[num], by_case[den]
        if (a["op"], a["shape"]) != (b["op"], b["shape"]):
            continue
        repeats = min(int(extra_fields(r)["repeats"]) for r in (a, b))
        if repeats < MIN_REPEATS:
            continue
        speed = float(extra_fields(a)["tokens_per_s"]) / float(extra_fields(b)["tokens_per_s"])
        memory = (float(a["peak_mb"]) / float(b["peak_mb"])
                  if a.get("peak_mb") and b.get("peak_mb") and float(b["peak_mb"]) > 0
                  else float("nan"))
        out.append({"what": what, "num": num, "den": den, "speed": speed, "memory": memory,
                    "repeats": repeats})
    return out


def _ratio_section(run: list[dict], ratios: list[dict]) -> list[str]:
    run_id = extra_fields(run[-1])["run"]
    lines = [f"\n## Ratios of run {run_id}", "",
             f"From this run's rows only (cases interleaved, >= {MIN_REPEATS} timed repeats, "
             f"tokens/s at the median step time). Commit {run[-1].get('commit', '')}, "
             f"{run[-1].get('device', '')}, load {extra_fields(run[-1]).get('load', '?')}.", "",
             "| ratio | cases | speed (tokens/s) | step peak memory | repeats |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['num']} / {r['den']} | {r['speed']:.2f}x | "
              f"{r['memory']:.2f}x | {r['repeats']} |" for r in ratios]
    if not ratios:
        lines.append(f"| (none: this run has no pair of cases with >= {MIN_REPEATS} repeats) "
                     f"| | | | |")
    return lines


def render_ratios(rows: list[dict]) -> str:
    """A Markdown section per run that states a ratio, newest first (each from its own rows
    only); the latest run's section alone when none does (or why there are none)."""
    run = latest_run(rows)
    if not run:
        return "\n## Ratios\n\nNo run with a run id yet (rows from before ratios were kept).\n"
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        run_id = extra_fields(row).get("run")
        if run_id:
            by_run.setdefault(run_id, []).append(row)
    lines = []
    for run_rows in reversed(list(by_run.values())):
        ratios = run_ratios(run_rows)
        if ratios:
            lines += _ratio_section(run_rows, ratios)
    if not lines:
        lines = _ratio_section(run, [])
    return "\n".join(lines) + "\n"
