"""Prefix-RFT policy loss and its fused form over hidden states (+ micro-batching, SFT).

Per response token t of rollout i (advantage ``A_i`` per rollout, or ``A_{i,t}`` per token)::

    ρ_t   = exp(logπθ(y_t) − logπ_old(y_t))        # log-ratio clamped to ±20 as in verl
    A_t   = A_i (A_{i,t})  on continuation tokens and on kept prefix tokens, 0 on other prefix
    ℓ_t   = −min(ρ_t·A_t, clip(ρ_t, 1 − clip_low, 1 + clip_high)·A_t)
    ℓ_t   = min(ℓ_t, −clip_c·A_t)   where A_t < 0       # dual clip, only if clip_c is set
    loss  = loss_scale · [Σ ℓ_t·m_t / (num_sequences·max_response_tokens) − entropy_coef·E]
    E     = Σ H_t·c_t / (num_sequences·max_response_tokens)     # entropy_norm "dr_grpo"
    E     = Σ H_t·c_t / num_entropy_tokens                      # entropy_norm "token_mean"

``m`` = response_mask, ``c`` = continuation tokens (``m & ~prefix_mask``);
``num_entropy_tokens`` is the continuation-token count of the whole mini-batch (default: this
call's), so ``token_mean`` is the authors' (and LUFFY's) token-mean entropy bonus. The kept prefix
tokens are the top ``entropy_top_fraction`` of the batch's prefix tokens by (detached)
entropy H_t -- the rule lives in :mod:`prefix_rft.loss.entropy_mask`; the others stay in the sum
with advantage 0 -- they add nothing, but the normalizer is a constant (Dr. GRPO), not a count.

Modules: the policy loss and :class:`PrefixRFTLoss` here; :mod:`prefix_rft.loss.entropy_mask`
(which prefix tokens keep their advantage), :mod:`prefix_rft.loss.metrics` (logged values),
:mod:`prefix_rft.loss.sft`, :mod:`prefix_rft.update.split`; all importable from here. The
options are one frozen :class:`~prefix_rft.loss.settings.LossSettings`;
:mod:`prefix_rft.loss.fused` computes the same loss through the fused head-and-loss.

Entry points:

* :func:`prefix_rft_loss` -- from per-token ``[B, T]`` log-probs/entropies (any trainer).
* :class:`PrefixRFTLoss` -- from hidden states and the lm_head, one fused
  :func:`~prefix_rft.kernels.linear_logprob_entropy` call, never a ``[B·T, V]`` tensor.
* :func:`split_micro_batches` / :func:`compute_keep_prefix_mask` -- gradient accumulation.
* :func:`sft_loss` -- token NLL on demonstrations, the ``algo: sft`` baseline.

**Micro-batching.** Split a mini-batch of ``B`` sequences into micro-batches (e.g. with
:func:`split_micro_batches`) and call the loss on each with ``num_sequences=B`` (the
*mini-batch* size). Each micro-batch's loss is then its share of the full-batch loss, so
``Σ_k loss_k.backward()`` accumulates exactly the full-batch gradient (no further division
by the number of micro-batches). Multiply by ``loss_scale`` for anything else (e.g. 1/world
size if your data-parallel all-reduce sums instead of averaging).

**Entropy-mask scope.** ``micro_batch`` (default, as in the authors' code): the top fraction
is taken among the prefix tokens of each micro-batch, so the result depends on how the
mini-batch is split. ``mini_batch``: the top fraction is taken over the whole mini-batch,
which needs its entropies before the first backward: run a no-grad pass per micro-batch
(:meth:`PrefixRFTLoss.token_logprob_entropy` under no_grad, or reuse the entropies of the
old-log-prob pass, which equal the current policy's on the first update of a step), call
:func:`compute_keep_prefix_mask` on the list of micro-batch tensors (the trainer does this in
:meth:`prefix_rft.loss.entropy_mask.EntropyMask.mini_batch_keeps`), and hand each micro-batch its
slice as ``keep_prefix_mask``. With ``mini_batch`` scope, micro-batch
accumulation equals the full-batch gradient exactly; with ``micro_batch`` it does only when
``entropy_top_fraction == 1``.
"""

from __future__ import annotations

import torch

from ..checks import (
    as_mask,
    check_float_tensor,
    check_int,
    check_mask,
    check_number,
    check_tensor,
)
from ..kernels import linear_logprob_entropy
from ..update.split import split_micro_batches
from .entropy_mask import compute_keep_prefix_mask
from .metrics import policy_metrics
from .settings import EntropyNorm, KernelImpl, LossSettings, check_loss_options
from .sft import sft_loss

__all__ = ["EntropyNorm", "KernelImpl", "LOG_RATIO_CLAMP", "LossSettings", "PrefixRFTLoss",
           "check_loss_options", "compute_keep_prefix_mask", "prefix_rft_loss", "sft_loss",
           "split_micro_batches"]

# verl clamps the log-ratio to ±20 before exp so a stale old_logprob cannot overflow.
LOG_RATIO_CLAMP = 20.0


# ---------------------------------------------------------------------------- policy loss


def _check_advantages(advantages, B: int, T: int, device) -> None:
    """``[B]`` (one per rollout) or ``[B, T]`` (one per token), floating, on ``device``."""
    shape = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else None
    if shape not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got "
                         f"{shape if shape is not None else type(advantages).__name__}")
    check_tensor("advantages", advantages, shape, device, floating=True)


def prefix_rft_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    prefix_mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    *,
    settings: LossSettings | None = None,
    loss_scale: float = 1.0,
    num_sequences: int | None = None,
    keep_prefix_mask: torch.Tensor | None = None,
    num_entropy_tokens: int | None = None,
    seq_index: torch.Tensor | None = None,
    importance_weights: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Prefix-RFT policy loss from per-token log-probs (formulas in the module docstring).

    Two layouts: padded ``[B, T]`` per-token tensors (below), or packed -- give ``seq_index``
    and every per-token tensor is ``[R]`` (the ``R`` response tokens of ``B`` sequences back
    to back, :mod:`prefix_rft.update.packed`), ``advantages`` still ``[B]``. The packed loss equals
    the padded one on the same tokens (row-major order of the valid tokens = packed order).

    Args:
        logprob: ``[B, T]`` log π_θ(y_t) of the response tokens, with gradient.
        old_logprob: ``[B, T]`` log π_old(y_t) from the policy before the update (same
            temperature), no gradient needed. None for an exactly on-policy update (one
            optimizer step per rollout batch): the detached ``logprob`` is used, so ρ = 1.
        advantages: ``[B]`` one advantage per rollout (``advantage.group_advantages``) or
            ``[B, T]`` one per token (``advantage.token_advantages``, ``baseline: official``).
        response_mask: ``[B, T]`` bool, or integer/float 0/1, True on real response tokens.
        prefix_mask: ``[B, T]`` bool, or integer/float 0/1, True on demonstration-prefix tokens.
        entropy: ``[B, T]`` token entropies; detached for the mask, differentiated for the
            entropy bonus. May be None when neither needs it (fraction 1 or a given
            ``keep_prefix_mask``, and ``entropy_coef == 0``); entropy metrics are then 0.
        settings: the loss's :class:`~prefix_rft.loss.settings.LossSettings` (clip range, dual
            clip, entropy mask, entropy bonus and its normalizer ``entropy_norm``: ``"dr_grpo"``
            ÷ num_sequences·max_response_tokens as the policy term, ``"token_mean"`` ÷
            ``num_entropy_tokens``). The trainer passes the one it built from the config.
        **options: shorthand instead of ``settings``: its fields as keywords, e.g.
            ``max_response_tokens=1024, clip_c=3.0`` (validated by ``LossSettings``).
        loss_scale: multiplies the returned loss (e.g. 1/world_size).
        num_sequences: B of the normalizer (default ``logprob.shape[0]``); give the
            mini-batch size when this call is one micro-batch of it. With ``G`` equal
            micro-batches of ``B_micro`` accumulated per optimizer step that is
            ``B_micro × G`` (e.g. TRL's Dr. GRPO: ``per_device_train_batch_size ×
            gradient_accumulation_steps``).
        keep_prefix_mask: ``[B, T]`` bool precomputed by :func:`compute_keep_prefix_mask`
            (``mini_batch`` scope); None computes it here from ``entropy`` (``micro_batch``).
        num_entropy_tokens: continuation tokens of the whole mini-batch (``token_mean``; give
            it when this call is one micro-batch of it); default this call's count.
        seq_index: packed layout only: ``[R]`` int, the sequence (``0..B-1``) of each token;
            ``advantages`` is then ``[B]``, or ``[R]`` one per token.
        importance_weights: ``[B, T]`` or ``[B, 1]`` (packed: ``[R]``) non-negative, no
            gradient: multiplies each token's clipped loss, e.g. TRL's vLLM
            importance-sampling correction ``π_old / π_sampler`` (truncated or masked).
            None = 1.

    Returns:
        ``(loss, metrics)``: scalar fp32 loss; metrics of Python floats (see
        :func:`prefix_rft.loss.metrics.policy_metrics`).

    Example::

        >>> B, T = 2, 4
        >>> lp = torch.randn(B, T, requires_grad=True); old = lp.detach() + 0.1
        >>> mask = torch.ones(B, T, dtype=torch.bool); pre = torch.zeros(B, T, dtype=torch.bool)
        >>> pre[0, :2] = True
        >>> loss, m = prefix_rft_loss(lp, old, torch.tensor([1.0, -1.0]), mask, pre,
        ...                           torch.rand(B, T), max_response_tokens=8)
        >>> loss.backward()
    """
    settings = LossSettings.resolve(settings, options)
    B, per_token = _check_loss_inputs(
        logprob, old_logprob, advantages, response_mask, prefix_mask, entropy, settings,
        loss_scale=loss_scale, num_sequences=num_sequences, keep_prefix_mask=keep_prefix_mask,
        num_entropy_tokens=num_entropy_tokens, seq_index=seq_index,
        importance_weights=importance_weights)
    if old_logprob is None:
        old_logprob = logprob.detach()
    valid = as_mask(response_mask)
    prefix = as_mask(prefix_mask) & valid
    continuation = valid & ~prefix
    kept = settings.entropy_mask.keep(prefix, entropy, keep_prefix_mask, seq_index)
    if seq_index is None:
        adv = advantages.float()[:, None] if advantages.dim() == 1 else advantages.float()
    else:
        adv = advantages.float() if per_token else advantages.float()[seq_index]
    token_adv = torch.where(continuation | kept, adv, 0.0)

    # where() (not multiply) keeps NaN/inf in padded positions out of values and gradients.
    log_ratio = torch.where(valid, logprob.float() - old_logprob.float(), 0.0)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -token_adv * ratio
    clipped = -token_adv * ratio.clamp(1.0 - settings.clip_low, 1.0 + settings.clip_high)
    token_loss = torch.maximum(unclipped, clipped)
    if settings.clip_c is not None:
        capped = torch.minimum(token_loss, -token_adv * settings.clip_c)
        token_loss = torch.where(token_adv < 0, capped, token_loss)
    if importance_weights is not None:
        token_loss = token_loss * importance_weights.detach().float()
    denom = float((num_sequences or B) * settings.max_response_tokens)
    pg_loss = torch.where(valid, token_loss, 0.0).sum() / denom
    loss = pg_loss
    entropy_bonus = None
    if settings.entropy_coef != 0:
        if settings.entropy_norm == "dr_grpo":
            ent_denom = denom
        elif num_entropy_tokens is not None:
            ent_denom = float(num_entropy_tokens)
        else:  # this call's continuation tokens (a tensor: no device sync)
            ent_denom = continuation.sum().clamp_min(1).float()
        entropy_bonus = torch.where(continuation, entropy.float(), 0.0).sum() / ent_denom
        loss = loss - settings.entropy_coef * entropy_bonus
    loss = loss * loss_scale
    metrics = policy_metrics(
        loss=loss, pg_loss=pg_loss, entropy_bonus=entropy_bonus, ratio=ratio, token_adv=token_adv,
        advantages=advantages if advantages.dim() == 1 else advantages[valid],
        entropy=entropy, valid=valid, prefix=prefix, kept=kept,
        continuation=continuation, clip_low=settings.clip_low,
        clip_high=settings.clip_high, clip_c=settings.clip_c,
    )
    return loss, metrics


def _check_loss_inputs(logprob, old_logprob, advantages, response_mask, prefix_mask, entropy,
                       settings: LossSettings, *, loss_scale, num_sequences, keep_prefix_mask,
                       num_entropy_tokens, seq_index, importance_weights) -> tuple[int, bool]:
    """The tensors of one :func:`prefix_rft_loss` call against each other (shapes, devices,
    dtypes; the options were checked when ``settings`` was built). Returns ``(B, per_token)``:
    the number of sequences and whether a packed call's ``advantages`` are per token."""
    per_token = False
    if seq_index is None:
        check_float_tensor("logprob", logprob, "[B, T]")
        B = logprob.shape[0]
    else:
        check_float_tensor("logprob", logprob, "[R]")
        check_float_tensor("advantages", advantages, "[B]")
        check_tensor("seq_index", seq_index, tuple(logprob.shape), logprob.device, floating=False)
        # [R] advantages are per token (baseline official); [B] per sequence
        per_token = advantages.shape[0] == logprob.shape[0] and seq_index.numel() > 0 \
            and advantages.shape[0] != int(seq_index.max()) + 1
        B = int(seq_index.max()) + 1 if per_token else advantages.shape[0]
        if seq_index.numel() and (int(seq_index.min()) < 0 or int(seq_index.max()) >= B):
            raise ValueError(f"seq_index must be in [0, {B}) (the sequence of each token)")
    shape, dev = tuple(logprob.shape), logprob.device
    if old_logprob is not None:
        check_tensor("old_logprob", old_logprob, shape, dev, floating=True)
    if seq_index is None:
        _check_advantages(advantages, B, shape[1], dev)
    else:
        check_tensor("advantages", advantages, (shape[0],) if per_token else (B,), dev,
                     floating=True)
    check_mask("response_mask", response_mask, shape, dev)
    check_mask("prefix_mask", prefix_mask, shape, dev)
    if importance_weights is not None:
        if seq_index is None:
            _check_importance_weights(importance_weights, B, shape[1], dev)
        else:
            check_tensor("importance_weights", importance_weights, shape, dev, floating=True)
    check_number("loss_scale", loss_scale)
    check_int("num_sequences", num_sequences, allow_none=True)
    check_int("num_entropy_tokens", num_entropy_tokens, allow_none=True)
    if num_sequences is not None and num_sequences < B:
        raise ValueError(f"num_sequences must be >= the batch size {B}, got {num_sequences}")
    if keep_prefix_mask is not None:
        check_tensor("keep_prefix_mask", keep_prefix_mask, shape, dev, floating=False)
    needs_entropy = settings.entropy_coef != 0 or settings.entropy_mask.needs_entropy(
        keep_given=keep_prefix_mask is not None)
    if entropy is not None:
        check_tensor("entropy", entropy, shape, dev, floating=True)
    elif needs_entropy:
        raise ValueError("entropy is required for the prefix entropy mask or the entropy bonus")
    return B, per_token


def _check_importance_weights(weights, B: int, T: int, device) -> None:
    cols = weights.shape[-1] if isinstance(weights, torch.Tensor) and weights.dim() == 2 else T
    check_tensor("importance_weights", weights, (B, 1 if cols == 1 else T), device,
                 floating=True)


# ---------------------------------------------------------------------------- fused module


class PrefixRFTLoss(torch.nn.Module):
    """Prefix-RFT policy loss straight from hidden states: the loss other trainers import.

    One :func:`~prefix_rft.kernels.linear_logprob_entropy` call over the valid response tokens
    gives log-probs *and* entropies of ``(hidden @ W.T + b) / temperature``; the entropies
    feed the prefix mask (detached) and the optional bonus from that same forward. Nothing of
    size ``[B·T, V]`` is ever allocated, in the forward or the backward.

    **Alignment.** ``hidden[b, t]`` is the hidden state that *predicts* ``response_ids[b, t]``:
    the caller shifts. For a causal LM over ``input_ids = [prompt (P tokens, left-padded) |
    response (T tokens, right-padded)]`` that is ``last_hidden_state[:, P-1 : P-1+T]`` -- the
    final-norm output of the backbone (``model.model(...)`` in HF), *not* the logits.

    **Temperature.** Log-probs and entropies are those of the logits divided by
    ``temperature``; ``old_logprob`` must use the same temperature (the rollout's).

    Args (constructor): ``settings`` -- a :class:`~prefix_rft.loss.settings.LossSettings`
    (``max_response_tokens``, clip range, dual clip, entropy mask and its scope, entropy bonus
    and its normalizer, ``temperature``, kernel ``impl``) -- or its fields as keywords, e.g.
    ``PrefixRFTLoss(max_response_tokens=1024, impl="torch")``. With ``entropy_mask_scope=
    "mini_batch"`` forward requires ``keep_prefix_mask`` unless the fraction is 1.

    Forward shapes: ``hidden [B, T, H]``, ``lm_head_weight [V, H]``, ``response_ids [B, T]``
    int, ``old_logprob [B, T]`` (None: on-policy), ``advantages [B]`` or ``[B, T]``,
    ``response_mask [B, T]``, ``prefix_mask [B, T]``, ``lm_head_bias [V]`` or None; keyword
    ``num_sequences``, ``loss_scale``, ``keep_prefix_mask``, ``importance_weights``,
    ``num_entropy_tokens`` as in :func:`prefix_rft_loss`.
    Packed layout (:mod:`prefix_rft.update.packed`, no padding): ``hidden [R, H]`` and ``[R]``
    per-token tensors for the ``R`` response tokens back to back, ``advantages [B]`` (or
    ``[R]``) and ``seq_index [R]``.
    Returns ``(loss scalar fp32, metrics dict[str, float])``.

    Example (paste into any trainer; a tiny HF model stands in for yours)::

        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from prefix_rft.loss import PrefixRFTLoss

        cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        model = Qwen2ForCausalLM(cfg)
        prompt, response = torch.randint(0, 128, (2, 5)), torch.randint(0, 128, (2, 6))
        response_mask = torch.ones(2, 6, dtype=torch.bool); response_mask[1, 4:] = False
        prefix_mask = torch.zeros(2, 6, dtype=torch.bool); prefix_mask[0, :3] = True
        advantages = torch.tensor([0.5, -0.5])
        P, T = prompt.shape[1], response.shape[1]

        def response_hidden():  # the states that predict response[:, t]
            out = model.model(input_ids=torch.cat([prompt, response], 1))
            return out.last_hidden_state[:, P - 1 : P - 1 + T]

        loss_fn = PrefixRFTLoss(max_response_tokens=8, temperature=1.0)
        with torch.no_grad():  # the policy before the update
            old_logprob, _ = loss_fn.token_logprob_entropy(
                response_hidden(), model.lm_head.weight, response, response_mask)
        loss, metrics = loss_fn(response_hidden(), model.lm_head.weight, response,
                                old_logprob, advantages, response_mask, prefix_mask)
        loss.backward()
    """

    def __init__(self, settings: LossSettings | None = None, **options) -> None:
        super().__init__()
        self.settings = LossSettings.resolve(settings, options)

    def extra_repr(self) -> str:
        return repr(self.settings)

    def token_logprob_entropy(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        lm_head_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprob [B, T] fp32, entropy [B, T] fp32)`` of the response tokens, 0 off-mask.

        Only the ``response_mask`` rows reach the kernel (``hidden[response_mask]``), so
        padding costs no lm_head work. Differentiable w.r.t. hidden, weight and bias.
        Packed layout: ``hidden [R, H]``, ``response_ids [R]``, ``response_mask [R]`` ->
        ``[R]`` results (all-True mask: the kernel runs on ``hidden`` as given).
        """
        packed = isinstance(hidden, torch.Tensor) and hidden.dim() == 2
        check_float_tensor("hidden", hidden, "[R, H]" if packed else "[B, T, H]")
        shape, H = tuple(hidden.shape[:-1]), hidden.shape[-1]
        weight = lm_head_weight
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != H:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"lm_head_weight must be [V, H] with H = {H}, got {got}")
        check_tensor("response_ids", response_ids, shape, hidden.device, floating=False)
        if response_ids.dtype == torch.bool:
            raise ValueError("response_ids must be an integer tensor of token ids, got bool")
        check_mask("response_mask", response_mask, shape, hidden.device)
        valid = as_mask(response_mask)
        if packed and bool(valid.all()):  # no padding to drop
            return linear_logprob_entropy(hidden, lm_head_weight, response_ids.long(),
                                          bias=lm_head_bias,
                                          temperature=self.settings.temperature,
                                          impl=self.settings.impl)
        logprob, entropy = linear_logprob_entropy(
            hidden[valid], lm_head_weight, response_ids[valid].long(), bias=lm_head_bias,
            temperature=self.settings.temperature, impl=self.settings.impl,
        )
        zeros = torch.zeros(shape, dtype=logprob.dtype, device=hidden.device)
        # index_put with the same bool mask restores row-major order; differentiable in values.
        return zeros.index_put((valid,), logprob), zeros.index_put((valid,), entropy)

    def forward(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        response_ids: torch.Tensor,
        old_logprob: torch.Tensor | None,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        prefix_mask: torch.Tensor,
        lm_head_bias: torch.Tensor | None = None,
        *,
        num_sequences: int | None = None,
        loss_scale: float = 1.0,
        keep_prefix_mask: torch.Tensor | None = None,
        num_entropy_tokens: int | None = None,
        seq_index: torch.Tensor | None = None,
        importance_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of :func:`prefix_rft_loss` on the fused log-probs/entropies of ``hidden``.

        ``old_logprob=None`` means on-policy (ρ = 1); the keyword arguments are passed through.
        """
        self.settings.entropy_mask.check_keep(keep_prefix_mask)
        logprob, entropy = self.token_logprob_entropy(
            hidden, lm_head_weight, response_ids, response_mask, lm_head_bias
        )
        return prefix_rft_loss(
            logprob, old_logprob, advantages, response_mask, prefix_mask, entropy,
            settings=self.settings, loss_scale=loss_scale, num_sequences=num_sequences,
            keep_prefix_mask=keep_prefix_mask, seq_index=seq_index,
            importance_weights=importance_weights, num_entropy_tokens=num_entropy_tokens,
        )
