"""The Prefix-RFT training loop, in the open (DESIGN §3).

    from prefix_rft.config import load_config
    from prefix_rft.train import train
    result = train(load_config("configs/demo.yaml", ["--train.steps=3"]))

Per step, top to bottom in :func:`train`: sample this rank's questions -> build ``G``
requests per question (``num_prefixed`` hybrids continuing a scheduled demonstration
prefix, the rest on-policy) -> roll out through the engine -> decode + reward -> Dr. GRPO
advantages (group = question) -> old log-probs with the fused kernel (no grad; prefix tokens
too) and the engine-vs-trainer log-prob mismatch -> ``ppo_epochs`` x mini-batches of
micro-batched :class:`~prefix_rft.loss.PrefixRFTLoss` over the decoder's hidden states ->
AdamW (warmup, clipping) -> weight sync to the engine -> log -> checkpoint.

``algo``: ``prefix_rft`` as above; ``rft`` the same with ``num_prefixed = 0``; ``sft`` updates
on full demonstrations with :func:`~prefix_rft.loss.sft_loss` and still rolls out ``G``
on-policy samples per question, only to log reward / pass rate / length like the others.

Precision: fp32 on CPU. On CUDA (``model.dtype: auto``) weights stay fp32 (AdamW masters;
an lr of 1e-6 would vanish in bf16) and compute runs in bf16 (FSDP2 mixed precision
under torchrun, ``torch.autocast`` in one process); ``model.dtype: bf16`` keeps bf16 weights.

Under torchrun every rank rolls out, scores and updates its own share of the questions;
gradients are averaged by FSDP2, so each rank's loss is scaled to its share of the global
mini-batch. Stops: SIGTERM/SIGINT or ``train.max_steps_per_run`` finish the current step,
checkpoint and return; an exception in a single-process run saves before re-raising.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed as D
from .advantage import advantage_stats, group_advantages
from .batching import Rollout, collate, micro_batches, response_logprob_entropy, run_head
from .config import Config, resolve_config, save_config, validate_config
from .loss import PrefixRFTLoss, compute_keep_prefix_mask, sft_loss
from .metrics_log import MetricsLogger, plot_metrics
from .prefix import cut_prefix, prefix_low_bound, sample_prefix_ratios
from .rollout import RolloutRequest, SamplingSettings, logprob_mismatch, make_engine
from .rollout.mismatch import continuation_mask_for


# ---------------------------------------------------------------------------- model setup
def _is_installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def load_policy(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The policy from ``model.path`` (``from_pretrained``, a local directory) and its tokenizer.

    fp32 weights unless ``model.dtype: bf16``; SDPA attention (flash-attn only when requested
    and installed); Liger RMSNorm/SwiGLU/RoPE when installed and on CUDA; gradient checkpointing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.model.path)
    if not cfg.model.path or not (path / "config.json").is_file():
        raise ValueError(f"model.path must be a local HF model directory with a config.json, "
                         f"got {cfg.model.path!r}")
    attn = cfg.model.attn_implementation
    if attn == "flash_attention_2" and not (_is_installed("flash_attn") and device.type == "cuda"):
        print("[prefix-rft] flash-attn not installed or not on CUDA: using sdpa attention", flush=True)
        attn = "sdpa"
    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn,
        trust_remote_code=cfg.model.trust_remote_code).to(device)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or str(path),
                                              trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    use_liger = cfg.model.liger == "true" or (
        cfg.model.liger == "auto" and device.type == "cuda" and _is_installed("liger_kernel"))
    if use_liger:
        if not _is_installed("liger_kernel"):
            raise ValueError("model.liger=true but liger-kernel is not installed (pip install liger-kernel)")
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # Only the layer kernels: the head goes through our fused log-prob kernel instead.
        _apply_liger_kernel_to_instance(model=model, rms_norm=True, swiglu=True, rope=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, tokenizer


def build_optimizer(cfg: Config, model: torch.nn.Module):
    """AdamW + a per-optimizer-step LR schedule: linear warmup, then constant or cosine."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    total = optimizer_steps_per_step(cfg) * cfg.train.steps

    def lr_factor(k: int) -> float:
        if k < o.warmup_steps:
            return (k + 1) / o.warmup_steps
        if o.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (k - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def optimizer_steps_per_step(cfg: Config) -> int:
    return cfg.train.ppo_epochs * (cfg.train.prompts_per_step // cfg.train.mini_batch_size)


def build_engine(cfg: Config, model: torch.nn.Module, tokenizer, device: torch.device, rank: int):
    """The rollout engine: ``hf`` samples from the live policy; ``vllm`` starts from model.path."""
    r = cfg.rollout
    if r.engine == "hf":
        return make_engine("hf", model, tokenizer, max_batch_rows=r.hf_batch_size or 1 << 30,
                           seed=r.seed + rank)
    extra = {"tensor_parallel_size": r.tensor_parallel_size} if r.tensor_parallel_size > 1 else {}
    return make_engine(
        "vllm", cfg.model.path, tokenizer, dtype=_vllm_dtype(cfg, device),
        gpu_memory_utilization=r.gpu_memory_utilization,
        enforce_eager=r.enforce_eager or device.type != "cuda", seed=r.seed + rank,
        max_model_len=cfg.data.max_prompt_tokens + r.max_response_tokens, **extra)


def _vllm_dtype(cfg: Config, device: torch.device) -> str:
    """bf16 on GPU (the trainer computes in bf16 there), the trainer's fp32 on CPU."""
    return "bfloat16" if device.type == "cuda" or cfg.model.dtype == "bf16" else "float32"


def sync_weights(engine, model: torch.nn.Module) -> None:
    """Push the policy's weights into the engine (the HF engine reads the live module)."""
    if engine.name == "hf":
        return
    state = D.gather_full_state_dict(model, rank0_only=False)  # one engine per rank
    engine.wake()
    engine.load_weights(state.items())


@contextlib.contextmanager
def compute_context(model: torch.nn.Module, device: torch.device, cfg: Config):
    """bf16 autocast for a single-process CUDA run with fp32 weights (FSDP2 casts itself)."""
    if device.type == "cuda" and cfg.model.dtype == "auto" and not D.is_fsdp(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def unsharded_for_generation(model: torch.nn.Module, engine):
    """Under FSDP2, gather the weights once for a whole HF-engine generate call: ranks decode
    different numbers of steps, so per-forward all-gathers would deadlock. No-op on a plain
    model or for vLLM (it has its own copy of the weights)."""
    if not D.is_fsdp(model) or engine.name != "hf":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True)


# ---------------------------------------------------------------------------- rollouts
def _request_seed(cfg: Config, step: int, position: int) -> int:
    """Seed of one question's requests: a function of (seed, step, global batch position), so
    sampling repeats exactly on resume and does not depend on the number of ranks."""
    return (cfg.rollout.seed * 1_000_003 + step * 10_007 + position * 97) % (2**31 - 1)


def build_requests(cfg: Config, items: list[dict], step: int, first_position: int):
    """``G`` rollouts per question: one on-policy request (``n = G - num_prefixed``) plus one
    request per hybrid continuing ``cut_prefix(demo, ratio)``. Returns ``(requests, meta)``;
    ``meta[i] = (question index, is_prefixed, ratio)`` per request."""
    r, p = cfg.rollout, cfg.prefix
    G = r.group_size
    num_prefixed = 0 if cfg.loss.algo == "sft" else p.num_prefixed
    low = prefix_low_bound(step, schedule=p.schedule, start=p.start, end=p.end,
                           decay_steps=p.decay_steps)
    requests, meta = [], []
    for q, item in enumerate(items):
        seed = _request_seed(cfg, step, first_position + q)
        sampling = SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                    max_new_tokens=r.max_response_tokens, seed=seed)
        if G - num_prefixed > 0:
            requests.append(RolloutRequest(item["prompt_ids"], (), n=G - num_prefixed, sampling=sampling))
            meta.append((q, False, 0.0))
        ratios = sample_prefix_ratios(num_prefixed, low, high=p.high, beta_alpha=p.beta_alpha,
                                      beta_beta=p.beta_beta, generator=seed)
        for j, ratio in enumerate(ratios):
            prefix = cut_prefix(item["demo_ids"], ratio, min_prefix_tokens=p.min_prefix_tokens)
            prefix = prefix[: r.max_response_tokens - 1]  # leave room for one sampled token
            hybrid = SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                      max_new_tokens=r.max_response_tokens, seed=seed + 1 + j)
            requests.append(RolloutRequest(item["prompt_ids"], prefix, n=1, sampling=hybrid))
            meta.append((q, len(prefix) > 0, ratio))
    return requests, meta, low


def roll_out(engine, model, cfg, device, items, requests, meta) -> list[Rollout]:
    """Generate and flatten into :class:`Rollout` rows, grouped by question."""
    with torch.no_grad(), unsharded_for_generation(model, engine), compute_context(model, device, cfg):
        outputs = engine.generate(requests)
    rollouts = []
    for request, (q, prefixed, _), samples in zip(requests, meta, outputs):
        for s in samples:
            rollouts.append(Rollout(prompt_ids=list(request.prompt_ids), response_ids=list(s.response_ids),
                                    prefix_len=s.prefix_len, group=q, is_prefixed=prefixed,
                                    engine_logprobs=list(s.logprobs), finish_reason=s.finish_reason))
    rollouts.sort(key=lambda x: x.group)  # stable: questions contiguous, for mini-batching
    return rollouts


def score(rollouts: list[Rollout], items: list[dict], tokenizer, cfg: Config) -> dict[str, float]:
    """Rewards (math-verify) and Dr. GRPO advantages, written into the rollouts; returns metrics."""
    from .reward import math_rewards

    texts = [tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
    rewards, stats = math_rewards(texts, [items[r.group]["answer"] for r in rollouts],
                                  fallback=cfg.reward.fallback, timeout_s=cfg.reward.timeout_s,
                                  num_workers=cfg.reward.num_workers)
    reward_t = torch.tensor(rewards, dtype=torch.float64)
    groups = torch.tensor([r.group for r in rollouts])
    prefixed = torch.tensor([r.is_prefixed for r in rollouts], dtype=torch.bool)
    adv = group_advantages(reward_t, groups, baseline=cfg.loss.baseline, is_prefixed=prefixed)
    for r, value, a in zip(rollouts, rewards, adv.tolist()):
        r.reward, r.advantage = value, a
    solved = [0.0] * len(items)  # pass rate: a question counts when an on-policy rollout solved it
    for r in rollouts:
        if not r.is_prefixed:
            solved[r.group] = max(solved[r.group], r.reward)
    lengths = [len(r.response_ids) for r in rollouts]
    on, hyb = reward_t[~prefixed], reward_t[prefixed]
    m = {"reward_mean": reward_t.mean().item(),
         "reward_on_policy": on.mean().item() if on.numel() else float("nan"),
         "reward_hybrid": hyb.mean().item() if hyb.numel() else float("nan"),
         "pass_rate": sum(solved) / max(1, len(items)),
         "response_len_mean": float(np.mean(lengths)), "response_len_max": float(max(lengths)),
         "truncated_frac": float(np.mean([r.finish_reason == "length" for r in rollouts])),
         "reward_no_answer_frac": stats.no_answer / max(1, stats.total),
         "reward_failures": float(stats.parse_failures + stats.timeouts + stats.errors)}
    m.update(advantage_stats(adv))
    return m


# ---------------------------------------------------------------------------- update
def old_logprobs(model, cfg, device, loss_fn, rollouts, pad_id) -> dict[str, float]:
    """Log-probs (and entropies) of the policy before the update, per rollout, no grad;
    prefix tokens included. Also the engine-vs-trainer mismatch on continuation tokens."""
    rows = range(len(rollouts))
    with torch.no_grad(), compute_context(model, device, cfg):
        for mb in micro_batches(rollouts, rows, cfg.train.micro_batch_tokens):
            batch = collate(rollouts, mb, pad_token_id=pad_id, device=device)
            lp, ent = response_logprob_entropy(model, batch, loss_fn)
            for b, i in enumerate(mb):
                n = len(rollouts[i].response_ids)
                rollouts[i].old_logprob, rollouts[i].old_entropy = lp[b, :n].float().cpu(), ent[b, :n].float().cpu()
    width = max(len(r.response_ids) for r in rollouts)
    trainer = torch.zeros(len(rollouts), width)
    for i, r in enumerate(rollouts):
        trainer[i, : len(r.response_ids)] = r.old_logprob
    return logprob_mismatch([r.engine_logprobs for r in rollouts], trainer,
                            continuation_mask_for(rollouts, width))


def _padded(values: list[torch.Tensor], rows: list[int], width: int, device) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for b, i in enumerate(rows):
        out[b, : len(values[i])] = values[i]
    return out.to(device)


class MetricAverager:
    """Token-weighted means of the loss metrics over micro-batches (sums for the loss)."""

    WEIGHTS = {"clip_frac_low": "num_tokens", "clip_frac_high": "num_tokens", "clip_frac_dual": "num_tokens",
               "ratio_mean": "num_tokens", "prefix_token_frac": "num_tokens",
               "kept_prefix_token_frac": "num_tokens", "kept_prefix_frac": "num_prefix_tokens",
               "entropy_prefix": "num_prefix_tokens", "entropy_continuation": "num_continuation_tokens",
               "nll_per_token": "num_tokens"}

    def __init__(self):
        self.sums, self.weights, self.loss, self.n_mini = {}, {}, 0.0, 0
        self.ratio_min, self.ratio_max = math.inf, -math.inf

    def add(self, m: dict[str, float]) -> None:
        self.loss += m["loss"]
        self.ratio_min = min(self.ratio_min, m.get("ratio_min", math.inf)) if m.get("num_tokens") else self.ratio_min
        self.ratio_max = max(self.ratio_max, m.get("ratio_max", -math.inf)) if m.get("num_tokens") else self.ratio_max
        for key, weight_key in self.WEIGHTS.items():
            if key in m:
                w = m.get(weight_key, 0.0)
                self.sums[key] = self.sums.get(key, 0.0) + m[key] * w
                self.weights[key] = self.weights.get(key, 0.0) + w

    def result(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.weights[k] if self.weights[k] else 0.0 for k in self.sums}
        out["loss"] = self.loss / max(1, self.n_mini)  # mean over optimizer steps
        if "clip_frac_low" in out:
            out["clip_frac"] = out["clip_frac_low"] + out["clip_frac_high"]
            out["ratio_min"] = self.ratio_min if math.isfinite(self.ratio_min) else 1.0
            out["ratio_max"] = self.ratio_max if math.isfinite(self.ratio_max) else 1.0
        return out


def _micro_loss(model, cfg, loss_fn, batch, rollouts, num_sequences, world, keep):
    """Loss of one micro-batch (its share of the global mini-batch) and its metrics."""
    T = batch.response_ids.shape[1]
    if cfg.loss.algo == "sft":
        def head(hidden, weight, bias):
            lp, _ = loss_fn.token_logprob_entropy(hidden, weight, batch.response_ids,
                                                  batch.response_mask, bias)
            return sft_loss(lp, batch.response_mask, max_response_tokens=cfg.rollout.max_response_tokens,
                            num_sequences=num_sequences, loss_scale=float(world))
        return run_head(model, batch, head)
    old = _padded([r.old_logprob for r in rollouts], batch.rows, T, batch.response_ids.device)

    def head(hidden, weight, bias):
        return loss_fn(hidden, weight, batch.response_ids, old, batch.advantages,
                       batch.response_mask, batch.prefix_mask, bias, num_sequences=num_sequences,
                       loss_scale=float(world), keep_prefix_mask=keep)
    return run_head(model, batch, head)


def _mini_batch_keep_masks(model, cfg, device, loss_fn, rollouts, mbs, pad_id, first_update):
    """``mini_batch`` entropy-mask scope: rank the whole mini-batch's prefix tokens jointly.
    On the first optimizer step of a step the old-pass entropies are the current policy's."""
    if cfg.loss.entropy_mask_scope != "mini_batch" or cfg.loss.algo == "sft":
        return [None] * len(mbs)
    ents, resp, pre = [], [], []
    for mb in mbs:
        batch = collate(rollouts, mb, pad_token_id=pad_id, device=device)
        if first_update:
            ent = _padded([r.old_entropy for r in rollouts], mb, batch.response_ids.shape[1], device)
        else:
            with torch.no_grad(), compute_context(model, device, cfg):
                ent = response_logprob_entropy(model, batch, loss_fn)[1]
        ents.append(ent)
        resp.append(batch.response_mask)
        pre.append(batch.prefix_mask)
    return compute_keep_prefix_mask(ents, resp, pre, entropy_top_fraction=cfg.loss.entropy_top_fraction)


def update(model, optimizer, scheduler, cfg, device, loss_fn, rollouts, pad_id, world, state) -> dict:
    """``ppo_epochs`` passes of mini-batches (by question) of micro-batched loss + AdamW step."""
    per_question = 1 if cfg.loss.algo == "sft" else cfg.rollout.group_size
    local_questions = cfg.train.mini_batch_size // world
    num_sequences = cfg.train.mini_batch_size * per_question  # global mini-batch, normalizer B
    avg, grad_norms, tokens = MetricAverager(), [], 0
    groups = sorted({r.group for r in rollouts})
    for epoch in range(cfg.train.ppo_epochs):
        for start in range(0, len(groups), local_questions):
            chosen = set(groups[start:start + local_questions])
            rows = [i for i, r in enumerate(rollouts) if r.group in chosen]
            mbs = micro_batches(rollouts, rows, cfg.train.micro_batch_tokens)
            keeps = _mini_batch_keep_masks(model, cfg, device, loss_fn, rollouts, mbs, pad_id,
                                           first_update=epoch == 0 and start == 0)
            for mb, keep in zip(mbs, keeps):
                batch = collate(rollouts, mb, pad_token_id=pad_id, device=device)
                with compute_context(model, device, cfg):
                    loss, m = _micro_loss(model, cfg, loss_fn, batch, rollouts, num_sequences, world, keep)
                loss.backward()
                avg.add(m)
                tokens += int(batch.attention_mask.sum())
            grad_norms.append(D.clip_grad_norm(model, cfg.optim.grad_clip))
            state["optimizer_stepped"] = True
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            avg.n_mini += 1
    out = avg.result()
    out.update(grad_norm=float(np.mean(grad_norms)), grad_norm_max=float(np.max(grad_norms)),
               lr=scheduler.get_last_lr()[0], update_tokens=float(tokens))
    return out


# ---------------------------------------------------------------------------- the loop
def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_divisible(cfg: Config, world: int) -> None:
    for key, value in (("train.prompts_per_step", cfg.train.prompts_per_step),
                       ("train.mini_batch_size", cfg.train.mini_batch_size)):
        if value % world:
            raise ValueError(f"{key} must be divisible by the number of ranks ({world}), got {value}")


def train_step(step, ctx) -> dict[str, float]:
    """One training step (0-based ``step``); returns its metrics (already rank-averaged)."""
    cfg, model, device, engine, tok = ctx["cfg"], ctx["model"], ctx["device"], ctx["engine"], ctx["tokenizer"]
    world, pad_id, loss_fn = ctx["world"], ctx["pad_id"], ctx["loss_fn"]
    ds, sampler = ctx["dataset"], ctx["sampler"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak_mem_gb is this step's
    t0 = time.perf_counter()
    # ---- sample questions, build requests, roll out
    indices = sampler.next_batch(cfg.train.prompts_per_step)
    items = [ds[i] for i in indices]
    first = D.shard_range(cfg.train.prompts_per_step).start
    requests, meta, low = build_requests(cfg, items, step, first)
    rollouts = roll_out(engine, model, cfg, device, items, requests, meta)
    engine.sleep()
    t_rollout = time.perf_counter()
    # ---- reward + advantages
    metrics = score(rollouts, items, tok, cfg)
    ratios = [ratio for _, prefixed, ratio in meta if prefixed]
    metrics.update(prefix_low=low, prefix_ratio_mean=float(np.mean(ratios)) if ratios else float("nan"))
    t_reward = time.perf_counter()
    # ---- old log-probs (fused kernel, no grad) + engine mismatch
    if cfg.loss.algo == "sft":
        update_rows = [Rollout(prompt_ids=it["prompt_ids"], group=q,
                               response_ids=it["demo_ids"][: cfg.rollout.max_response_tokens])
                       for q, it in enumerate(items)]
        metrics["mismatch_mean"] = metrics["mismatch_max"] = float("nan")
    else:
        update_rows = rollouts
        mismatch = old_logprobs(model, cfg, device, loss_fn, rollouts, pad_id)
        metrics.update(mismatch_mean=mismatch["mismatch_mean"], mismatch_max=mismatch["mismatch_max"])
    t_old = time.perf_counter()
    # ---- policy update
    metrics.update(update(model, ctx["optimizer"], ctx["scheduler"], cfg, device, loss_fn,
                          update_rows, pad_id, world, ctx["state"]))
    t_update = time.perf_counter()
    # ---- weight sync
    sync_weights(engine, model)
    t_end = time.perf_counter()
    metrics.update(rollout_time_s=t_rollout - t0, reward_time_s=t_reward - t_rollout,
                   old_logprob_time_s=t_old - t_reward, update_time_s=t_update - t_old,
                   sync_time_s=t_end - t_update, step_time_s=t_end - t0,
                   tokens_per_s=metrics["update_tokens"] * world / max(t_update - t_old, 1e-9),
                   peak_mem_gb=_peak_memory_gb(device))
    return D.all_reduce_mean(metrics)


def _setup(cfg: Config) -> dict[str, Any]:
    """Process group, data, model (+FSDP2), optimizer, engine, resume. Returns the context."""
    from .data import StatefulSampler, load_prompt_dataset

    rank, world, device = D.init_distributed(cfg.train.device)
    _check_divisible(cfg, world)
    _seed_everything(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    if D.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    model, tokenizer = load_policy(cfg, device)
    dataset = load_prompt_dataset(cfg.data, tokenizer, need_demo=cfg.loss.algo != "rft")
    if D.is_main():
        print(f"[prefix-rft] {dataset.summary()}", flush=True)
    sampler = StatefulSampler(len(dataset), seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                              rank=rank, world_size=world)
    if world > 1:
        D.wrap_fsdp2(model, mixed_precision_bf16=device.type == "cuda" and cfg.model.dtype == "auto")
    optimizer, scheduler = build_optimizer(cfg, model)
    start = 0
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, run_dir)
    if resume_from is not None:
        meta = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
        start = int(meta["step"])
        sampler.load_state_dict(meta["sampler"])
    engine = build_engine(cfg, model, tokenizer, device, rank)
    if resume_from is not None:
        sync_weights(engine, model)
    loss_fn = PrefixRFTLoss(
        max_response_tokens=cfg.rollout.max_response_tokens, clip_low=cfg.loss.clip_low,
        clip_high=cfg.loss.clip_high, clip_c=cfg.loss.clip_c,
        entropy_top_fraction=cfg.loss.entropy_top_fraction, entropy_coef=cfg.loss.entropy_coef,
        temperature=cfg.rollout.temperature, impl=cfg.loss.kernel_impl,
        entropy_mask_scope=cfg.loss.entropy_mask_scope)
    return dict(cfg=cfg, rank=rank, world=world, device=device, run_dir=run_dir, model=model,
                tokenizer=tokenizer, dataset=dataset, sampler=sampler, optimizer=optimizer,
                scheduler=scheduler, engine=engine, loss_fn=loss_fn, start=start,
                resumed_from=str(resume_from) if resume_from else None, state={},
                pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def periodic_eval(ctx) -> dict[str, float]:
    """``eval.files`` scored with the rollout engine: ``eval/<file stem>/avg@k`` and ``pass@k``.
    Every rank evaluates every question (same seeds), so FSDP2 ranks stay in step."""
    from .evaluate import evaluate_rows

    cfg, e, out = ctx["cfg"], ctx["cfg"].eval, {}
    for path in e.files:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        with unsharded_for_generation(ctx["model"], ctx["engine"]), compute_context(ctx["model"], ctx["device"], cfg):
            result = evaluate_rows(ctx["model"], ctx["tokenizer"], rows, e.k, temperature=e.temperature,
                                   top_p=e.top_p, max_response_tokens=e.max_response_tokens,
                                   engine=ctx["engine"], seed=cfg.train.seed, instruction=cfg.data.instruction)
        out[f"eval/{Path(path).stem}/avg@{e.k}"] = result[f"avg@{e.k}"]
        out[f"eval/{Path(path).stem}/pass@{e.k}"] = result[f"pass@{e.k}"]
    return out


def _save(ctx, done: int, sampler_state: dict, metrics: dict) -> Path:
    cfg = ctx["cfg"]
    return ckpt.save_checkpoint(ctx["run_dir"], done, model=ctx["model"], optimizer=ctx["optimizer"],
                                scheduler=ctx["scheduler"], sampler_state=sampler_state,
                                extra={"metrics": metrics}, keep_last=cfg.checkpoint.keep_last)


def _save_after_crash(ctx, done: int, sampler_state: dict, error: BaseException) -> None:
    """Single process only (a collective save from one failing rank would hang the others)."""
    if D.is_distributed():
        return
    try:
        if not ctx["state"].get("optimizer_stepped"):  # model untouched this step: a clean checkpoint
            path = _save(ctx, done, sampler_state, {"crashed": repr(error)[:500]})
        else:  # mid-step weights: keep them for inspection, but not as a resumable checkpoint
            path = ckpt.save_hf_model(ctx["model"], ctx["tokenizer"], ctx["run_dir"] / f"crash-step_{done + 1}")
        print(f"[prefix-rft] {type(error).__name__} in step {done + 1}: saved {path}", flush=True)
    except Exception as save_error:  # noqa: BLE001 -- never mask the original error
        print(f"[prefix-rft] could not save after the error: {save_error!r}", flush=True)


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training as configured. Returns ``{"run_dir", "steps_done",
    "final_model_dir", "metrics" (last step's), "stopped_early", "resumed_from"}``."""
    cfg = validate_config(resolve_config(cfg))
    ctx = _setup(cfg)
    run_dir, total, done = ctx["run_dir"], cfg.train.steps, ctx["start"]
    logger = MetricsLogger(run_dir, total_steps=total, start_step=done, tensorboard=cfg.log.tensorboard,
                           progress=cfg.log.progress, enabled=D.is_main())
    previous_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop_flag = ckpt.install_signal_handlers()
    metrics: dict[str, float] = {}
    stopped_early, steps_this_run = False, 0
    try:
        while done < total:
            sampler_state = ctx["sampler"].state_dict()
            ctx["state"]["optimizer_stepped"] = False
            try:
                metrics = train_step(done, ctx)
            except BaseException as error:
                _save_after_crash(ctx, done, sampler_state, error)
                raise
            done += 1
            steps_this_run += 1
            if cfg.eval.every and cfg.eval.files and (done % cfg.eval.every == 0 or done == total):
                metrics.update(periodic_eval(ctx))
            if done % cfg.log.every == 0 or done == total:
                logger.log(done, metrics)
            else:
                logger.advance(done)
            stop = ckpt.stop_requested(stop_flag)
            limit = cfg.train.max_steps_per_run and steps_this_run >= cfg.train.max_steps_per_run
            periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0
            if periodic or stop or limit or done == total:
                _save(ctx, done, ctx["sampler"].state_dict(), metrics)
            if (stop or limit) and done < total:
                stopped_early = True
                logger.write(f"[prefix-rft] stopping after step {done} "
                             f"({'signal' if stop else 'train.max_steps_per_run'}); resume with "
                             f"--checkpoint.resume=auto")
                break
    finally:
        logger.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    final_dir = None
    if done == total and cfg.checkpoint.save_final:
        final_dir = ckpt.save_hf_model(ctx["model"], ctx["tokenizer"], run_dir / "final")
    if D.is_main() and cfg.log.plots:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots")
    ctx["engine"].close()
    if ctx["world"] > 1:
        D.destroy_distributed()
    return {"run_dir": str(run_dir), "steps_done": done, "final_model_dir": str(final_dir) if final_dir else None,
            "metrics": metrics, "stopped_early": stopped_early, "resumed_from": ctx["resumed_from"]}
