"""Public entry: fused linear -> per-token log-prob and entropy, without ``[N, V]`` logits.

Shape of this module (house rule): Triton jit kernels and their launchers live in
``linear_logprob_entropy_triton.py`` (``triton_fwd`` and the atomic backward ``triton_bwd``)
and ``linear_logprob_entropy_split.py`` (the vocab-split backward ``triton_bwd_split``), the
chunked torch implementation in ``linear_logprob_entropy_torch.py`` (``torch_fwd`` /
``torch_bwd``); here are the ``autograd.Function`` that calls either, and the public
function with its argument checks.
"""

from __future__ import annotations

import os

import torch

from ._checks import check_linear_logprob_entropy_inputs, check_triton_dtypes
from .linear_logprob_entropy_torch import torch_bwd, torch_fwd

IMPLS = ("auto", "torch", "triton")
# Triton backwards: "split" (per vocab chunk a dz kernel + library GEMMs, deterministic) and
# "atomic" (one kernel, fp32 atomics). No GPU has timed both yet; the FLOP/traffic estimate
# favours "split", so it is the default until a benchmark says otherwise.
BWDS = ("split", "atomic")
DEFAULT_BWD = "split"


def _triton_ops(bwd: str = DEFAULT_BWD):
    # Imported lazily: `import prefix_rft.kernels` must work (and stay fast) without a GPU,
    # and TRITON_INTERPRET must be read after tests set it.
    from . import linear_logprob_entropy_triton as ops

    if bwd == "atomic":
        return ops.triton_fwd, ops.triton_bwd
    from .linear_logprob_entropy_split import triton_bwd_split

    return ops.triton_fwd, triton_bwd_split


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` on CUDA and ``"torch"`` elsewhere; validate names."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
            f"got tensors on {device}"
        )
    return impl


class LinearLogprobEntropyFunction(torch.autograd.Function):
    """autograd wrapper: saves inputs and the per-row (lse, entropy), recomputes tiles in bwd."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, impl,
                bwd=DEFAULT_BWD):
        fwd = torch_fwd if impl == "torch" else _triton_ops()[0]
        logprob, entropy, lse = fwd(hidden, weight, bias, labels, temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.impl, ctx.bwd = temperature, ignore_index, impl, bwd
        # Unused outputs arrive as None instead of zero tensors, so the backward skips
        # the entropy term entirely when only log-probs are trained on (and vice versa).
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if (grad_logprob is None and grad_entropy is None) or not any(needs):
            return (None,) * 8
        bwd = torch_bwd if ctx.impl == "torch" else _triton_ops(ctx.bwd)[1]
        dx, dw, db = bwd(
            hidden, weight, bias, labels, lse, entropy, grad_logprob, grad_entropy,
            ctx.temperature, ctx.ignore_index, needs,
        )
        return dx, dw, db, None, None, None, None, None


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
    bwd: str = DEFAULT_BWD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``labels`` and softmax entropy, from hidden states and lm_head.

    Equivalent torch (which allocates the ``[N, V]`` logits this function never does)::

        z = (hidden.float() @ weight.float().T + bias) / temperature
        logprob = z.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)

    Args:
        hidden: ``[N, H]`` fp32 / bf16 / fp16, last hidden states (N may be 0).
        weight: ``[V, H]``, the lm_head weight; with ``impl="triton"`` in hidden's dtype (a
            16-bit / fp32 mix is refused: it would run the fp32 tiles, 15-30x slower).
        labels: ``[N]`` int64/int32 target ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` lm_head bias.
        temperature: > 0, logits are divided by it (sampling temperature).
        ignore_index: label value whose row yields 0 and receives no gradient.
        impl: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"`` (chunked plain
            torch, bounded memory) or ``"triton"``.
        bwd: Triton backward: ``"split"`` (default; per vocab chunk a dz kernel and two
            library GEMMs, deterministic, no atomics) or ``"atomic"`` (one kernel adding
            into fp32 dX/dW with atomics). Same results; ignored by ``impl="torch"``.

    Returns:
        ``(logprob [N] fp32, entropy [N] fp32)``, differentiable w.r.t. hidden, weight and
        bias for any upstream gradients of both outputs.

    Example::

        >>> h = torch.randn(5, 16, requires_grad=True); w = torch.randn(100, 16)
        >>> y = torch.tensor([1, 2, 3, -100, 99])
        >>> lp, ent = linear_logprob_entropy(h, w, y)
        >>> (lp.sum() + 0.1 * ent.sum()).backward()
    """
    check_linear_logprob_entropy_inputs(hidden, weight, labels, bias, temperature, ignore_index)
    impl = resolve_impl(impl, hidden.device)
    if impl == "triton":
        check_triton_dtypes(hidden, weight)
    if bwd not in BWDS:
        raise ValueError(f"bwd must be one of {BWDS}, got {bwd!r}")
    if hidden.shape[0] == 0:
        impl = "torch"  # nothing to launch; the torch path returns empty outputs and zero grads
    # Under torch.autocast the inputs' own dtypes decide (the caller casts them to the autocast
    # dtype, see prefix_rft.batching.head_inputs); autocast must not re-type the tile GEMMs.
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearLogprobEntropyFunction.apply(
            hidden, weight, bias, labels, float(temperature), int(ignore_index), impl, bwd
        )
