"""Update micro-batches of (prompt, response) sequences and the fused-head forward over them.

Two layouts: right-padded rows (below; ``train.packing: false``) and packed rows
(:mod:`prefix_rft.packing`, the default): :func:`make_micro_batches` builds either,
:func:`run_head` / :func:`response_logprob_entropy` take either.

Layout. Each row is ``prompt + response`` packed from position 0 and right-padded to the
longest row (no left padding: a left-padded query row would attend to nothing, and SDPA's
NaNs there could leak into weight gradients as ``0 * NaN``). Response token ``t`` of row
``b`` is predicted by the hidden state at position ``len(prompt_b) - 1 + t``;
``response_index [B, T]`` holds those positions, so

    hidden = model.model(input_ids, attention_mask).last_hidden_state          # [B, W, H]
    resp_hidden = hidden.gather(1, response_index[..., None].expand(-1, -1, H))  # [B, T, H]

and ``resp_hidden[b, t]`` predicts ``response_ids[b, t]``. Padded response slots point at
position 0 and are masked by ``response_mask``. :func:`response_logprob_entropy` and the
trainer's loss call go through :func:`prefix_rft.distributed.forward_with_head`, so under
FSDP2 the lm_head weight is the gathered one and no ``[tokens x vocab]`` tensor exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .distributed import forward_with_head, max_over_ranks
from .packing import PackedBatch, pack, run_packed_head, split_rows


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


def run_head(model: torch.nn.Module, batch: UpdateBatch | PackedBatch,
             head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], object]) -> object:
    """``head(resp_hidden [B, T, H], lm_head_weight [V, H], bias | None)`` inside one model
    forward (FSDP2-safe; see ``distributed.forward_with_head``), dtypes by :func:`head_inputs`.
    A :class:`~prefix_rft.packing.PackedBatch` gives ``resp_hidden [R, H]`` instead
    (:func:`prefix_rft.packing.run_packed_head`). Returns what ``head`` returns."""
    if isinstance(batch, PackedBatch):
        return run_packed_head(model, batch, head)

    def head_fn(hidden, weight, bias):
        return head(*head_inputs(response_hidden(hidden, batch.response_index), weight, bias))

    return forward_with_head(model, head_fn, batch.input_ids, attention_mask=batch.attention_mask)


def response_logprob_entropy(model: torch.nn.Module, batch: UpdateBatch | PackedBatch,
                             loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprob [B, T], entropy [B, T])`` fp32 of the response tokens (0 off-mask; ``[R]``
    for a packed batch), through
    ``loss_fn.token_logprob_entropy`` (a :class:`prefix_rft.loss.PrefixRFTLoss`) -- the
    fused kernel at the loss's temperature. Differentiable unless called under no_grad."""
    def head(resp_hidden, weight, bias):
        return loss_fn.token_logprob_entropy(resp_hidden, weight, batch.response_ids,
                                             batch.response_mask, bias)

    return run_head(model, batch, head)


def micro_batches(rollouts: Sequence[Rollout], rows: Sequence[int],
                  max_tokens: int) -> list[list[int]]:
    """Split ``rows`` (indices into ``rollouts``) into micro-batches of at most ``max_tokens``
    padded tokens (``len(mb) * longest``); a row alone over budget gets its own."""
    from .micro_batching import split_micro_batches

    rows = list(rows)
    parts = split_micro_batches([rollouts[i].num_tokens for i in rows], max_tokens=max_tokens)
    return [[rows[j] for j in part] for part in parts]


def make_micro_batches(rollouts: Sequence[Rollout], rows: Sequence[int], max_tokens: int, *,
                       packing: bool, balanced: bool, pad_token_id: int,
                       device: torch.device | str = "cpu") -> list[UpdateBatch | PackedBatch]:
    """The micro-batches of one pass over ``rows`` (indices into ``rollouts``).

    ``packing``: one packed row each (:mod:`prefix_rft.packing`), split by real tokens --
    first-fit decreasing when ``balanced`` (passes whose result does not depend on which
    rollouts share a micro-batch), in order otherwise. Not ``packing``: right-padded rows cut in
    order by padded tokens (:func:`micro_batches`)."""
    if packing:
        parts = split_rows(rollouts, rows, max_tokens, balanced=balanced)
        return [pack(rollouts, mb, device=device) for mb in parts]
    return [collate(rollouts, mb, pad_token_id=pad_token_id, device=device)
            for mb in micro_batches(rollouts, rows, max_tokens)]


def update_micro_batches(run, rows: list[Rollout], picked, *, balanced: bool):
    """Micro-batches of one pass: packed (``train.packing``; first-fit decreasing by real
    tokens when ``balanced``, else in order) or right-padded rows cut in order, from a
    :class:`prefix_rft.setup.Run`'s ``cfg.train``, ``pad_id`` and ``device``. Returns
    ``(batches, idle)``: ``idle`` = how many fewer this rank has than the busiest rank."""
    t = run.cfg.train
    batches = make_micro_batches(rows, picked, t.micro_batch_tokens, packing=t.packing,
                                 balanced=balanced, pad_token_id=run.pad_id, device=run.device)
    return batches, max_over_ranks(len(batches)) - len(batches)


def idle_forwards(run, count: int, *, grad: bool) -> None:
    """``count`` one-token forwards (+ backward of an exact zero when ``grad``): under FSDP2
    every forward all-gathers, so a rank with fewer micro-batches than another must still
    join the collectives of the extra ones. Adds nothing to any gradient."""
    ids = torch.full((1, 1), run.pad_id, dtype=torch.long, device=run.device)

    def head(hidden, weight, bias):
        return (hidden.sum() + weight.sum()) * 0.0

    for _ in range(count):
        with run.compute(), torch.set_grad_enabled(grad):
            zero = forward_with_head(run.model, head, ids)
        if grad:
            zero.backward()


def may_balance_update(cfg) -> bool:
    """Whether the update's micro-batches may be token-balanced: not when the ``micro_batch``
    entropy-mask scope ranks prefix tokens per micro-batch (which rollouts share one changes
    the mask), so there the packed split keeps the mini-batch's order."""
    lo = cfg.loss
    return lo.algo == "sft" or not (lo.entropy_mask_scope == "micro_batch"
                                    and lo.entropy_top_fraction < 1)


def padded_cut_tokens(rollouts: Sequence[Rollout], rows: Sequence[int], max_tokens: int) -> int:
    """Positions right-padded micro-batches of ``rows`` would hold (the padded layout's
    in-order cut, ``len(mb) * longest`` each): what packing saves, for the logs."""
    return sum(len(mb) * max(rollouts[i].num_tokens for i in mb)
               for mb in micro_batches(rollouts, rows, max_tokens))
