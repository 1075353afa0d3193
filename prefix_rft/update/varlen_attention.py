"""Attention over packed sequences (one row, several sequences) without a ``[N, N]`` mask.

A packed micro-batch is one row ``input_ids [1, N]`` holding ``n`` sequences back to back,
``position_ids`` restarting at 0 at each sequence and ``cu_seq_lens = [0, l_0, l_0 + l_1,
..., N]`` (int32). Attention must stay inside each sequence (block-diagonal causal).

What the libraries offer (transformers 5.x, torch 2.13):

* ``flash_attention_2`` / ``_3`` (CUDA, flash-attn installed): transformers reads
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` from the forward's kwargs (or derives them from
  ``position_ids``) and calls flash-attn's varlen kernel. Nothing to add here.
* ``sdpa`` / ``eager`` with ``attention_mask=None`` and packed ``position_ids``: transformers
  detects the packing (``masking_utils.find_packed_sequence_indices``) and builds a dense
  block-diagonal causal mask ``[1, 1, N, N]``. Correct, but SDPA then runs a masked kernel over
  all ``N^2`` pairs of the row (and holds the mask) instead of ``sum(l_i^2) / 2``.
* ``flex_attention``: no backward on CPU in torch 2.13 (``NotImplementedError``).
* ``torch.nn.attention.varlen.varlen_attn``: CUDA (flash) only.

So for SDPA this module registers one more transformers attention function,
``prefix_rft_varlen_sdpa`` (:data:`VARLEN_SDPA`), through ``AttentionInterface`` -- the hook
transformers provides for custom kernels. It reads the same ``cu_seq_lens_q`` kwarg that
flash-attn's varlen path reads and runs ``F.scaled_dot_product_attention(is_causal=True)``
per group of sequences: sequences are sorted by length and grouped while right-padding the
group to its longest costs at most ``max_waste`` x the exact attention FLOPs; a group is
right-padded into ``[g, heads, L, d]`` (causal attention never reads the padded keys from a
real query, so the result is exact) and scattered back. Cost ``~ sum(l_i^2)``, not ``N^2``.

:func:`enable_packed_attention` switches an ``sdpa`` model to it for good (on unpacked calls
it *is* transformers' SDPA, mask included); :func:`packed_forward` wraps each packed forward
(no dense mask is built). flash-attn models keep transformers' own varlen path.

Equivalent torch for one layer (``q [1, Hq, N, d]``, ``k, v [1, Hkv, N, d]``)::

    out = torch.cat([F.scaled_dot_product_attention(q[..., s:e, :], k[..., s:e, :],
                     v[..., s:e, :], is_causal=True, enable_gqa=True)
                     for s, e in zip(cu[:-1], cu[1:])], dim=2).transpose(1, 2)
"""

from __future__ import annotations

import contextlib
import contextvars
from functools import lru_cache

import torch
import torch.nn.functional as F

VARLEN_SDPA = "prefix_rft_varlen_sdpa"
NATIVE_VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
DEFAULT_MAX_WASTE = 1.5  # a group's padded attention FLOPs <= this x its exact FLOPs


def plan_groups(lengths: tuple[int, ...], max_waste: float = DEFAULT_MAX_WASTE) -> list[list[int]]:
    """Group sequence indices for padded attention calls.

    Sequences sorted by length (longest first) join the current group while
    ``len(group) * longest**2 <= max_waste * sum(l**2 for l in group)``.
    ``max_waste = 1`` gives one call per distinct length; a large value one call.
    """
    if max_waste < 1:
        raise ValueError(f"max_waste must be >= 1, got {max_waste!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    exact = 0
    for i in order:
        sq = lengths[i] ** 2
        padded = (len(groups[-1]) + 1) * lengths[groups[-1][0]] ** 2 if groups else 0
        if groups and padded <= max_waste * (exact + sq):
            groups[-1].append(i)
            exact += sq
        else:
            groups.append([i])
            exact = sq
    return groups


@lru_cache(maxsize=64)
def _gather_plan(lengths: tuple[int, ...], max_waste: float, device: str):
    """Per group: ``(start, end)`` for a lone sequence, or ``(index [g, L], valid [g, L])`` into
    the packed row; plus the permutation that restores packed order after concatenating
    the groups' outputs."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    plan, order = [], []
    for group in plan_groups(lengths, max_waste):
        if len(group) == 1:
            i = group[0]
            plan.append((starts[i], starts[i + 1]))
            order.extend(range(starts[i], starts[i + 1]))
            continue
        width = lengths[group[0]]
        index = torch.zeros(len(group), width, dtype=torch.long)
        valid = torch.zeros(len(group), width, dtype=torch.bool)
        for row, i in enumerate(group):
            index[row, : lengths[i]] = torch.arange(starts[i], starts[i + 1])
            valid[row, : lengths[i]] = True
            order.extend(range(starts[i], starts[i + 1]))
        plan.append((index.to(device), valid.to(device)))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return plan, inverse.to(device)


def varlen_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                cu_seq_lens: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0,
                max_waste: float = DEFAULT_MAX_WASTE) -> torch.Tensor:
    """Causal attention inside each packed sequence.

    Args:
        query: ``[1, Hq, N, d]``; key, value: ``[1, Hkv, N, d]`` (``Hq % Hkv == 0``, GQA).
        cu_seq_lens: ``[n + 1]`` int, ``0 = cu[0] < ... < cu[n] = N``.
    Returns:
        ``[1, N, Hq, d]`` (the layout transformers' attention functions return).
    """
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"query must be [1, heads, N, d] (one packed row), "
                         f"got {tuple(query.shape)}")
    N = query.shape[2]
    cu = [int(c) for c in cu_seq_lens.tolist()]
    if cu[0] != 0 or cu[-1] != N or any(b <= a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seq_lens must rise strictly from 0 to N={N}, got {cu}")
    lengths = tuple(b - a for a, b in zip(cu[:-1], cu[1:]))
    gqa = query.shape[1] != key.shape[1]
    plan, inverse = _gather_plan(lengths, float(max_waste), str(query.device))
    q, k, v = query[0], key[0], value[0]  # [heads, N, d]
    outs = []
    for entry in plan:
        if isinstance(entry[0], int):
            s, e = entry
            o = F.scaled_dot_product_attention(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e],
                                               is_causal=True, scale=scale, dropout_p=dropout_p,
                                               enable_gqa=gqa)
            outs.append(o[0].transpose(0, 1))  # [len, Hq, d]
        else:
            index, valid = entry
            qg, kg, vg = (t[:, index].transpose(0, 1) for t in (q, k, v))  # [g, heads, L, d]
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale,
                                               dropout_p=dropout_p, enable_gqa=gqa)
            outs.append(o.transpose(1, 2)[valid])  # [tokens of the group, Hq, d]
    return torch.cat(outs, 0)[inverse].unsqueeze(0)


def _varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, sliding_window=None, **kwargs):
    """transformers attention-function signature: packed (``cu_seq_lens_q`` given) ->
    :func:`varlen_sdpa`; anything else (generation, padded batches) -> transformers' SDPA."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or kwargs.get("cache") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if sliding_window is not None:
        raise ValueError("packed attention does not support sliding-window layers; "
                         "set train.packing=false")
    if not getattr(module, "is_causal", True):
        raise ValueError("packed attention needs causal self-attention layers")
    out = varlen_sdpa(query, key, value, cu, scale=scaling, dropout_p=dropout)
    return out, None


_IN_PACKED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "prefix_rft_packed_forward", default=False)


def _varlen_sdpa_mask(*args, **kwargs):
    """Mask creation for :data:`VARLEN_SDPA`: none inside a packed forward (the attention
    reads ``cu_seq_lens_q``; transformers would otherwise build a dense ``[N, N]``
    block-diagonal mask from the packed ``position_ids``), transformers' SDPA mask otherwise."""
    if _IN_PACKED_FORWARD.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


_REGISTERED = False


def register() -> None:
    """Register :data:`VARLEN_SDPA` with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, _varlen_sdpa_mask)
    _REGISTERED = True


def enable_packed_attention(model: torch.nn.Module) -> str:
    """Make ``model`` able to run packed forwards; returns its attention implementation.

    ``sdpa`` -> :data:`VARLEN_SDPA` (stays: it equals SDPA on every unpacked call, and a
    backward that recomputes checkpointed layers must see the same function as the forward);
    flash-attn implementations are left as they are (transformers' own varlen path); anything
    else is a ``ValueError``. Idempotent.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == VARLEN_SDPA or current in NATIVE_VARLEN_IMPLEMENTATIONS:
        return current
    if current != "sdpa":
        raise ValueError(f"packed micro-batches need sdpa or flash-attn attention, got "
                         f"{current!r}; set train.packing=false "
                         f"(or model.attn_implementation=sdpa)")
    register()
    config._attn_implementation = VARLEN_SDPA
    return VARLEN_SDPA


@contextlib.contextmanager
def packed_forward(model: torch.nn.Module):
    """Around a packed model forward (``input_ids [1, N]``, ``attention_mask=None``, packed
    ``position_ids`` and ``cu_seq_lens_q/k``, ``max_length_q/k`` kwargs): enables packed
    attention (:func:`enable_packed_attention`) and skips the dense mask."""
    enable_packed_attention(model)
    token = _IN_PACKED_FORWARD.set(True)
    try:
        yield
    finally:
        _IN_PACKED_FORWARD.reset(token)
