"""The forward-with-head: one model forward whose response states go straight into a head.

    result = run_head(model, batch, head)    # head(resp_hidden, lm_head_weight, bias | None)

``resp_hidden`` is ``[B, T, H]`` for a right-padded :class:`~prefix_rft.update.batch.UpdateBatch`
(the states at ``response_index``) and ``[R, H]`` for a packed
:class:`~prefix_rft.update.packed.PackedBatch` (its ``R`` response states, no padding). The
head runs inside :func:`prefix_rft.runtime.distributed.forward_with_head`, so under FSDP2 the
lm_head weight is the gathered one and no ``[tokens x vocab]`` tensor exists; its dtypes are
:func:`head_inputs`'. What the head computes (log-probs and entropies, a loss) is the caller's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch

from ..runtime.distributed import forward_with_head
from .batch import MicroBatch
from .packed import PackedBatch
from .varlen_attention import packed_forward

HeadResult = TypeVar("HeadResult")
# head(resp_hidden [B, T, H] | [R, H], lm_head_weight [V, H], lm_head_bias [V] | None)
Head = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], HeadResult]


class Policy(Protocol):
    """What the idle forwards need of a run (:class:`prefix_rft.run.setup.Run` is one)."""

    model: torch.nn.Module
    pad_id: int
    device: torch.device

    def compute(self) -> contextlib.AbstractContextManager: ...


def response_hidden(hidden: torch.Tensor, response_index: torch.Tensor) -> torch.Tensor:
    """``hidden [B, W, H]`` -> ``[B, T, H]``: the states that predict the response tokens."""
    return hidden.gather(1, response_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def head_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Dtypes for the fused kernel. Under autocast (CUDA or CPU) the decoder's residual stream
    (so the final hidden state) stays fp32 while a plain HF forward would run lm_head in the
    autocast dtype: give the kernel that dtype too (half the bytes, tensor cores). Otherwise
    match the weight to ``hidden`` (under FSDP2 mixed precision both are already bf16)."""
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    return hidden, weight, bias


def run_head(model: torch.nn.Module, batch: MicroBatch, head: Head) -> HeadResult:
    """``head(resp_hidden, lm_head_weight, bias)`` inside one model forward over ``batch``
    (FSDP2-safe), dtypes by :func:`head_inputs`. Returns what ``head`` returns."""
    if isinstance(batch, PackedBatch):
        def packed_head(hidden, weight, bias):  # hidden [1, N, H] -> [R, H]
            resp = hidden[0].index_select(0, batch.response_index)
            return head(*head_inputs(resp, weight, bias))

        with packed_forward(model):
            return forward_with_head(model, packed_head, batch.input_ids, **batch.model_kwargs())

    def padded_head(hidden, weight, bias):  # hidden [B, W, H] -> [B, T, H]
        return head(*head_inputs(response_hidden(hidden, batch.response_index), weight, bias))

    return forward_with_head(model, padded_head, batch.input_ids,
                             attention_mask=batch.attention_mask)


def response_logprob_entropy(model: torch.nn.Module, batch: MicroBatch,
                             loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprob, entropy)`` fp32 of the response tokens, ``[B, T]`` (0 off-mask) or packed
    ``[R]``, through ``loss_fn.token_logprob_entropy`` (a :class:`prefix_rft.loss.PrefixRFTLoss`:
    the fused kernel at the loss's temperature). Differentiable unless called under no_grad."""
    def head(resp_hidden, weight, bias):
        return loss_fn.token_logprob_entropy(resp_hidden, weight, batch.response_ids,
                                             batch.response_mask, bias)

    return run_head(model, batch, head)


def idle_forwards(policy: Policy, count: int, *, grad: bool) -> None:
    """``count`` one-token forwards (+ backward of an exact zero when ``grad``): under FSDP2
    every forward all-gathers, so a rank with fewer micro-batches than another must still
    join the collectives of the extra ones. Adds nothing to any gradient."""
    ids = torch.full((1, 1), policy.pad_id, dtype=torch.long, device=policy.device)

    def head(hidden, weight, bias):
        return (hidden.sum() + weight.sum()) * 0.0

    for _ in range(count):
        with policy.compute(), torch.set_grad_enabled(grad):
            zero = forward_with_head(policy.model, head, ids)
        if grad:
            zero.backward()
