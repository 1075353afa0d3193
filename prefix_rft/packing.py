"""Packed (padding-free) update micro-batches and token-balanced micro-batch splits.

Layout. The ``n`` sequences (``prompt + response``) of a micro-batch are concatenated into one
row ``input_ids [1, N]``, ``N = sum of their lengths``, with ``position_ids`` restarting at 0
at each sequence and ``cu_seq_lens [n + 1]`` (int32) marking the boundaries. Attention never
crosses a boundary (:mod:`prefix_rft.varlen_attention`: flash-attn's varlen kernel on CUDA,
per-sequence SDPA otherwise). Response token ``t`` of sequence ``j`` (prompt length ``P_j``,
starting at packed offset ``s_j``) is predicted by the hidden state at packed position
``s_j + P_j - 1 + t``; ``response_index [R]`` holds these positions for all ``R`` response
tokens of the micro-batch in sequence order, so

    hidden = model.model(input_ids, position_ids=position_ids, cu_seq_lens_q=cu, ...)
    resp_hidden = hidden[0, response_index]                     # [R, H], no padding

and the fused head + loss run on ``[R, H]`` directly. ``seq_index [R]`` names each token's
sequence (0..n-1 within the micro-batch); flat order = the row-major order of the valid
tokens of the padded ``[n, T]`` layout (:mod:`prefix_rft.batching`), so per-token results map
one to one between the two layouts.

Splitting. :func:`balanced_micro_batches` packs sequences by real token count with
first-fit decreasing under a budget (fewer, fuller micro-batches than an in-order cut);
:func:`in_order_micro_batches` cuts in order by real tokens, for the one pass whose result
depends on which rollouts share a micro-batch (``micro_batch`` entropy-mask scope).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .varlen_attention import packed_forward


@dataclass
class PackedBatch:
    """Tensors of one packed micro-batch (see the module docstring for the layout)."""

    input_ids: torch.Tensor  # [1, N] long
    position_ids: torch.Tensor  # [1, N] long, restarting at 0 per sequence
    cu_seq_lens: torch.Tensor  # [n + 1] int32, sequence boundaries in the row
    max_length: int  # longest sequence (prompt + response)
    response_index: torch.Tensor  # [R] long: packed position of the state predicting token r
    response_ids: torch.Tensor  # [R] long
    prefix_mask: torch.Tensor  # [R] bool, demonstration-prefix tokens
    seq_index: torch.Tensor  # [R] long, sequence of token r (0..n-1)
    response_lens: list[int]  # per sequence
    advantages: torch.Tensor  # [n] fp32, or [R] when a row has its own prefix advantage
    rows: list[int]  # indices of these sequences in the list given to pack

    @property
    def num_sequences(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        """Tokens in the row (prompts + responses): all real, none padding."""
        return int(self.input_ids.shape[1])

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def num_padded_tokens(self) -> int:
        """Positions the forward computes: the real tokens (no padding)."""
        return self.num_tokens

    @property
    def response_mask(self) -> torch.Tensor:
        """``[R]`` all True (every packed response token is real)."""
        return torch.ones_like(self.response_ids, dtype=torch.bool)

    def per_rollout(self, values: torch.Tensor) -> list[torch.Tensor]:
        """``[R]`` per-token values -> one 1-D tensor per sequence (views)."""
        return list(values.split(self.response_lens))

    def gather(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-rollout 1-D tensors (indexed like pack's ``rollouts``) -> ``[R]`` fp32."""
        return gather_per_token(values, self)

    def model_kwargs(self) -> dict:
        """Keyword arguments of the packed decoder forward (no attention mask)."""
        return {"position_ids": self.position_ids, "cu_seq_lens_q": self.cu_seq_lens,
                "cu_seq_lens_k": self.cu_seq_lens, "max_length_q": self.max_length,
                "max_length_k": self.max_length}


def pack(rollouts: Sequence, rows: Sequence[int], *,
         device: torch.device | str = "cpu") -> PackedBatch:
    """Pack ``rollouts[i] for i in rows`` (objects with ``prompt_ids``, ``response_ids``,
    ``prefix_len``, ``advantage``, e.g. :class:`prefix_rft.batching.Rollout`) into one row."""
    rows = list(rows)
    if not rows:
        raise ValueError("rows must select at least one rollout")
    ids, pos, cu, resp_index, resp_ids, prefix, seq, lens = [], [], [0], [], [], [], [], []
    for j, i in enumerate(rows):
        r = rollouts[i]
        P, n = len(r.prompt_ids), len(r.response_ids)
        if P == 0 or n == 0:
            raise ValueError(f"rollouts[{i}] must have a non-empty prompt and response")
        start = cu[-1]
        ids.extend(r.prompt_ids)
        ids.extend(r.response_ids)
        pos.extend(range(P + n))
        cu.append(start + P + n)
        resp_index.extend(range(start + P - 1, start + P - 1 + n))
        resp_ids.extend(r.response_ids)
        k = min(max(int(r.prefix_len), 0), n)
        prefix.extend([True] * k + [False] * (n - k))
        seq.extend([j] * n)
        lens.append(n)
    long = dict(dtype=torch.long, device=device)
    return PackedBatch(
        input_ids=torch.tensor([ids], **long), position_ids=torch.tensor([pos], **long),
        cu_seq_lens=torch.tensor(cu, dtype=torch.int32, device=device),
        max_length=max(b - a for a, b in zip(cu[:-1], cu[1:])),
        response_index=torch.tensor(resp_index, **long),
        response_ids=torch.tensor(resp_ids, **long),
        prefix_mask=torch.tensor(prefix, dtype=torch.bool, device=device),
        seq_index=torch.tensor(seq, **long), response_lens=lens,
        advantages=_packed_advantages([rollouts[i] for i in rows], prefix, device),
        rows=rows)


def _packed_advantages(picked, prefix: list[bool], device) -> torch.Tensor:
    """``[n]`` one per rollout, or ``[R]`` per token when a rollout's prefix tokens have their
    own advantage (``Rollout.prefix_advantage``, baseline official)."""
    if all(r.prefix_advantage is None for r in picked):
        return torch.tensor([float(r.advantage) for r in picked], dtype=torch.float32,
                            device=device)
    values, t = [], 0
    for r in picked:
        pre = r.advantage if r.prefix_advantage is None else r.prefix_advantage
        for _ in range(len(r.response_ids)):
            values.append(float(pre if prefix[t] else r.advantage))
            t += 1
    return torch.tensor(values, dtype=torch.float32, device=device)


def gather_per_token(values: Sequence[torch.Tensor], packed: PackedBatch,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Per-rollout 1-D tensors (e.g. ``Rollout.old_logprob``), indexed like ``pack``'s
    ``rollouts`` -> ``[R]`` in packed order."""
    parts = []
    for i, n in zip(packed.rows, packed.response_lens):
        v = values[i]
        if v is None or v.shape[0] != n:
            raise ValueError(f"values[{i}] must have one entry per response token ({n})")
        parts.append(v.float())
    out = torch.cat(parts)
    return out.to(device if device is not None else packed.response_ids.device)


def run_packed_head(model: torch.nn.Module, packed: PackedBatch,
                    head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], object]):
    """``head(resp_hidden [R, H], lm_head_weight [V, H], bias | None)`` inside one packed model
    forward (FSDP2-safe through ``distributed.forward_with_head``; dtypes as
    ``batching.head_inputs``). Returns what ``head`` returns."""
    from .batching import head_inputs
    from .distributed import forward_with_head

    def head_fn(hidden, weight, bias):
        resp = hidden[0].index_select(0, packed.response_index)
        return head(*head_inputs(resp, weight, bias))

    with packed_forward(model):
        return forward_with_head(model, head_fn, packed.input_ids, **packed.model_kwargs())


# ---------------------------------------------------------------------------- splitting
def _check_counts(token_counts: Sequence[int], max_tokens: int) -> list[int]:
    counts = list(token_counts)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"token_counts must be ints >= 0, got {counts!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    return counts


def balanced_micro_batches(token_counts: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices into ``token_counts`` in bins of at most ``max_tokens``
    real tokens (a sequence alone over budget gets its own bin).

    Sequences are taken longest first (ties: lower index first) and put into the first bin
    they fit. Within a bin indices are ascending; bins are ordered by their first index.
    Together the bins cover ``range(len(token_counts))`` once.
    """
    counts = _check_counts(token_counts, max_tokens)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(counts)), key=lambda j: (-counts[j], j)):
        for b, free in enumerate(room):
            if counts[i] <= free:
                bins[b].append(i)
                room[b] -= counts[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - counts[i])
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def in_order_micro_batches(token_counts: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive runs of at most ``max_tokens`` real tokens (greedy, in order); a sequence
    alone over budget gets its own run."""
    counts = _check_counts(token_counts, max_tokens)
    batches: list[list[int]] = []
    used = 0
    for i, c in enumerate(counts):
        if batches and used + c <= max_tokens:
            batches[-1].append(i)
            used += c
        else:
            batches.append([i])
            used = c
    return batches


def split_rows(rollouts: Sequence, rows: Sequence[int], max_tokens: int, *,
               balanced: bool) -> list[list[int]]:
    """``rows`` (indices into ``rollouts``) as packed micro-batches by real tokens
    (prompt + response): :func:`balanced_micro_batches` or :func:`in_order_micro_batches`."""
    rows = list(rows)
    counts = [len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids) for i in rows]
    split = balanced_micro_batches if balanced else in_order_micro_batches
    return [[rows[j] for j in part] for part in split(counts, max_tokens)]


def padding_stats(rollouts: Sequence, micro_batches: Sequence[Sequence[int]], *,
                  packed: bool) -> dict[str, float]:
    """Tokens of a pass over ``micro_batches``: ``tokens`` (real), ``padded_tokens`` (what the
    forwards hold: the real tokens when packed, ``len(mb) * longest`` per micro-batch when
    padded) and ``padding_frac = 1 - tokens / padded_tokens``."""
    real = padded = 0
    for mb in micro_batches:
        lengths = [len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids) for i in mb]
        real += sum(lengths)
        padded += sum(lengths) if packed else len(lengths) * max(lengths, default=0)
    return {"tokens": float(real), "padded_tokens": float(padded),
            "padding_frac": 1.0 - real / padded if padded else 0.0}
