"""The demo's "base model" step and ``prepare_demo``.

Evaluation goes through ``prefix_rft.evaluate.evaluate_questions`` like every other model.

The paper starts from a pretrained base that already solves some hard problems. The
demo's stand-in: a tiny randomly initialized Qwen2 is briefly fine-tuned (plain SFT)
on a mix of mostly *easy* problems and a small share of *hard* ones, which leaves it a
low but non-zero pass rate on the hard held-out split -- room for Prefix-RFT to show.

The SFT loss is the mean token NLL of the response (demonstration + ``<|im_end|>``)
given the prompt. It is computed from the decoder's last hidden states and
``model.lm_head.weight`` on the response positions only (plain ``F.cross_entropy``;
the vocabulary is a few hundred tokens, so there is no need for the fused kernel).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import data
from .task import DEMONSTRATORS, INSTRUCTION


def encode_example(tokenizer, row: dict, template: str = "verl"):
    """(input_ids, labels) lists: prompt + demonstration + <|im_end|>; labels -100 on the prompt.

    The prompt is built by ``prefix_rft.data`` with a named prompt template, exactly as the
    trainer and the evaluator build it: ``"verl"`` appends the instruction (``INSTRUCTION``),
    ``"none"`` is the bare problem.
    """
    messages = data.prompt_messages([{"role": "user", "content": row["problem"]}], template,
                                    None)
    prompt_ids = tokenizer.encode(data.prompt_text(tokenizer, messages), add_special_tokens=False)
    response_ids = data.demo_token_ids(tokenizer, row["solution"])
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded batch: input_ids [B, T], attention_mask [B, T], labels [B, T]."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, mask, labels


def response_nll(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean NLL over response tokens; hidden [B,T,H] -> shift -> lm_head on labelled rows only.

    Equivalent torch: ``F.cross_entropy(model(input_ids).logits[:, :-1].flatten(0, 1),
    labels[:, 1:].flatten(), ignore_index=-100)``.
    """
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    hidden, targets = hidden[:, :-1], labels[:, 1:]
    keep = targets != -100
    logits = hidden[keep] @ model.lm_head.weight.T  # [N_response, V], V is tiny
    return F.cross_entropy(logits.float(), targets[keep])


@dataclass
class SFTConfig:
    steps: int = 600  # optimizer steps
    batch_size: int = 32  # sequences per step
    lr: float = 5e-3  # peak AdamW learning rate
    warmup_steps: int = 20  # linear warmup, then cosine decay to 10% of lr
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global grad norm
    bare_prompt_share: float = 0.75  # share of prompts without the instruction suffix
    log_every: int = 100  # steps between log lines (0: silent)


def sft_train(model, tokenizer, rows: list[dict], cfg: SFTConfig, seed: int = 0,
              log=print) -> list[float]:
    """Plain SFT on ``rows`` (shuffled, cycled); returns the per-step losses.

    Leaves the model in eval mode. Uses its own ``random.Random(seed)`` for batches.
    """
    if not rows:
        raise ValueError("rows: expected at least one training row, got none")
    if cfg.steps < 0 or cfg.batch_size < 1:
        raise ValueError(f"cfg: expected steps >= 0 and batch_size >= 1, got {cfg}")
    rng = random.Random(seed)
    examples = [
        encode_example(tokenizer, r, "none" if rng.random() < cfg.bare_prompt_share else "verl")
        for r in rows
    ]
    order: list[int] = []
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))

    model.train()
    losses, start = [], time.perf_counter()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [examples[order.pop()] for _ in range(cfg.batch_size)]
        ids, mask, labels = _collate(batch, tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = response_nll(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            log(f"  sft step {step + 1}/{cfg.steps}  loss {recent:.4f}  "
                f"{time.perf_counter() - start:.1f}s")
    model.eval()
    return losses


# ---------------------------------------------------------------- prepare_demo
@dataclass
class DemoSettings:
    """Everything ``prepare_demo`` builds; the manifest stores it to decide reuse."""

    model_size: str = "tiny"  # a key of model.MODEL_SIZES
    easy: str = "easy"  # difficulty preset of the base step's main data
    hard: str = "hard"  # difficulty preset of the RL train split and the held-out split
    num_train: int = 4000  # hard train rows (problem + demonstration) for the trainer
    num_test: int = 200  # hard held-out rows
    num_easy: int = 4000  # easy rows for the base step (train split only)
    base_hard_share: float = 0.4  # share of hard train rows in the base step's mix
    demonstrator: str = "expert"  # train.jsonl's demonstrator (task.DEMONSTRATORS)
    vocab_size: int = 384  # tokenizer vocab bound (BPE may stop earlier)
    sft: SFTConfig = None  # the base step's SFT settings (None: SFTConfig())

    def __post_init__(self):
        if self.sft is None:
            self.sft = SFTConfig()
        elif isinstance(self.sft, dict):
            self.sft = SFTConfig(**self.sft)
        if not 0.0 <= self.base_hard_share < 1.0:
            raise ValueError(f"base_hard_share: expected in [0, 1), got {self.base_hard_share}")
        if self.demonstrator not in DEMONSTRATORS:
            raise ValueError(f"demonstrator: expected one of {DEMONSTRATORS}, "
                             f"got {self.demonstrator!r}")


def quick_settings() -> DemoSettings:
    """Seconds-scale settings for smoke tests (the base model learns next to nothing)."""
    return DemoSettings(model_size="micro", num_train=64, num_test=16, num_easy=64,
                        sft=SFTConfig(steps=4, batch_size=8, warmup_steps=1, log_every=0))


def _base_mix(settings: DemoSettings, hard_train: list[dict], seed: int) -> list[dict]:
    """Easy problems plus a ``base_hard_share`` of the trainer's hard split. The demo is a
    showcase, tuned with this mix; the fair comparison (``benchmarks/paper_task.py``) builds its
    own base from hard problems outside the training split."""
    from .task import make_split

    easy = make_split("train", settings.num_easy, settings.easy, seed)
    share = settings.base_hard_share
    num_hard = min(len(hard_train), round(share * len(easy) / (1.0 - share)))
    return easy + hard_train[:num_hard]


def _manifest_matches(paths: dict, manifest: dict) -> bool:
    import json
    import os

    if not os.path.isfile(paths["manifest"]):
        return False
    try:
        with open(paths["manifest"], encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    needed = [paths["train"], paths["test"], paths["base_train"],
              os.path.join(paths["tokenizer"], "tokenizer.json"),
              os.path.join(paths["model"], "config.json"),
              os.path.join(paths["model"], "model.safetensors")]
    return saved.get("settings") == manifest["settings"] and all(map(os.path.isfile, needed))


def prepare_demo(workdir: str, seed: int = 0, quick: bool = False,
                 settings: DemoSettings | None = None, log=print) -> dict:
    """Build (or reuse, when the manifest matches) the demo's data, tokenizer and base model.

    Writes under ``{workdir}/assets``: ``train.jsonl`` (hard train rows with
    demonstrations), ``test.jsonl`` (hard held-out rows), ``base_train.jsonl`` (the base
    step's mix), ``tokenizer/``, ``model/`` (the base model + tokenizer, a HF directory)
    and ``manifest.json`` (settings, seed, timings, final SFT loss). Returns those paths
    as a dict (keys: assets, train, test, base_train, tokenizer, model, manifest) plus
    ``reused`` (bool) and ``timings`` (seconds per stage).
    """
    import dataclasses
    import json
    import os

    from .model import build_tiny_model, model_size_summary, save_model
    from .task import apply_demonstrator, difficulty_dict, make_split, write_jsonl
    from .tokenizer import build_tokenizer

    settings = settings or (quick_settings() if quick else DemoSettings())
    assets = os.path.join(workdir, "assets")
    paths = {"assets": assets, "train": os.path.join(assets, "train.jsonl"),
             "test": os.path.join(assets, "test.jsonl"),
             "base_train": os.path.join(assets, "base_train.jsonl"),
             "tokenizer": os.path.join(assets, "tokenizer"),
             "model": os.path.join(assets, "model"),
             "manifest": os.path.join(assets, "manifest.json")}
    manifest = {"settings": {**dataclasses.asdict(settings), "seed": seed,
                             "difficulties": {settings.easy: difficulty_dict(settings.easy),
                                              settings.hard: difficulty_dict(settings.hard)}}}
    if _manifest_matches(paths, manifest):
        log(f"[demo] reusing the task, tokenizer and base model in {assets}")
        return {**paths, "reused": True, "timings": {}}

    timings, t0 = {}, time.perf_counter()
    train = apply_demonstrator(make_split("train", settings.num_train, settings.hard, seed),
                               settings.demonstrator)
    test = make_split("test", settings.num_test, settings.hard, seed)
    base_rows = _base_mix(settings, train, seed)
    for rows, key in ((train, "train"), (test, "test"), (base_rows, "base_train")):
        write_jsonl(rows, paths[key])
    timings["task"] = time.perf_counter() - t0
    log(f"[demo] task: {len(train)} train / {len(test)} held-out {settings.hard!r} problems, "
        f"base mix {len(base_rows)} rows ({timings['task']:.1f}s)")

    t0 = time.perf_counter()
    tokenizer = build_tokenizer(train + base_rows, paths["tokenizer"], INSTRUCTION,
                                vocab_size=settings.vocab_size)
    timings["tokenizer"] = time.perf_counter() - t0
    log(f"[demo] tokenizer: {len(tokenizer)} tokens ({timings['tokenizer']:.1f}s)")

    t0 = time.perf_counter()
    model = build_tiny_model(paths["tokenizer"], None, size=settings.model_size, seed=seed)
    log(f"[demo] base model: {model_size_summary(model)}; SFT {settings.sft.steps} steps "
        f"x {settings.sft.batch_size} sequences")
    losses = sft_train(model, tokenizer, base_rows, settings.sft, seed=seed, log=log)
    save_model(model, tokenizer, paths["model"])
    timings["base_model"] = time.perf_counter() - t0
    tail = losses[-10:] or [float("nan")]
    log(f"[demo] base model saved to {paths['model']} (final SFT loss "
        f"{sum(tail) / len(tail):.3f}, {timings['base_model']:.1f}s)")
    manifest.update(timings=timings, final_sft_loss=sum(tail) / len(tail))
    with open(paths["manifest"], "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return {**paths, "reused": False, "timings": timings}
