"""A fair miniature of the paper's comparison, reproduced by one resumable command.

    OMP_NUM_THREADS=1 python -m benchmarks.paper_repro           # everything (~90 min, see below)
    OMP_NUM_THREADS=1 python -m benchmarks.paper_repro --quick   # smoke test of every stage (CI)

Config: ``benchmarks/paper_repro.yaml`` (what each choice is and why). Stages:

1. Task + base model (``benchmarks/paper_task.py``): train / validation / test / OOD (more
   operations) / unseen-phrasing splits, disjoint; the base model's SFT uses problems that are
   not in the training split; the training split in two demonstrator variants (``expert``,
   ``systematic``: multiplication mis-applied on the subclass of problems with a ``*``).
2. Per variant, a learning-rate sweep of SFT, RFT and Prefix-RFT on the validation split
   (seed ``sweep.seed``); the best validation avg@k picks each method's lr.
3. Per variant and seed, every method (base, SFT, RFT, Prefix-RFT, its two ablations,
   SFT->RFT) trains once through ``prefix_rft.train.train(cfg)`` with the selected lrs and the
   same budget, then is scored once on test, OOD and phrasing at each eval setting.
4. Report (``benchmarks/paper_report.py``): mean ± std over seeds, paired differences against
   Prefix-RFT per seed with a bootstrap CI over questions, the selected lrs; ``--out``.md /
   .csv / .png.

Resume: a training run is cached by the hash of its full override list (a sweep run whose lr
is selected *is* the seed-``sweep.seed`` run of the table, not trained twice), an evaluation by
(model, split, setting, k, seed); both under ``{workdir}/cache``. Re-running the command
skips what is cached; a failed run is recorded and retried on the next invocation.

Budget: the full run took 57 min on an idle 2-core CPU with the two variants as two
processes side by side (``--variants expert`` / ``--variants systematic``, one shared cache;
the assets built once first), 55 min each; ``--quick`` about 30 s.
The report prints the measured wall time; re-run the same command to resume.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from benchmarks.paper_task import VARIANTS, TableTask, prepare_table_assets

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "benchmarks" / "paper_repro.yaml"
def log(message: str) -> None:
    print(f"[paper_repro {time.strftime('%H:%M:%S')}] {message}", flush=True)


def as_overrides(mapping: dict[str, Any] | None) -> list[str]:
    """``{"train.steps": 3}`` -> ``["--train.steps=3"]`` (values in YAML syntax)."""
    out = []
    for key, value in (mapping or {}).items():
        text = value if isinstance(value, str) else yaml.safe_dump(
            value, default_flow_style=True).strip()
        out.append(f"--{key}={text.removesuffix(chr(10) + '...').strip()}")
    return out


KEYS = ("base_config", "workdir", "variants", "seeds", "assets", "sweep", "budget", "common",
        "methods", "reference", "eval")


def load_config(path: str | Path, quick: bool = False) -> dict[str, Any]:
    """The table config; with ``quick`` its ``quick`` section replaces the fields it names."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--table-config: {str(path)!r} does not exist")
    table = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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
    return table


class Runner:
    """Trains and evaluates with caching; one instance per command."""

    def __init__(self, table: dict, workdir: Path, extra: list[str]):
        self.table, self.workdir, self.extra = table, workdir, extra
        self.cache = workdir / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.config_path = str(REPO_ROOT / table["base_config"])
        self.timings: dict[str, float] = {"train": 0.0, "eval": 0.0, "assets": 0.0}
        self.counts = {"train": 0, "eval": 0}
        self._loaded: tuple = (None, None, None)

    # ------------------------------------------------------------------ assets
    def assets(self) -> dict[str, str]:
        from prefix_rft.demo.base import SFTConfig

        a = self.table["assets"]
        start = time.perf_counter()
        paths = prepare_table_assets(str(self.workdir), int(a["seed"]), TableTask(**a["task"]),
                                     SFTConfig(**a["sft"]), a["model_size"], log=log)
        self.timings["assets"] += time.perf_counter() - start
        self.paths = paths
        return paths

    # ------------------------------------------------------------------ training
    def _stage_overrides(self, variant: str, stage: dict, lr: float, steps: int, seed: int,
                         model: str, run_dir: Path) -> list[str]:
        own = [f"--{o}" if not o.startswith("--") else o for o in stage["set"] + self.extra]
        budget = {**self.table["budget"], "train.steps": steps}
        return (as_overrides(self.table["common"]) + as_overrides(budget) + own
                + [f"--optim.lr={lr:g}", f"--model.path={model}",
                   f"--model.tokenizer_path={model}",
                   f"--data.train_files=[{self.paths['train_' + variant]}]",
                   f"--train.run_dir={run_dir}", f"--train.seed={seed}",
                   "--eval.every=0", "--eval.files=[]"])

    def train(self, variant: str, method: str, seed: int, lrs: dict[str, float]) -> str:
        """The final model dir of ``method`` (its stages chained), trained unless cached."""
        from prefix_rft.config import load_config as load_train_config
        from prefix_rft.train import train

        model = self.paths["model"]
        for stage in self.table["methods"][method]:
            steps = max(1, round(float(stage["share"]) * int(self.table["budget"]["train.steps"])))
            lr = float(lrs[stage["lr_of"]])
            probe = self._stage_overrides(variant, stage, lr, steps, seed, model, Path("RUN"))
            key = hashlib.sha256(json.dumps(probe).encode()).hexdigest()[:16]
            run_dir = self.workdir / "runs" / key
            record = self.cache / f"train_{key}.json"
            if record.is_file() and json.loads(record.read_text())["status"] == "ok":
                model = json.loads(record.read_text())["model_dir"]
                continue
            start = time.perf_counter()
            if run_dir.exists():  # a half-finished earlier attempt: start clean
                shutil.rmtree(run_dir)
            overrides = self._stage_overrides(variant, stage, lr, steps, seed, model, run_dir)
            log(f"train {variant}/{method} seed {seed} lr {lr:g} steps {steps} ({key})")
            try:
                result = train(load_train_config(self.config_path, overrides))
                if not result["final_model_dir"]:
                    raise RuntimeError("train() stopped without a final model")
            except Exception as error:  # noqa: BLE001 -- recorded, the table goes on
                record.write_text(json.dumps({"status": "failed", "error": repr(error)[:300]}))
                raise
            seconds = time.perf_counter() - start
            self.timings["train"] += seconds
            self.counts["train"] += 1
            model = result["final_model_dir"]
            record.write_text(json.dumps({"status": "ok", "model_dir": model, "seconds": seconds,
                                          "overrides": overrides}, indent=1))
        return model

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model_dir: str, split: str, setting: dict, seed: int) -> dict[str, Any]:
        """Per-question scores (fraction of k correct) of a model on a split, cached."""
        ev = self.table["eval"]
        k, max_tokens = int(ev["k"]), int(ev["max_response_tokens"][split])
        key_src = json.dumps([model_dir, split, setting, k, max_tokens, seed])
        key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        record = self.cache / f"eval_{key}.json"
        if record.is_file():
            return json.loads(record.read_text())
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from prefix_rft.data import read_questions
        from prefix_rft.evaluate import evaluate_questions

        questions = read_questions(self.paths[split])
        start = time.perf_counter()
        if self._loaded[0] != model_dir:  # one load per model for all its splits / settings
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            self._loaded = (model_dir, model, tokenizer)
        _, model, tokenizer = self._loaded
        result = evaluate_questions(
            model, tokenizer, questions, k, temperature=float(setting["temperature"]),
            top_p=float(setting["top_p"]), max_response_tokens=max_tokens,
            batch_questions=int(ev.get("batch_questions", 50)), seed=seed,
            prompt_template=self.prompt_template())
        out = {"scores": [c / k for c in result["correct"]], "avg": result[f"avg@{k}"],
               "pass": result[f"pass@{k}"], "k": k, "length": result["mean_response_tokens"],
               "seconds": time.perf_counter() - start}
        self.timings["eval"] += out["seconds"]
        self.counts["eval"] += 1
        record.write_text(json.dumps(out))
        return out

    def prompt_template(self) -> str:
        """The training config's prompt template, so evaluation prompts match training's."""
        from prefix_rft.config import load_config as load_train_config

        return load_train_config(self.config_path, []).data.prompt_template


def run_sweep(runner: Runner, variant: str) -> tuple[dict[str, float], list[dict]]:
    """Each swept method at each lr on validation; returns (selected lrs, sweep rows)."""
    sweep = runner.table["sweep"]
    seed, select = int(sweep["seed"]), sweep["select"]
    setting = {"temperature": select["temperature"], "top_p": select["top_p"]}
    chosen, rows = {}, []
    for method, lrs in sweep["lrs"].items():
        best = None
        for lr in lrs:
            row = {"variant": variant, "method": method, "lr": float(lr), "status": "ok"}
            try:
                model = runner.train(variant, method, seed, {method: float(lr)})
                row["val_avg"] = runner.evaluate(model, select["split"], setting, seed)["avg"]
                if best is None or row["val_avg"] > best[1]:
                    best = (float(lr), row["val_avg"])
            except Exception as error:  # noqa: BLE001
                row.update(status="failed", error=repr(error)[:200], val_avg=float("nan"))
                traceback.print_exc()
            rows.append(row)
        chosen[method] = best[0] if best else float(lrs[0])
        log(f"{variant}: {method} lr {chosen[method]:g} selected on {select['split']}")
    return chosen, rows


def run_table(runner: Runner, variant: str, lrs: dict[str, float], seeds: list[int]) -> list[dict]:
    """Every (method, seed, split, setting) of one variant: rows with per-question scores."""
    ev, rows = runner.table["eval"], []
    for seed in seeds:
        for method, stages in runner.table["methods"].items():
            base = {"variant": variant, "method": method, "seed": seed}
            try:
                model = runner.paths["model"] if stages is None else runner.train(
                    variant, method, seed, lrs)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                rows.append({**base, "status": "failed", "error": repr(error)[:200]})
                continue
            for split in ev["splits"]:
                for setting in ev["settings"]:
                    out = runner.evaluate(model, split, setting, seed)
                    rows.append({**base, "status": "ok", "split": split,
                                 "temperature": setting["temperature"],
                                 "top_p": setting["top_p"], **out})
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paper_repro",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--table-config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--quick", action="store_true", help="smoke test (the config's quick section)")
    ap.add_argument("--out", default=None,
                    help="output prefix (.md/.csv/.png); default benchmarks/results/paper_table"
                         " (with --quick: {workdir}/paper_repro_quick)")
    ap.add_argument("--workdir", default=None, help="default: the config's workdir")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="SECTION.FIELD=V",
                    help="trainer overrides for every run")
    ap.add_argument("--analysis", default=None, help="Markdown appended under '## Analysis'")
    return ap


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
    selected, sweep_rows, rows = {}, [], []
    for variant in variants:
        selected[variant], sweep = run_sweep(runner, variant)
        sweep_rows += sweep
    for variant in variants:  # test/OOD/phrasing only once every lr is fixed
        rows += run_table(runner, variant, selected[variant], seeds)
    out = Path(args.out or (workdir / "paper_repro_quick" if args.quick
                            else REPO_ROOT / "benchmarks" / "results" / "paper_table"))
    header = {"command": "python -m benchmarks.paper_repro " + " ".join(map(shlex.quote, argv)),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "wall_s": time.perf_counter() - wall, "seeds": seeds, "variants": variants,
              "timings": runner.timings, "counts": runner.counts}
    write_report(out, table, header, selected, sweep_rows, rows, args.analysis)
    log(f"wrote {out}.md/.csv/.png in {header['wall_s']:.0f}s "
        f"(new: {runner.counts['train']} trainings, {runner.counts['eval']} evaluations)")
    ok = all(r["status"] == "ok" for r in rows + sweep_rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
