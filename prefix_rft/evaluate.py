"""avg@k and unbiased pass@k of a model on benchmark files.

    prefix-rft eval --model runs/x/final --data aime24.jsonl math500.jsonl --k 32
    prefix-rft eval --model DIR --data a.jsonl --k 8 --engine vllm --max-tokens 4096 --out DIR

Per benchmark file (jsonl / parquet / saved dataset, any training schema: ``--schema``,
detected per file by default; read with ``prefix_rft.data.read_questions``):
``n = k`` samples per question at temperature 0.6 / top-p 0.95 (defaults), rewarded with
``prefix_rft.reward.math_reward``. With ``c_i`` correct samples out of ``n`` for question i:

    avg@k    = mean_i c_i / n                                   (mean accuracy)
    pass@j   = mean_i [1 - C(n - c_i, j) / C(n, j)]   for j = 1, 2, 4, ..., k   (Codex estimator)

``pass@1`` equals ``avg@k``. Results go to ``eval_results.json`` and ``eval_results.md``
in ``--out`` (default ``<model>/eval``). Prompts are built exactly as for training
(``prefix_rft.data``: chat template + the instruction). Use :func:`evaluate_questions` to score
an in-memory model (the demo and the trainer's periodic eval do).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checks import choices
from .data import SCHEMAS, Question, prompt_messages, prompt_text, read_questions
from .data.options import DataConfig
from .runtime.distributed import Device


# ---------------------------------------------------------------------------- estimators
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with ``c`` correct out of ``n`` samples (Chen et al.
    2021): ``1 - C(n-c, k) / C(n, k)``, computed as a stable product."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if c > n:
        raise ValueError(f"c must be <= n={n}, got {c}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def pass_ks(k: int) -> list[int]:
    """The pass@j reported for ``k`` samples: 1, 2, 4, ... up to k (k always included)."""
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    return out + [k]


def summarize(correct_counts: Sequence[int], n: int) -> dict[str, float]:
    """``{"avg@n", "pass@1", "pass@2", ..., "pass@n", "num_questions"}`` from per-question
    counts."""
    if not correct_counts:
        raise ValueError("correct_counts must hold at least one question")
    out = {f"avg@{n}": sum(correct_counts) / (n * len(correct_counts))}
    for j in pass_ks(n):
        out[f"pass@{j}"] = sum(pass_at_k(n, c, j) for c in correct_counts) / len(correct_counts)
    out["num_questions"] = float(len(correct_counts))
    return out


# ---------------------------------------------------------------------------- sampling
def _prompt_ids(tokenizer, questions: Sequence[Question], prompt_template: str,
                system_prompt: str | None) -> list[list[int]]:
    return [tokenizer.encode(prompt_text(tokenizer, prompt_messages(q.messages, prompt_template,
                                                                    system_prompt)),
                             add_special_tokens=False) for q in questions]


def evaluate_questions(model, tokenizer, questions: Sequence[Question], k: int, *,
                       temperature: float = 0.6, top_p: float = 0.95,
                       max_response_tokens: int = 1024, engine=None, batch_questions: int = 32,
                       seed: int = 0, prompt_template: str | None = None,
                       system_prompt: str | None = None,
                       progress: bool = False) -> dict[str, Any]:
    """Sample ``k`` responses per question and score them against ``question.answer``.

    Args:
        model: a transformers causal LM (sampled with the default engine when ``engine`` is
            None; unused otherwise).
        tokenizer: its tokenizer (chat template used when present).
        questions: :class:`prefix_rft.data.Question` s (``prefix_rft.data.read_questions``).
        engine: a :class:`prefix_rft.rollout.RolloutEngine` to sample with instead.
        batch_questions: questions per ``generate`` call.
        seed: question i is sampled with seed ``seed + i`` (reproducible, batch-independent).
        prompt_template: as ``data.prompt_template``; None = the training default.
        system_prompt: as ``data.system_prompt`` (None keeps the file's own system message).

    Returns ``summarize(...)`` plus ``"correct"`` (per-question counts), ``"k"``,
    ``"mean_response_tokens"``, ``"seconds"``.
    """
    from .reward import math_rewards
    from .rollout import DEFAULT_ENGINE, RolloutRequest, SamplingSettings, make_engine

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not questions:
        raise ValueError("questions must hold at least one question")
    start = time.perf_counter()
    engine = engine or make_engine(DEFAULT_ENGINE, model, tokenizer, seed=seed)
    if prompt_template is None:
        prompt_template = DataConfig().prompt_template
    prompts = _prompt_ids(tokenizer, questions, prompt_template, system_prompt)
    correct, lengths = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(questions), desc="eval", unit="q", dynamic_ncols=True)
    for lo in range(0, len(questions), batch_questions):
        chunk = range(lo, min(len(questions), lo + batch_questions))
        requests = [RolloutRequest(prompts[i], (), n=k, sampling=SamplingSettings(
            temperature=temperature, top_p=top_p, max_new_tokens=max_response_tokens,
            seed=seed + i)) for i in chunk]
        with torch.no_grad():
            outputs = engine.generate(requests)
        texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True)
                 for out in outputs for s in out]
        golds = [questions[i].answer for i in chunk for _ in range(k)]
        rewards, _ = math_rewards(texts, golds)
        lengths += [len(s.response_ids) for out in outputs for s in out]
        correct += [int(sum(rewards[j * k:(j + 1) * k])) for j in range(len(chunk))]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    result: dict[str, Any] = summarize(correct, k)
    result.update(correct=correct, k=k, mean_response_tokens=sum(lengths) / len(lengths),
                  seconds=time.perf_counter() - start)
    return result


# ---------------------------------------------------------------------------- reports
def render_markdown(results: dict[str, dict[str, Any]], k: int) -> str:
    """A Markdown table: one row per benchmark, avg@k and pass@j columns."""
    cols = [f"avg@{k}"] + [f"pass@{j}" for j in pass_ks(k)]
    lines = ["| benchmark | questions | " + " | ".join(cols) + " |",
             "|---|---:|" + "|".join("---:" for _ in cols) + "|"]
    for name, r in results.items():
        cells = [f"{100 * r[c]:.1f}" for c in cols]
        lines.append(f"| {name} | {int(r['num_questions'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(percent; pass@j is the unbiased estimator from k samples)\n"


def build_parser() -> argparse.ArgumentParser:
    from .rollout import DEFAULT_ENGINE, engine_names

    ap = argparse.ArgumentParser(prog="prefix-rft eval", description="avg@k and unbiased pass@k "
                                 "of a local HF model on benchmark files (jsonl/parquet, any "
                                 "training schema).")
    ap.add_argument("--model", required=True, help="local HF model directory")
    ap.add_argument("--data", required=True, nargs="+",
                    help="benchmark files (.jsonl/.json/.parquet or saved dataset directories)")
    ap.add_argument("--k", type=int, default=32, help="samples per question (default 32)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-tokens", type=int, default=8192, help="max response tokens")
    ap.add_argument("--engine", choices=engine_names(), default=DEFAULT_ENGINE,
                    help="rollout engine (the registry in prefix_rft.rollout)")
    ap.add_argument("--batch-questions", type=int, default=32, help="questions per generate call")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                    help="for engines that reserve GPU memory")
    ap.add_argument("--schema", choices=("auto", *SCHEMAS), default="auto",
                    help="row schema of the files, as data.schema (default: detected per file)")
    ap.add_argument("--problem-key", default="problem", help="flat schema: question field")
    ap.add_argument("--answer-key", default="answer", help="flat schema: gold answer field")
    ap.add_argument("--prompt-template", default=None,
                    help="as data.prompt_template: authors | luffy | verl | none | a custom "
                         "'...{question}...' string (default: training's)")
    ap.add_argument("--max-rows", type=int, default=0, help="first N questions per file; 0 = all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=choices(Device), default="auto")
    ap.add_argument("--out", default=None, help="output directory (default: <model>/eval)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _load(args, device: str):
    """``(tokenizer, engine)``: the engine named by ``--engine`` over the model directory."""
    from transformers import AutoTokenizer

    from .rollout import engine_class

    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model must be a local HF model directory with config.json, "
                         f"got {args.model!r}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    engine = engine_class(args.engine).from_pretrained(
        args.model, tokenizer, device=torch.device(device), seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization)
    return tokenizer, engine


def _check_arguments(args: argparse.Namespace) -> None:
    """The numeric options, the prompt template and the device, before any file is read
    (a :class:`UserError` naming the option)."""
    from .data.templates import check_template
    from .errors import UserError

    if args.k < 1 or args.max_tokens < 1 or not 0 < args.top_p <= 1 or args.temperature < 0:
        raise UserError(f"need --k >= 1, --max-tokens >= 1, 0 < --top-p <= 1, --temperature "
                        f">= 0, got {args.k}, {args.max_tokens}, {args.top_p}, "
                        f"{args.temperature}")
    if args.batch_questions < 1 or args.max_rows < 0:
        raise UserError(f"need --batch-questions >= 1 and --max-rows >= 0, got "
                        f"{args.batch_questions}, {args.max_rows}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise UserError(f"--gpu-memory-utilization must be in (0, 1], got "
                        f"{args.gpu_memory_utilization}")
    if args.prompt_template is not None:
        try:
            check_template(args.prompt_template)
        except ValueError as err:
            raise UserError(str(err).replace("data.prompt_template", "--prompt-template")) from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch.cuda.is_available() is False (use --device cpu)")


def main(argv: Sequence[str] | None = None) -> int:
    """``prefix-rft eval`` entry point; returns 0. A user mistake raises
    :class:`~prefix_rft.errors.UserError` (the CLI prints one line, exit status 2)."""
    from .errors import UserError, writing

    args = build_parser().parse_args(argv)
    _check_arguments(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        data_cfg = DataConfig(schema=args.schema, problem_key=args.problem_key,
                              answer_key=args.answer_key, max_rows=args.max_rows)
        benchmarks = {Path(p).stem: read_questions(p, data_cfg, what="--data") for p in args.data}
        tokenizer, engine = _load(args, device)
    except ValueError as err:
        raise UserError(str(err)) from err
    results = {}
    for name, questions in benchmarks.items():
        results[name] = evaluate_questions(
            None, tokenizer, questions, args.k, temperature=args.temperature, top_p=args.top_p,
            max_response_tokens=args.max_tokens, engine=engine,
            batch_questions=args.batch_questions, seed=args.seed,
            prompt_template=args.prompt_template,
            progress=not args.no_progress)
        print(f"{name}: avg@{args.k} {results[name][f'avg@{args.k}']:.4f}  "
              f"pass@{args.k} {results[name][f'pass@{args.k}']:.4f}", flush=True)
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    with writing(out):  # a read-only or full disk: one line, not a traceback
        out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("no_progress",)}
    report = {"settings": settings, "results": results}
    (out / "eval_results.json").write_text(json.dumps(report, indent=1))
    (out / "eval_results.md").write_text(render_markdown(results, args.k))
    print(f"wrote {out / 'eval_results.json'} and {out / 'eval_results.md'}", flush=True)
    return 0 if all(math.isfinite(r[f"avg@{args.k}"]) for r in results.values()) else 1
