"""Splitting a pass's rows into micro-batches under a token budget (gradient accumulation).

One splitter, two knobs: ``count`` says what a micro-batch costs -- ``"padded"`` charges
``len(mb) · longest`` (what a right-padded ``[b, W]`` micro-batch holds), ``"tokens"`` the sum of
real tokens (a packed row); ``order`` says how rows are grouped -- ``"in_order"`` cuts
consecutive runs greedily, ``"balanced"`` packs first-fit decreasing (fewer, fuller
micro-batches). A row alone over budget always gets its own micro-batch (never dropped).

Call the loss on each micro-batch with ``num_sequences`` = the mini-batch size: each
micro-batch's loss is then its share of the full-batch loss and ``Σ_k loss_k.backward()``
accumulates exactly the full-batch gradient (see :mod:`prefix_rft.loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from ..checks import check_choice, check_int
from .batch import MicroBatch, Rollout, collate
from .packed import pack

MicroBatchCount = Literal["padded", "tokens"]  # cost of a micro-batch: padded or real tokens
SplitOrder = Literal["in_order", "balanced"]  # consecutive runs, or first-fit decreasing


def _counts(token_counts: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(token_counts, torch.Tensor):
        if token_counts.dim() != 1 or token_counts.is_floating_point():
            raise ValueError("token_counts must be a 1-D integer tensor or a sequence of ints")
        return [int(c) for c in token_counts.tolist()]
    counts = list(token_counts)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"token_counts must be ints >= 0, got {counts!r}")
    return counts


def _cost_fn(counts: list[int], count: str) -> Callable[[list[int], int], int]:
    """``cost(bin, i)``: the cost of micro-batch ``bin`` (indices) once ``i`` joins it."""
    if count == "padded":
        return lambda b, i: (len(b) + 1) * max([counts[i]] + [counts[j] for j in b])
    return lambda b, i: sum(counts[j] for j in b) + counts[i]


def split_micro_batches(
    token_counts: Sequence[int] | torch.Tensor,
    *,
    max_tokens: int,
    count: MicroBatchCount = "padded",
    order: SplitOrder = "in_order",
) -> list[list[int]]:
    """Indices into ``token_counts`` grouped into micro-batches that cost at most ``max_tokens``.

    ``order="in_order"``: rows are added in order until the next one would exceed the budget;
    the micro-batches cover ``range(B)`` once, in order. ``order="balanced"``: rows are taken
    longest first (ties: lower index first) and put into the first micro-batch they fit;
    within one, indices ascend, and micro-batches are ordered by their first index.

    Args:
        token_counts: per-sequence token counts (e.g. prompt + response), ints >= 0.
        max_tokens: budget per micro-batch, >= 1.
        count: ``"padded"`` (``len(mb) · max``) or ``"tokens"`` (sum) per micro-batch.
        order: ``"in_order"`` or ``"balanced"``.

    Returns:
        Lists of indices; call the loss on each with ``num_sequences=B`` and accumulate.
    """
    counts = _counts(token_counts)
    check_int("max_tokens", max_tokens)
    check_choice("count", count, MicroBatchCount)
    check_choice("order", order, SplitOrder)
    cost = _cost_fn(counts, count)
    bins: list[list[int]] = []
    if order == "in_order":
        for i in range(len(counts)):
            if bins and cost(bins[-1], i) <= max_tokens:
                bins[-1].append(i)
            else:
                bins.append([i])
        return bins
    for i in sorted(range(len(counts)), key=lambda j: (-counts[j], j)):
        fit = next((b for b in bins if cost(b, i) <= max_tokens), None)
        if fit is None:
            bins.append([i])
        else:
            fit.append(i)
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def split_rows(rollouts: Sequence[Rollout], rows: Sequence[int], max_tokens: int, *,
               packing: bool, balanced: bool) -> list[list[int]]:
    """``rows`` (indices into ``rollouts``) as micro-batches of prompt + response tokens.

    Packed rows cost their real tokens and are balanced when ``balanced`` (passes whose result
    does not depend on which rollouts share a micro-batch); right-padded rows cost ``len(mb) ·
    longest`` and are always cut in order (the reference layout, as the authors' code cuts)."""
    rows = list(rows)
    counts = [rollouts[i].num_tokens for i in rows]
    parts = split_micro_batches(
        counts, max_tokens=max_tokens, count="tokens" if packing else "padded",
        order="balanced" if packing and balanced else "in_order")
    return [[rows[j] for j in part] for part in parts]


def make_micro_batches(rollouts: Sequence[Rollout], rows: Sequence[int], max_tokens: int, *,
                       packing: bool, balanced: bool, pad_token_id: int,
                       device: torch.device | str = "cpu") -> list[MicroBatch]:
    """The micro-batches of one pass over ``rows`` (indices into ``rollouts``): one packed row
    each (:func:`prefix_rft.update.packed.pack`) or right-padded rows
    (:func:`prefix_rft.update.batch.collate`), split by :func:`split_rows`."""
    parts = split_rows(rollouts, rows, max_tokens, packing=packing, balanced=balanced)
    if packing:
        return [pack(rollouts, mb, device=device) for mb in parts]
    return [collate(rollouts, mb, pad_token_id=pad_token_id, device=device) for mb in parts]


def padded_cut_tokens(rollouts: Sequence[Rollout], rows: Sequence[int], max_tokens: int) -> int:
    """Positions right-padded micro-batches of ``rows`` would hold (the padded layout's
    in-order cut, ``len(mb) * longest`` each): what packing saves, for the logs."""
    return sum(len(mb) * max(rollouts[i].num_tokens for i in mb)
               for mb in split_rows(rollouts, rows, max_tokens, packing=False, balanced=False))
