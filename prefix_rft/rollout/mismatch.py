"""Engine-vs-trainer log-prob mismatch over continuation tokens (fed by either engine).

Rollout engines and the trainer compute the same log-probs with different kernels (vLLM's
attention and sampler vs the trainer's forward and fused log-prob kernel); the drift breaks
PPO importance ratios if it grows, so the trainer reports it after each rollout.

Alignment. Row b of the trainer tensors is sample b (``RolloutSample`` order, flattened
request by request). Along T, the trainer's response positions are ``response_ids`` positions
(prefix first, then continuation, then padding); ``continuation_mask[b, t]`` is True exactly
on the continuation positions ``prefix_len <= t < len(response_ids)`` -- which is what
``continuation_mask_for`` builds -- and the k-th True position of row b is matched with
``engine_logprobs[b][k]`` (the engine reports continuation log-probs only). Both sides must
use the same temperature (and, with top-p/top-k on, the engine's log-probs are of the
renormalized filtered distribution, so only compare with ``top_p=1, top_k=0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def continuation_mask_for(samples: Sequence, width: int) -> torch.Tensor:
    """[B, width] bool: True on each sample's continuation positions of ``response_ids``.

    ``samples`` are ``RolloutSample``s (anything with ``prefix_len`` and ``response_ids``).
    """
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for b, sample in enumerate(samples):
        end = min(len(sample.response_ids), width)
        mask[b, sample.prefix_len:end] = True
    return mask


def logprob_mismatch(engine_logprobs: Sequence[Sequence[float]], trainer_logprobs: torch.Tensor,
                     continuation_mask: torch.Tensor) -> dict[str, float]:
    """Mean and max of ``|engine - trainer|`` over continuation tokens.

    Args:
        engine_logprobs: B lists; list b holds the engine's log-probs of row b's
            continuation tokens (``RolloutSample.logprobs``).
        trainer_logprobs: [B, T] float, the trainer's log-prob of each response token.
        continuation_mask: [B, T] bool, True on continuation positions; row b must have
            exactly ``len(engine_logprobs[b])`` True entries.

    Returns ``{"mismatch_mean": float, "mismatch_max": float, "num_tokens": int}``
    (both 0.0 when there are no continuation tokens). Equivalent torch::

        engine = torch.zeros_like(trainer); engine[mask] = cat(engine_logprobs)
        diff = (engine - trainer).abs()[mask]; diff.mean(), diff.max()
    """
    if trainer_logprobs.dim() != 2:
        raise ValueError(f"trainer_logprobs must be [B, T], got shape "
                         f"{tuple(trainer_logprobs.shape)}")
    if continuation_mask.shape != trainer_logprobs.shape or continuation_mask.dtype != torch.bool:
        raise ValueError(f"continuation_mask must be a bool tensor of shape "
                         f"{tuple(trainer_logprobs.shape)}, got {continuation_mask.dtype} "
                         f"{tuple(continuation_mask.shape)}")
    if len(engine_logprobs) != trainer_logprobs.shape[0]:
        raise ValueError(f"engine_logprobs has {len(engine_logprobs)} rows, trainer_logprobs "
                         f"has {trainer_logprobs.shape[0]}")
    counts = continuation_mask.sum(dim=1).tolist()
    for b, (row, count) in enumerate(zip(engine_logprobs, counts)):
        if len(row) != count:
            raise ValueError(f"row {b}: engine_logprobs has {len(row)} entries but "
                             f"continuation_mask has {count} True positions")
    trainer_values = trainer_logprobs.detach().double()[continuation_mask.to(
        trainer_logprobs.device)].cpu()
    if trainer_values.numel() == 0:
        return {"mismatch_mean": 0.0, "mismatch_max": 0.0, "num_tokens": 0}
    engine_values = torch.tensor([v for row in engine_logprobs for v in row],
                                 dtype=torch.float64)
    diff = (engine_values - trainer_values).abs()
    return {"mismatch_mean": float(diff.mean()), "mismatch_max": float(diff.max()),
            "num_tokens": int(diff.numel())}
