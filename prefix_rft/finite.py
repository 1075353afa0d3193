"""Non-finite (NaN/Inf) guards: weights before a save or after loading, and the per-step guard
that skips an optimizer step whose loss or gradient norm is not finite.

    check_weights_finite(model, "refusing to save checkpoint step_000012")  # NonFiniteError
    guard = StepGuard(max_bad_steps=3)
    guard.step = 11                                            # 0-based training step
    ok = guard.check(losses=[(0, loss)], grad_norm=norm)      # False: skip the step
    # ... guard.raise_if_exhausted() stops the run after 3 bad optimizer steps in a row

Under torchrun every rank checks its own shards and the verdict is agreed collectively, so
every rank skips (or stops) together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import NonFiniteError
from .runtime import distributed as D


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def non_finite_names(named: Iterable[tuple[str, torch.Tensor]], limit: int = 3) -> list[str]:
    """Names of the first ``limit`` floating tensors holding a NaN or Inf, e.g.
    ``["lm_head.weight (2 NaN, 0 Inf)"]``; empty when all are finite."""
    found = []
    for name, tensor in named:
        tensor = _local(tensor.detach())
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if bool(torch.isfinite(tensor).all()):
            continue
        nans = int(torch.isnan(tensor).sum())
        found.append(f"{name} ({nans} NaN, {int(torch.isinf(tensor).sum())} Inf)")
        if len(found) >= limit:
            break
    return found


def _agree(bad: bool) -> bool:
    """True on every rank when any rank saw a problem (a no-op in one process)."""
    return D.all_reduce_mean(1.0 if bad else 0.0) > 0.0 if D.is_distributed() else bad


def check_weights_finite(model: nn.Module, what: str) -> None:
    """Raise :class:`NonFiniteError` ``"<what>: non-finite weights in <names>"`` when any
    parameter or buffer of ``model`` (this rank's shards) holds a NaN or Inf.
    Collective under FSDP2 (call on every rank)."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    names = non_finite_names(named)
    if _agree(bool(names)):
        detail = ", ".join(names) if names else "another rank's shard"
        raise NonFiniteError(f"{what}: non-finite weights in {detail}")


def is_finite(value: float | torch.Tensor) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


@dataclass
class StepGuard:
    """Skips optimizer steps with a non-finite loss or gradient norm; stops the run after
    ``max_bad_steps`` such steps in a row (0 = never stop).

    ``skipped`` counts every skipped optimizer step of the run; ``reasons`` keeps the latest
    messages (one line each: training step, micro-batch, loss / grad norm / advantages)."""

    max_bad_steps: int = 3
    step: int = 0  # the current training step (0-based), set by the loop for the messages
    consecutive: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    non_finite_zeroed: int = 0  # NaN/Inf rewards + advantages set to 0 so far in this run

    def check(self, *, losses: list[tuple[int, float]], grad_norm: float,
              bad_advantages: int = 0) -> bool:
        """Decide one optimizer step (collective under torchrun). ``losses``: (micro-batch
        index, loss value) of the micro-batches accumulated into it; ``bad_advantages``:
        non-finite advantages seen in its rows. True = finite, take the step."""
        bad_losses = [(i, v) for i, v in losses if not math.isfinite(v)]
        bad_norm = not math.isfinite(grad_norm)
        if not _agree(bool(bad_losses) or bad_norm):
            self.consecutive = 0
            return True
        parts = [f"loss {v} in micro-batch {i}" for i, v in bad_losses[:3]]
        if bad_norm:
            parts.append(f"grad norm {grad_norm}")
        if bad_advantages:
            parts.append(f"{bad_advantages} non-finite advantages")
        if not parts:
            parts.append("non-finite loss or grad norm on another rank")
        self.consecutive += 1
        self.skipped += 1
        self.reasons = (self.reasons + [f"step {self.step + 1}: skipped the optimizer step: "
                                        + ", ".join(parts)])[-5:]
        return False

    @property
    def exhausted(self) -> bool:
        return self.max_bad_steps > 0 and self.consecutive >= self.max_bad_steps

    def raise_if_exhausted(self, field_name: str = "train.max_bad_steps") -> None:
        if self.exhausted:
            raise NonFiniteError(
                f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
                f"norm ({self.reasons[-1] if self.reasons else ''}); stopped, the last good "
                f"checkpoint is kept: lower optim.lr, check the data, or raise {field_name}")


def zero_non_finite(values: torch.Tensor, what: str, mode: str, step: int,
                    guard: StepGuard | None = None) -> tuple[torch.Tensor, int]:
    """``mode`` (``reward.non_finite``): ``zero`` sets the NaN/Inf entries of ``values`` (e.g.
    rewards, advantages, any shape) to 0; ``error`` stops the run. Returns ``(values,
    count)``; ``step`` (0-based) names the training step. Zeroing prints one line the first
    time in a run (``guard`` remembers it; without one, every time), saying how to stop
    instead; the step's count goes to the metrics and the progress bar."""
    bad = ~torch.isfinite(values)
    count = int(bad.sum())
    if count and mode == "error":
        raise NonFiniteError(f"step {step + 1}: {count} non-finite {what}; stopped, the last "
                             f"good checkpoint is kept (reward.non_finite=zero sets them to 0)")
    if count:
        first = guard is None or guard.non_finite_zeroed == 0
        if guard is not None:
            guard.non_finite_zeroed += count
        if first and D.is_main():
            print(f"[prefix-rft] step {step + 1}: {count} non-finite {what} set to 0 and "
                  f"training goes on (counted per step as non_finite_rewards / "
                  f"non_finite_advantages; set reward.non_finite: error to stop instead)",
                  flush=True)
        values = values.masked_fill(bad, 0.0)
    return values, count
