"""Argument checks shared by every module: one wording for one kind of mistake.

    check_int("group_size", 0)
    #   ValueError: group_size must be an int >= 1, got 0
    check_number("clip_low", 1.5, 0.0, 1.0, hi_open=True)
    #   ValueError: clip_low must be a number in [0.0, 1.0), got 1.5
    check_choice("baseline", "mean", choices(Baseline))
    #   ValueError: baseline must be one of group|on_policy, got 'mean'

A choice is a ``typing.Literal`` type owned by the module that implements it (e.g.
``advantage.Baseline``); :func:`choices` reads its allowed values, so no second list exists.
Tensor checks (shape, dtype, device) for ``[B, T]`` inputs live here too. Every check raises a
one-line ``ValueError`` that starts with the argument's name.
"""

from __future__ import annotations

import math
import numbers
import typing
from typing import Any


def is_number(value: Any) -> bool:
    """A real number (int, float, numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def choices(literal: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal[...]`` type (also through ``Optional``)."""
    args = typing.get_args(literal)
    if typing.get_origin(literal) is typing.Literal:
        return tuple(args)
    inner = [a for a in args if typing.get_origin(a) is typing.Literal]
    if not inner:
        raise TypeError(f"{literal!r} is not a Literal type")
    return tuple(inner[0].__args__)


def is_choice_type(tp: Any) -> bool:
    """True for ``Literal[...]`` (and ``Literal[...] | None``)."""
    if typing.get_origin(tp) is typing.Literal:
        return True
    return any(typing.get_origin(a) is typing.Literal for a in typing.get_args(tp))


def check_choice(name: str, value: Any, allowed: Any) -> None:
    """``value`` must be one of ``allowed`` (a tuple or a ``Literal`` type)."""
    options = tuple(allowed) if isinstance(allowed, (tuple, list)) else choices(allowed)
    if value not in options:
        raise ValueError(f"{name} must be one of {'|'.join(map(str, options))}, got {value!r}")


def check_int(name: str, value: Any, minimum: int = 1, *, allow_none: bool = False) -> None:
    """An int (numpy ints too, not bools) >= ``minimum``; None only when ``allow_none``."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _span(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    left, right = "(" if lo_open or lo is None else "[", ")" if hi_open or hi is None else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False, allow_none: bool = False) -> None:
    """A finite real number in ``[lo, hi]`` (ends open when ``lo_open`` / ``hi_open``;
    None = unbounded on that side)."""
    if allow_none and value is None:
        return
    ok = is_number(value) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise ValueError(f"{name} must be a number in {_span(lo, hi, lo_open, hi_open)}, "
                         f"got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    """A share in ``(0, 1]`` (e.g. the fraction of prefix tokens kept)."""
    check_number(name, value, 0.0, 1.0, lo_open=True)


# ---------------------------------------------------------------------------- tensors
def as_mask(t):
    """A bool view of a bool or 0/1 integer mask."""
    import torch

    return t if t.dtype == torch.bool else t != 0


def check_tensor(name: str, t: Any, shape: tuple[int, ...], device, floating: bool | None
                 ) -> None:
    """``t`` is a tensor of ``shape`` on ``device``; ``floating`` True = a float tensor,
    False = a bool or integer (0/1 mask / ids) tensor, None = any dtype."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if floating is True and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if floating is False and t.is_floating_point():
        raise ValueError(f"{name} must be a bool or integer 0/1 mask, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of logprob)")


def check_mask(name: str, t: Any, shape: tuple[int, ...], device) -> None:
    """A ``shape`` mask: bool, integer 0/1 or floating 0/1 (e.g. a product of masks)."""
    check_tensor(name, t, shape, device, floating=None)
    if t.is_floating_point() and bool(((t != 0) & (t != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1, got other values in a {t.dtype} mask")


def check_float_tensor(name: str, t: Any, dims: str) -> None:
    """A floating tensor with as many dimensions as ``dims`` names, e.g. ``"[B, T]"``."""
    import torch

    ndim = dims.count(",") + 1
    if not isinstance(t, torch.Tensor) or t.dim() != ndim or not t.is_floating_point():
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating {dims} tensor, got {got}")
