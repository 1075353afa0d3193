"""``prefix-rft demo``: the whole method on a CPU in minutes, start to finish.

    prefix-rft demo                                  # runs/demo, seed 0, configs/demo.yaml
    prefix-rft demo --quick                          # a few steps on a micro model (CI smoke)
    prefix-rft demo --seed 1 --steps 200 --threads 2 --optim.lr=2e-4

Stages (each logs as it goes; training shows the trainer's progress bar):

1. ``prepare_demo``: build or reuse the task (hard train / held-out splits), the tokenizer
   and the base model under ``{workdir}/assets`` (manifest-checked, so a second run reuses).
2. Evaluate the base on the held-out hard split: ``k`` samples per question, avg@k,
   pass@k, mean response tokens (``prefix_rft.evaluate.evaluate_questions``).
3. Train with Prefix-RFT through ``prefix_rft.train.train(cfg)`` -- the same loop, config and
   ``from_pretrained`` path a real model takes. The config is ``configs/demo.yaml`` with the
   paths pointed at ``{workdir}``, then any ``--section.field=value`` overrides.
4. Evaluate the trained model the same way (same seed, same sampling settings).
5. Print the before/after table; write ``{workdir}/run`` (config.yaml, metrics.jsonl,
   checkpoints, ``final/`` model, ``plots/*.png``, ``demo_results.json`` / ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .task import DEMONSTRATORS

# configs/demo.yaml of the source tree (the project is installed editable from a clone).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
QUICK_STEPS = 3  # --quick: training steps


def _log(message: str) -> None:
    print(message, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="prefix-rft demo",
        description="Prefix-RFT end to end on an embedded arithmetic task with a tiny Qwen2 "
                    "model on CPU: build/reuse the task, tokenizer and base model, evaluate, "
                    "train, evaluate again, print a before/after table.",
        epilog="Any trainer config field can be overridden as --section.field=value "
               "(e.g. --optim.lr=2e-4 --rollout.group_size=8); see prefix_rft/config.py.",
        allow_abbrev=False)
    ap.add_argument("--workdir", default="runs/demo",
                    help="assets go to WORKDIR/assets, the training run to WORKDIR/run (default "
                         "runs/demo)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the task, base model, training and eval")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps (default: the config's)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: micro model, tiny data, {QUICK_STEPS} steps, "
                         "small eval (< 90 s)")
    ap.add_argument("--demonstrator", choices=DEMONSTRATORS, default="expert",
                    help="who wrote the training demonstrations: expert (exact, the default), "
                         "systematic (every x*k computed as x+k on problems with a '*'; gold "
                         "answers stay correct) or off_style (correct, in words the base model "
                         "never writes)")
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                    help="rollout engine for training (evaluation always uses the HF engine)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice, usually one per core)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG),
                    help="trainer YAML (default configs/demo.yaml)")
    ap.add_argument("--eval-k", type=int, default=8,
                    help="samples per held-out question (default 8)")
    ap.add_argument("--eval-rows", type=int, default=0, help="held-out questions to score; 0 = all")
    ap.add_argument("--eval-temperature", type=float, default=1.0,
                    help="sampling temperature of the before/after evaluation (default 1.0)")
    return ap


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options plus the ``--section.field=value`` trainer overrides (checked, one clean error)."""
    from ..config import split_overrides

    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    try:
        overrides = split_overrides(extra)
    except ValueError as err:
        parser.error(str(err))
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.eval_k < 1 or args.eval_rows < 0:
        parser.error(f"--eval-k must be >= 1 and --eval-rows >= 0, got {args.eval_k}, "
                     f"{args.eval_rows}")
    if not args.eval_temperature > 0:
        parser.error(f"--eval-temperature must be > 0, got {args.eval_temperature}")
    if not Path(args.config).is_file():
        parser.error(f"--config: {args.config!r} does not exist (run from a clone of the "
                     f"repository, or pass --config configs/demo.yaml)")
    return args, overrides


def asset_paths(workdir: str) -> dict[str, str]:
    """Where ``prepare_demo`` writes (known before it runs, so the config is checked first)."""
    assets = os.path.join(workdir, "assets")
    return {"model": os.path.join(assets, "model"), "train": os.path.join(assets, "train.jsonl"),
            "test": os.path.join(assets, "test.jsonl")}


def demo_config(args: argparse.Namespace, overrides: list[str], paths: dict[str, Any]):
    """``--config`` with the paths pointed at the workdir, then the user's overrides."""
    from ..config import load_config

    run_dir = os.path.join(args.workdir, "run")
    ours = [f"--model.path={paths['model']}", f"--data.train_files=[{paths['train']}]",
            f"--train.run_dir={run_dir}", f"--train.seed={args.seed}",
            f"--eval.files=[{paths['test']}]",
            f"--rollout.engine={args.engine}", "--train.device=cpu"]
    if args.steps is not None:
        ours.append(f"--train.steps={args.steps}")
    if args.quick:
        ours += [f"--train.steps={args.steps or QUICK_STEPS}", "--train.prompts_per_step=2",
                 "--rollout.group_size=4", "--rollout.max_response_tokens=24",
                 "--checkpoint.every=0", "--eval.every=0", "--log.tensorboard=false"]
    return load_config(args.config, ours + overrides)


def evaluate_model(model_dir: str, questions: list, args, cfg, label: str) -> dict[str, Any]:
    """avg@k / pass@k / mean response tokens of the model in ``model_dir`` on ``questions``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluate import evaluate_questions

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _log(f"[demo] evaluating the {label} model: {len(questions)} held-out questions x "
         f"{args.eval_k} samples (T={args.eval_temperature}, top-p 1.0, "
         f"max {cfg.rollout.max_response_tokens} tokens)")
    result = evaluate_questions(
        model, tokenizer, questions, args.eval_k, temperature=args.eval_temperature, top_p=1.0,
        max_response_tokens=cfg.rollout.max_response_tokens, seed=args.seed,
        prompt_template=cfg.data.prompt_template, system_prompt=cfg.data.system_prompt,
        progress=True)
    result.pop("correct", None)
    return result


def render_table(before: dict, after: dict, k: int) -> str:
    """Markdown before/after table: avg@k, pass@1, pass@k (percent), mean response tokens."""
    cols = [(f"avg@{k}", f"avg@{k}", True), ("pass@1", "pass@1", True),
            (f"pass@{k}", f"pass@{k}", True),
            ("mean response tokens", "mean_response_tokens", False)]
    lines = ["| model | " + " | ".join(c[0] for c in cols) + " |",
             "|---|" + "|".join("---:" for _ in cols) + "|"]
    for name, r in (("base", before), ("Prefix-RFT", after)):
        cells = [f"{100 * r[key]:.1f}" if pct else f"{r[key]:.1f}" for _, key, pct in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_before_after(before: dict, after: dict, k: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"avg@{k}", f"pass@{k}"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    width = 0.38
    for i, (name, r) in enumerate((("base", before), ("Prefix-RFT", after))):
        xs = [j + (i - 0.5) * width for j in range(len(keys))]
        bars = ax.bar(xs, [100 * r[key] for key in keys], width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("demo: held-out hard problems")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any] | None:
    """The five stages of the module docstring; returns the results dict that is also saved
    (None when training was stopped early; it can be resumed)."""
    import torch

    from ..data import read_questions
    from ..train import train
    from .base import DemoSettings, prepare_demo, quick_settings

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    _log(f"[demo] workdir {args.workdir}, seed {args.seed}, {torch.get_num_threads()} torch threads"
         + (" (quick smoke run)" if args.quick else ""))
    cfg = demo_config(args, overrides, asset_paths(args.workdir))  # bad overrides fail here, early
    settings = quick_settings() if args.quick else DemoSettings()
    settings.demonstrator = args.demonstrator
    paths = prepare_demo(args.workdir, seed=args.seed, settings=settings, log=_log)
    timings["prepare"] = time.perf_counter() - start
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and cfg.checkpoint.resume == "none":
        _log(f"[demo] removing the previous run in {run_dir}")
        shutil.rmtree(run_dir)
    questions = read_questions(paths["test"], what="demo test split")
    questions = questions[: args.eval_rows] if args.eval_rows else questions
    k = 2 if args.quick else args.eval_k
    args.eval_k = k

    t0 = time.perf_counter()
    before = evaluate_model(paths["model"], questions, args, cfg, "base")
    timings["eval_base"] = time.perf_counter() - t0
    _log(f"[demo] base: avg@{k} {100 * before[f'avg@{k}']:.1f}%  pass@{k} "
         f"{100 * before[f'pass@{k}']:.1f}%  ({timings['eval_base']:.1f}s)")

    t0 = time.perf_counter()
    _log(f"[demo] training: {cfg.loss.algo}, {cfg.train.steps} steps x "
         f"{cfg.train.prompts_per_step} questions x {cfg.rollout.group_size} rollouts "
         f"({cfg.prefix.num_prefixed} from a "
         f"demonstration prefix), lr {cfg.optim.lr:g}, engine {cfg.rollout.engine}")
    result = train(cfg)
    timings["train"] = time.perf_counter() - t0
    if not result.get("final_model_dir"):  # a signal (Ctrl-C) or train.max_steps_per_run
        _log(f"[demo] training stopped after {result['steps_done']} of {cfg.train.steps} steps "
             f"(checkpoint in {run_dir}); continue with the same command plus "
             f"--checkpoint.resume=auto")
        return None

    t0 = time.perf_counter()
    after = evaluate_model(result["final_model_dir"], questions, args, cfg, "trained")
    timings["eval_after"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    table = render_table(before, after, k)
    plot = plot_before_after(before, after, k, run_dir / "plots" / "before_after.png")
    results = {"before": before, "after": after, "k": k, "eval_temperature": args.eval_temperature,
               "eval_questions": len(questions), "seed": args.seed, "steps": result["steps_done"],
               "timings_s": timings, "torch_threads": torch.get_num_threads(),
               "assets_reused": paths["reused"], "overrides": overrides, "run_dir": str(run_dir),
               "final_model_dir": result["final_model_dir"]}
    (run_dir / "demo_results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (run_dir / "demo_results.md").write_text(
        f"Held-out hard problems: {len(questions)} questions x {k} samples at "
        f"T={args.eval_temperature} (percent)\n\n{table}", encoding="utf-8")
    _log("")
    _log(table)
    _log(f"[demo] {len(questions)} held-out questions x {k} samples, T={args.eval_temperature}; "
         f"times: prepare {timings['prepare']:.0f}s, base eval {timings['eval_base']:.0f}s, "
         f"train {timings['train']:.0f}s, final eval {timings['eval_after']:.0f}s, "
         f"total {timings['total']:.0f}s")
    _log(f"[demo] run directory: {run_dir} (metrics.jsonl, plots/, final/, demo_results.md; "
         f"plot {plot.name})")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``prefix-rft demo`` entry point: 0 on success, 1 when training was stopped early
    (argument errors exit with status 2; a user mistake raises
    :class:`~prefix_rft.errors.UserError`, which the CLI prints as one line, status 2)."""
    import sys

    from ..errors import UserError

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        demo_config(args, overrides, asset_paths(args.workdir))
    except ValueError as err:  # a bad override or config value: one clean line, before any work
        raise UserError(str(err)) from err
    return 0 if run_demo(args, overrides) is not None else 1


if __name__ == "__main__":
    import sys

    from ..cli import main as cli_main

    raise SystemExit(cli_main(["demo", *sys.argv[1:]]))
