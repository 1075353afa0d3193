"""Token NLL on demonstrations: the ``algo: sft`` baseline's loss."""

from __future__ import annotations

from typing import Literal

import torch

from ..checks import (
    as_mask,
    check_choice,
    check_float_tensor,
    check_int,
    check_number,
    check_tensor,
)

SftNormalizer = Literal["max_tokens", "tokens", "sequences"]


def sft_loss(
    logprob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    max_response_tokens: int | None = None,
    normalizer: SftNormalizer = "max_tokens",
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
    :func:`prefix_rft.loss.prefix_rft_loss` is ``−m / (B·L_max)`` per token -- the gradient of
    this loss under ``"max_tokens"``. (The values differ by a constant; the gradients are equal.)

    Returns:
        ``(loss, {"loss", "nll_per_token", "num_tokens", "num_sequences"})``.
    """
    check_float_tensor("logprob", logprob, "[B, T]")
    B, T = logprob.shape
    dev = logprob.device
    check_tensor("response_mask", response_mask, (B, T), dev, floating=False)
    check_choice("normalizer", normalizer, SftNormalizer)
    check_int("num_sequences", num_sequences, allow_none=True)
    check_int("num_tokens", num_tokens, allow_none=True)
    check_number("loss_scale", loss_scale)
    if normalizer == "max_tokens":
        check_int("max_response_tokens", max_response_tokens)
    valid = as_mask(response_mask)
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
