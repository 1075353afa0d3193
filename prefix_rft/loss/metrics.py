"""Logging metrics of the Prefix-RFT policy loss (what :func:`prefix_rft.loss.prefix_rft_loss`
returns beside the loss), gathered into one tensor so the GPU is synchronized once."""

from __future__ import annotations

import torch


@torch.no_grad()
def policy_metrics(
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
        "num_sequences": torch.tensor(float(advantages.shape[0]), dtype=f, device=ratio.device),
    }
    return dict(zip(values.keys(), torch.stack(list(values.values())).tolist()))
