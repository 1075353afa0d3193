"""The Prefix-RFT training loop, in the open.

    from prefix_rft.config import load_config
    from prefix_rft.train import train
    result = train(load_config("configs/demo.yaml", ["--train.steps=3"]))

Per step, top to bottom in :func:`train_step`: sample this rank's questions -> build ``G``
requests per question (``num_prefixed`` hybrids continuing a scheduled demonstration
prefix, the rest on-policy) -> roll out through the engine -> decode + reward -> Dr. GRPO
advantages (group = question) -> old log-probs with the fused kernel (no grad; prefix tokens
too) and the engine-vs-trainer log-prob mismatch (skipped when the update is exactly on-policy:
:func:`is_exactly_on_policy`) -> ``ppo_epochs`` x mini-batches of
micro-batched :class:`~prefix_rft.loss.PrefixRFTLoss` over the decoder's hidden states ->
AdamW (warmup, clipping) -> weight sync to the engine -> log -> checkpoint.

``algo``: ``prefix_rft`` as above; ``rft`` the same with ``num_prefixed = 0``; ``sft`` updates
on full demonstrations with :func:`~prefix_rft.loss.sft_loss` and still rolls out ``G``
on-policy samples per question, only to log reward / pass rate / length like the others.

What a run is made of (model, optimizer, engine, precision, seeds) is built in
:mod:`prefix_rft.run.setup` into a typed :class:`~prefix_rft.run.setup.Run`; engine differences
live in the engines (:mod:`prefix_rft.rollout`), the entropy-mask rule in
:mod:`prefix_rft.loss.entropy_mask`, the micro-batches and the forward-with-head in
:mod:`prefix_rft.update`; :func:`micro_loss` is the one place a micro-batch's loss is computed.

Under torchrun every rank rolls out, scores and updates its own share of the questions;
gradients are averaged by FSDP2, so each rank's loss is scaled to its share of the global
mini-batch. Stops: SIGTERM/SIGINT or ``train.max_steps_per_run`` finish the current step,
checkpoint and return; an exception in a single-process run saves before re-raising.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import torch

from .advantage import advantage_stats, rollout_advantages
from .config import Config, resolve_config, validate_config
from .data import Question
from .finite import StepGuard, zero_non_finite
from .loss import prefix_rft_loss, sft_loss
from .loss.entropy_mask import EntropyMask
from .loss.fused import fused_prefix_rft_loss, fused_sft_loss, use_fused_head
from .metrics_log import MetricAverager, MetricsLogger, plot_metrics
from .prefix import cut_prefix, prefix_low_bound, step_ratios
from .prefix_policy import (
    as_conditioning,
    failing_groups,
    prefix_source_ids,
    replace_failed_in_place,
    self_store_additions,
)
from .prefix_store import gather_additions
from .preflight import preflight
from .rollout import RolloutRequest, SamplingSettings, logprob_mismatch
from .rollout.mismatch import continuation_mask_for
from .run import checkpoint as ckpt
from .run.runlock import RunLock
from .run.setup import Run, peak_memory_gb, reset_peak_memory, start_run
from .run.train_io import periodic_eval, save_after_crash, save_step
from .runtime import distributed as D
from .update import (
    MicroBatch,
    Rollout,
    idle_forwards,
    make_micro_batches,
    padded_cut_tokens,
    response_logprob_entropy,
    run_head,
)


# ---------------------------------------------------------------------------- rollouts
def _request_seed(cfg: Config, step: int, position: int) -> int:
    """Seed of one question's requests: a function of (seed, step, global batch position), so
    sampling repeats exactly on resume and does not depend on the number of ranks."""
    return (cfg.rollout.seed * 1_000_003 + step * 10_007 + position * 97) % (2**31 - 1)


def build_requests(cfg: Config, questions: list[Question], step: int, first_position: int,
                   store=None, hybrids_for: set[int] | None = None,
                   on_policy_n: int | None = None):
    """``G`` rollouts per question: one on-policy request (``n = G - num_prefixed``) plus one
    request per hybrid continuing ``cut_prefix(source, ratio)`` (the source: the
    demonstration, or for ``prefix.source: self`` a correct response from ``store``).
    ``hybrids_for`` limits the hybrids to those questions (None: all) and ``on_policy_n``
    sets the on-policy count (``prefix.when: on_failure`` asks ``G`` first, then hybrids only).
    Returns ``(requests, meta, low)``: ``meta[i] = (question index, is_prefixed, ratio,
    origin)`` per request (origin: ``"self"``, ``"demonstration"`` or ``""`` for on-policy)
    and ``low`` the step's prefix-ratio lower bound."""
    r, p = cfg.rollout, cfg.prefix
    G = r.group_size
    n_on = G - p.num_prefixed if on_policy_n is None else on_policy_n
    low = prefix_low_bound(step, schedule=p.schedule, start=p.start, end=p.end,
                           decay_steps=p.decay_steps)
    requests, meta = [], []
    for q, question in enumerate(questions):
        seed = _request_seed(cfg, step, first_position + q)
        sampling = SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                    max_new_tokens=r.max_response_tokens, seed=seed)
        if n_on > 0:
            requests.append(RolloutRequest(question.prompt_ids, (), n=n_on, sampling=sampling))
            meta.append((q, False, 0.0, ""))
        if hybrids_for is not None and q not in hybrids_for:
            continue
        ratios = step_ratios(p.num_prefixed, low, p.schedule, high=p.high,
                             beta_alpha=p.beta_alpha, beta_beta=p.beta_beta, generator=seed)
        source_ids, origin = prefix_source_ids(p.source, question.index, question.demo_ids,
                                               store, seed)
        for j, ratio in enumerate(ratios):
            prefix = cut_prefix(source_ids, ratio, min_prefix_tokens=p.min_prefix_tokens)
            prefix = prefix[: r.max_response_tokens - 1]  # leave room for one sampled token
            hybrid = SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                      max_new_tokens=r.max_response_tokens, seed=seed + 1 + j)
            requests.append(RolloutRequest(question.prompt_ids, prefix, n=1, sampling=hybrid))
            meta.append((q, len(prefix) > 0, ratio, origin if prefix else ""))
    return requests, meta, low


def roll_out(run: Run, requests: list[RolloutRequest], meta: list) -> list[Rollout]:
    """Generate and flatten into :class:`Rollout` rows, grouped by question."""
    with torch.no_grad(), run.engine.generation_context(run.model), run.compute():
        # every rank enters the context (FSDP2 gathers there), even with nothing to generate
        outputs = run.engine.generate(requests) if requests else []
    rollouts = []
    for request, (q, prefixed, *_), samples in zip(requests, meta, outputs):
        for s in samples:
            rollouts.append(Rollout(
                prompt_ids=list(request.prompt_ids), response_ids=list(s.response_ids),
                prefix_len=s.prefix_len, group=q, is_prefixed=prefixed,
                engine_logprobs=list(s.logprobs), finish_reason=s.finish_reason))
    rollouts.sort(key=lambda x: x.group)  # stable: questions contiguous, for mini-batching
    return rollouts


def step_rollouts(run: Run, questions: list[Question], step: int, first_position: int):
    """This step's rollouts under ``prefix.when`` (:mod:`prefix_rft.prefix_policy`).
    Returns ``(rollouts, meta, low, metrics)``: ``prefix_question_frac`` is the share of
    questions that got a non-empty prefix, ``prefix_self_frac`` the share of prefixes cut
    from the policy's own stored responses."""
    cfg, p = run.cfg, run.cfg.prefix
    if p.when == "on_failure" and p.num_prefixed > 0:
        from .reward import math_rewards

        meta_on = build_requests(cfg, questions, step, first_position, run.prefix_store,
                                 hybrids_for=set(), on_policy_n=cfg.rollout.group_size)
        on_policy = roll_out(run, meta_on[0], meta_on[1])
        texts = [run.tokenizer.decode(r.response_ids, skip_special_tokens=True)
                 for r in on_policy]
        rewards, _ = math_rewards(texts, [questions[r.group].answer for r in on_policy],
                                  fallback=cfg.reward.fallback, timeout_s=cfg.reward.timeout_s,
                                  num_workers=cfg.reward.num_workers)
        failing = failing_groups(on_policy, rewards)
        requests, meta, low = build_requests(cfg, questions, step, first_position,
                                             run.prefix_store, hybrids_for=failing,
                                             on_policy_n=0)
        hybrids = roll_out(run, requests, meta)
        rollouts = replace_failed_in_place(on_policy, hybrids, failing, p.num_prefixed)
        meta = meta_on[1] + meta
    else:
        requests, meta, low = build_requests(cfg, questions, step, first_position,
                                             run.prefix_store)
        rollouts = roll_out(run, requests, meta)
    prefixed_questions = {q for q, prefixed, *_ in meta if prefixed}
    origins = [origin for _, prefixed, _, origin in meta if prefixed]
    return rollouts, meta, low, {
        "prefix_question_frac": len(prefixed_questions) / max(1, len(questions)),
        "prefix_self_frac": origins.count("self") / len(origins) if origins else float("nan")}


def score(rollouts: list[Rollout], questions: list[Question], tokenizer, cfg: Config,
          step: int = 0, guard: StepGuard | None = None) -> dict[str, float]:
    """Rewards (math-verify) and advantages (``loss.baseline``), written into the rollouts;
    returns metrics. ``baseline: official`` gives a hybrid's prefix tokens their own advantage
    (``Rollout.prefix_advantage``), so its update batch carries ``[B, T]`` advantages.
    Non-finite rewards / advantages are zeroed and counted, or stop the run
    (``reward.non_finite``); ``guard`` (the run's) makes the zeroing notice print once."""
    from .reward import math_rewards

    texts = [tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
    rewards, stats = math_rewards(texts, [questions[r.group].answer for r in rollouts],
                                  fallback=cfg.reward.fallback, timeout_s=cfg.reward.timeout_s,
                                  num_workers=cfg.reward.num_workers)
    reward_t, bad_rewards = zero_non_finite(torch.tensor(rewards, dtype=torch.float64),
                                            "rewards", cfg.reward.non_finite, step, guard)
    rewards = reward_t.tolist()
    groups = torch.tensor([r.group for r in rollouts])
    prefixed = torch.tensor([r.is_prefixed for r in rollouts], dtype=torch.bool)
    adv, prefix_adv = rollout_advantages(reward_t, groups, baseline=cfg.loss.baseline,
                                         is_prefixed=prefixed)
    adv, bad_advantages = zero_non_finite(adv, "advantages", cfg.reward.non_finite, step,
                                         guard)
    prefix_adv = torch.where(torch.isfinite(prefix_adv), prefix_adv, adv)
    for r, value, a, pa in zip(rollouts, rewards, adv.tolist(), prefix_adv.tolist()):
        r.reward, r.advantage = value, a
        r.prefix_advantage = pa if pa != a else None
    # pass rate: a question counts when an on-policy rollout solved it
    solved, sampled = [0.0] * len(questions), [False] * len(questions)
    for r in rollouts:
        if not r.is_prefixed:
            solved[r.group] = max(solved[r.group], r.reward)
            sampled[r.group] = True
    # groups whose on-policy rollouts all failed: where RFT's advantage is zero and only a
    # prefix gives signal (the paper's regime)
    all_fail = sum(1 for s, f in zip(sampled, solved) if s and f == 0.0)
    lengths = [len(r.response_ids) for r in rollouts]
    on, hyb = reward_t[~prefixed], reward_t[prefixed]
    m = {"reward_mean": reward_t.mean().item(),
         "reward_on_policy": on.mean().item() if on.numel() else float("nan"),
         "reward_hybrid": hyb.mean().item() if hyb.numel() else float("nan"),
         "pass_rate": sum(solved) / max(1, len(questions)),
         "on_policy_all_fail_frac": all_fail / max(1, sum(sampled)),
         "response_len_mean": float(np.mean(lengths)), "response_len_max": float(max(lengths)),
         "truncated_frac": float(np.mean([r.finish_reason == "length" for r in rollouts])),
         "reward_no_answer_frac": stats.no_answer / max(1, stats.total),
         "reward_failures": float(stats.parse_failures + stats.timeouts + stats.errors),
         "non_finite_rewards": float(bad_rewards), "non_finite_advantages": float(bad_advantages)}
    m.update(advantage_stats(adv))
    if cfg.loss.baseline == "official":  # the hybrids' prefix-token advantage, r_h - mean_on
        m["adv_hybrid_prefix_mean"] = (prefix_adv[prefixed].mean().item() if bool(prefixed.any())
                                       else float("nan"))
    return m


# ---------------------------------------------------------------------------- update rows
def old_logprobs(run: Run, rollouts: list[Rollout]) -> dict[str, float]:
    """Log-probs (and entropies) of the policy before the update, per rollout, no grad;
    prefix tokens included. Returns the engine-vs-trainer mismatch on continuation tokens."""
    batches, idle = update_micro_batches(run, rollouts, range(len(rollouts)), balanced=True)
    with torch.no_grad(), run.compute():
        for batch in batches:
            lp, ent = response_logprob_entropy(run.model, batch, run.loss_fn)
            for i, lp_i, ent_i in zip(batch.rows, batch.per_rollout(lp), batch.per_rollout(ent)):
                rollouts[i].old_logprob = lp_i.float().cpu()
                rollouts[i].old_entropy = ent_i.float().cpu()
    idle_forwards(run, idle, grad=False)
    return engine_mismatch(rollouts, [r.old_logprob for r in rollouts])


def engine_mismatch(rollouts: list[Rollout], trainer_logprobs: list[torch.Tensor]
                    ) -> dict[str, float]:
    """``mismatch_mean`` / ``mismatch_max``: |engine - trainer| log-prob on continuation tokens,
    given the trainer's ``[len(response_ids)]`` log-probs of each rollout."""
    width = max(len(r.response_ids) for r in rollouts)
    trainer = torch.zeros(len(rollouts), width)
    for i, (r, lp) in enumerate(zip(rollouts, trainer_logprobs)):
        trainer[i, : len(r.response_ids)] = lp[: len(r.response_ids)]
    mismatch = logprob_mismatch([r.engine_logprobs for r in rollouts], trainer,
                                continuation_mask_for(rollouts, width))
    return {"mismatch_mean": mismatch["mismatch_mean"], "mismatch_max": mismatch["mismatch_max"]}


def policy_rows(run: Run, questions: list[Question], rollouts: list[Rollout]):
    """The rollouts, with their old log-probs; the mismatch metrics. Exactly on-policy, no
    old-log-prob pass: the update measures the mismatch (see :func:`is_exactly_on_policy`)."""
    if is_exactly_on_policy(run.cfg):
        return rollouts, {}
    return rollouts, old_logprobs(run, rollouts)


def sft_rows(run: Run, questions: list[Question], rollouts: list[Rollout]):
    """The questions' demonstrations (cut to the response budget); no mismatch to measure."""
    demos = [Rollout(prompt_ids=question.prompt_ids, group=q,
                     response_ids=question.demo_ids[: run.cfg.rollout.max_response_tokens])
             for q, question in enumerate(questions)]
    return demos, {"mismatch_mean": float("nan"), "mismatch_max": float("nan")}


# ---------------------------------------------------------------------------- update
def update_micro_batches(run: Run, rows: list[Rollout], picked, *, balanced: bool):
    """Micro-batches of one pass over ``rows[i] for i in picked`` (``train.packing``,
    ``train.micro_batch_tokens``; :func:`prefix_rft.update.make_micro_batches`). Returns
    ``(batches, idle)``: ``idle`` = how many fewer this rank has than the busiest rank."""
    t = run.cfg.train
    batches = make_micro_batches(rows, picked, t.micro_batch_tokens, packing=t.packing,
                                 balanced=balanced, pad_token_id=run.pad_id, device=run.device)
    return batches, D.max_over_ranks(len(batches)) - len(batches)


def may_balance_update(cfg: Config) -> bool:
    """Whether the update's micro-batches may be token-balanced: not when the split changes the
    entropy mask (:attr:`~prefix_rft.loss.entropy_mask.EntropyMask.split_changes_mask`)."""
    return cfg.loss.algo == "sft" or not _entropy_mask(cfg).split_changes_mask


def _entropy_mask(cfg: Config) -> EntropyMask:
    return EntropyMask(cfg.loss.entropy_top_fraction, cfg.loss.entropy_mask_scope)


def micro_loss(run: Run, batch: MicroBatch, *, old_logprob: torch.Tensor | None,
               num_sequences: int, keep: torch.Tensor | None, entropy_tokens: int | None,
               seen: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """One micro-batch's ``(loss, metrics)``: its share of the global mini-batch of
    ``num_sequences`` rows, scaled by the world size (FSDP2 averages gradients over ranks).

    The one place the loss meets the model: one forward-with-head gives the fused kernel's
    log-probs and entropies ``[B, T]`` (packed ``[R]``), then the objective of ``loss.algo``
    with the run's :class:`~prefix_rft.loss.settings.LossSettings` -- token NLL for ``sft``,
    :func:`~prefix_rft.loss.prefix_rft_loss` otherwise (``old_logprob`` None: exactly
    on-policy, ρ = 1; its detached log-probs go into ``seen`` for the mismatch). A new head
    path (e.g. one that computes the loss gradient inside the head) is chosen here."""
    settings = run.loss_fn.settings
    if use_fused_head(run.cfg.train.head_path):
        return _fused_micro_loss(run, batch, old_logprob=old_logprob,
                                 num_sequences=num_sequences, keep=keep,
                                 entropy_tokens=entropy_tokens, seen=seen)

    def head(hidden, weight, bias):
        lp, ent = run.loss_fn.token_logprob_entropy(hidden, weight, batch.response_ids,
                                                    batch.response_mask, bias)
        _remember(seen, batch, lp)
        if run.cfg.loss.algo == "sft":
            mask = batch.response_mask  # packed [R]: one row for sft_loss's [B, T]
            lp, mask = (lp[None], mask[None]) if lp.dim() == 1 else (lp, mask)
            return sft_loss(lp, mask, max_response_tokens=settings.max_response_tokens,
                            num_sequences=num_sequences, loss_scale=float(run.world))
        settings.entropy_mask.check_keep(keep)
        return prefix_rft_loss(
            lp, old_logprob, batch.advantages, batch.response_mask, batch.prefix_mask, ent,
            settings=settings, loss_scale=float(run.world), num_sequences=num_sequences,
            keep_prefix_mask=keep, seq_index=batch.seq_index, num_entropy_tokens=entropy_tokens)

    return _tag_head_path(run_head(run.model, batch, head), fused=False)


def _fused_micro_loss(run: Run, batch: MicroBatch, *, old_logprob, num_sequences, keep,
                      entropy_tokens, seen) -> tuple[torch.Tensor, dict]:
    """:func:`micro_loss` through the fused head-and-loss (:mod:`prefix_rft.loss.fused`,
    6NHV: the loss gradient is computed in the head's forward, no logit recompute)."""
    chunk_bytes = run.cfg.train.head_chunk_mb * 2**20 or None  # None: per-device default

    def head(hidden, weight, bias):
        if run.cfg.loss.algo == "sft":
            return fused_sft_loss(
                run.loss_fn, hidden, weight, batch.response_ids, batch.response_mask, bias,
                max_response_tokens=run.loss_fn.settings.max_response_tokens,
                num_sequences=num_sequences, loss_scale=float(run.world),
                chunk_bytes=chunk_bytes)
        loss, metrics, lp = fused_prefix_rft_loss(
            run.loss_fn, hidden, weight, batch.response_ids, old_logprob, batch.advantages,
            batch.response_mask, batch.prefix_mask, bias, num_sequences=num_sequences,
            loss_scale=float(run.world), keep_prefix_mask=keep, seq_index=batch.seq_index,
            num_entropy_tokens=entropy_tokens, chunk_bytes=chunk_bytes)
        _remember(seen, batch, lp)
        return loss, metrics

    return _tag_head_path(run_head(run.model, batch, head), fused=True)


def _remember(seen: dict[int, torch.Tensor] | None, batch: MicroBatch, logprob) -> None:
    """Exactly on-policy: keep each row's detached update log-probs (the engine mismatch)."""
    if seen is not None:
        for i, lp_i in zip(batch.rows, batch.per_rollout(logprob.detach())):
            seen[i] = lp_i.float().cpu()


def _tag_head_path(result, *, fused: bool):
    """``(loss, metrics)`` with ``head_path_fused`` (1: the fused head-and-loss ran)."""
    loss, metrics = result
    metrics["head_path_fused"] = float(fused)
    return loss, metrics


def _global_continuation_tokens(run: Run, batches: list[MicroBatch]) -> int:
    """Continuation tokens of the whole mini-batch over all ranks (token-mean entropy bonus)."""
    local = sum(int((b.response_mask & ~b.prefix_mask).sum()) for b in batches)
    return max(1, round(D.all_reduce_mean(float(local)) * run.world))


def _keep_masks(run: Run, rows: list[Rollout], batches: list[MicroBatch], *,
                first_update: bool, idle: int) -> list:
    """Each micro-batch's ``keep_prefix_mask`` when the loop ranks the mini-batch's prefix
    tokens (:meth:`~prefix_rft.loss.entropy_mask.EntropyMask.mini_batch_keeps`), else None each."""
    mask = run.loss_fn.settings.entropy_mask
    if run.cfg.loss.algo == "sft":
        return [None] * len(batches)

    def current_entropy(batch):
        with torch.no_grad(), run.compute():
            return response_logprob_entropy(run.model, batch, run.loss_fn)[1]

    keeps = mask.mini_batch_keeps(
        batches, first_update=first_update, current_entropy=current_entropy,
        stored_entropy=lambda batch: batch.gather([r.old_entropy for r in rows]))
    if mask.needs_entropy_pass(first_update):
        idle_forwards(run, idle, grad=False)
    return keeps


def _accumulate(run: Run, rows: list[Rollout], picked: list[int], *, balanced: bool,
                first_update: bool, num_sequences: int, avg: MetricAverager,
                seen: dict | None) -> tuple[list, int, dict[str, int]]:
    """Forward + backward of one mini-batch's micro-batches on this rank (gradients
    accumulate); returns ``(losses, bad_advantages, token counts)``."""
    cfg = run.cfg
    batches, idle = update_micro_batches(run, rows, picked, balanced=balanced)
    keeps = _keep_masks(run, rows, batches, first_update=first_update, idle=idle)
    token_mean = cfg.loss.entropy_norm == "token_mean" and cfg.loss.entropy_coef != 0
    entropy_tokens = (_global_continuation_tokens(run, batches)
                      if token_mean and cfg.loss.algo != "sft" else None)
    use_old = cfg.loss.algo != "sft" and seen is None
    losses, bad_adv = [], 0
    counts = {"tokens": 0, "padded": 0,
              "if_padded": padded_cut_tokens(rows, picked, cfg.train.micro_batch_tokens)}
    for index, (batch, keep) in enumerate(zip(batches, keeps)):
        old = batch.gather([r.old_logprob for r in rows]) if use_old else None
        with run.compute():
            loss, m = micro_loss(run, batch, old_logprob=old, num_sequences=num_sequences,
                                 keep=keep, entropy_tokens=entropy_tokens, seen=seen)
        loss.backward()  # even when non-finite: FSDP2 ranks reduce together
        losses.append((index, float(loss.detach())))
        bad_adv += int((~torch.isfinite(batch.advantages)).sum())
        avg.add(m)
        counts["tokens"] += batch.num_tokens
        counts["padded"] += batch.num_padded_tokens
    idle_forwards(run, idle, grad=True)
    return losses, bad_adv, counts


def optimize(run: Run, rows: list[Rollout], *, per_question: int,
             seen: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
    """``ppo_epochs`` passes of mini-batches (by question) of micro-batched loss
    (:func:`micro_loss`) + an optimizer step each (skipped when non-finite).

    ``seen``: exactly on-policy (no old log-probs), it collects the update's detached
    log-probs per row. Logs real / computed update tokens and padding fractions (actual, and
    if padded)."""
    cfg = run.cfg
    local_questions = cfg.train.mini_batch_size // run.world
    num_sequences = cfg.train.mini_batch_size * per_question  # global mini-batch, normalizer B
    avg, grad_norms, skipped = MetricAverager(), [], 0
    totals = {"tokens": 0, "padded": 0, "if_padded": 0}
    groups = sorted({r.group for r in rows})
    balanced = may_balance_update(cfg)
    for epoch in range(cfg.train.ppo_epochs):
        for start in range(0, len(groups), local_questions):
            chosen = set(groups[start:start + local_questions])
            picked = [i for i, r in enumerate(rows) if r.group in chosen]
            losses, bad_adv, counts = _accumulate(
                run, rows, picked, balanced=balanced, first_update=epoch == 0 and start == 0,
                num_sequences=num_sequences, avg=avg, seen=seen)
            totals = {k: totals[k] + counts[k] for k in totals}
            grad_norms.append(D.clip_grad_norm(run.model, cfg.optim.grad_clip))
            if run.guard.check(losses=losses, grad_norm=grad_norms[-1], bad_advantages=bad_adv):
                run.optimizer_stepped = True
                run.optimizer.step()
                run.scheduler.step()
            else:  # skip: no update, no schedule step; the reason is printed
                skipped += 1
                if D.is_main():
                    print(f"[prefix-rft] {run.guard.reasons[-1]}", flush=True)
            run.optimizer.zero_grad(set_to_none=True)
            avg.n_mini += 1
            run.guard.raise_if_exhausted()
    tokens, padded, if_padded = totals["tokens"], totals["padded"], totals["if_padded"]
    out = avg.result()
    out.update(grad_norm=float(np.mean(grad_norms)), grad_norm_max=float(np.max(grad_norms)),
               lr=run.scheduler.get_last_lr()[0], update_tokens=float(tokens),
               skipped_steps=float(skipped), update_padded_tokens=float(padded),
               update_padding_frac=1.0 - tokens / padded if padded else 0.0,
               update_padding_frac_if_padded=1.0 - tokens / if_padded if if_padded else 0.0)
    return out


def policy_update(run: Run, rollouts: list[Rollout]) -> dict[str, float]:
    """The Prefix-RFT / RFT update over the scored rollouts; exactly on-policy
    (:func:`is_exactly_on_policy`) it also measures the engine mismatch."""
    if not is_exactly_on_policy(run.cfg):
        return optimize(run, rollouts, per_question=run.cfg.rollout.group_size)
    seen: dict[int, torch.Tensor] = {}
    out = optimize(run, rollouts, per_question=run.cfg.rollout.group_size, seen=seen)
    out.update(engine_mismatch(rollouts, [seen[i] for i in range(len(rollouts))]))
    return out


def is_exactly_on_policy(cfg: Config) -> bool:
    """One optimizer step per rollout batch (``ppo_epochs`` 1, one mini-batch) and no
    mini-batch entropy ranking before the first backward: the policy before the update is the
    one the update's only forward sees, so the old-log-prob pass is redundant. The loss then
    uses the detached log-probs of that forward (ρ = 1, as TRL does with ``num_iterations=1``)
    and the engine mismatch is measured on them."""
    return (cfg.loss.algo != "sft" and cfg.train.ppo_epochs == 1
            and cfg.train.mini_batch_size == cfg.train.prompts_per_step
            and not _entropy_mask(cfg).ranks_mini_batch)


def sft_update(run: Run, demos: list[Rollout]) -> dict[str, float]:
    """The SFT baseline's update: token NLL on the demonstrations (one per question)."""
    return optimize(run, demos, per_question=1)


# ---------------------------------------------------------------------------- the step
def train_step(run: Run, step: int) -> dict[str, float]:
    """One training step (0-based ``step``); returns its metrics (already rank-averaged)."""
    cfg = run.cfg
    # SFT learns from the demonstrations; prefix_rft and rft from the scored rollouts.
    update_rows, update = ((sft_rows, sft_update) if cfg.loss.algo == "sft"
                           else (policy_rows, policy_update))
    reset_peak_memory(run.device)  # peak_mem_gb is this step's
    t0 = time.perf_counter()
    # ---- sample questions, build requests, roll out
    questions = [run.dataset[i] for i in run.sampler.next_batch(cfg.train.prompts_per_step)]
    first = D.shard_range(cfg.train.prompts_per_step).start
    rollouts, meta, low, prefix_metrics = step_rollouts(run, questions, step, first)
    run.engine.sleep()
    t_rollout = time.perf_counter()
    # ---- reward + advantages
    run.guard.step = step
    metrics = score(rollouts, questions, run.tokenizer, cfg, step=step, guard=run.guard)
    metrics.update(prefix_metrics)
    if run.prefix_store is not None:  # source self: this step's solutions, for later steps
        run.prefix_store.add_all(gather_additions(
            self_store_additions(rollouts, [question.index for question in questions])))
        metrics["self_store_size"] = float(len(run.prefix_store))
    if not cfg.prefix.train_on_prefix:  # scored as prefix + continuation (as when trained);
        rollouts = [as_conditioning(r) for r in rollouts]  # the update sees the continuation
    ratios = [ratio for _, prefixed, ratio, _ in meta if prefixed]
    metrics.update(prefix_low=low,
                   prefix_ratio_mean=float(np.mean(ratios)) if ratios else float("nan"))
    t_reward = time.perf_counter()
    # ---- old log-probs (fused kernel, no grad) + engine mismatch; SFT: the demonstrations
    rows, mismatch = update_rows(run, questions, rollouts)
    metrics.update(mismatch)
    t_old = time.perf_counter()
    # ---- policy update
    metrics.update(update(run, rows))
    t_update = time.perf_counter()
    # ---- weight sync
    run.engine.sync_from(run.model)
    t_end = time.perf_counter()
    metrics.update(rollout_time_s=t_rollout - t0, reward_time_s=t_reward - t_rollout,
                   old_logprob_time_s=t_old - t_reward, update_time_s=t_update - t_old,
                   sync_time_s=t_end - t_update, step_time_s=t_end - t0,
                   tokens_per_s=metrics["update_tokens"] * run.world / max(t_update - t_old, 1e-9),
                   peak_mem_gb=peak_memory_gb(run.device))
    return D.all_reduce_mean(metrics)


# ---------------------------------------------------------------------------- the loop
def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training as configured. Returns ``{"run_dir", "steps_done",
    "final_model_dir", "metrics" (last step's), "stopped_early", "resumed_from"}``."""
    cfg = validate_config(resolve_config(cfg))
    preflight(cfg)  # paths, data files, resume, device: before the model is loaded
    lock = RunLock(cfg.train.run_dir)
    if os.environ.get("RANK", "0") == "0":  # the main rank (the process group is not up yet)
        lock.acquire()
    try:
        return _train(cfg)
    finally:
        lock.release()


def _train(cfg: Config) -> dict[str, Any]:
    run = start_run(cfg)
    run_dir, total, done = run.run_dir, cfg.train.steps, run.start_step
    logger = MetricsLogger(run_dir, total_steps=total, start_step=done,
                           tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                           enabled=D.is_main())
    previous_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop_flag = ckpt.install_signal_handlers()
    metrics: dict[str, float] = {}
    stopped_early, steps_this_run = False, 0
    try:
        while done < total:
            sampler_state = run.sampler.state_dict()
            run.optimizer_stepped = False
            try:
                metrics = train_step(run, done)
            except BaseException as error:
                save_after_crash(run, done, sampler_state, error)
                raise
            done += 1
            steps_this_run += 1
            if cfg.eval.every and cfg.eval.files and (done % cfg.eval.every == 0 or done == total):
                metrics.update(periodic_eval(run))
            if done % cfg.log.every == 0 or done == total:
                logger.log(done, metrics)
            else:
                logger.advance(done)
            stop = ckpt.stop_requested(stop_flag)
            limit = cfg.train.max_steps_per_run and steps_this_run >= cfg.train.max_steps_per_run
            periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0
            if periodic or stop or limit or done == total:
                save_step(run, done, run.sampler.state_dict(), metrics)
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
        final_dir = ckpt.save_hf_model(run.model, run.tokenizer, run_dir / "final",
                                       dtype=run.precision.export)
    if D.is_main() and cfg.log.plots:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots")
    run.engine.close()
    if run.world > 1 or cfg.train.offload == "params":  # (a one-rank group for offload)
        D.destroy_distributed()
    return {"run_dir": str(run_dir), "steps_done": done,
            "final_model_dir": str(final_dir) if final_dir else None, "metrics": metrics,
            "stopped_early": stopped_early, "resumed_from": run.resumed_from}
