"""Dr. GRPO group advantages: ``A_i = r_i − mean_{j in group(i)} r_j``, no std.

Equivalent torch for one group ``g`` (``baseline="group"``)::

    adv[group_ids == g] = rewards[group_ids == g] - rewards[group_ids == g].mean()

One batch may hold many questions with groups of different sizes (e.g. after filtering);
rows of a group need not be contiguous. Every token of rollout i later gets the same ``A_i``.

Baselines:
    ``"group"`` (default): the mean over all rollouts of the group, hybrid ones included.
    ``"on_policy"``: the mean over the group's rollouts with ``is_prefixed == False`` only (the
    authors' code); a group with no on-policy rollout falls back to its full-group mean.

A group whose rewards are all equal gets exactly 0.0 (checked by value, so float rounding in
the mean can never leave a tiny non-zero advantage on a group that carries no signal).
"""

from __future__ import annotations

from typing import Literal

import torch

from prefix_rft.checks import check_choice

Baseline = Literal["group", "on_policy"]


def _check_inputs(rewards, group_ids, baseline, is_prefixed) -> None:
    if (
        not isinstance(rewards, torch.Tensor)
        or rewards.dim() != 1
        or not rewards.is_floating_point()
    ):
        got = (
            f"{rewards.dtype} {tuple(rewards.shape)}"
            if isinstance(rewards, torch.Tensor)
            else type(rewards).__name__
        )
        raise ValueError(f"rewards must be a 1-D floating tensor [B], got {got}")
    if (
        not isinstance(group_ids, torch.Tensor)
        or group_ids.shape != rewards.shape
        or group_ids.is_floating_point()
        or group_ids.dtype == torch.bool
    ):
        got = (
            f"{group_ids.dtype} {tuple(group_ids.shape)}"
            if isinstance(group_ids, torch.Tensor)
            else type(group_ids).__name__
        )
        raise ValueError(
            f"group_ids must be an integer tensor of shape {tuple(rewards.shape)}, got {got}"
        )
    check_choice("baseline", baseline, Baseline)
    if is_prefixed is not None and (
        not isinstance(is_prefixed, torch.Tensor)
        or is_prefixed.dtype != torch.bool
        or is_prefixed.shape != rewards.shape
    ):
        raise ValueError(
            f"is_prefixed must be None or a bool tensor of shape {tuple(rewards.shape)}"
        )
    if baseline == "on_policy" and is_prefixed is None:
        raise ValueError("is_prefixed is required with baseline='on_policy'")
    devices = {t.device for t in (rewards, group_ids, is_prefixed) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"rewards, group_ids and is_prefixed must share a device, got {devices}")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    baseline: Baseline = "group",
    is_prefixed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-rollout Dr. GRPO advantage.

    Args:
        rewards: ``[B]`` floating rewards.
        group_ids: ``[B]`` integer ids; rollouts of one question share an id (any values,
            any order, groups of any size).
        baseline: ``"group"`` or ``"on_policy"`` (see the module docstring).
        is_prefixed: ``[B]`` bool, True for hybrid (demonstration-prefixed) rollouts.
            Required for ``"on_policy"``; ignored by ``"group"``.

    Returns:
        ``[B]`` advantages, dtype and device of ``rewards``. Computed in fp64.

    Example::

        >>> r = torch.tensor([1., 0., 0., 1., 1., 1.]); g = torch.tensor([0, 0, 0, 0, 1, 1])
        >>> group_advantages(r, g)
        tensor([ 0.5000, -0.5000, -0.5000,  0.5000,  0.0000,  0.0000])
    """
    _check_inputs(rewards, group_ids, baseline, is_prefixed)
    if rewards.numel() == 0:
        return rewards.clone()
    r = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max().item()) + 1

    def group_mean(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(
            0, inverse, r * weight
        )
        counts = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(
            0, inverse, weight
        )
        return sums / counts.clamp_min(1.0), counts

    mean_all, _ = group_mean(torch.ones_like(r))
    if baseline == "on_policy":
        mean_on, n_on = group_mean((~is_prefixed).double())
        # A group made only of hybrid rollouts has no on-policy baseline: use the group mean.
        mean = torch.where(n_on > 0, mean_on, mean_all)
    else:
        mean = mean_all
    g_max = torch.full((n_groups,), -torch.inf, dtype=torch.float64, device=r.device)
    g_min = torch.full((n_groups,), torch.inf, dtype=torch.float64, device=r.device)
    g_max = g_max.scatter_reduce(0, inverse, r, reduce="amax")
    g_min = g_min.scatter_reduce(0, inverse, r, reduce="amin")
    constant = (g_max == g_min)[inverse]
    adv = torch.where(constant, torch.zeros_like(r), r - mean[inverse])
    return adv.to(rewards.dtype)


def advantage_stats(advantages: torch.Tensor) -> dict[str, float]:
    """Logging summary of a ``[B]`` (or any-shape) advantage tensor.

    Returns ``{"adv_mean", "adv_std", "adv_min", "adv_max", "adv_frac_zero", "adv_count"}``
    as Python floats; std is the population std (``unbiased=False``). An empty tensor gives
    zeros with ``adv_count == 0``.
    """
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise ValueError("advantages must be a floating torch.Tensor")
    a = advantages.detach().double().reshape(-1)
    if a.numel() == 0:
        return dict(
            adv_mean=0.0, adv_std=0.0, adv_min=0.0, adv_max=0.0, adv_frac_zero=0.0, adv_count=0.0
        )
    # One device->host transfer for all six numbers.
    values = torch.stack(
        [
            a.mean(),
            a.std(unbiased=False),
            a.min(),
            a.max(),
            (a == 0).double().mean(),
            torch.tensor(float(a.numel()), dtype=torch.float64, device=a.device),
        ]
    ).tolist()
    keys = ("adv_mean", "adv_std", "adv_min", "adv_max", "adv_frac_zero", "adv_count")
    return dict(zip(keys, values))
