"""Dr. GRPO group advantages (prefix_rft/advantage.py) against plain-Python references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefix_rft.advantage import advantage_stats, group_advantages


def _reference(rewards, groups, prefixed=None, baseline="group"):
    """Loop-over-groups reference in Python floats."""
    out = []
    for i, g in enumerate(groups):
        members = [j for j, h in enumerate(groups) if h == g]
        vals = [rewards[j] for j in members]
        if len(set(vals)) == 1:
            out.append(0.0)
            continue
        if baseline == "on_policy":
            on = [rewards[j] for j in members if not prefixed[j]]
            base = vals if not on else on
        else:
            base = vals
        out.append(rewards[i] - sum(base) / len(base))
    return out


def test_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    g = torch.tensor([5, 5, 5, 5, 2, 2, 2])
    adv = group_advantages(r, g)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 1 / 3, 1 / 3, -2 / 3])
    torch.testing.assert_close(adv, expected)
    assert adv.dtype == torch.float32


def test_no_std_division():
    r = torch.tensor([10.0, 0.0, 3.0, 1.0])  # Dr. GRPO: raw centred rewards
    adv = group_advantages(r, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(adv, r - r.mean())


def test_mixed_sizes_noncontiguous():
    r = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.0, 0.2])
    g = torch.tensor([3, 1, 3, 7, 1, 3, 9, 9])  # sizes 3, 2, 1, 2; interleaved
    adv = group_advantages(r, g)
    torch.testing.assert_close(
        adv, torch.tensor(_reference(r.tolist(), g.tolist())), rtol=0, atol=1e-7
    )
    assert adv[3] == 0.0  # singleton group


def test_all_equal_groups_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 1.0, 0.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    adv = group_advantages(r, g)
    assert (adv[:5] == 0).all()  # 0.1 * 3 / 3 != 0.1 in floats: exact zeros regardless
    assert adv[5] == 0.5 and adv[6] == -0.5


def test_on_policy_baseline():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    pre = torch.tensor([True, False, False, False, True, False, False])
    adv = group_advantages(r, g, baseline="on_policy", is_prefixed=pre)
    # group 0: on-policy mean (0 + 1 + 0) / 3; group 1: on-policy mean (1 + 0) / 2
    expected = torch.tensor([1 - 1 / 3, -1 / 3, 2 / 3, -1 / 3, 0.5, 0.5, -0.5])
    torch.testing.assert_close(adv, expected)
    # baseline="group" on the same data differs (hybrid reward enters the mean)
    assert not torch.allclose(group_advantages(r, g, is_prefixed=pre), expected)


def test_on_policy_fallback_when_group_all_prefixed():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 1, 1])
    pre = torch.tensor([True, True, True, False])
    adv = group_advantages(r, g, baseline="on_policy", is_prefixed=pre)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 1.0, 0.0]))


@given(
    data=st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from([0.0, 0.25, 1.0, -1.0, 0.1]), st.booleans()),
        min_size=1,
        max_size=40,
    ),
    baseline=st.sampled_from(["group", "on_policy"]),
)
@settings(max_examples=150, deadline=None)
def test_property_against_reference(data, baseline):
    groups, rewards, prefixed = map(list, zip(*data))
    adv = group_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(groups),
        baseline=baseline,
        is_prefixed=torch.tensor(prefixed),
    )
    ref = _reference(rewards, groups, prefixed, baseline)
    torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)
    if baseline == "group":  # group-centred advantages sum to 0 within every group
        for g in set(groups):
            assert abs(sum(a for a, h in zip(adv.tolist(), groups) if h == g)) < 1e-9


def test_empty_batch():
    out = group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        ((torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long)), {}, "rewards"),
        ((torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)), {}, "rewards"),
        ((torch.ones(3), torch.zeros(2, dtype=torch.long)), {}, "group_ids"),
        ((torch.ones(3), torch.zeros(3)), {}, "group_ids"),
        ((torch.ones(3), torch.zeros(3, dtype=torch.long)), dict(baseline="mean"), "baseline"),
        (
            (torch.ones(3), torch.zeros(3, dtype=torch.long)),
            dict(baseline="on_policy"),
            "is_prefixed",
        ),
        (
            (torch.ones(3), torch.zeros(3, dtype=torch.long)),
            dict(is_prefixed=torch.ones(3)),
            "is_prefixed",
        ),
    ],
)
def test_bad_inputs(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        group_advantages(*args, **kwargs)


def test_stats():
    a = torch.tensor([0.5, -0.5, 0.0, 0.0, 1.0])
    s = advantage_stats(a)
    assert s["adv_mean"] == pytest.approx(0.2)
    assert s["adv_std"] == pytest.approx(a.double().std(unbiased=False).item())
    assert (s["adv_min"], s["adv_max"], s["adv_frac_zero"], s["adv_count"]) == (-0.5, 1.0, 0.4, 5.0)
    assert advantage_stats(torch.zeros(0))["adv_count"] == 0.0
    with pytest.raises(ValueError, match="advantages"):
        advantage_stats(torch.ones(3, dtype=torch.long))


def test_docstring_examples_run():
    import doctest

    import prefix_rft.advantage as module

    result = doctest.testmod(
        module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0
