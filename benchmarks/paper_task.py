"""The fair table's task: splits, the demonstrator variants and the shared base model.

Built on the embedded demo task (``prefix_rft.demo.task``), without changing it:

- **Splits**, disjoint by arithmetic chain (operands and operators in order,
  ``prefix_rft.demo.task.problem_chain``), never merely by wording: ``train`` (hard problems
  with demonstrations, what every method trains on), ``base`` (what the base model's SFT
  sees: easy problems plus hard chains that are *not* in ``train``), ``validation`` and
  ``test`` (both from the demo's held-out part of the chain space, told apart by a second
  hash of the chain), ``ood`` (held-out chains with more operations than any training
  problem) and ``phrasing`` (held-out hard chains, none of them a test chain, in a wording no
  training problem uses). All tuning reads ``validation``; ``test``, ``ood`` and
  ``phrasing`` are scored once, at the end.
- **Demonstrator variants**: the demo task's flag (``prefix_rft.demo.task.DEMONSTRATORS``,
  ``prefix-rft demo --demonstrator``): ``expert`` writes the exact worked solution;
  ``systematic`` computes every ``x*k`` as ``x+k`` on problems with a multiplication, the
  gold ``answer`` staying correct, so a reward can unlearn the wrong mode SFT imitates;
  ``off_style`` is correct but in words the base never writes, so imitation is not free.

The base model is trained once per (seed, size) on the ``base`` split with the expert's
(correct) demonstrations, so both variants start from the same model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time

from prefix_rft.demo.task import (
    DEMONSTRATORS,
    DIFFICULTIES,
    INSTRUCTION,
    Difficulty,
    apply_demonstrator,
    chain_fraction,
    is_held_out_problem,
    make_problem,
    make_split,
    problem_chain,
    write_jsonl,
)
from prefix_rft.demo.task import in_systematic_subclass as in_subclass

VARIANTS = DEMONSTRATORS  # the demo task's demonstrator flag
# wording of the "phrasing" split; the demo's templates are "Compute/What is/Evaluate"
UNSEEN_TEMPLATE = "Work out the value of {expr} please."
# share of the held-out problem space (by a second hash) that is validation, the rest test
VALIDATION_SHARE = 0.5
# more operations than any training problem (hard: 3-4), same operands
OOD = Difficulty(min_steps=5, max_steps=6, max_operand=9, max_multiplier=5, max_value=99)


def is_validation_problem(problem: str) -> bool:
    """True when a held-out ``problem``'s chain belongs to validation (else to test)."""
    return chain_fraction(problem, salt="validation/") < VALIDATION_SHARE


def held_out_rows(num: int, difficulty, seed: int, split: str, template: str | None = None,
                  exclude=()) -> list[dict]:
    """``num`` distinct held-out problems of ``split`` (validation/test), seeded.

    ``template`` rewrites the problem text (the ``phrasing`` split); membership is decided by
    the chain, so a rephrased test problem is never a validation problem. Chains are distinct
    and none is in ``exclude`` (problem texts or chains).
    """
    if split not in ("validation", "test"):
        raise ValueError(f"split: expected 'validation' or 'test', got {split!r}")
    want_val = split == "validation"
    rng = random.Random(f"{seed}/{split}/{template}/{difficulty}")
    seen, rows, misses = {problem_chain(e) for e in exclude}, [], 0
    while len(rows) < num:
        row = make_problem(rng, difficulty)
        text = row["problem"]
        if (problem_chain(text) in seen or not is_held_out_problem(text)
                or is_validation_problem(text) != want_val):
            misses += 1
            if misses > 50_000:
                raise ValueError(f"num: only {len(rows)} {split} problems found, asked for {num}")
            continue
        seen.add(problem_chain(text))
        misses = 0
        if template is not None:
            expr = text.split(" ", 1)[1].rstrip(".?") if not text.startswith("What is") \
                else text[len("What is "):].rstrip("?")
            row["problem"] = template.format(expr=expr)
        row.update(id=f"{split}-{len(rows)}", subclass=in_subclass(row))
        rows.append(row)
    return rows


@dataclasses.dataclass
class TableTask:
    """Sizes of the table's splits (rows)."""

    num_train: int = 4000
    num_base_hard: int = 1000  # hard problems in the base mix (never in train)
    num_base_easy: int = 3000
    num_validation: int = 100
    num_test: int = 200
    num_ood: int = 100
    num_phrasing: int = 100


def build_splits(task: TableTask, seed: int) -> dict[str, list[dict]]:
    """All splits of the module docstring (expert demonstrations), disjoint by construction."""
    train = make_split("train", task.num_train, "hard", seed)
    for row in train:
        row["subclass"] = in_subclass(row)
    train_text = {r["problem"] for r in train}
    base_hard = make_split("train", task.num_base_hard, "hard", seed + 10_000, exclude=train_text)
    base = make_split("train", task.num_base_easy, "easy", seed) + base_hard
    validation = held_out_rows(task.num_validation, "hard", seed, "validation")
    test = held_out_rows(task.num_test, "hard", seed, "test")
    ood = held_out_rows(task.num_ood, OOD, seed, "test")
    phrasing = held_out_rows(task.num_phrasing, "hard", seed + 1, "test", UNSEEN_TEMPLATE,
                             exclude={r["problem"] for r in test})
    return {"train": train, "base": base, "validation": validation, "test": test, "ood": ood,
            "phrasing": phrasing}


def prepare_table_assets(workdir: str, seed: int, task: TableTask, sft, model_size: str,
                         log=print) -> dict[str, str]:
    """Write the splits (train per variant), tokenizer and base model under
    ``{workdir}/assets``; reuse them when ``manifest.json`` records the same settings.

    Returns paths: ``model``, ``train_expert``, ``train_systematic``, ``validation``,
    ``test``, ``ood``, ``phrasing``, ``base``.
    """
    from prefix_rft.demo.base import sft_train
    from prefix_rft.demo.model import build_tiny_model, save_model
    from prefix_rft.demo.tokenizer import build_tokenizer

    assets = os.path.join(workdir, "assets")
    paths = {name: os.path.join(assets, f"{name}.jsonl")
             for name in ("base", "validation", "test", "ood", "phrasing")}
    paths.update({f"train_{v}": os.path.join(assets, f"train_{v}.jsonl") for v in VARIANTS})
    paths["model"] = os.path.join(assets, "model")
    manifest_path = os.path.join(assets, "manifest.json")
    settings = {"seed": seed, "task": dataclasses.asdict(task), "sft": dataclasses.asdict(sft),
                "model_size": model_size, "hard": dataclasses.asdict(DIFFICULTIES["hard"]),
                "ood": dataclasses.asdict(OOD), "phrasing": UNSEEN_TEMPLATE}
    if os.path.isfile(manifest_path) and os.path.isfile(os.path.join(paths["model"],
                                                                     "config.json")):
        with open(manifest_path, encoding="utf-8") as f:
            if json.load(f).get("settings") == settings:
                log(f"assets reused from {assets}")
                return paths
    start = time.perf_counter()
    splits = build_splits(task, seed)
    for name in ("base", "validation", "test", "ood", "phrasing"):
        write_jsonl(splits[name], paths[name])
    for variant in VARIANTS:
        write_jsonl(apply_demonstrator(splits["train"], variant), paths[f"train_{variant}"])
    tok_dir = os.path.join(assets, "tokenizer")
    # the tokenizer sees what the base and the methods train on (every variant), no eval text
    seen_text = splits["base"] + [row for variant in VARIANTS
                                  for row in apply_demonstrator(splits["train"], variant)]
    tokenizer = build_tokenizer(seen_text, tok_dir, INSTRUCTION)
    model = build_tiny_model(tok_dir, None, size=model_size, seed=seed)
    losses = sft_train(model, tokenizer, splits["base"], sft, seed=seed, log=log)
    save_model(model, tokenizer, paths["model"])
    tail = losses[-10:] or [float("nan")]
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "final_sft_loss": sum(tail) / len(tail),
                   "seconds": time.perf_counter() - start}, f, indent=1)
    log(f"assets built in {time.perf_counter() - start:.0f}s ({assets})")
    return paths
