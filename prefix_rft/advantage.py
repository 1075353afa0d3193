"""Dr. GRPO group advantages: ``A_i = r_i − mean_{j in group(i)} r_j``, no std, and the
Prefix-RFT authors' per-token variant.

Equivalent torch for one group ``g`` (``baseline="group"``)::

    adv[group_ids == g] = rewards[group_ids == g] - rewards[group_ids == g].mean()

One batch may hold many questions with groups of different sizes (e.g. after filtering);
rows of a group need not be contiguous.

Baselines (``loss.baseline``):
    ``"group"`` (default, Dr. GRPO over the group): the mean over all rollouts of the group,
    hybrid ones included; every token of rollout i gets the same ``A_i``.
    ``"on_policy"``: the mean over the group's rollouts with ``is_prefixed == False`` only,
    every token of rollout i gets the same ``A_i`` (an ablation, not the authors' code); a
    group with no on-policy rollout falls back to its full-group mean.
    ``"official"``: the authors' verl code, a per-token advantage (prefix tokens of a hybrid
    ``r_h − μ_on``, its continuation the raw ``r_h``): :func:`rollout_advantages`.

:func:`rollout_advantages` serves all three as ``(advantage, prefix_advantage)`` per rollout;
:func:`token_advantages` expands them to ``[B, T]`` with the prefix mask.

A group whose rewards are all equal gets exactly 0.0 (checked by value, so float rounding in
the mean can never leave a tiny non-zero advantage on a group that carries no signal).
"""

from __future__ import annotations

from typing import Literal

import torch

from .checks import check_choice

Baseline = Literal["group", "on_policy", "official"]  # see the module docstring
ScalarBaseline = Literal["group", "on_policy"]  # one advantage per rollout


def _check_inputs(rewards, group_ids, baseline, is_prefixed, allowed=Baseline) -> None:
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
    check_choice("baseline", baseline, allowed)
    if is_prefixed is not None and (
        not isinstance(is_prefixed, torch.Tensor)
        or is_prefixed.dtype != torch.bool
        or is_prefixed.shape != rewards.shape
    ):
        raise ValueError(
            f"is_prefixed must be None or a bool tensor of shape {tuple(rewards.shape)}"
        )
    if baseline != "group" and is_prefixed is None:
        raise ValueError(f"is_prefixed is required with baseline={baseline!r}")
    devices = {t.device for t in (rewards, group_ids, is_prefixed) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"rewards, group_ids and is_prefixed must share a device, got {devices}")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    baseline: ScalarBaseline = "group",
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
    _check_inputs(rewards, group_ids, baseline, is_prefixed, ScalarBaseline)
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


def rollout_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    baseline: Baseline = "group",
    is_prefixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rollout advantages of the continuation tokens and of the demonstration-prefix tokens.

    Returns ``(advantage [B], prefix_advantage [B])`` (dtype/device of ``rewards``); token t of
    rollout i gets ``prefix_advantage[i]`` when it is a prefix token, else ``advantage[i]``
    (:func:`token_advantages` builds the ``[B, T]`` tensor). For ``"group"`` and ``"on_policy"``
    both are :func:`group_advantages` (one scalar per rollout).

    ``"official"`` reproduces the Prefix-RFT authors' verl code (``compute_dr_grpo_prefix_
    outcome_advantage`` with 7 on-policy + 1 hybrid rollouts per question, ``n = 1``). Their
    code groups rollouts by (question, prefix id): all on-policy rollouts share one prefix id,
    every hybrid has its own. Per question, with ``μ_on`` the mean reward of its on-policy
    rollouts (0 when there is only one, as their code does for any group of size 1):

    * on-policy rollout: ``r − μ_on`` on every token;
    * hybrid rollout: prefix tokens ``r_h − μ_on``; continuation tokens ``r_h − mean(own
      group)`` = the raw ``r_h`` (its own group has size 1, so its mean is taken as 0).

    So a hybrid that succeeds always pushes its continuation up by 1, and a failed one leaves
    it at 0 (never negative). A question with no on-policy rollout raises ValueError (their code
    fails there too). As for the other baselines, an on-policy rollout whose on-policy
    group-mates all have its reward gets exactly 0.
    """
    check_choice("baseline", baseline, Baseline)
    if baseline != "official":
        adv = group_advantages(rewards, group_ids, baseline=baseline, is_prefixed=is_prefixed)
        return adv, adv
    _check_inputs(rewards, group_ids, "on_policy", is_prefixed)
    if rewards.numel() == 0:
        return rewards.clone(), rewards.clone()
    r = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max().item()) + 1
    on = (~is_prefixed).double()
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=r.device)
    n_on = zeros.clone().index_add_(0, inverse, on)
    if bool((n_on == 0).any()):
        bad = group_ids[(n_on == 0)[inverse]][0].item()
        raise ValueError(f"baseline='official' needs at least one on-policy rollout per group; "
                         f"group {bad} has none (prefix.num_prefixed must be < rollout.group_size)")
    sum_on = zeros.clone().index_add_(0, inverse, r * on)
    mean_on = torch.where(n_on > 1, sum_on / n_on, zeros)[inverse]  # size-1 group: mean 0
    # An on-policy rollout whose on-policy mates all share its reward gets exactly 0.
    big = torch.where(is_prefixed, torch.full_like(r, -torch.inf), r)
    small = torch.where(is_prefixed, torch.full_like(r, torch.inf), r)
    on_max = torch.full((n_groups,), -torch.inf, dtype=torch.float64, device=r.device)
    on_min = torch.full((n_groups,), torch.inf, dtype=torch.float64, device=r.device)
    on_max = on_max.scatter_reduce(0, inverse, big, reduce="amax")[inverse]
    on_min = on_min.scatter_reduce(0, inverse, small, reduce="amin")[inverse]
    constant_on = (on_max == on_min) & (n_on[inverse] > 1)
    on_adv = torch.where(constant_on, torch.zeros_like(r), r - mean_on)
    advantage = torch.where(is_prefixed, r, on_adv)
    prefix_advantage = torch.where(is_prefixed, r - mean_on, on_adv)
    return advantage.to(rewards.dtype), prefix_advantage.to(rewards.dtype)


def token_advantages(advantage: torch.Tensor, prefix_advantage: torch.Tensor,
                     prefix_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` per-token advantages: ``prefix_advantage[i]`` on prefix tokens
    (``prefix_mask`` True), ``advantage[i]`` elsewhere. Equivalent torch::

        torch.where(prefix_mask, prefix_advantage[:, None], advantage[:, None])
    """
    for name, t in (("advantage", advantage), ("prefix_advantage", prefix_advantage)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 1-D floating tensor [B]")
    if (not isinstance(prefix_mask, torch.Tensor) or prefix_mask.dim() != 2
            or prefix_mask.shape[0] != advantage.shape[0]
            or prefix_advantage.shape != advantage.shape):
        raise ValueError(f"prefix_mask must be [B, T] with B = {advantage.shape[0]} and "
                         f"prefix_advantage [B]")
    mask = prefix_mask if prefix_mask.dtype == torch.bool else prefix_mask != 0
    return torch.where(mask, prefix_advantage[:, None], advantage[:, None])


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
