"""Prefix-RFT policy loss (DESIGN §3), its fused form over hidden states, micro-batching, SFT.

Per response token t of rollout i (advantage ``A_i``, one scalar per rollout)::

    ρ_t   = exp(logπθ(y_t) − logπ_old(y_t))        # log-ratio clamped to ±20 as in verl
    A_t   = A_i   on continuation tokens and on kept prefix tokens, 0 on other prefix tokens
    ℓ_t   = −min(ρ_t·A_t, clip(ρ_t, 1 − clip_low, 1 + clip_high)·A_t)
    ℓ_t   = min(ℓ_t, −clip_c·A_t)   where A_t < 0       # dual clip, only if clip_c is set
    loss  = loss_scale · [Σ ℓ_t·m_t − entropy_coef·Σ H_t·c_t] / (num_sequences·max_response_tokens)

``m`` = response_mask, ``c`` = continuation tokens (``m & ~prefix_mask``). The kept prefix
tokens are the top ``entropy_top_fraction`` of the batch's prefix tokens by (detached)
entropy H_t (:func:`prefix_rft.kernels.entropy_topk_mask`); the others stay in the sum with
advantage 0 -- they add nothing, but the normalizer is a constant (Dr. GRPO), not a count.

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
(:meth:`PrefixRFTLoss.token_entropy`, or reuse the entropies of the old-log-prob pass, which
equal the current policy's on the first update of a step), call
:func:`compute_keep_prefix_mask` on the list of micro-batch tensors, and hand each
micro-batch its slice as ``keep_prefix_mask``. With ``mini_batch`` scope, micro-batch
accumulation equals the full-batch gradient exactly; with ``micro_batch`` it does only when
``entropy_top_fraction == 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefix_rft.kernels import entropy_topk_mask, linear_logprob_entropy

# verl clamps the log-ratio to ±20 before exp so a stale old_logprob cannot overflow.
LOG_RATIO_CLAMP = 20.0
ENTROPY_MASK_SCOPES = ("micro_batch", "mini_batch")
SFT_NORMALIZERS = ("max_tokens", "tokens", "sequences")
MICRO_BATCH_COUNTS = ("padded", "tokens")


# ---------------------------------------------------------------------------- validation


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_loss_options(
    *,
    max_response_tokens: int,
    clip_low: float,
    clip_high: float,
    clip_c: float | None,
    entropy_top_fraction: float,
    entropy_coef: float,
) -> None:
    """Validate the policy-loss options (shared by the function and the module)."""
    _check_positive_int("max_response_tokens", max_response_tokens)
    if not _is_number(clip_low) or not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not _is_number(clip_high) or not clip_high >= 0.0:
        raise ValueError(f"clip_high must be a number >= 0, got {clip_high!r}")
    if clip_c is not None and (not _is_number(clip_c) or not clip_c > 1.0):
        raise ValueError(f"clip_c must be None or a number > 1 (dual clip), got {clip_c!r}")
    if not _is_number(entropy_top_fraction) or not 0.0 < entropy_top_fraction <= 1.0:
        raise ValueError(f"entropy_top_fraction must be in (0, 1], got {entropy_top_fraction!r}")
    if not _is_number(entropy_coef) or entropy_coef != entropy_coef:
        raise ValueError(f"entropy_coef must be a finite number, got {entropy_coef!r}")


def _check_bt(name: str, t, shape: tuple[int, ...], device, floating: bool | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if floating is True and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if floating is False and t.is_floating_point():
        raise ValueError(f"{name} must be a bool or integer 0/1 mask, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of logprob)")


def _check_float_tensor(name: str, t, dims: str) -> None:
    ndim = dims.count(",") + 1
    if not isinstance(t, torch.Tensor) or t.dim() != ndim or not t.is_floating_point():
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating {dims} tensor, got {got}")


def _as_mask(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bool else t != 0


# ---------------------------------------------------------------------------- entropy mask


@torch.no_grad()
def compute_keep_prefix_mask(
    entropy: torch.Tensor | Sequence[torch.Tensor],
    response_mask: torch.Tensor | Sequence[torch.Tensor],
    prefix_mask: torch.Tensor | Sequence[torch.Tensor],
    *,
    entropy_top_fraction: float = 0.2,
):
    """Which prefix tokens keep their advantage: the top ``entropy_top_fraction`` by entropy.

    Candidates are ``prefix_mask & response_mask``. Give ``[B, T]`` tensors for one batch, or
    equal-length lists of ``[B_k, T_k]`` tensors (the micro-batches of one mini-batch, widths
    may differ) to rank all of them jointly -- the ``mini_batch`` scope. Ties go to the earlier
    position in row-major order, micro-batches in list order.

    Returns:
        bool ``[B, T]`` (or a list of bool ``[B_k, T_k]``), True on kept prefix tokens.
    """
    single = isinstance(entropy, torch.Tensor)
    ents = [entropy] if single else list(entropy)
    rms = [response_mask] if single else list(response_mask)
    pms = [prefix_mask] if single else list(prefix_mask)
    if not (len(ents) == len(rms) == len(pms)) or not ents:
        raise ValueError(
            "entropy, response_mask and prefix_mask must be tensors or equal, non-empty lists"
        )
    if not _is_number(entropy_top_fraction) or not 0.0 < entropy_top_fraction <= 1.0:
        raise ValueError(f"entropy_top_fraction must be in (0, 1], got {entropy_top_fraction!r}")
    for k, (e, r, p) in enumerate(zip(ents, rms, pms)):
        if not isinstance(e, torch.Tensor) or e.dim() != 2:
            raise ValueError(f"entropy[{k}] must be a [B, T] tensor")
        _check_bt(f"response_mask[{k}]", r, tuple(e.shape), e.device, floating=False)
        _check_bt(f"prefix_mask[{k}]", p, tuple(e.shape), e.device, floating=False)
    cands = [(_as_mask(p) & _as_mask(r)) for p, r in zip(pms, rms)]
    flat_c = torch.cat([c.reshape(-1) for c in cands])
    flat_e = torch.cat([e.detach().float().reshape(-1) for e in ents])
    keep = entropy_topk_mask(flat_e, flat_c, entropy_top_fraction)
    pieces = keep.split([c.numel() for c in cands])
    out = [piece.reshape(c.shape) for piece, c in zip(pieces, cands)]
    return out[0] if single else out


# ---------------------------------------------------------------------------- policy loss


def prefix_rft_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    prefix_mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    *,
    max_response_tokens: int,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float | None = None,
    entropy_top_fraction: float = 0.2,
    entropy_coef: float = 0.0,
    loss_scale: float = 1.0,
    num_sequences: int | None = None,
    keep_prefix_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Prefix-RFT policy loss from per-token log-probs (formulas in the module docstring).

    Args:
        logprob: ``[B, T]`` log π_θ(y_t) of the response tokens, with gradient.
        old_logprob: ``[B, T]`` log π_old(y_t) from the policy before the update (same
            temperature), no gradient needed.
        advantages: ``[B]`` one advantage per rollout (``advantage.group_advantages``).
        response_mask: ``[B, T]`` bool (or 0/1), True on real response tokens.
        prefix_mask: ``[B, T]`` bool (or 0/1), True on demonstration-prefix tokens.
        entropy: ``[B, T]`` token entropies; detached for the mask, differentiated for the
            entropy bonus. May be None when neither needs it (fraction 1 or a given
            ``keep_prefix_mask``, and ``entropy_coef == 0``); entropy metrics are then 0.
        max_response_tokens: L_max of the Dr. GRPO normalizer (a constant, not a count).
        clip_low, clip_high: PPO clip range ``[1 − clip_low, 1 + clip_high]``.
        clip_c: dual-clip constant (> 1) capping ℓ_t at ``−clip_c·A_t`` when A_t < 0; None off.
        entropy_top_fraction: share of prefix tokens (by entropy) that keep their advantage.
        entropy_coef: entropy bonus weight on continuation tokens (0 = off).
        loss_scale: multiplies the returned loss (e.g. 1/world_size).
        num_sequences: B of the normalizer (default ``logprob.shape[0]``); give the
            mini-batch size when this call is one micro-batch of it.
        keep_prefix_mask: ``[B, T]`` bool precomputed by :func:`compute_keep_prefix_mask`
            (``mini_batch`` scope); None computes it here from ``entropy`` (``micro_batch``).

    Returns:
        ``(loss, metrics)``: scalar fp32 loss; metrics of Python floats (see
        :func:`_policy_metrics`).

    Example::

        >>> B, T = 2, 4
        >>> lp = torch.randn(B, T, requires_grad=True); old = lp.detach() + 0.1
        >>> mask = torch.ones(B, T, dtype=torch.bool); pre = torch.zeros(B, T, dtype=torch.bool)
        >>> pre[0, :2] = True
        >>> loss, m = prefix_rft_loss(lp, old, torch.tensor([1.0, -1.0]), mask, pre,
        ...                           torch.rand(B, T), max_response_tokens=8)
        >>> loss.backward()
    """
    _check_float_tensor("logprob", logprob, "[B, T]")
    B, T = logprob.shape
    dev = logprob.device
    check_loss_options(
        max_response_tokens=max_response_tokens, clip_low=clip_low, clip_high=clip_high,
        clip_c=clip_c, entropy_top_fraction=entropy_top_fraction, entropy_coef=entropy_coef,
    )
    _check_bt("old_logprob", old_logprob, (B, T), dev, floating=True)
    _check_bt("advantages", advantages, (B,), dev, floating=True)
    _check_bt("response_mask", response_mask, (B, T), dev, floating=False)
    _check_bt("prefix_mask", prefix_mask, (B, T), dev, floating=False)
    if not _is_number(loss_scale):
        raise ValueError(f"loss_scale must be a number, got {loss_scale!r}")
    _check_positive_int("num_sequences", num_sequences, allow_none=True)
    if num_sequences is not None and num_sequences < B:
        raise ValueError(f"num_sequences must be >= the batch size {B}, got {num_sequences}")
    if keep_prefix_mask is not None:
        _check_bt("keep_prefix_mask", keep_prefix_mask, (B, T), dev, floating=False)
    needs_entropy = entropy_coef != 0 or (keep_prefix_mask is None and entropy_top_fraction < 1.0)
    if entropy is not None:
        _check_bt("entropy", entropy, (B, T), dev, floating=True)
    elif needs_entropy:
        raise ValueError("entropy is required for the prefix entropy mask or the entropy bonus")

    valid = _as_mask(response_mask)
    prefix = _as_mask(prefix_mask) & valid
    continuation = valid & ~prefix
    if keep_prefix_mask is not None:
        kept = _as_mask(keep_prefix_mask) & prefix
    elif entropy_top_fraction >= 1.0:
        kept = prefix
    else:
        kept = entropy_topk_mask(entropy.detach(), prefix, entropy_top_fraction)
    token_adv = torch.where(continuation | kept, advantages.float()[:, None], 0.0)

    # where() (not multiply) keeps NaN/inf in padded positions out of values and gradients.
    log_ratio = torch.where(valid, logprob.float() - old_logprob.float(), 0.0)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -token_adv * ratio
    clipped = -token_adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped)
    if clip_c is not None:
        capped = torch.minimum(token_loss, -token_adv * clip_c)
        token_loss = torch.where(token_adv < 0, capped, token_loss)
    denom = float((num_sequences or B) * max_response_tokens)
    pg_loss = torch.where(valid, token_loss, 0.0).sum() / denom
    loss = pg_loss
    entropy_bonus = None
    if entropy_coef != 0:
        entropy_bonus = torch.where(continuation, entropy.float(), 0.0).sum() / denom
        loss = loss - entropy_coef * entropy_bonus
    loss = loss * loss_scale
    metrics = _policy_metrics(
        loss=loss, pg_loss=pg_loss, entropy_bonus=entropy_bonus, ratio=ratio, token_adv=token_adv,
        advantages=advantages, entropy=entropy, valid=valid, prefix=prefix, kept=kept,
        continuation=continuation, clip_low=clip_low, clip_high=clip_high, clip_c=clip_c,
    )
    return loss, metrics


@torch.no_grad()
def _policy_metrics(
    *, loss, pg_loss, entropy_bonus, ratio, token_adv, advantages, entropy, valid, prefix, kept,
    continuation, clip_low, clip_high, clip_c,
) -> dict[str, float]:
    """Logging metrics, gathered into one tensor so the GPU is synchronized once.

    Keys: ``loss`` (returned value), ``pg_loss`` and ``entropy_bonus`` (before loss_scale);
    over response tokens: ``clip_frac_low`` (A<0, ρ<1−clip_low), ``clip_frac_high`` (A>0,
    ρ>1+clip_high), ``clip_frac_dual`` (dual-clip cap active), ``ratio_mean/min/max``;
    ``prefix_token_frac`` (prefix / response tokens), ``kept_prefix_frac`` (kept / prefix
    tokens), ``kept_prefix_token_frac`` (kept / response tokens); ``entropy_prefix``,
    ``entropy_continuation`` (token means); ``adv_mean/std`` over the B rollouts; counts
    ``num_tokens``, ``num_prefix_tokens``, ``num_kept_prefix_tokens``,
    ``num_continuation_tokens``, ``num_sequences`` for weighting across micro-batches.
    Means over an empty set are 0 (their count says so).
    """
    f = torch.float64
    n_valid, n_pre, n_kept, n_cont = (m.sum().to(f) for m in (valid, prefix, kept, continuation))

    def frac(num, den):
        return num / den.clamp_min(1.0)

    def masked_mean(x, m):
        return frac(torch.where(m, x.to(f), 0.0).sum(), m.sum().to(f))

    low = valid & (token_adv < 0) & (ratio < 1.0 - clip_low)
    high = valid & (token_adv > 0) & (ratio > 1.0 + clip_high)
    if clip_c is not None:
        # For A < 0 the clipped loss is |A|·max(ρ, 1 − clip_low): the cap bites when ρ > clip_c.
        dual = valid & (token_adv < 0) & (ratio > clip_c)
    else:
        dual = torch.zeros_like(valid)
    ent = entropy.detach() if entropy is not None else torch.zeros_like(ratio)
    zero = torch.zeros((), dtype=f, device=ratio.device)
    r_valid = ratio.to(f).reshape(-1)[valid.reshape(-1)]
    r_low = r_valid.min() if r_valid.numel() else zero
    r_high = r_valid.max() if r_valid.numel() else zero
    any_valid = n_valid > 0
    adv = advantages.detach().to(f)
    values = {
        "loss": loss.detach().to(f),
        "pg_loss": pg_loss.detach().to(f),
        "entropy_bonus": entropy_bonus.detach().to(f) if entropy_bonus is not None else zero,
        "clip_frac_low": frac(low.sum().to(f), n_valid),
        "clip_frac_high": frac(high.sum().to(f), n_valid),
        "clip_frac_dual": frac(dual.sum().to(f), n_valid),
        "ratio_mean": masked_mean(ratio, valid),
        "ratio_min": torch.where(any_valid, r_low, zero),
        "ratio_max": torch.where(any_valid, r_high, zero),
        "prefix_token_frac": frac(n_pre, n_valid),
        "kept_prefix_frac": frac(n_kept, n_pre),
        "kept_prefix_token_frac": frac(n_kept, n_valid),
        "entropy_prefix": masked_mean(ent, prefix),
        "entropy_continuation": masked_mean(ent, continuation),
        "adv_mean": adv.mean() if adv.numel() else zero,
        "adv_std": adv.std(unbiased=False) if adv.numel() else zero,
        "num_tokens": n_valid,
        "num_prefix_tokens": n_pre,
        "num_kept_prefix_tokens": n_kept,
        "num_continuation_tokens": n_cont,
        "num_sequences": torch.tensor(float(valid.shape[0]), dtype=f, device=ratio.device),
    }
    return dict(zip(values.keys(), torch.stack(list(values.values())).tolist()))


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

    Args (constructor, all keyword): ``max_response_tokens`` (required), ``clip_low=0.2``,
    ``clip_high=0.2``, ``clip_c=None``, ``entropy_top_fraction=0.2``, ``entropy_coef=0.0``
    -- as in :func:`prefix_rft_loss`; ``temperature=1.0``; ``impl="auto"`` (kernel:
    ``"auto" | "torch" | "triton"``); ``entropy_mask_scope="micro_batch" | "mini_batch"``
    (``mini_batch`` requires ``keep_prefix_mask`` in forward unless the fraction is 1).

    Forward shapes: ``hidden [B, T, H]``, ``lm_head_weight [V, H]``, ``response_ids [B, T]``
    int, ``old_logprob [B, T]``, ``advantages [B]``, ``response_mask [B, T]``,
    ``prefix_mask [B, T]``, ``lm_head_bias [V]`` or None; keyword ``num_sequences``,
    ``loss_scale``, ``keep_prefix_mask`` as in :func:`prefix_rft_loss`.
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

    def __init__(
        self,
        *,
        max_response_tokens: int,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        clip_c: float | None = None,
        entropy_top_fraction: float = 0.2,
        entropy_coef: float = 0.0,
        temperature: float = 1.0,
        impl: str = "auto",
        entropy_mask_scope: str = "micro_batch",
    ) -> None:
        super().__init__()
        check_loss_options(
            max_response_tokens=max_response_tokens, clip_low=clip_low, clip_high=clip_high,
            clip_c=clip_c, entropy_top_fraction=entropy_top_fraction, entropy_coef=entropy_coef,
        )
        if not _is_number(temperature) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if impl not in ("auto", "torch", "triton"):
            raise ValueError(f"impl must be one of ('auto', 'torch', 'triton'), got {impl!r}")
        if entropy_mask_scope not in ENTROPY_MASK_SCOPES:
            raise ValueError(
                f"entropy_mask_scope must be one of {ENTROPY_MASK_SCOPES}, "
                f"got {entropy_mask_scope!r}"
            )
        self.max_response_tokens = max_response_tokens
        self.clip_low, self.clip_high, self.clip_c = clip_low, clip_high, clip_c
        self.entropy_top_fraction, self.entropy_coef = entropy_top_fraction, entropy_coef
        self.temperature, self.impl, self.entropy_mask_scope = temperature, impl, entropy_mask_scope

    def extra_repr(self) -> str:
        keys = ("max_response_tokens", "clip_low", "clip_high", "clip_c", "entropy_top_fraction",
                "entropy_coef", "temperature", "impl", "entropy_mask_scope")
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in keys)

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
        """
        _check_float_tensor("hidden", hidden, "[B, T, H]")
        B, T, H = hidden.shape
        weight = lm_head_weight
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != H:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"lm_head_weight must be [V, H] with H = {H}, got {got}")
        _check_bt("response_ids", response_ids, (B, T), hidden.device, floating=False)
        if response_ids.dtype == torch.bool:
            raise ValueError("response_ids must be an integer tensor of token ids, got bool")
        _check_bt("response_mask", response_mask, (B, T), hidden.device, floating=False)
        valid = _as_mask(response_mask)
        logprob, entropy = linear_logprob_entropy(
            hidden[valid], lm_head_weight, response_ids[valid].long(), bias=lm_head_bias,
            temperature=self.temperature, impl=self.impl,
        )
        zeros = torch.zeros(B, T, dtype=logprob.dtype, device=hidden.device)
        # index_put with the same bool mask restores row-major order; differentiable in values.
        return zeros.index_put((valid,), logprob), zeros.index_put((valid,), entropy)

    @torch.no_grad()
    def token_entropy(self, hidden, lm_head_weight, response_ids, response_mask, lm_head_bias=None):
        """No-grad ``[B, T]`` entropies, e.g. for the ``mini_batch`` mask pass."""
        args = (hidden, lm_head_weight, response_ids, response_mask, lm_head_bias)
        return self.token_logprob_entropy(*args)[1]

    def forward(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        response_ids: torch.Tensor,
        old_logprob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        prefix_mask: torch.Tensor,
        lm_head_bias: torch.Tensor | None = None,
        *,
        num_sequences: int | None = None,
        loss_scale: float = 1.0,
        keep_prefix_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        scope = self.entropy_mask_scope
        if scope == "micro_batch" and keep_prefix_mask is not None:
            raise ValueError("keep_prefix_mask needs entropy_mask_scope='mini_batch'")
        if scope == "mini_batch" and keep_prefix_mask is None and self.entropy_top_fraction < 1:
            raise ValueError(
                "keep_prefix_mask is required with entropy_mask_scope='mini_batch' "
                "(see compute_keep_prefix_mask)"
            )
        logprob, entropy = self.token_logprob_entropy(
            hidden, lm_head_weight, response_ids, response_mask, lm_head_bias
        )
        return prefix_rft_loss(
            logprob, old_logprob, advantages, response_mask, prefix_mask, entropy,
            max_response_tokens=self.max_response_tokens, clip_low=self.clip_low,
            clip_high=self.clip_high, clip_c=self.clip_c,
            entropy_top_fraction=self.entropy_top_fraction, entropy_coef=self.entropy_coef,
            loss_scale=loss_scale, num_sequences=num_sequences, keep_prefix_mask=keep_prefix_mask,
        )


# ---------------------------------------------------------------------------- micro-batches


def split_micro_batches(
    token_counts: Sequence[int] | torch.Tensor, *, max_tokens: int, count: str = "padded"
) -> list[list[int]]:
    """Split a mini-batch into micro-batches under a token budget, keeping sequence order.

    Greedy: sequences are added in order until the next one would exceed ``max_tokens``.
    ``count="padded"`` (default) charges a micro-batch ``len(mb) · max(token_counts in mb)``
    (what a right-padded ``[b, T]`` micro-batch holds); ``count="tokens"`` charges the sum.
    A sequence alone over budget still gets its own micro-batch (never dropped).

    Args:
        token_counts: per-sequence token counts (e.g. response lengths), ints >= 0.
        max_tokens: budget per micro-batch, >= 1.

    Returns:
        Lists of indices into the mini-batch; together they cover ``range(B)`` once, in order.
        Call the loss on each with ``num_sequences=B`` and accumulate the gradients.
    """
    if isinstance(token_counts, torch.Tensor):
        if token_counts.dim() != 1 or token_counts.is_floating_point():
            raise ValueError("token_counts must be a 1-D integer tensor or a sequence of ints")
        counts = [int(c) for c in token_counts.tolist()]
    else:
        counts = list(token_counts)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"token_counts must be ints >= 0, got {counts!r}")
    _check_positive_int("max_tokens", max_tokens)
    if count not in MICRO_BATCH_COUNTS:
        raise ValueError(f"count must be one of {MICRO_BATCH_COUNTS}, got {count!r}")
    batches: list[list[int]] = []
    current: list[int] = []
    used = width = 0
    for i, c in enumerate(counts):
        cost = (len(current) + 1) * max(width, c) if count == "padded" else used + c
        if current and cost > max_tokens:
            batches.append(current)
            current, used, width = [], 0, 0
        current.append(i)
        used, width = used + c, max(width, c)
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------- SFT


def sft_loss(
    logprob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    max_response_tokens: int | None = None,
    normalizer: str = "max_tokens",
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token NLL on demonstrations (the ``algo: sft`` baseline).

    ``loss = loss_scale · Σ −logprob·m / Z`` with ``Z`` by ``normalizer``:
    ``"max_tokens"`` (default, Dr. GRPO's): ``num_sequences · max_response_tokens``;
    ``"tokens"``: ``num_tokens`` (default: this batch's mask sum; give the mini-batch's
    total when micro-batching); ``"sequences"``: ``num_sequences`` (default B).

    It is the policy loss's special case: with ``old_logprob = logprob.detach()`` (ρ = 1),
    advantage 1 on every token and ``entropy_top_fraction = 1``, the gradient of
    :func:`prefix_rft_loss` is ``−m / (B·L_max)`` per token -- the gradient of this loss under
    ``"max_tokens"``. (The values differ by a constant; the gradients are equal.)

    Returns:
        ``(loss, {"loss", "nll_per_token", "num_tokens", "num_sequences"})``.
    """
    _check_float_tensor("logprob", logprob, "[B, T]")
    B, T = logprob.shape
    dev = logprob.device
    _check_bt("response_mask", response_mask, (B, T), dev, floating=False)
    if normalizer not in SFT_NORMALIZERS:
        raise ValueError(f"normalizer must be one of {SFT_NORMALIZERS}, got {normalizer!r}")
    _check_positive_int("num_sequences", num_sequences, allow_none=True)
    _check_positive_int("num_tokens", num_tokens, allow_none=True)
    if not _is_number(loss_scale):
        raise ValueError(f"loss_scale must be a number, got {loss_scale!r}")
    if normalizer == "max_tokens":
        _check_positive_int("max_response_tokens", max_response_tokens)
    valid = _as_mask(response_mask)
    nll_sum = -torch.where(valid, logprob.float(), 0.0).sum()
    n_valid = valid.sum()
    if normalizer == "max_tokens":
        denom = torch.tensor(float((num_sequences or B) * max_response_tokens), device=dev)
    elif normalizer == "sequences":
        denom = torch.tensor(float(num_sequences or B), device=dev)
    else:
        denom = n_valid.float().clamp_min(1.0)
        if num_tokens is not None:
            denom = torch.tensor(float(num_tokens), device=dev)
    loss = nll_sum / denom * loss_scale
    with torch.no_grad():
        vals = torch.stack([loss.detach(), nll_sum.detach() / n_valid.float().clamp_min(1.0),
                            n_valid.float(), torch.tensor(float(B), device=dev)]).tolist()
    return loss, dict(zip(("loss", "nll_per_token", "num_tokens", "num_sequences"), vals))
