"""The rows of an update and their right-padded micro-batch layout.

:class:`Rollout` is one scored sequence of the update; a micro-batch of them is either a
right-padded :class:`UpdateBatch` (below, ``train.packing: false``) or a packed
:class:`~prefix_rft.update.packed.PackedBatch` (the default). Both satisfy :class:`MicroBatch`,
which is all the loss and the loop read.

Layout. Each row is ``prompt + response`` packed from position 0 and right-padded to the
longest row (no left padding: a left-padded query row would attend to nothing, and SDPA's
NaNs there could leak into weight gradients as ``0 * NaN``). Response token ``t`` of row
``b`` is predicted by the hidden state at position ``len(prompt_b) - 1 + t``;
``response_index [B, T]`` holds those positions, so

    hidden = model.model(input_ids, attention_mask).last_hidden_state          # [B, W, H]
    resp_hidden = hidden.gather(1, response_index[..., None].expand(-1, -1, H))  # [B, T, H]

and ``resp_hidden[b, t]`` predicts ``response_ids[b, t]``. Padded response slots point at
position 0 and are masked by ``response_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Rollout:
    """One sequence of the update: a rollout (or, for SFT, a demonstration).

    ``response_ids = prefix + continuation`` (``prefix_len`` leading demonstration tokens);
    ``engine_logprobs`` has one entry per continuation token (empty for demonstrations).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    prefix_len: int = 0
    group: int = 0  # question id: rollouts of one question share it
    is_prefixed: bool = False  # a hybrid rollout (started from a demonstration prefix)
    advantage: float = 0.0  # of every token, or of the continuation when prefix_advantage is set
    prefix_advantage: float | None = None  # of the prefix tokens when it differs (baseline
    # official: r_h - mean_on there, the raw r_h on the continuation); None = advantage
    reward: float = 0.0
    engine_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"
    old_logprob: torch.Tensor | None = None  # [len(response_ids)] fp32, policy before the update
    old_entropy: torch.Tensor | None = None  # [len(response_ids)] fp32, same pass

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


class MicroBatch(Protocol):
    """What the loss and the loop read from one micro-batch, padded or packed.

    Per-token tensors are ``[B, T]`` (padded, ``seq_index`` None) or ``[R]`` (packed: the ``R``
    response tokens back to back, ``seq_index [R]`` naming each token's sequence)."""

    response_ids: torch.Tensor  # [B, T] | [R] long
    prefix_mask: torch.Tensor  # [B, T] | [R] bool
    advantages: torch.Tensor  # [B] fp32, or per token [B, T] | [R]
    rows: list[int]  # indices of the micro-batch's rollouts in the pass's list
    seq_index: torch.Tensor | None  # packed [R] long; None for the padded layout

    @property
    def response_mask(self) -> torch.Tensor: ...  # [B, T] | [R] bool, real response tokens

    @property
    def num_tokens(self) -> int: ...  # real (prompt + response) tokens

    @property
    def num_padded_tokens(self) -> int: ...  # positions the forward computes

    def per_rollout(self, values: torch.Tensor) -> list[torch.Tensor]: ...

    def gather(self, values: Sequence[torch.Tensor]) -> torch.Tensor: ...


@dataclass
class UpdateBatch:
    """Tensors of one micro-batch (see the module docstring for the layout)."""

    input_ids: torch.Tensor  # [B, W] long, right-padded
    attention_mask: torch.Tensor  # [B, W] long
    response_index: torch.Tensor  # [B, T] long: position of the hidden state predicting token t
    response_ids: torch.Tensor  # [B, T] long
    response_mask: torch.Tensor  # [B, T] bool, real response tokens
    prefix_mask: torch.Tensor  # [B, T] bool, demonstration-prefix tokens
    advantages: torch.Tensor  # [B] fp32, or [B, T] when a row has its own prefix advantage
    rows: list[int]  # indices of these rows in the list given to collate

    seq_index = None  # padded layout: the loss's per-token tensors are [B, T]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def num_tokens(self) -> int:
        """Real (prompt + response) tokens."""
        return int(self.attention_mask.sum())

    @property
    def num_padded_tokens(self) -> int:
        """Positions the forward computes: ``B * W``, padding included."""
        return int(self.input_ids.numel())

    def per_rollout(self, values: torch.Tensor) -> list[torch.Tensor]:
        """``[B, T]`` per-token values -> one 1-D tensor per row (its real tokens)."""
        lengths = self.response_mask.sum(1).tolist()
        return [values[b, :n] for b, n in enumerate(lengths)]

    def gather(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-rollout 1-D tensors (indexed like collate's ``rollouts``) -> ``[B, T]``, 0-padded,
        on this batch's device."""
        out = torch.zeros(self.response_ids.shape)
        for b, i in enumerate(self.rows):
            out[b, : len(values[i])] = values[i]
        return out.to(self.response_ids.device)


def collate(rollouts: Sequence[Rollout], rows: Sequence[int], *, pad_token_id: int,
            device: torch.device | str = "cpu") -> UpdateBatch:
    """Build the micro-batch of ``rollouts[i] for i in rows``."""
    picked = [rollouts[i] for i in rows]
    if not picked:
        raise ValueError("rows must select at least one rollout")
    for i, r in zip(rows, picked):
        if not r.prompt_ids or not r.response_ids:
            raise ValueError(f"rollouts[{i}] must have a non-empty prompt and response")
    width = max(r.num_tokens for r in picked)
    T = max(len(r.response_ids) for r in picked)
    B = len(picked)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    response_index = torch.zeros((B, T), dtype=torch.long)
    response_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.bool)
    prefix_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, r in enumerate(picked):
        P, n = len(r.prompt_ids), len(r.response_ids)
        input_ids[b, :P + n] = torch.tensor(r.prompt_ids + r.response_ids, dtype=torch.long)
        attention_mask[b, :P + n] = 1
        response_index[b, :n] = torch.arange(P - 1, P - 1 + n)
        response_ids[b, :n] = torch.tensor(r.response_ids, dtype=torch.long)
        response_mask[b, :n] = True
        prefix_mask[b, :min(r.prefix_len, n)] = True
    advantages = torch.tensor([r.advantage for r in picked], dtype=torch.float32)
    if any(r.prefix_advantage is not None for r in picked):  # per-token: prefix vs continuation
        prefix_adv = torch.tensor([r.advantage if r.prefix_advantage is None
                                   else r.prefix_advantage for r in picked], dtype=torch.float32)
        advantages = torch.where(prefix_mask, prefix_adv[:, None], advantages[:, None])
    return UpdateBatch(*(t.to(device) for t in (input_ids, attention_mask, response_index,
                                                 response_ids, response_mask, prefix_mask,
                                                 advantages)), rows=list(rows))
