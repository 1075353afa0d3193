"""Packed (padding-free) update micro-batches and token-balanced micro-batch splits.

Layout. The ``n`` sequences (``prompt + response``) of a micro-batch are concatenated into one
row ``input_ids [1, N]``, ``N = sum of their lengths``, with ``position_ids`` restarting at 0
at each sequence and ``cu_seq_lens [n + 1]`` (int32) marking the boundaries. Attention never
crosses a boundary (:mod:`prefix_rft.update.varlen_attention`: flash-attn's varlen kernel on CUDA,
per-sequence SDPA otherwise). Response token ``t`` of sequence ``j`` (prompt length ``P_j``,
starting at packed offset ``s_j``) is predicted by the hidden state at packed position
``s_j + P_j - 1 + t``; ``response_index [R]`` holds these positions for all ``R`` response
tokens of the micro-batch in sequence order, so

    hidden = model.model(input_ids, position_ids=position_ids, cu_seq_lens_q=cu, ...)
    resp_hidden = hidden[0, response_index]                     # [R, H], no padding

and the fused head + loss run on ``[R, H]`` directly. ``seq_index [R]`` names each token's
sequence (0..n-1 within the micro-batch); flat order = the row-major order of the valid
tokens of the padded ``[n, T]`` layout (:mod:`prefix_rft.update.batch`), so per-token results
map one to one between the two layouts. The forward over a packed row is
:func:`prefix_rft.update.head.run_head`; the split into micro-batches
:mod:`prefix_rft.update.split`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
    ``prefix_len``, ``advantage``, e.g. :class:`prefix_rft.update.batch.Rollout`) into one row."""
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
