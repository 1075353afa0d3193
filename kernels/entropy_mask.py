"""Top-fraction entropy mask over a set of candidate positions (the Prefix-RFT prefix mask).

Equivalent torch (any shape; ``n`` = number of candidates)::

    n_drop = floor((1 - fraction) * n)
    order  = stable descending sort of entropy[candidates]   # ties: earlier position first
    keep   = candidates with rank < n - n_drop
"""

from __future__ import annotations

import math

import torch

from ._checks import check_fraction


@torch.no_grad()
def entropy_topk_mask(
    entropy: torch.Tensor, candidates: torch.Tensor, fraction: float = 0.2
) -> torch.Tensor:
    """Keep the highest-entropy ``fraction`` of the candidate positions.

    Args:
        entropy: float tensor of any shape (e.g. ``[B, T]`` token entropies).
        candidates: bool tensor of the same shape; True marks positions that compete
            (e.g. prefix tokens of the update batch).
        fraction: in (0, 1]; the lowest ``floor((1 - fraction) * n)`` candidates are dropped.

    Returns:
        bool tensor, same shape: True on kept candidates, False elsewhere. Ties are broken
        deterministically in favour of the earlier position in row-major (flattened) order.
        No gradient flows through the selection.

    Example::

        >>> ent = torch.tensor([[0.1, 2.0, 0.5], [1.0, 0.3, 9.9]])
        >>> cand = torch.tensor([[True, True, True], [True, True, False]])
        >>> entropy_topk_mask(ent, cand, fraction=0.4)   # 5 candidates, drop floor(3.0)=3
        tensor([[False,  True, False],
                [ True, False, False]])
    """
    if not isinstance(entropy, torch.Tensor) or not entropy.is_floating_point():
        raise ValueError("entropy must be a floating torch.Tensor")
    if not isinstance(candidates, torch.Tensor) or candidates.dtype != torch.bool:
        raise ValueError("candidates must be a bool torch.Tensor")
    if candidates.shape != entropy.shape:
        raise ValueError(
            f"candidates must have the shape of entropy {tuple(entropy.shape)}, "
            f"got {tuple(candidates.shape)}"
        )
    if candidates.device != entropy.device:
        raise ValueError(f"candidates on {candidates.device} but entropy on {entropy.device}")
    check_fraction(fraction)
    flat_cand = candidates.reshape(-1)
    positions = flat_cand.nonzero().squeeze(-1)
    n = positions.numel()
    # The epsilon keeps float products such as 0.8 * 5 = 4.000000000000001 from flooring wrong.
    n_keep = n - math.floor((1.0 - fraction) * n + 1e-9)
    keep = torch.zeros_like(flat_cand)
    if n_keep > 0:
        order = torch.sort(entropy.detach().reshape(-1)[positions], descending=True, stable=True)
        keep[positions[order.indices[:n_keep]]] = True
    return keep.reshape(candidates.shape)
