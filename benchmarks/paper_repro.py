"""The paper's comparison in the hard regime, reproduced by one resumable command.

    OMP_NUM_THREADS=1 python -m benchmarks.paper_repro --parallel 2  # everything, resumable
    OMP_NUM_THREADS=1 python -m benchmarks.paper_repro --quick       # smoke test of every stage
    OMP_NUM_THREADS=1 python -m benchmarks.paper_repro --table-config \
        benchmarks/paper_repro_self.yaml --out benchmarks/results/paper_table_self
                                     # ``source: self`` over two passes (after the full run)

``--parallel 2`` builds the task, base model and slices, then runs the variants in two
single-thread child processes sharing the cache (``--variants expert`` and ``--variants
systematic off_style``: the same as starting those two by hand after ``--only-assets``), then
writes the report from the cache. Re-run the same command to resume.

Config: ``benchmarks/paper_repro.yaml`` (what each choice is and why). Stages:

1. Task + base model (``benchmarks/paper_task.py``): train / validation / test / OOD / unseen
   phrasing splits disjoint by arithmetic chain, the base model's SFT on chains outside all of
   them, and the training split written by each demonstrator (expert, systematic, off_style).
2. Slices: the base model's pass@k at T = 1 (k = ``slices.k``) on every split marks each
   question *base-solvable* (some sample correct) or *base-unsolvable* (none): the regime
   where RFT's group advantage is zero and only a demonstration prefix gives signal.
3. Per variant, a learning-rate sweep of each swept method on validation (seed
   ``sweep.seed``, outside the table's seeds), extended by ``sweep.factor`` past whichever end
   wins until the chosen lr is interior (at most ``sweep.max_extensions`` times).
4. Per variant and seed, every method trains once through ``prefix_rft.train.train(cfg)`` with
   the selected lrs and the same rollout budget (validation curve logged during training),
   then is scored once on test, OOD and phrasing.
5. Report (``benchmarks/paper_report.py``): per slice, mean ± std over seeds, paired
   differences against Prefix-RFT with a bootstrap over seeds x questions and Holm-adjusted
   p-values, validation curves, and the analysis of each claim; ``--out``.md / .csv / .png /
   _curves.png.

Resume: see ``benchmarks/paper_runner.py`` (runs and evaluations cached under
``{workdir}/cache``; two processes can share it). Re-running the same command skips what is
cached; a failed run is recorded and retried on the next invocation.

Budget (measured on 2026-12-07, ``benchmarks/results/paper_table.md``'s header): 173
trainings took 166 min of process time and 389 evaluations 28 min, so at most about 1 h 40 min on
an idle 2-core machine (one single-thread process per core), plus ~2 min for the assets and
slices; that run took 101 min of wall time while a test suite and the demo shared the cores
part of the way. The two ablations and the family rows run for the expert only: with the
ablations in the other variants the second process would need about 2 h 10 min.
``--quick`` takes about a minute of CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from benchmarks.paper_analysis import methods_of
from benchmarks.paper_runner import REPO_ROOT, Runner, as_overrides, log  # noqa: F401
from benchmarks.paper_task import VARIANTS

DEFAULT_CONFIG = REPO_ROOT / "benchmarks" / "paper_repro.yaml"
KEYS = ("base_config", "workdir", "variants", "seeds", "assets", "slices", "sweep", "budget",
        "common", "methods", "reference", "eval")


def _read_table(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--table-config: {str(path)!r} does not exist")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def load_config(path: str | Path, quick: bool = False) -> dict[str, Any]:
    """The table config; with ``quick`` its ``quick`` section replaces the fields it names.

    ``extends: PATH`` (relative to the repository root) takes every top-level field of that
    table config except its ``quick`` section, then this file's fields replace the ones they
    name: a table that changes only its rows shares the task, budget and cache of its parent."""
    table = _read_table(path)
    parent = table.pop("extends", None)
    if parent is not None:
        inherited = _read_table(REPO_ROOT / parent)
        if "extends" in inherited:
            raise ValueError(f"table config {str(path)!r}: extends {parent!r}, which extends "
                             "another table (one level only)")
        inherited.pop("quick", None)
        table = {**inherited, **table}
    quick_section = table.pop("quick", None) or {}
    if quick:
        table.update(quick_section)
    missing = [k for k in KEYS if k not in table]
    if missing:
        raise ValueError(f"table config {str(path)!r}: missing fields {missing}")
    if table["reference"] not in table["methods"]:
        raise ValueError(f"table config reference: {table['reference']!r} is not a method")
    bad = [v for v in table["variants"] if v not in VARIANTS]
    if bad:
        raise ValueError(f"table config variants: {bad} not in {VARIANTS}")
    for name, stages in table["methods"].items():
        for stage in stages or []:
            if stage.get("lr_of") not in table["sweep"]["lrs"]:
                raise ValueError(f"table config methods.{name}: lr_of must name a swept method")
    for variant, names in (table.get("variant_methods") or {}).items():
        unknown = [m for m in names if m not in table["methods"]]
        if unknown or table["reference"] not in names:
            raise ValueError(f"table config variant_methods.{variant}: {unknown} unknown, or "
                             f"the reference {table['reference']!r} missing")
    return table


def base_slices(runner: Runner) -> dict[str, dict]:
    """Per split: the base model's per-question correct counts at the slice setting and the
    base-solvable mask (``correct > 0``)."""
    sl = runner.table["slices"]
    setting = {"temperature": sl["temperature"], "top_p": sl["top_p"]}
    out = {}
    for split in sl["splits"]:
        result = runner.evaluate(runner.paths["model"], split, setting, int(sl["seed"]),
                                 k=int(sl["k"]))
        solvable = [c > 0 for c in result["correct"]]
        out[split] = {"solvable": solvable, "unsolvable_share": 1 - sum(solvable) / len(solvable),
                      "k": int(sl["k"])}
        log(f"slices: {split} base-unsolvable {100 * out[split]['unsolvable_share']:.0f}% "
            f"(pass@{sl['k']} = 0 at T={sl['temperature']:g})")
    return out


def _pick(tried: dict[float, float]) -> float:
    """Best validation score; a tie goes to the smaller lr (the more conservative step)."""
    ok = {lr: v for lr, v in tried.items() if not math.isnan(v)}
    if not ok:
        return min(tried)
    return max(sorted(ok), key=lambda lr: (ok[lr], -lr))


def sweep_method(runner: Runner, variant: str, method: str) -> tuple[float, list[dict]]:
    """One swept method: its lrs, then one more past the winning end until the winner is
    interior (or ``max_extensions`` is reached); returns (selected lr, rows)."""
    sweep = runner.table["sweep"]
    seed, select = int(sweep["seed"]), sweep["select"]
    setting = {"temperature": select["temperature"], "top_p": select["top_p"]}
    tried: dict[float, float] = {}
    todo, extensions, rows = sorted(float(x) for x in sweep["lrs"][method]), 0, []
    while todo:
        lr = todo.pop(0)
        row = {"variant": variant, "method": method, "lr": lr, "status": "ok"}
        try:
            model, _ = runner.train(variant, method, seed, {method: lr})
            row["val_avg"] = runner.evaluate(model, select["split"], setting, seed,
                                             k=int(select["k"]))["avg"]
        except Exception as error:  # noqa: BLE001
            row.update(status="failed", error=repr(error)[:200], val_avg=float("nan"))
            traceback.print_exc()
        tried[lr] = row["val_avg"]
        rows.append(row)
        best, ordered = _pick(tried), sorted(tried)
        if not todo and extensions < int(sweep["max_extensions"]) and len(ordered) > 1:
            if best == ordered[0]:
                todo, extensions = [best / float(sweep["factor"])], extensions + 1
            elif best == ordered[-1]:
                todo, extensions = [best * float(sweep["factor"])], extensions + 1
    best, ordered = _pick(tried), sorted(tried)
    for row in rows:
        row["selected"] = row["lr"] == best
        row["bracketed"] = ordered[0] < best < ordered[-1]
    log(f"{variant}: {method} lr {best:g} selected on {select['split']} "
        f"({'interior' if rows[0]['bracketed'] else 'an END of the swept range'})")
    return best, rows


def run_sweep(runner: Runner, variant: str) -> tuple[dict[str, float], list[dict]]:
    """Every swept method on validation; the base's validation score as a reference row."""
    sweep, chosen, rows = runner.table["sweep"], {}, []
    select = sweep["select"]
    setting = {"temperature": select["temperature"], "top_p": select["top_p"]}
    base = runner.evaluate(runner.paths["model"], select["split"], setting, int(sweep["seed"]),
                           k=int(select["k"]))
    rows.append({"variant": variant, "method": "base", "lr": float("nan"), "status": "ok",
                 "val_avg": base["avg"], "selected": False, "bracketed": False})
    needed = {st["lr_of"] for m in methods_of(runner.table, variant)
              for st in runner.table["methods"][m] or []}
    for method in sweep["lrs"]:
        if method in needed:
            chosen[method], method_rows = sweep_method(runner, variant, method)
            rows += method_rows
    return chosen, rows


def run_table(runner: Runner, variant: str, lrs: dict[str, float], seeds: list[int]) -> list[dict]:
    """Every (method, seed, split, setting) of one variant: rows with per-question counts."""
    ev, rows = runner.table["eval"], []
    for seed in seeds:
        for method in methods_of(runner.table, variant):
            stages = runner.table["methods"][method]
            base = {"variant": variant, "method": method, "seed": seed}
            try:
                model, run_dirs = ((runner.paths["model"], []) if stages is None
                                   else runner.train(variant, method, seed, lrs, curve=True))
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                rows.append({**base, "status": "failed", "error": repr(error)[:200]})
                continue
            for split in ev["splits"]:
                for setting in ev["settings"]:
                    out = runner.evaluate(model, split, setting, seed)
                    rows.append({**base, "status": "ok", "split": split, "run_dirs": run_dirs,
                                 "temperature": setting["temperature"],
                                 "top_p": setting["top_p"], **out})
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paper_repro",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--table-config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--quick", action="store_true", help="smoke test (the config's quick section)")
    ap.add_argument("--only-assets", action="store_true",
                    help="build the task, base model and slices, then stop (run once before "
                         "starting parallel processes)")
    ap.add_argument("--out", default=None,
                    help="output prefix (.md/.csv/.png); default benchmarks/results/paper_table"
                         " (with --quick: {workdir}/paper_repro_quick; with a subset of the "
                         "variants: {workdir}/paper_repro_<variants>)")
    ap.add_argument("--workdir", default=None, help="default: the config's workdir")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="SECTION.FIELD=V",
                    help="trainer overrides for every run")
    ap.add_argument("--parallel", type=int, default=1, metavar="N",
                    help="run the variants in N single-thread child processes sharing the cache "
                         "(the first variant alone, the rest split among the others), then "
                         "write the report here; one per core")
    return ap


def run_children(args, argv: list[str], variants: list[str]) -> bool:
    """``--parallel N``: the variants in N child processes of this command (one thread each),
    sharing the cache; True when every child exited 0. The first variant (the expert, with
    the ablations) is the largest share, so it runs alone."""
    import os
    import subprocess

    n = max(1, min(args.parallel, len(variants)))
    groups = [[variants[0]]] + [variants[1:][i::n - 1] for i in range(n - 1)] if n > 1 \
        else [variants]
    passthrough, skip = [], False
    for a in argv:  # everything but --parallel / --variants / --out and their values
        if skip and not a.startswith("--"):
            continue
        skip = a in ("--parallel", "--variants", "--out")
        if not skip:
            passthrough.append(a)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-m", "benchmarks.paper_repro", *passthrough,
                                  "--variants", *group], cwd=REPO_ROOT, env=env)
                for group in groups if group]
    log(f"--parallel: {len(children)} processes: {[g for g in groups if g]}")
    return all(child.wait() == 0 for child in children)


def default_out(args, workdir: Path, variants: list[str], table: dict) -> Path:
    """benchmarks/results/paper_table for the whole comparison; a process that runs a subset
    of the variants (one of two in parallel) writes its partial report under the workdir, so
    it never overwrites the committed results with half of them."""
    if set(variants) != set(table["variants"]):
        return workdir / ("paper_repro_" + "_".join(variants))
    if args.quick:
        return workdir / "paper_repro_quick"
    return REPO_ROOT / "benchmarks" / "results" / "paper_table"


def main(argv: list[str] | None = None) -> int:
    """Runs everything (cached parts reused) and writes the report; 0 when every run is ok."""
    from benchmarks.paper_report import write_report

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    wall = time.perf_counter()
    table = load_config(args.table_config, quick=args.quick)
    workdir = Path(args.workdir or table["workdir"])
    seeds = list(args.seeds or table["seeds"])
    variants = list(args.variants or table["variants"])
    runner = Runner(table, workdir, list(args.overrides))
    runner.assets()
    slices = base_slices(runner)
    if args.only_assets:
        return 0
    if args.parallel > 1:  # the children train and evaluate; this process then reports
        run_children(args, argv, variants)
    selected, sweep_rows, rows = {}, [], []
    for variant in variants:
        selected[variant], sweep = run_sweep(runner, variant)
        sweep_rows += sweep
    for variant in variants:  # test/OOD/phrasing only once every lr is fixed
        rows += run_table(runner, variant, selected[variant], seeds)
    out = Path(args.out or default_out(args, workdir, variants, table))
    header = {"command": "python -m benchmarks.paper_repro " + " ".join(map(shlex.quote, argv)),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "wall_s": time.perf_counter() - wall, "seeds": seeds, "variants": variants,
              "timings": runner.timings, "counts": runner.counts,
              "cache": runner.cache_totals()}
    write_report(out, table, header, selected, sweep_rows, rows, slices)
    log(f"wrote {out}.md/.csv/.png in {header['wall_s']:.0f}s "
        f"(new: {runner.counts['train']} trainings, {runner.counts['eval']} evaluations)")
    ok = all(r["status"] == "ok" for r in rows + sweep_rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
