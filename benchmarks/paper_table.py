"""A miniature of the paper's table on the embedded demo task: base, SFT, RFT, Prefix-RFT
and the two ablations, several seeds each, the same training budget, held-out avg@k/pass@k.

    python -m benchmarks.paper_table                        # full table (paper_table.yaml)
    python -m benchmarks.paper_table --smoke --out /tmp/t   # CI-sized, < 90 s
    python -m benchmarks.paper_table --seeds 0 1 2 --set train.steps=30

Superseded by ``benchmarks/paper_repro.py`` (issue 15): a validation split, per-method lr
sweeps, a base model that never saw the training split, a mini-batch smaller than the
rollout batch, OOD evaluations and paired statistics. Its table awaits a full run.
``benchmarks/results/paper_table.md`` keeps this script's measured numbers. Since issue 15,
the demo's base mix no longer draws on the training split, so a re-run of this script
measures a different base model than those numbers.

Every run goes through the real ``prefix_rft.train.train(cfg)`` loop. A run's config is
``--config`` (default: the table config's ``base_config``, the demo's config) <- the table
config's ``common`` <- ``budget`` <- the method's overrides <- ``--set`` overrides, plus the
paths of the shared assets (``prepare_demo``: one base model for all methods) and the run's
own ``train.run_dir`` / ``train.seed``. Nothing is tuned per method beyond the method's line.

Budget: the same ``train.steps x train.prompts_per_step`` questions (same order per seed),
each rolled out ``rollout.group_size`` times, i.e. the same optimizer steps and rollouts for
every method. The tokens each method updates on differ by construction (SFT: one
demonstration per question) and are reported per run as ``trained_tokens``.

Outputs (``--out PREFIX``): ``PREFIX.md`` (mean +- std over seeds, the command, device, commit,
date, wall time), ``PREFIX.csv`` (one row per (method, seed)), ``PREFIX.png`` (bars with
std error bars). Each finished run is cached as ``{workdir}/results/{method}_seed{seed}.json``;
a re-run skips runs whose cache says "ok" (failed runs are retried). A failing run is
recorded as failed, with its error, and the table goes on.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from benchmarks.results_io import device_name, git_commit

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TABLE_CONFIG = REPO_ROOT / "benchmarks" / "paper_table.yaml"
CSV_COLUMNS = ["method", "seed", "status", "avg_at_k", "pass_at_k", "k", "eval_questions",
               "mean_response_tokens", "trained_tokens", "train_steps", "questions", "rollouts",
               "final_train_reward", "train_s", "eval_s", "error", "device", "commit", "date"]
TABLE_KEYS = ("base_config", "workdir", "assets", "seeds", "budget", "common", "methods", "eval")


def log(message: str) -> None:
    print(f"[paper_table {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------- config
def load_table_config(path: str | Path, smoke: bool = False) -> dict[str, Any]:
    """The table config as a dict; with ``smoke`` its ``smoke`` section replaces the top-level
    fields it names (``budget`` and ``eval`` are merged key by key)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"table config: {str(path)!r} does not exist")
    table = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    missing = [k for k in TABLE_KEYS if k not in table]
    if missing:
        raise ValueError(f"table config {str(path)!r}: missing fields {missing}")
    smoke_section = table.pop("smoke", None) or {}
    if smoke:
        for key, value in smoke_section.items():
            if key not in TABLE_KEYS:
                raise ValueError(f"table config smoke.{key}: expected one of {TABLE_KEYS}")
            if isinstance(value, dict) and isinstance(table[key], dict):
                table[key] = {**table[key], **value}
            else:
                table[key] = value
    if not isinstance(table["methods"], dict) or not table["methods"]:
        raise ValueError("table config methods: expected a non-empty mapping name -> overrides")
    return table


def as_overrides(mapping: dict[str, Any] | None) -> list[str]:
    """``{"train.steps": 3}`` -> ``["--train.steps=3"]`` (values in YAML syntax)."""
    out = []
    for key, value in (mapping or {}).items():
        if isinstance(value, str):
            text = value
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip()
        text = text.removesuffix("\n...").strip()
        out.append(f"--{key}={text}")
    return out


def run_overrides(table: dict, method: str, seed: int, assets: dict, run_dir: Path,
                  extra: list[str]) -> list[str]:
    """The full override list of one training run (see the module docstring for the order)."""
    own = table["methods"][method]
    if own is None:
        raise ValueError(f"method {method!r} has no training (null overrides)")
    return (as_overrides(table["common"]) + as_overrides(table["budget"])
            + [f"--{o}" if not o.startswith("--") else o for o in own]
            + [f"--{o}" if not o.startswith("--") else o for o in extra]
            + [f"--model.path={assets['model']}", f"--model.tokenizer_path={assets['model']}",
               f"--data.train_files=[{assets['train']}]", f"--train.run_dir={run_dir}",
               f"--train.seed={seed}",
               # the table evaluates every final model itself; an in-training eval curve
               # (the demo config's) would only cost time, equally for every method
               "--eval.every=0", "--eval.files=[]"])


# ---------------------------------------------------------------------------- one run
def evaluate_model_dir(model_dir: str, test_questions: list, eval_cfg: dict, seed: int,
                       max_response_tokens: int, prompt_template: str | None) -> dict[str, Any]:
    """avg@k, pass@k, mean response tokens of a saved HF model on ``test_questions`` (CPU,
    fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefix_rft.evaluate import evaluate_questions

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    k = int(eval_cfg["k"])
    result = evaluate_questions(
        model, tokenizer, test_questions, k, temperature=float(eval_cfg["temperature"]),
        top_p=float(eval_cfg["top_p"]), max_response_tokens=max_response_tokens,
        batch_questions=int(eval_cfg.get("batch_questions", 32)), seed=seed,
        prompt_template=prompt_template)
    return {"avg_at_k": result[f"avg@{k}"], "pass_at_k": result[f"pass@{k}"], "k": k,
            "eval_questions": len(test_questions),
            "mean_response_tokens": result["mean_response_tokens"],
            "eval_s": result["seconds"]}


def train_one(table: dict, method: str, seed: int, assets: dict, workdir: Path, config_path: str,
              extra: list[str]) -> dict[str, Any]:
    """Train one (method, seed) through ``train(cfg)``; returns its training facts."""
    from prefix_rft.config import load_config
    from prefix_rft.metrics_log import read_metrics
    from prefix_rft.train import train

    run_dir = workdir / method / f"seed{seed}"
    if run_dir.exists():  # a half-finished earlier attempt: start clean, never mix runs
        shutil.rmtree(run_dir)
    cfg = load_config(config_path, run_overrides(table, method, seed, assets, run_dir, extra))
    start = time.perf_counter()
    result = train(cfg)
    if not result["final_model_dir"]:
        raise RuntimeError(f"train() stopped after {result['steps_done']} steps without a "
                           f"final model")
    steps = read_metrics(Path(result["run_dir"]) / "metrics.jsonl")
    return {"model_dir": result["final_model_dir"], "train_s": time.perf_counter() - start,
            "trained_tokens": int(sum(r.get("update_tokens", 0) for r in steps)),
            "train_steps": int(result["steps_done"]),
            "questions": cfg.train.steps * cfg.train.prompts_per_step,
            "rollouts": cfg.train.steps * cfg.train.prompts_per_step * cfg.rollout.group_size,
            "final_train_reward": (float(steps[-1].get("reward_mean", math.nan)) if steps
                                   else math.nan)}


def run_one(table: dict, method: str, seed: int, assets: dict, workdir: Path, config_path: str,
            extra: list[str], test_questions: list) -> dict[str, Any]:
    """Train (unless ``base``) and evaluate one (method, seed); never raises: a failure gives a
    row with ``status: failed`` and the error."""
    from prefix_rft.config import load_config

    row: dict[str, Any] = {"method": method, "seed": seed, "status": "ok", "error": "",
                           "device": device_name(), "commit": git_commit(),
                           "date": _dt.datetime.now(_dt.timezone.utc).strftime(
                               "%Y-%m-%d %H:%M UTC")}
    try:
        # The training config of the cell also fixes the eval length and the instruction.
        cfg = load_config(config_path, as_overrides(table["common"]) + as_overrides(table["budget"])
                          + [f"--{o}" if not o.startswith("--") else o for o in extra]
                          + [f"--model.path={assets['model']}"])
        if table["methods"][method] is None:
            facts = {"model_dir": assets["model"], "train_s": 0.0, "trained_tokens": 0,
                     "train_steps": 0, "questions": 0, "rollouts": 0,
                     "final_train_reward": math.nan}
        else:
            facts = train_one(table, method, seed, assets, workdir, config_path, extra)
        row.update(facts)
        max_tokens = int(table["eval"].get("max_response_tokens")
                         or cfg.rollout.max_response_tokens)
        row.update(evaluate_model_dir(facts["model_dir"], test_questions, table["eval"], seed,
                                      max_tokens, cfg.data.prompt_template))
    except Exception as error:  # noqa: BLE001 -- recorded in the table, the other runs go on
        row.update(status="failed", error=f"{type(error).__name__}: {error}"[:300])
        log(f"{method} seed {seed} FAILED: {row['error']}")
        traceback.print_exc()
    return row


# ---------------------------------------------------------------------------- reports
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value, nan for none)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def summarize_methods(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: number of ok / failed runs and (mean, std) of the numeric columns."""
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r["status"] == "ok"]
        summary = {"method": method, "ok": len(ok), "failed": len(mine) - len(ok),
                   "errors": sorted({r["error"] for r in mine if r["status"] != "ok"})}
        for key in ("avg_at_k", "pass_at_k", "mean_response_tokens", "trained_tokens", "train_s"):
            summary[key] = mean_std([r[key] for r in ok])
        summary["k"] = ok[0]["k"] if ok else ""
        out.append(summary)
    return out


def _pm(pair: tuple[float, float], scale: float = 1.0, digits: int = 1) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "--"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def render_markdown(summaries: list[dict], table: dict, header: dict) -> str:
    """The results file: provenance, budget, the mean ± std table, failures."""
    k = next((s["k"] for s in summaries if s["k"] != ""), table["eval"]["k"])
    num_rows = table["eval"]["num_rows"]
    first = f"first {num_rows}" if num_rows else "all"
    lines = ["# Paper table, miniature (embedded demo task)", "",
             f"- command: `{header['command']}`",
             f"- device: {header['device']}; commit {header['commit']}; date {header['date']}; "
             f"wall time {header['wall_s'] / 60:.1f} min",
             f"- base config: `{header['config']}`; seeds {header['seeds']}; budget per run "
             f"(same for every method): {header['budget']}",
             f"- eval: {first} held-out questions, k = {k} samples "
             f"each, temperature {table['eval']['temperature']}, top-p {table['eval']['top_p']}",
             "- avg@k and pass@k in percent, mean ± sample std over seeds; response length in "
             "tokens; trained tokens = tokens through the update's forward/backward passes "
             "(prompt + response of every updated sequence: the trainer's update_tokens summed "
             "over steps)", "",
             f"| method | runs ok | avg@{k} | pass@{k} | response tokens | trained tokens "
             "| train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        runs = f"{s['ok']}/{s['ok'] + s['failed']}"
        lines.append(f"| {s['method']} | {runs} | {_pm(s['avg_at_k'], 100)} | "
                     f"{_pm(s['pass_at_k'], 100)} | {_pm(s['mean_response_tokens'])} | "
                     f"{_pm(s['trained_tokens'], digits=0)} | "
                     f"{_pm(s['train_s'], digits=0)} |")
    failures = [(s["method"], e) for s in summaries for e in s["errors"]]
    if failures:
        lines += ["", "Failed runs:"] + [f"- {m}: `{e}`" for m, e in failures]
    return "\n".join(lines) + "\n"


def render_png(summaries: list[dict], png_path: str | Path, title: str) -> None:
    """Bars of avg@k and pass@k per method (percent) with ±std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["method"] for s in summaries]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 4))
    width = 0.38
    k = next((s["k"] for s in summaries if s["k"] != ""), "k")
    for j, (key, label) in enumerate((("avg_at_k", f"avg@{k}"), ("pass_at_k", f"pass@{k}"))):
        means = [0.0 if math.isnan(s[key][0]) else 100 * s[key][0] for s in summaries]
        stds = [0.0 if math.isnan(s[key][1]) else 100 * s[key][1] for s in summaries]
        ax.bar([i + (j - 0.5) * width for i in range(len(names))], means, width, yerr=stds,
               capsize=3, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8, rotation=15)
    ax.set_ylabel("held-out accuracy, %")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def write_csv(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in CSV_COLUMNS})


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paper_table",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--table-config", default=str(DEFAULT_TABLE_CONFIG),
                    help="the table's own config")
    ap.add_argument("--config", default=None,
                    help="training config (default: the table config's base_config)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="default: the table config's seeds")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="subset of the table config's methods")
    ap.add_argument("--smoke", action="store_true",
                    help="CI-sized run (the table config's smoke section)")
    ap.add_argument("--out", default="benchmarks/results/paper_table",
                    help="output prefix (.md/.csv/.png)")
    ap.add_argument("--workdir", default=None,
                    help="assets, run dirs, per-run cache (default: table config)")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                    help="training-config overrides applied to every run (after the budget)")
    ap.add_argument("--no-resume", action="store_true", help="rerun runs whose cached result is ok")
    ap.add_argument("--analysis", default=None,
                    help="a Markdown file appended verbatim under '## Analysis' (written by hand "
                         "after reading the numbers; re-rendering the table keeps it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Runs every (method, seed), writes the outputs; returns 0 when every run is ok, else 1."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    wall_start = time.perf_counter()
    table = load_table_config(args.table_config, smoke=args.smoke)
    config_path = str(args.config or REPO_ROOT / table["base_config"])
    seeds = list(args.seeds if args.seeds is not None else table["seeds"])
    methods = list(args.methods or table["methods"])
    unknown = [m for m in methods if m not in table["methods"]]
    if args.analysis and not Path(args.analysis).is_file():
        raise SystemExit(f"paper_table: --analysis {args.analysis!r} is not a file")
    if unknown or not seeds:
        raise SystemExit(f"paper_table: unknown methods {unknown} (known: "
                         f"{list(table['methods'])}) or no seeds {seeds}")
    workdir = Path(args.workdir or table["workdir"])
    from prefix_rft.demo.base import prepare_demo

    log(f"assets in {workdir / 'assets'} (quick={table['assets']['quick']})")
    assets = prepare_demo(str(workdir), seed=int(table["assets"]["seed"]),
                          quick=bool(table["assets"]["quick"]), log=log)
    from prefix_rft.data import read_questions

    num_rows = int(table["eval"]["num_rows"])
    test_questions = read_questions(assets["test"], what="held-out split")[:num_rows or None]
    cache = workdir / "results"
    cache.mkdir(parents=True, exist_ok=True)
    rows, total, n = [], len(methods) * len(seeds), 0
    # seed-major: a run that is stopped part-way still has every method for its finished seeds
    for seed in seeds:
        for method in methods:
            n += 1
            path = cache / f"{method}_seed{seed}.json"
            if path.is_file() and not args.no_resume:
                cached = json.loads(path.read_text(encoding="utf-8"))
                if cached.get("status") == "ok":
                    log(f"[{n}/{total}] {method} seed {seed}: cached ({path})")
                    rows.append(cached)
                    continue
            log(f"[{n}/{total}] {method} seed {seed}: start "
                f"({time.perf_counter() - wall_start:.0f}s elapsed)")
            row = run_one(table, method, seed, assets, workdir, config_path, args.overrides,
                          test_questions)
            path.write_text(json.dumps(row, indent=1, default=str), encoding="utf-8")
            rows.append(row)
            if row["status"] == "ok":
                log(f"[{n}/{total}] {method} seed {seed}: avg@{row['k']} "
                    f"{100 * row['avg_at_k']:.1f}%  pass@{row['k']} "
                    f"{100 * row['pass_at_k']:.1f}%  len {row['mean_response_tokens']:.1f}  "
                    f"trained tokens {row['trained_tokens']}  train {row['train_s']:.0f}s  "
                    f"eval {row['eval_s']:.0f}s")
    summaries = summarize_methods(rows, methods)
    header = {"command": "python -m benchmarks.paper_table "
              + " ".join(shlex.quote(a) for a in argv),
              "device": device_name(), "commit": git_commit(),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "wall_s": time.perf_counter() - wall_start, "config": config_path, "seeds": seeds,
              "budget": ", ".join(f"{k}={v}" for k, v in table["budget"].items())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render_markdown(summaries, table, header)
    if args.analysis:
        text += "\n## Analysis\n\n" + Path(args.analysis).read_text(encoding="utf-8").strip() + "\n"
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    write_csv(rows, out.with_suffix(".csv"))
    render_png(summaries, out.with_suffix(".png"),
               f"held-out accuracy, mean ± std over seeds {seeds}")
    log(f"wrote {out.with_suffix('.md')}, .csv, .png ({header['wall_s']:.0f}s)")
    print(out.with_suffix(".md").read_text(encoding="utf-8"), flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
