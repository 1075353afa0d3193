"""Paired statistics of the fair table: per-seed differences against a reference method and a
bootstrap confidence interval over questions.

Scores are per question: the fraction of a question's k samples that were correct (so the
mean over questions is avg@k). For a method ``a`` and the reference ``b`` evaluated on the
same questions with the same seeds, the statistic is the mean over seeds and questions of
``a - b``; the bootstrap resamples *questions* with replacement (the same resample for every
seed and both methods: the pairing is kept), which is the uncertainty of a finite
evaluation set. Seeds are reported one by one next to it, so seed-to-seed spread is visible.

numpy equivalent of ``paired_bootstrap``::

    d = (a - b).mean(axis=0)                        # [Q] per-question difference, seed mean
    idx = rng.integers(0, Q, size=(n_boot, Q))      # question resamples
    lo, hi = np.quantile(d[idx].mean(axis=1), [alpha/2, 1 - alpha/2])
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
    """Mean difference ``a - b`` and its (1 - alpha) percentile bootstrap CI over questions.

    ``a``, ``b``: [seeds, questions] (or [questions]) per-question scores, paired by index.
    Returns ``{"diff", "lo", "hi", "per_seed", "questions", "seeds"}``.
    """
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a, b: expected the same [seeds, questions] shape, "
                         f"got {a.shape}, {b.shape}")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"n_boot >= 1 and 0 < alpha < 1 expected, got {n_boot}, {alpha}")
    d = (a - b).mean(axis=0)  # [Q]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.shape[0], size=(n_boot, d.shape[0]))
    boots = d[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi),
            "per_seed": per_seed_differences(a, b), "questions": int(d.shape[0]),
            "seeds": int(a.shape[0])}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value, nan for none)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
