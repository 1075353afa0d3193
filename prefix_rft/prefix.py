"""Prefix sampling for Prefix-RFT: the ratio schedule, the ratio draw, the cut.

A *hybrid* rollout starts from the first ``L`` tokens of an expert demonstration ``d`` (token
ids ``d_1..d_D``); the policy writes the rest. Three pure steps decide ``L``:

1. :func:`prefix_low_bound` -- the lower end ``low_t`` of the ratio range at training step t.
   ``cosine``: ``low_t = end + ½(1 + cos(π·t/T))·(start − end)``, T = ``decay_steps``;
   ``linear``: ``low_t = end + (1 − t/T)·(start − end)``; both stay at ``end`` for t ≥ T.
   ``constant`` (alias ``uniform``, the paper's uniform-sampling ablation): ``low_t = end``
   at every step, so ratios are drawn from the whole range ``[end, high]`` from step 0.
   ``step`` (QuestA's 50 % -> 25 % hint): ``low_t = start`` for t < T, then ``end``; the
   trainer draws no range for it -- every hybrid's ratio is ``low_t`` itself (a held ratio
   that drops once), so ``high`` and the Beta shape do not apply.
2. :func:`sample_prefix_ratios` -- ``ratio ~ U(low_t, high)``, generalized to
   ``low + (high − low)·Beta(α, β)`` (``U`` is ``Beta(1, 1)``). Seeded and reproducible.
3. :func:`cut_prefix` -- ``L = clamp(int(ratio·D), min_prefix_tokens, D − 1)``; the prefix is
   ``d[:L]``. The upper bound ``D − 1`` wins over ``min_prefix_tokens`` (at least one
   demonstration token is always left for the policy to write), so a demonstration with
   ``D ≤ 1`` gives an empty prefix (the rollout is then an ordinary on-policy one).

The rollout engine then continues ``prompt + prefix`` and returns the response as ``prefix +
continuation`` token ids (never decoded and re-encoded), with the first ``L`` positions marked
as prefix tokens (:mod:`prefix_rft.rollout`).

Example::

    >>> g = torch.Generator().manual_seed(0)
    >>> low = prefix_low_bound(100, decay_steps=500)           # cosine, ~0.864
    >>> ratios = sample_prefix_ratios(2, low, generator=g)      # two draws in [low, 0.95]
    >>> prefix = cut_prefix(list(range(40)), ratios[0], min_prefix_tokens=1)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

import torch

from .checks import check_choice, check_int, check_number

# ``constant`` and ``uniform`` are the same schedule (the uniform-sampling ablation).
Schedule = Literal["cosine", "linear", "constant", "uniform", "step"]


def check_prefix_options(*, schedule: str, start: float, end: float, high: float,
                         decay_steps: int, beta_alpha: float, beta_beta: float,
                         min_prefix_tokens: int) -> None:
    """The options of a prefix-sampling setup, together: each value's range, ``end <= start``
    (the bound decays) and ``high >= start`` (the draw range is never empty)."""
    check_choice("schedule", schedule, Schedule)
    for name, value in (("start", start), ("end", end), ("high", high)):
        check_number(name, value, 0.0, 1.0)
    if end > start:
        raise ValueError(f"end must be <= start ({start}), got {end}")
    if high < start:
        raise ValueError(f"high must be >= start ({start}), got {high}")
    check_int("decay_steps", decay_steps, 1)
    check_number("beta_alpha", beta_alpha, 0.0, lo_open=True)
    check_number("beta_beta", beta_beta, 0.0, lo_open=True)
    check_int("min_prefix_tokens", min_prefix_tokens, 0)


def prefix_low_bound(
    step: int,
    *,
    schedule: Schedule = "cosine",
    start: float = 0.95,
    end: float = 0.05,
    decay_steps: int = 500,
) -> float:
    """Lower end ``low_t`` of the prefix-ratio range at training step ``step`` (0-based).

    Args:
        step: training step t >= 0.
        schedule: ``"cosine"`` (default), ``"linear"``, ``"constant"`` / ``"uniform"``
            (fixed ``low_t = end``: the uniform-sampling ablation), or ``"step"`` (``start``
            while ``step < decay_steps``, then ``end``).
        start: ``low_0``, in [0, 1].
        end: the floor reached at ``t = decay_steps`` and kept afterwards; ``end <= start``.
        decay_steps: T >= 1, steps over which ``low_t`` decays from ``start`` to ``end``.

    Returns:
        ``low_t`` as a Python float in ``[end, start]``, non-increasing in ``step``.
    """
    check_int("step", step, 0)
    check_choice("schedule", schedule, Schedule)
    check_number("start", start, 0.0, 1.0)
    check_number("end", end, 0.0, 1.0)
    if end > start:
        raise ValueError(f"end must be <= start (the bound decays), got start={start}, end={end}")
    check_int("decay_steps", decay_steps, 1)
    if schedule in ("constant", "uniform"):
        return float(end)
    if schedule == "step":
        return float(start if step < decay_steps else end)
    progress = min(step / decay_steps, 1.0)
    if schedule == "cosine":
        weight = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        weight = 1.0 - progress
    # max() guards the float rounding of the last step; the result never leaves [end, start].
    return float(min(start, max(end, end + weight * (start - end))))


def _python_rng(generator: torch.Generator | int | None) -> random.Random:
    """A stdlib RNG seeded from ``generator`` (a torch.Generator, an int seed, or None).

    torch has no Beta sampler that accepts a Generator, so one 63-bit seed is drawn from the
    torch generator (None: torch's global generator, i.e. ``torch.manual_seed``) and the
    draws come from ``random.Random`` -- reproducible under the same generator state.
    """
    if isinstance(generator, bool):
        raise ValueError("generator must be a torch.Generator, an int seed or None, got bool")
    if isinstance(generator, int):
        return random.Random(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            "generator must be a torch.Generator, an int seed or None, "
            f"got {type(generator).__name__}"
        )
    seed = torch.randint(0, 2**62, (1,), generator=generator).item()
    return random.Random(seed)


def sample_prefix_ratios(
    n: int,
    low: float,
    *,
    high: float = 0.95,
    beta_alpha: float = 1.0,
    beta_beta: float = 1.0,
    generator: torch.Generator | int | None = None,
) -> list[float]:
    """Draw ``n`` prefix ratios ``low + (high − low)·Beta(α, β)`` (``U(low, high)`` by default).

    Args:
        n: number of ratios (hybrid rollouts), >= 0.
        low: lower end, usually :func:`prefix_low_bound`; ``0 <= low <= high``.
        high: upper end, <= 1 (default 0.95).
        beta_alpha, beta_beta: Beta shape parameters, > 0; (1, 1) is uniform.
        generator: a ``torch.Generator``, an int seed, or None (torch's global RNG).

    Returns:
        ``n`` floats in ``[low, high]``. Same generator state (or seed) -> same list.
    """
    check_int("n", n, 0)
    check_number("low", low, 0.0, 1.0)
    check_number("high", high, 0.0, 1.0)
    if low > high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")
    check_number("beta_alpha", beta_alpha, 0.0, lo_open=True)
    check_number("beta_beta", beta_beta, 0.0, lo_open=True)
    rng = _python_rng(generator)
    ratios = []
    for _ in range(n):
        u = rng.betavariate(beta_alpha, beta_beta)
        ratios.append(min(high, max(low, low + (high - low) * u)))
    return ratios


def step_ratios(n: int, low: float, schedule: str, **draw) -> list[float]:
    """The ``n`` hybrids' ratios of one question: the held ratio ``low`` itself for the
    ``step`` schedule, else :func:`sample_prefix_ratios` ``(n, low, **draw)``."""
    if schedule == "step":
        check_int("n", n, 0)
        return [float(low)] * n
    return sample_prefix_ratios(n, low, **draw)


def prefix_length(num_demo_tokens: int, ratio: float, *, min_prefix_tokens: int = 1) -> int:
    """``L = clamp(int(ratio·D), min_prefix_tokens, D − 1)``, with 0 when ``D <= 1``.

    The upper clamp wins: ``L`` always lies in ``[min(min_prefix_tokens, D − 1), D − 1]``.
    ``int`` truncates toward zero, as the formula's ``int(ratio·D)`` does.
    """
    check_int("num_demo_tokens", num_demo_tokens, 0)
    check_number("ratio", ratio, 0.0, 1.0)
    check_int("min_prefix_tokens", min_prefix_tokens, 0)
    if num_demo_tokens <= 1:
        return 0
    return int(min(max(int(ratio * num_demo_tokens), min_prefix_tokens), num_demo_tokens - 1))


def _as_id_list(name: str, ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(
                f"{name} must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}"
            )
        return [int(x) for x in ids.tolist()]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{name} must be a sequence of token ids, got {type(ids).__name__}")
    out = []
    for x in ids:
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"{name} must hold int token ids, found {x!r}")
        out.append(x)
    return out


def cut_prefix(
    demo_ids: Sequence[int] | torch.Tensor, ratio: float, *, min_prefix_tokens: int = 1
) -> list[int]:
    """Token-level prefix ``demo_ids[:L]`` with ``L`` from :func:`prefix_length`.

    Args:
        demo_ids: the demonstration's token ids (list / tuple / 1-D int tensor), length D.
        ratio: prefix ratio in [0, 1].
        min_prefix_tokens: lower clamp on L (default 1); D − 1 caps it.

    Returns:
        The prefix as a list of ints (empty when ``D <= 1``).
    """
    ids = _as_id_list("demo_ids", demo_ids)
    return ids[: prefix_length(len(ids), ratio, min_prefix_tokens=min_prefix_tokens)]
