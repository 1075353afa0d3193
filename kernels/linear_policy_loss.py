"""Public entry: a fused head-and-loss -- the policy-gradient (or NLL) loss straight from hidden
states, with its gradient computed in the forward (6NHV FLOPs, no logit recompute).

Shape of this module (house rule): the Triton elementwise pass and its launcher live in
``linear_policy_loss_triton.py`` (``triton_policy_loss_fwd``), the chunked torch path in
``linear_policy_loss_torch.py`` (``torch_policy_loss_fwd``), the full-logits reference in
``linear_policy_loss_reference.py``; here are the ``autograd.Function`` and the public
function with its argument checks.

Where it sits beside :func:`~prefix_rft.kernels.linear_logprob_entropy`: that one returns
per-token log-probs/entropies for *any* upstream loss, so its backward must recompute the
logits (forward 2NHV + backward 6NHV = 8NHV). When the loss is a per-token function of
``(lp, H)`` known before the head runs -- PPO/GRPO clipping with given advantages, an entropy
bonus with given weights, NLL -- its derivative is known once a chunk's full vocabulary row is
in memory, so ``dX`` and ``dW`` come out of the forward (6NHV, the bare lm_head GEMMs) and the
backward only scales them by the incoming gradient.
"""

from __future__ import annotations

import torch

from ._checks import check_linear_logprob_entropy_inputs
from .linear_logprob_entropy import resolve_impl
from .linear_policy_loss_torch import (
    DEFAULT_CHUNK_BYTES,
    LossOptions,
    TokenInputs,
    torch_policy_loss_fwd,
)

LOSS_TYPES = ("ppo", "nll")


class LinearPolicyLossFunction(torch.autograd.Function):
    """Forward computes loss, ``lp``, ``H`` and (when needed) dX/dW/db; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tok, opts, ignore_index, impl, chunk_bytes,
                grad_enabled):
        # forward runs under no_grad: whether gradients are wanted was read by the caller
        needs = tuple(ctx.needs_input_grad[:3]) if grad_enabled else (False, False, False)
        if impl == "torch":
            fwd = torch_policy_loss_fwd
        else:
            from .linear_policy_loss_triton import triton_policy_loss_fwd as fwd
        loss, lp, ent, dx, dw, db = fwd(hidden, weight, bias, labels, tok, opts, ignore_index,
                                        needs, chunk_bytes)
        # Kept as an attribute, not saved tensors: the backward hands them over and drops its
        # reference, so autograd can take dW as weight.grad without a copy.
        ctx.grads = (dx, dw, db)
        ctx.mark_non_differentiable(lp, ent)
        return loss, lp, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_lp, _grad_ent):
        if ctx.grads is None:
            raise RuntimeError("linear_policy_loss: backward ran twice through the same call "
                               "(its gradients were computed once, in the forward)")
        grads, ctx.grads = ctx.grads, None
        if grad_loss is None:
            return (None,) * 10
        if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            # loss.backward(): on CPU the test is free and saves a pass over dW ([V, H])
            return (*grads, None, None, None, None, None, None, None)
        # in place (these tensors are ours): no copy, and no host sync to test for grad 1
        scaled = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return (*scaled, None, None, None, None, None, None, None)


def _per_token(name: str, value, n: int, device, *, optional: bool = True):
    """A float, None or an ``[N]`` floating tensor -> ``[N]`` fp32 on ``device`` (or None)."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} is required ([N] = [{n}] floating tensor or a float)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((n,), float(value), dtype=torch.float32, device=device)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() \
            or tuple(value.shape) != (n,):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a float or a floating [N] = [{n}] tensor, got {got}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, hidden on {device}")
    return value.detach().float()


def _check_options(loss_type, clip_low, clip_high, clip_c, chunk_bytes):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not isinstance(clip_low, (int, float)) or not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be a number in [0, 1), got {clip_low!r}")
    if not isinstance(clip_high, (int, float)) or clip_high < 0.0:
        raise ValueError(f"clip_high must be a number >= 0, got {clip_high!r}")
    if clip_c is not None and (not isinstance(clip_c, (int, float)) or clip_c <= 1.0):
        raise ValueError(f"clip_c must be None or a number > 1, got {clip_c!r}")
    if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or chunk_bytes < 1):
        raise ValueError(f"chunk_bytes must be a positive int (bytes), got {chunk_bytes!r}")


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    advantages: torch.Tensor | float | None = None,
    old_logprob: torch.Tensor | None = None,
    loss_weight: torch.Tensor | float = 1.0,
    importance_weights: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    entropy_weight: torch.Tensor | float | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float | None = None,
    temperature: float = 1.0,
    loss_type: str = "ppo",
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip (or NLL) loss + entropy bonus from hidden states, 6NHV, no ``[N, V]``.

    Equivalent torch (which allocates the ``[N, V]`` logits this function never does)::

        z = (hidden.float() @ weight.float().T + bias) / temperature
        lp = z.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
        H = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        A = torch.where(keep, advantages, 0)
        ratio = torch.exp((lp - (old_logprob if given else lp.detach())).clamp(-20, 20))
        l = torch.maximum(-A * ratio, -A * ratio.clamp(1 - clip_low, 1 + clip_high))
        l = torch.where(A < 0, torch.minimum(l, -A * clip_c), l)     # if clip_c is set
        # loss_type="nll": l = -lp
        loss = (loss_weight * importance_weights * l - entropy_weight * H)[labels != ignore].sum()

    Args:
        hidden: ``[N, H]`` fp32 / bf16 / fp16 hidden states (N may be 0).
        weight: ``[V, H]`` the lm_head weight. ``bias``: optional ``[V]``.
        labels: ``[N]`` int64/int32 target ids, ``ignore_index`` rows add nothing.
        advantages: ``[N]`` per-token advantage (or a float); required for ``"ppo"``.
        old_logprob: ``[N]`` log-probs of the policy before the update (same temperature);
            None = on-policy (ratio 1, gradient ``-A``).
        loss_weight: ``[N]`` or float, multiplies each token's policy loss (normalizer).
        importance_weights: ``[N]`` non-negative extra factor (no gradient), None = 1.
        keep: ``[N]`` bool, tokens whose advantage counts (others get advantage 0, e.g. the
            prefix tokens the entropy mask drops); None = all.
        entropy_weight: ``[N]`` or float, ``loss -= entropy_weight * H`` (bonus coefficient
            over its normalizer on the tokens it covers); None = no entropy term.
        clip_low, clip_high, clip_c: PPO clip range and dual-clip constant (None = off).
        temperature: logits are divided by it. ``loss_type``: ``"ppo"`` or ``"nll"``.
        impl: ``"auto"`` (Triton pass on CUDA, torch otherwise), ``"torch"``, ``"triton"``.
        chunk_bytes: memory budget of a token chunk's ``[C, V]`` fp32 logit buffer (the rows
            per chunk follow from it); None = 128 MiB on CPU, 1 GiB on CUDA.

    Returns:
        ``(loss fp32 scalar, logprob [N] fp32, entropy [N] fp32)``: the loss is differentiable
        w.r.t. hidden, weight and bias (its gradients were computed in the forward); the
        per-token log-probs/entropies are detached (for metrics and masks), 0 on ignored rows.

    Example::

        >>> h = torch.randn(5, 16, requires_grad=True); w = torch.randn(100, 16)
        >>> y = torch.tensor([1, 2, 3, -100, 99]); adv = torch.tensor([1., -1., .5, 0., 2.])
        >>> loss, lp, ent = linear_policy_loss(h, w, y, advantages=adv, loss_weight=1 / 8)
        >>> loss.backward()
    """
    check_linear_logprob_entropy_inputs(hidden, weight, labels, bias, temperature, ignore_index)
    _check_options(loss_type, clip_low, clip_high, clip_c, chunk_bytes)
    impl = resolve_impl(impl, hidden.device)
    n, dev = hidden.shape[0], hidden.device
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES["cuda" if dev.type == "cuda" else "cpu"]
    nll = loss_type == "nll"
    adv = None if nll else _per_token("advantages", advantages, n, dev, optional=False)
    if keep is not None and adv is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool \
                or tuple(keep.shape) != (n,):
            raise ValueError(f"keep must be a bool [N] = [{n}] tensor or None")
        adv = torch.where(keep, adv, 0.0)
    tok = TokenInputs(
        advantages=adv,
        old_logprob=None if nll else _per_token("old_logprob", old_logprob, n, dev),
        loss_weight=_per_token("loss_weight", loss_weight, n, dev, optional=False),
        importance_weights=_per_token("importance_weights", importance_weights, n, dev),
        entropy_weight=_per_token("entropy_weight", entropy_weight, n, dev),
    )
    opts = LossOptions(float(clip_low), float(clip_high),
                       None if clip_c is None else float(clip_c), float(temperature), nll)
    if n == 0:
        impl = "torch"  # nothing to launch
    with torch.autocast(dev.type, enabled=False):  # the inputs' own dtypes decide
        return LinearPolicyLossFunction.apply(hidden, weight, bias, labels, tok, opts,
                                              int(ignore_index), impl, int(chunk_bytes),
                                              torch.is_grad_enabled())
