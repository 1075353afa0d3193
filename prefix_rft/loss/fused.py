"""The micro-batch loss through the fused head-and-loss (6NHV): a thin adapter for the update.

Given one micro-batch's response hidden states, the lm_head and the per-token tensors,
:func:`fused_prefix_rft_loss` returns the same ``(loss, metrics)`` as
:class:`~prefix_rft.loss.PrefixRFTLoss` (and :func:`fused_sft_loss` as
:func:`~prefix_rft.loss.sft_loss`), with gradients to hidden, weight and bias -- through
:func:`prefix_rft.kernels.linear_policy_loss`, which computes the per-token loss derivative in
the forward, so the lm_head costs the three bare GEMMs (6NHV) instead of the generic
log-prob/entropy autograd path's 8NHV (its backward recomputes the logits).

What it maps (formulas in :mod:`prefix_rft.loss`): the valid tokens of a padded ``[B, T]``
batch or the ``[R]`` tokens of a packed one become ``[N]`` rows; advantages (per rollout or
per token, ``baseline: official``), importance weights and old log-probs are gathered per
token; the Dr. GRPO normalizer ``num_sequences · max_response_tokens`` and ``loss_scale``
become the per-token ``loss_weight``; the entropy bonus (``dr_grpo`` or ``token_mean``) an
``entropy_weight`` on continuation tokens.

**The entropy mask (today's rule exactly,** :mod:`prefix_rft.loss.entropy_mask`\\ **).** The mask
must be known before the fused pass. A given ``keep_prefix_mask`` (``mini_batch`` scope: the
trainer ranks the mini-batch first, from the old-log-prob pass's entropies on the first
update or a no-grad pass later) is used as is; fraction 1 keeps every prefix token;
otherwise (``micro_batch`` scope) a no-grad
:func:`~prefix_rft.kernels.linear_logprob_entropy` forward over **the prefix tokens only**
(2·N_prefix·H·V FLOPs, prefix tokens are a small share) gives the current policy's entropies
of those tokens -- the same values the loss's own forward gives them -- and
:func:`~prefix_rft.kernels.entropy_topk_mask` ranks them in row-major order, as
:meth:`~prefix_rft.loss.entropy_mask.EntropyMask.keep` does.

Metrics are :func:`~prefix_rft.loss.prefix_rft_loss`'s, computed on the fused pass's detached
per-token log-probs and entropies (elementwise ``[N]`` work), with ``loss`` the fused value.

Which path runs: ``train.head_path`` (:data:`HeadPath`); the trainer logs ``head_path_fused``
(1 when the fused path ran, averaged over micro-batches).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..checks import as_mask
from ..kernels import linear_logprob_entropy, linear_policy_loss
from . import prefix_rft_loss, sft_loss

# auto: the fused head-and-loss wherever the update's loss is the policy loss or the SFT NLL
# (always, today); fused_loss: force it; autograd: the generic log-prob/entropy autograd path.
HeadPath = Literal["auto", "fused_loss", "autograd"]


def use_fused_head(head_path: str) -> bool:
    """Whether the update computes its micro-batch loss through :func:`fused_prefix_rft_loss`."""
    return head_path in ("auto", "fused_loss")


def _rows(hidden, response_mask, packed):
    """``(rows_hidden [N, H], valid [B, T] or [R] bool)``: the tokens the loss sees."""
    valid = as_mask(response_mask)
    if packed and bool(valid.all()):
        return hidden, valid
    return hidden[valid], valid


def _is_per_token(values, valid, seq_index) -> bool:
    """Packed ``[R]`` values are per token unless ``R`` is also the number of sequences (the
    rule of :func:`~prefix_rft.loss.prefix_rft_loss`)."""
    return (values.shape[0] == valid.shape[0] and seq_index.numel() > 0
            and values.shape[0] != int(seq_index.max()) + 1)


def _num_rollouts(advantages, valid, seq_index) -> int:
    """B of the Dr. GRPO normalizer when ``num_sequences`` is not given."""
    if seq_index is None:
        return valid.shape[0]
    if _is_per_token(advantages, valid, seq_index):
        return int(seq_index.max()) + 1
    return advantages.shape[0]


def _per_token(values, valid, seq_index):
    """Per-rollout ``[B]``, per-token ``[B, T]``/``[B, 1]`` (padded) or ``[R]`` (packed) -> the
    ``[N]`` values of the valid tokens (None stays None)."""
    if values is None:
        return None
    values = values.detach().float()
    if seq_index is None:
        if values.dim() == 1:
            values = values[:, None]
        return values.expand(valid.shape)[valid]
    return values[valid] if _is_per_token(values, valid, seq_index) else values[seq_index]


def _row_sequences(valid, seq_index):
    """``[N]`` sequence id of each loss row (the rule may rank per sequence)."""
    if seq_index is not None:
        return seq_index[valid]
    rows = torch.arange(valid.shape[0], device=valid.device)
    return rows[:, None].expand(valid.shape)[valid]


@torch.no_grad()
def _kept_prefix(settings, hidden_rows, weight, bias, labels, prefix_rows, keep_rows,
                 row_seq=None):
    """Kept prefix tokens among the ``[N]`` rows (see the module docstring): the rule is
    :meth:`~prefix_rft.loss.entropy_mask.EntropyMask.keep`; this only supplies the entropies, from
    a no-grad pass over the prefix rows alone."""
    mask = settings.entropy_mask
    entropy = None
    if mask.needs_entropy(keep_given=keep_rows is not None):
        entropy = torch.zeros(prefix_rows.shape, dtype=torch.float32, device=prefix_rows.device)
        if bool(prefix_rows.any()):
            _, ent = linear_logprob_entropy(hidden_rows[prefix_rows].detach(), weight.detach(),
                                            labels[prefix_rows], bias=bias, impl=settings.impl,
                                            temperature=settings.temperature)
            entropy[prefix_rows] = ent
    return mask.keep(prefix_rows, entropy, keep_rows, row_seq)


def _entropy_weight(settings, continuation, denom, loss_scale, num_entropy_tokens):
    if settings.entropy_coef == 0:
        return None
    if settings.entropy_norm == "dr_grpo":
        ent_denom = denom
    elif num_entropy_tokens is not None:
        ent_denom = float(num_entropy_tokens)
    else:
        ent_denom = continuation.sum().clamp_min(1).float()
    coef = settings.entropy_coef * loss_scale / ent_denom
    return torch.where(continuation, coef, 0.0).float()


def _scatter(values, valid):
    if values.shape == valid.shape:
        return values
    return torch.zeros(valid.shape, dtype=values.dtype, device=values.device).index_put(
        (valid,), values)


def fused_prefix_rft_loss(
    loss_fn, hidden, lm_head_weight, response_ids, old_logprob, advantages, response_mask,
    prefix_mask, lm_head_bias=None, *, num_sequences=None, loss_scale=1.0, keep_prefix_mask=None,
    num_entropy_tokens=None, seq_index=None, importance_weights=None, chunk_bytes=None,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """:class:`~prefix_rft.loss.PrefixRFTLoss`'s ``forward`` (same arguments after ``loss_fn``,
    the module holding the options) through the fused head-and-loss.

    Returns ``(loss, metrics, logprob)``: ``logprob`` ``[B, T]`` (packed ``[R]``) detached, 0
    off-mask -- e.g. for the on-policy update's engine-mismatch metrics.
    """
    settings = loss_fn.settings
    settings.entropy_mask.check_keep(keep_prefix_mask)
    packed = seq_index is not None
    rows_h, valid = _rows(hidden, response_mask, packed)
    labels = response_ids[valid].long()
    prefix = as_mask(prefix_mask)[valid]
    keep_rows = None if keep_prefix_mask is None else as_mask(keep_prefix_mask)[valid]
    kept = _kept_prefix(settings, rows_h, lm_head_weight, lm_head_bias, labels, prefix,
                        keep_rows, _row_sequences(valid, seq_index))
    continuation = ~prefix
    denom = float((num_sequences or _num_rollouts(advantages, valid, seq_index))
                  * settings.max_response_tokens)
    kwargs = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    loss, lp, ent = linear_policy_loss(
        rows_h, lm_head_weight, labels, bias=lm_head_bias,
        advantages=_per_token(advantages, valid, seq_index),
        old_logprob=_per_token(old_logprob, valid, seq_index), loss_weight=loss_scale / denom,
        importance_weights=_per_token(importance_weights, valid, seq_index),
        keep=continuation | kept,
        entropy_weight=_entropy_weight(settings, continuation, denom, loss_scale,
                                       num_entropy_tokens),
        clip_low=settings.clip_low, clip_high=settings.clip_high, clip_c=settings.clip_c,
        temperature=settings.temperature, impl=settings.impl, **kwargs)
    lp_full, ent_full = _scatter(lp, valid), _scatter(ent, valid)
    _, metrics = prefix_rft_loss(
        lp_full, old_logprob, advantages, response_mask, prefix_mask, ent_full,
        settings=settings, loss_scale=loss_scale, num_sequences=num_sequences,
        keep_prefix_mask=_scatter(kept, valid), seq_index=seq_index,
        importance_weights=importance_weights, num_entropy_tokens=num_entropy_tokens)
    metrics["loss"] = float(loss.detach())
    return loss, metrics, lp_full


def fused_sft_loss(loss_fn, hidden, lm_head_weight, response_ids, response_mask,
                   lm_head_bias=None, *, max_response_tokens: int, num_sequences: int,
                   loss_scale: float = 1.0, chunk_bytes=None):
    """:func:`~prefix_rft.loss.sft_loss` (``normalizer="max_tokens"``, the trainer's) of the
    ``response_mask`` tokens, through the fused head-and-loss (``loss_type="nll"``).
    ``hidden`` ``[B, T, H]`` or packed ``[R, H]``. Returns ``(loss, metrics)``."""
    rows_h, valid = _rows(hidden, response_mask, hidden.dim() == 2)
    kwargs = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    loss, lp, _ = linear_policy_loss(
        rows_h, lm_head_weight, response_ids[valid].long(), bias=lm_head_bias, loss_type="nll",
        loss_weight=loss_scale / float(num_sequences * max_response_tokens),
        temperature=loss_fn.settings.temperature, impl=loss_fn.settings.impl, **kwargs)
    lp_full, mask = _scatter(lp, valid), valid
    if lp_full.dim() == 1:  # packed [R]: one row for sft_loss's [B, T]
        lp_full, mask = lp_full[None], mask[None]
    _, metrics = sft_loss(lp_full, mask, max_response_tokens=max_response_tokens,
                          num_sequences=num_sequences, loss_scale=loss_scale)
    metrics["loss"] = float(loss.detach())
    return loss, metrics
