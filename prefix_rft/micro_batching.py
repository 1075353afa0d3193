"""Splitting a mini-batch into micro-batches under a token budget (gradient accumulation).

Call the loss on each micro-batch with ``num_sequences`` = the mini-batch size: each
micro-batch's loss is then its share of the full-batch loss and ``Σ_k loss_k.backward()``
accumulates exactly the full-batch gradient (see :mod:`prefix_rft.loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from prefix_rft.checks import check_choice, check_int

MicroBatchCount = Literal["padded", "tokens"]


def split_micro_batches(
    token_counts: Sequence[int] | torch.Tensor,
    *,
    max_tokens: int,
    count: MicroBatchCount = "padded",
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
    check_int("max_tokens", max_tokens)
    check_choice("count", count, MicroBatchCount)
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
