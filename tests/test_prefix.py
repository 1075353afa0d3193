"""Prefix schedule, ratio draw and token-level cut (prefix_rft/prefix.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefix_rft.prefix import (
    check_prefix_options,
    cut_prefix,
    prefix_length,
    prefix_low_bound,
    sample_prefix_ratios,
)

# ---------------------------------------------------------------- schedule


def _cosine_by_hand(t, start, end, T):
    t = min(t, T)
    return end + 0.5 * (1 + math.cos(math.pi * t / T)) * (start - end)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_endpoints_monotone_and_bounded(schedule):
    T = 37
    values = [prefix_low_bound(t, schedule=schedule, decay_steps=T) for t in range(3 * T)]
    assert values[0] == pytest.approx(0.95, abs=1e-12)
    assert values[T] == pytest.approx(0.05, abs=1e-12)
    assert all(0.05 <= v <= 0.95 for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[T + 1 :] == [values[T]] * (len(values) - T - 1)  # stays at end after T
    assert values[T // 2] < 0.95 and values[T // 2] > 0.05  # strictly inside mid-way


def test_cosine_matches_formula_and_linear_is_linear():
    for t in [0, 1, 50, 123, 250, 499, 500, 501, 10_000]:
        got = prefix_low_bound(t, start=0.9, end=0.1, decay_steps=500)
        assert got == pytest.approx(_cosine_by_hand(t, 0.9, 0.1, 500), abs=1e-12)
        lin = prefix_low_bound(t, schedule="linear", start=0.9, end=0.1, decay_steps=500)
        assert lin == pytest.approx(0.1 + (1 - min(t, 500) / 500) * 0.8, abs=1e-12)
    # Half-way the cosine schedule is exactly at the midpoint.
    assert prefix_low_bound(250, decay_steps=500) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("schedule", ["constant", "uniform"])
def test_constant_schedule_is_fixed_at_end(schedule):
    np = pytest.importorskip("numpy", reason="numpy step types are optional")
    assert prefix_low_bound(np.int64(250), decay_steps=500) == pytest.approx(0.5)
    assert {prefix_low_bound(t, schedule=schedule, end=0.2) for t in (0, 5, 10_000)} == {0.2}


@given(
    t=st.integers(0, 5000),
    start=st.floats(0, 1),
    frac=st.floats(0, 1),
    T=st.integers(1, 2000),
    schedule=st.sampled_from(["cosine", "linear", "constant"]),
)
@settings(max_examples=200, deadline=None)
def test_schedule_bounds_property(t, start, frac, T, schedule):
    end = start * frac
    a = prefix_low_bound(t, schedule=schedule, start=start, end=end, decay_steps=T)
    b = prefix_low_bound(t + 1, schedule=schedule, start=start, end=end, decay_steps=T)
    assert end <= a <= start and b <= a


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(step=-1), "step"),
        (dict(step=0, schedule="exp"), "schedule"),
        (dict(step=0, start=1.5), "start"),
        (dict(step=0, end=-0.1), "end"),
        (dict(step=0, start=0.1, end=0.5), "end"),
        (dict(step=0, decay_steps=0), "decay_steps"),
        (dict(step=1.5), "step"),
    ],
)
def test_schedule_bad_inputs(kwargs, name):
    step = kwargs.pop("step")
    with pytest.raises(ValueError, match=name):
        prefix_low_bound(step, **kwargs)


# ---------------------------------------------------------------- ratio draw


def test_ratios_in_range_and_reproducible():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_prefix_ratios(500, 0.3, generator=g1)
    b = sample_prefix_ratios(500, 0.3, generator=g2)
    assert a == b and len(a) == 500
    assert all(0.3 <= r <= 0.95 for r in a)
    assert sample_prefix_ratios(50, 0.3, generator=7) == sample_prefix_ratios(50, 0.3, generator=7)
    assert sample_prefix_ratios(50, 0.3, generator=7) != sample_prefix_ratios(50, 0.3, generator=8)
    # Successive draws from one generator differ (the generator advances).
    g = torch.Generator().manual_seed(0)
    assert sample_prefix_ratios(5, 0.0, generator=g) != sample_prefix_ratios(5, 0.0, generator=g)
    # None uses torch's global RNG, so torch.manual_seed makes it reproducible.
    torch.manual_seed(11)
    c = sample_prefix_ratios(5, 0.1)
    torch.manual_seed(11)
    assert sample_prefix_ratios(5, 0.1) == c


def test_uniform_and_beta_moments():
    n = 4000
    u = sample_prefix_ratios(n, 0.2, high=0.8, generator=1)
    assert sum(u) / n == pytest.approx(0.5, abs=0.02)  # U(0.2, 0.8) mean 0.5, sd of mean ~0.003
    var = sum((x - 0.5) ** 2 for x in u) / n
    assert var == pytest.approx(0.6**2 / 12, rel=0.1)
    b = sample_prefix_ratios(n, 0.0, high=1.0, beta_alpha=2.0, beta_beta=5.0, generator=2)
    assert sum(b) / n == pytest.approx(2 / 7, abs=0.02)  # Beta(2,5) mean


def test_degenerate_range_and_empty():
    assert sample_prefix_ratios(3, 0.95, generator=0) == [0.95] * 3  # low_0 == high
    assert sample_prefix_ratios(0, 0.5, generator=0) == []


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        ((-1, 0.5), {}, "n"),
        ((2, 0.99), {}, "low"),  # low > high
        ((2, 0.5), dict(high=1.2), "high"),
        ((2, 0.5), dict(beta_alpha=0.0), "beta_alpha"),
        ((2, 0.5), dict(beta_beta=-1.0), "beta_beta"),
        ((2, 0.5), dict(generator="seed"), "generator"),
    ],
)
def test_ratio_bad_inputs(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_prefix_ratios(*args, **kwargs)


# ---------------------------------------------------------------- cut


def test_cut_by_hand():
    demo = list(range(100, 120))  # D = 20
    assert cut_prefix(demo, 0.5) == demo[:10]
    assert cut_prefix(demo, 0.0, min_prefix_tokens=3) == demo[:3]
    assert cut_prefix(demo, 1.0) == demo[:19]  # D - 1: one token always left
    assert cut_prefix(demo, 0.33) == demo[:6]  # int(6.6) truncates
    assert cut_prefix(demo, 0.5, min_prefix_tokens=50) == demo[:19]  # upper clamp wins
    assert cut_prefix(torch.tensor(demo), 0.5) == demo[:10]
    assert cut_prefix([5], 0.9) == [] and cut_prefix([], 0.9) == []  # D <= 1: no prefix


@given(
    demo=st.lists(st.integers(0, 50_000), max_size=300),
    ratio=st.floats(0, 1),
    min_tokens=st.integers(0, 400),
)
@settings(max_examples=300, deadline=None)
def test_cut_length_property(demo, ratio, min_tokens):
    prefix = cut_prefix(demo, ratio, min_prefix_tokens=min_tokens)
    D = len(demo)
    assert prefix == demo[: len(prefix)]
    if D <= 1:
        assert prefix == []
    else:
        assert min(min_tokens, D - 1) <= len(prefix) <= D - 1
        assert len(prefix) == min(max(int(ratio * D), min_tokens), D - 1)


@given(seed=st.integers(0, 2**31), D=st.integers(2, 500), step=st.integers(0, 1000))
@settings(max_examples=100, deadline=None)
def test_schedule_draw_cut_pipeline(seed, D, step):
    low = prefix_low_bound(step, decay_steps=300)
    ratios = sample_prefix_ratios(4, low, generator=seed)
    assert ratios == sample_prefix_ratios(4, low, generator=seed)
    for r in ratios:
        assert low <= r <= 0.95
        L = prefix_length(D, r, min_prefix_tokens=1)
        assert 1 <= L <= D - 1 and L == min(max(int(r * D), 1), D - 1)


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        (([1, 2, 3], 1.5), {}, "ratio"),
        (([1, 2, 3], 0.5), dict(min_prefix_tokens=-1), "min_prefix_tokens"),
        (([1, 2.0, 3], 0.5), {}, "demo_ids"),
        ((torch.ones(2, 2, dtype=torch.long), 0.5), {}, "demo_ids"),
        (("abc", 0.5), {}, "demo_ids"),
    ],
)
def test_cut_bad_inputs(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cut_prefix(*args, **kwargs)


# ---------------------------------------------------------------- options


def _options(**changes):
    base = dict(schedule="cosine", start=0.95, end=0.05, high=0.95, decay_steps=10,
                beta_alpha=1.0, beta_beta=1.0, min_prefix_tokens=1)
    base.update(changes)
    return base


def test_check_prefix_options_accepts_the_paper_settings():
    check_prefix_options(**_options())
    check_prefix_options(**_options(schedule="uniform", min_prefix_tokens=0))


@pytest.mark.parametrize("changes,message", [
    ({"schedule": "stairs"}, "schedule must be one of cosine|linear|constant|uniform|step"),
    ({"start": 1.5}, "start must be a number in [0.0, 1.0]"),
    ({"end": 0.99}, "end must be <= start"),
    ({"high": 0.5}, "high must be >= start"),
    ({"decay_steps": 0}, "decay_steps must be an int >= 1"),
    ({"beta_alpha": 0.0}, "beta_alpha must be a number in (0.0, inf)"),
    ({"min_prefix_tokens": -1}, "min_prefix_tokens must be an int >= 0"),
])
def test_check_prefix_options_names_the_bad_option(changes, message):
    with pytest.raises(ValueError) as info:
        check_prefix_options(**_options(**changes))
    assert str(info.value).startswith(message)


def test_docstring_examples_run():
    import doctest

    import prefix_rft.prefix as module

    result = doctest.testmod(
        module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0
