"""The full-logits plain-torch reference of the fused head-and-loss (``linear_policy_loss``).

It materializes the ``[N, V]`` logits in ``dtype`` (fp64 in the tests) and differentiates the
loss with autograd: the independent ground truth the fused paths are held to, never a
production path. Written from the formulas, not from the fused code.
"""

from __future__ import annotations

import torch

from .reference import linear_logprob_entropy_reference


def linear_policy_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    advantages=None,
    old_logprob=None,
    loss_weight=1.0,
    importance_weights=None,
    keep=None,
    entropy_weight=None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float | None = None,
    temperature: float = 1.0,
    loss_type: str = "ppo",
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, logprob [N], entropy [N])`` in ``dtype``; same arguments as
    :func:`~prefix_rft.kernels.linear_policy_loss`. Differentiate ``loss`` with autograd."""
    lp, ent = linear_logprob_entropy_reference(hidden, weight, labels, bias, temperature,
                                               ignore_index, dtype)
    valid = labels != ignore_index

    def as_t(v):
        return v.to(dtype) if isinstance(v, torch.Tensor) else torch.full_like(lp, float(v))

    if loss_type == "nll":
        token_loss = -lp
    else:
        adv = as_t(advantages)
        if keep is not None:
            adv = torch.where(keep, adv, 0.0)
        old = lp.detach() if old_logprob is None else old_logprob.to(dtype)
        ratio = torch.exp((lp - old).clamp(-20.0, 20.0))
        token_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
        if clip_c is not None:
            token_loss = torch.where(adv < 0, torch.minimum(token_loss, -adv * clip_c),
                                     token_loss)
    if importance_weights is not None:
        token_loss = token_loss * importance_weights.to(dtype)
    per_token = as_t(loss_weight) * token_loss
    if entropy_weight is not None:
        per_token = per_token - as_t(entropy_weight) * ent
    loss = torch.where(valid, per_token, 0.0).sum()
    return loss, lp.detach(), ent.detach()
