"""prefix_rft.checks: the one module of argument checks, and the Literal-derived choices."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch

from prefix_rft.checks import (
    as_mask,
    check_choice,
    check_float_tensor,
    check_fraction,
    check_int,
    check_number,
    check_tensor,
    choices,
    is_choice_type,
)

Color = typing.Literal["red", "green"]


def test_check_int_accepts_ints_and_numpy_ints_only():
    check_int("n", 3)
    check_int("n", np.int64(0), 0)
    check_int("n", None, allow_none=True)
    for bad in (0, -1, 1.0, True, "2", None):
        with pytest.raises(ValueError, match=r"^n must be an int >= 1, got "):
            check_int("n", bad)


@pytest.mark.parametrize("value,kwargs,ok", [
    (0.5, dict(lo=0.0, hi=1.0), True),
    (0.0, dict(lo=0.0, hi=1.0), True),
    (0.0, dict(lo=0.0, hi=1.0, lo_open=True), False),
    (1.0, dict(lo=0.0, hi=1.0, hi_open=True), False),
    (np.float32(0.25), dict(lo=0.0), True),
    (math.nan, dict(), False),
    (math.inf, dict(lo=0.0), False),
    (True, dict(), False),
    ("0.5", dict(), False),
    (None, dict(), False),
    (None, dict(allow_none=True), True),
])
def test_check_number_ranges_and_types(value, kwargs, ok):
    if ok:
        check_number("x", value, **kwargs)
    else:
        with pytest.raises(ValueError, match=r"^x must be a number in "):
            check_number("x", value, **kwargs)


def test_check_number_message_shows_the_interval():
    with pytest.raises(ValueError, match=r"clip_low must be a number in \[0.0, 1.0\), got 1.5"):
        check_number("clip_low", 1.5, 0.0, 1.0, hi_open=True)
    with pytest.raises(ValueError, match=r"c must be a number in \(1.0, inf\), got 0.5"):
        check_number("c", 0.5, 1.0, lo_open=True)
    with pytest.raises(ValueError, match=r"f must be a number in \(0.0, 1.0\], got 0"):
        check_fraction("f", 0)


def test_choices_come_from_the_literal_type():
    assert choices(Color) == ("red", "green")
    assert choices(Color | None) == ("red", "green")
    assert is_choice_type(Color) and not is_choice_type(str)
    with pytest.raises(TypeError):
        choices(str)
    check_choice("color", "red", Color)
    check_choice("color", "blue", ("blue",))
    with pytest.raises(ValueError, match=r"^color must be one of red\|green, got 'blue'$"):
        check_choice("color", "blue", Color)


def test_tensor_checks():
    x = torch.zeros(2, 3)
    check_tensor("x", x, (2, 3), x.device, floating=True)
    check_float_tensor("x", x, "[B, T]")
    with pytest.raises(ValueError, match=r"x must have shape \(2, 4\)"):
        check_tensor("x", x, (2, 4), x.device, floating=True)
    with pytest.raises(ValueError, match="x must be a bool or integer"):
        check_tensor("x", x, (2, 3), x.device, floating=False)
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        check_tensor("x", [1], (1,), x.device, floating=None)
    with pytest.raises(ValueError, match=r"h must be a floating \[B, T, H\] tensor"):
        check_float_tensor("h", x, "[B, T, H]")
    assert as_mask(torch.tensor([0, 2])).tolist() == [False, True]


def test_module_checks_accept_exactly_their_literal_values():
    """Each choice is owned by its module: the values its Literal lists are the values its
    own code accepts, and the config reads the same Literal (no second list)."""
    from prefix_rft import advantage, config, loss, prefix
    from prefix_rft.loss import entropy_mask

    fields = config.choice_fields()
    assert fields["loss.baseline"] == choices(advantage.Baseline)
    assert fields["prefix.schedule"] == choices(prefix.Schedule)
    assert fields["loss.entropy_mask_scope"] == choices(entropy_mask.EntropyMaskScope)
    assert fields["loss.kernel_impl"] == choices(loss.KernelImpl)
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    for baseline in choices(advantage.Baseline):
        advantage.rollout_advantages(r, g, baseline=baseline,
                                     is_prefixed=torch.tensor([True, False]))
    for schedule in choices(prefix.Schedule):
        prefix.prefix_low_bound(3, schedule=schedule, decay_steps=10)
    for scope in choices(entropy_mask.EntropyMaskScope):
        for impl in choices(loss.KernelImpl):
            loss.PrefixRFTLoss(max_response_tokens=4, entropy_mask_scope=scope, impl=impl)
    with pytest.raises(ValueError, match="baseline must be one of group|on_policy"):
        advantage.group_advantages(r, g, baseline="mean")
    with pytest.raises(ValueError, match=r"baseline must be one of group\|on_policy\|official"):
        advantage.rollout_advantages(r, g, baseline="mean")
