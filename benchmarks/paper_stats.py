"""Paired statistics of the comparison: per-seed differences against a reference method, a
bootstrap over seeds x questions, and Holm's correction over a family of comparisons.

Unit: a question's score is the fraction of its k samples that were correct (so the mean over
questions is avg@k). For a method ``a`` and the reference ``b`` evaluated on the same questions
with the same seeds, the statistic is the mean over seeds and questions of ``a - b``
([seeds, questions], paired by index). The bootstrap is two-stage, so both sources of
uncertainty count: resample the seeds with replacement (seed-to-seed training variance), then
the questions with replacement (a finite evaluation set; one question resample for all drawn
seeds, so the pairing of a question across seeds is kept). n = seeds x questions.

numpy equivalent of ``paired_bootstrap``::

    d = a - b                                                   # [S, Q]
    s = rng.integers(0, S, size=(n_boot, S)); q = rng.integers(0, Q, size=(n_boot, Q))
    boots = d[s[:, :, None], q[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(boots, [alpha/2, 1 - alpha/2])
    p = min(1, 2 * min(mean(boots <= 0), mean(boots >= 0)))     # two-sided, percentile

``holm`` adjusts a family's p-values (step-down, monotone); a difference is called
significant when its Holm-adjusted p is below alpha.
"""

from __future__ import annotations

import math

import numpy as np


def _as_matrix(scores, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected [seeds, questions] scores, got shape {arr.shape}")
    return arr


def per_seed_differences(a, b) -> list[float]:
    """Mean over questions of ``a - b`` for each seed; ``a``, ``b``: [seeds, questions]."""
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a, b: expected the same [seeds, questions] shape, "
                         f"got {a.shape}, {b.shape}")
    return [float(x) for x in (a - b).mean(axis=1)]


def paired_bootstrap(a, b, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Mean difference ``a - b``, its (1 - alpha) percentile CI from the two-stage bootstrap of
    the module docstring, and the two-sided bootstrap p-value.

    ``a``, ``b``: [seeds, questions] (or [questions]) per-question scores, paired by index.
    Returns ``{"diff", "lo", "hi", "p", "per_seed", "questions", "seeds"}``.
    """
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a, b: expected the same [seeds, questions] shape, "
                         f"got {a.shape}, {b.shape}")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"n_boot >= 1 and 0 < alpha < 1 expected, got {n_boot}, {alpha}")
    d = a - b  # [S, Q]
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, d.shape[0], size=(n_boot, d.shape[0]))
    questions = rng.integers(0, d.shape[1], size=(n_boot, d.shape[1]))
    boots = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # chunks bound the [chunk, S, Q] gather's memory
        s, q = seeds[start:start + 256], questions[start:start + 256]
        boots[start:start + 256] = d[s[:, :, None], q[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2.0 * min(float((boots <= 0).mean()), float((boots >= 0).mean())))
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "p": p,
            "per_seed": per_seed_differences(a, b), "questions": int(d.shape[1]),
            "seeds": int(d.shape[0])}


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: sort ascending, multiply the i-th smallest
    (0-based) by ``m - i``, take the running maximum, cap at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value, nan for none)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
