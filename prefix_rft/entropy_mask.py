"""The Prefix-RFT entropy mask on demonstration-prefix tokens: the whole rule, in one place.

* **Which tokens compete:** the prefix tokens of the update batch (``prefix_mask &
  response_mask``). Continuation tokens are never masked.
* **Which entropies:** the policy's token entropies of the temperature-scaled logits (the
  rollout temperature), detached: no gradient flows through the selection.
* **Which scope:** ``micro_batch`` (the authors' code): the top fraction is taken among the
  prefix tokens of each micro-batch, inside the loss call. ``mini_batch``: among all prefix
  tokens of the mini-batch, ranked jointly before the first backward
  (:func:`mini_batch_keep_masks`); the result then does not depend on how the mini-batch is
  split into micro-batches.
* **How many:** the top ``entropy_top_fraction`` keep their advantage; the other prefix tokens
  get advantage 0 but stay in the token count. Fraction 1 keeps every prefix token (no ranking
  and no entropy pass). Ties go to the earlier position in row-major order, micro-batches in
  list order (:func:`prefix_rft.kernels.entropy_topk_mask`, the primitive).

Equivalent torch for one micro-batch (``micro_batch`` scope)::

    cand = prefix_mask & response_mask
    kept = entropy_topk_mask(entropy.detach(), cand, fraction)   # fraction < 1
    token_adv = where(continuation | kept, A, 0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from prefix_rft.checks import as_mask, check_choice, check_fraction, check_tensor
from prefix_rft.kernels import entropy_topk_mask

EntropyMaskScope = Literal["micro_batch", "mini_batch"]


def check_entropy_mask_options(*, entropy_top_fraction: float,
                               entropy_mask_scope: str = "micro_batch") -> None:
    check_fraction("entropy_top_fraction", entropy_top_fraction)
    check_choice("entropy_mask_scope", entropy_mask_scope, EntropyMaskScope)


def keeps_all(entropy_top_fraction: float) -> bool:
    """Fraction 1: every prefix token keeps its advantage (nothing to rank)."""
    return entropy_top_fraction >= 1.0


def needs_mini_batch_pass(scope: str, entropy_top_fraction: float) -> bool:
    """Whether the loop must rank the mini-batch's prefix tokens before the backward passes."""
    return scope == "mini_batch" and not keeps_all(entropy_top_fraction)


def kept_prefix_tokens(prefix: torch.Tensor, entropy: torch.Tensor | None,
                       entropy_top_fraction: float,
                       keep_prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Inside the loss: the prefix tokens (bool ``[B, T]``, already ``& response_mask``) that
    keep their advantage. A given ``keep_prefix_mask`` (``mini_batch`` scope) wins; fraction 1
    keeps all; otherwise the top fraction of this batch by detached ``entropy``."""
    if keep_prefix_mask is not None:
        return as_mask(keep_prefix_mask) & prefix
    if keeps_all(entropy_top_fraction):
        return prefix
    return entropy_topk_mask(entropy.detach(), prefix, entropy_top_fraction)


@torch.no_grad()
def compute_keep_prefix_mask(
    entropy: torch.Tensor | Sequence[torch.Tensor],
    response_mask: torch.Tensor | Sequence[torch.Tensor],
    prefix_mask: torch.Tensor | Sequence[torch.Tensor],
    *,
    entropy_top_fraction: float = 0.2,
):
    """Which prefix tokens keep their advantage: the top ``entropy_top_fraction`` by entropy.

    Candidates are ``prefix_mask & response_mask``. Give ``[B, T]`` tensors for one batch, or
    equal-length lists of ``[B_k, T_k]`` tensors (the micro-batches of one mini-batch, widths
    may differ) to rank all of them jointly -- the ``mini_batch`` scope. Packed micro-batches
    (:mod:`prefix_rft.packing`) give ``[R_k]`` tensors instead; layouts may be mixed.

    Returns:
        bool ``[B, T]`` (or a list of bool ``[B_k, T_k]``), True on kept prefix tokens.
    """
    single = isinstance(entropy, torch.Tensor)
    ents = [entropy] if single else list(entropy)
    rms = [response_mask] if single else list(response_mask)
    pms = [prefix_mask] if single else list(prefix_mask)
    if not (len(ents) == len(rms) == len(pms)) or not ents:
        raise ValueError(
            "entropy, response_mask and prefix_mask must be tensors or equal, non-empty lists"
        )
    check_fraction("entropy_top_fraction", entropy_top_fraction)
    for k, (e, r, p) in enumerate(zip(ents, rms, pms)):
        if not isinstance(e, torch.Tensor) or e.dim() not in (1, 2):
            raise ValueError(f"entropy[{k}] must be a [B, T] (or packed [R]) tensor")
        check_tensor(f"response_mask[{k}]", r, tuple(e.shape), e.device, floating=False)
        check_tensor(f"prefix_mask[{k}]", p, tuple(e.shape), e.device, floating=False)
    cands = [(as_mask(p) & as_mask(r)) for p, r in zip(pms, rms)]
    flat_c = torch.cat([c.reshape(-1) for c in cands])
    flat_e = torch.cat([e.detach().float().reshape(-1) for e in ents])
    keep = entropy_topk_mask(flat_e, flat_c, entropy_top_fraction)
    pieces = keep.split([c.numel() for c in cands])
    out = [piece.reshape(c.shape) for piece, c in zip(pieces, cands)]
    return out[0] if single else out


def mini_batch_keep_masks(batches: Sequence, entropy_of: Callable[[int, object], torch.Tensor],
                          *, scope: str, entropy_top_fraction: float) -> list:
    """The ``keep_prefix_mask`` of each micro-batch of one mini-batch (None each when the loss
    decides per micro-batch: ``micro_batch`` scope or fraction 1).

    ``batches`` are the micro-batches (objects with ``response_mask`` and ``prefix_mask``
    ``[B_k, T_k]``); ``entropy_of(k, batch)`` returns micro-batch k's no-grad,
    temperature-scaled token entropies ``[B_k, T_k]`` of the current policy (the trainer
    reuses the old-log-prob pass's entropies on a step's first optimizer step, where the
    policy has not moved yet, and runs a no-grad pass otherwise).
    """
    if not needs_mini_batch_pass(scope, entropy_top_fraction):
        return [None] * len(batches)
    ents = [entropy_of(k, batch) for k, batch in enumerate(batches)]
    return compute_keep_prefix_mask(ents, [b.response_mask for b in batches],
                                    [b.prefix_mask for b in batches],
                                    entropy_top_fraction=entropy_top_fraction)
