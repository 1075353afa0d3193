"""The Prefix-RFT entropy mask on demonstration-prefix tokens: the whole rule, in one place.

:class:`EntropyMask` (frozen, built once from ``loss.entropy_top_fraction`` and
``loss.entropy_mask_scope``) answers every question the loss and the loop ask of the rule:
which tokens it keeps (:meth:`EntropyMask.keep`), whether the loss needs entropies for it
(:meth:`EntropyMask.needs_entropy`), whether the loop must rank a mini-batch before the first
backward (:attr:`EntropyMask.ranks_mini_batch`) and with which entropies
(:meth:`EntropyMask.mini_batch_keeps`), whether that costs a forward pass
(:meth:`EntropyMask.needs_entropy_pass`), and whether the split into micro-batches changes the
mask (:attr:`EntropyMask.split_changes_mask`). Changing the rule changes this file only.

* **Which tokens compete:** the prefix tokens of the update batch (``prefix_mask &
  response_mask``). Continuation tokens are never masked.
* **Which entropies:** the policy's token entropies of the temperature-scaled logits (the
  rollout temperature), detached: no gradient flows through the selection.
* **Which scope:** ``micro_batch`` (the authors' code): the top fraction is taken among the
  prefix tokens of each micro-batch, inside the loss call. ``mini_batch``: among all prefix
  tokens of the mini-batch, ranked jointly before the first backward
  (:meth:`EntropyMask.mini_batch_keeps`); the result then does not depend on how the mini-batch is
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
from dataclasses import dataclass
from typing import Literal

import torch

from ..checks import as_mask, check_choice, check_fraction, check_tensor
from ..kernels import entropy_topk_mask

EntropyMaskScope = Literal["micro_batch", "mini_batch"]


def check_entropy_mask_options(*, entropy_top_fraction: float,
                               entropy_mask_scope: str = "micro_batch") -> None:
    check_fraction("entropy_top_fraction", entropy_top_fraction)
    check_choice("entropy_mask_scope", entropy_mask_scope, EntropyMaskScope)


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
    (:mod:`prefix_rft.update.packed`) give ``[R_k]`` tensors instead; layouts may be mixed.

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


@dataclass(frozen=True)
class EntropyMask:
    """The entropy-mask rule: the top ``top_fraction`` of the prefix tokens by entropy keep their
    advantage, ranked per micro-batch or per mini-batch (``scope``)."""

    top_fraction: float = 0.2  # share of prefix tokens that keep their advantage, in [0, 1]
    scope: EntropyMaskScope = "micro_batch"  # where prefix tokens are ranked against each other

    def __post_init__(self) -> None:
        check_entropy_mask_options(entropy_top_fraction=self.top_fraction,
                                   entropy_mask_scope=self.scope)

    @property
    def keeps_all(self) -> bool:
        """Fraction 1: every prefix token keeps its advantage (nothing to rank)."""
        return self.top_fraction >= 1.0

    @property
    def ranks_mini_batch(self) -> bool:
        """The loop ranks the mini-batch's prefix tokens before the backward passes and hands
        each micro-batch its ``keep_prefix_mask``; otherwise the loss ranks per call."""
        return self.scope == "mini_batch" and not self.keeps_all

    @property
    def split_changes_mask(self) -> bool:
        """Which rollouts share a micro-batch changes the mask (``micro_batch`` scope ranks
        within each): then the update's micro-batches keep the mini-batch's order."""
        return self.scope == "micro_batch" and not self.keeps_all

    def needs_entropy(self, keep_given: bool) -> bool:
        """The loss call needs token entropies to rank (no precomputed mask, fraction < 1)."""
        return not keep_given and not self.keeps_all

    def needs_entropy_pass(self, first_update: bool) -> bool:
        """Ranking a mini-batch costs a no-grad forward: not on a step's first optimizer step,
        whose policy is the old-log-prob pass's (its entropies are reused)."""
        return self.ranks_mini_batch and not first_update

    def check_keep(self, keep_prefix_mask: torch.Tensor | None) -> None:
        """A precomputed ``keep_prefix_mask`` is given exactly when the loop ranks."""
        if self.scope == "micro_batch" and keep_prefix_mask is not None:
            raise ValueError("keep_prefix_mask needs entropy_mask_scope='mini_batch'")
        if self.ranks_mini_batch and keep_prefix_mask is None:
            raise ValueError("keep_prefix_mask is required with entropy_mask_scope='mini_batch' "
                             "(see compute_keep_prefix_mask)")

    def keep(self, prefix: torch.Tensor, entropy: torch.Tensor | None,
             keep_prefix_mask: torch.Tensor | None = None,
             seq_index: torch.Tensor | None = None) -> torch.Tensor:
        """Inside the loss: the prefix tokens (bool ``[B, T]`` or packed ``[R]``, already ``&
        response_mask``) that keep their advantage. A given ``keep_prefix_mask`` (ranked by the
        loop) wins; fraction 1 keeps all; otherwise the top fraction of this call's prefix
        tokens by detached ``entropy`` (same shape). ``seq_index [R]`` (packed; None padded,
        where row ``b`` is sequence ``b``) names each token's sequence, for a per-sequence
        rule."""
        if keep_prefix_mask is not None:
            return as_mask(keep_prefix_mask) & prefix
        if self.keeps_all:
            return prefix
        return entropy_topk_mask(entropy.detach(), prefix, self.top_fraction)

    def mini_batch_keeps(self, batches: Sequence, *, first_update: bool,
                         stored_entropy: Callable[[object], torch.Tensor],
                         current_entropy: Callable[[object], torch.Tensor]) -> list:
        """The ``keep_prefix_mask`` of each micro-batch of one mini-batch (None each when the
        loss ranks per call).

        ``batches`` have ``response_mask`` and ``prefix_mask`` (``[B_k, T_k]`` or ``[R_k]``).
        The ranking uses the current policy's no-grad, temperature-scaled entropies: on a step's
        first optimizer step the policy has not moved since the old-log-prob pass, so
        ``stored_entropy(batch)`` (that pass's) is exact; later ones use
        ``current_entropy(batch)`` (a no-grad forward).
        """
        if not self.ranks_mini_batch:
            return [None] * len(batches)
        entropy_of = stored_entropy if first_update else current_entropy
        return compute_keep_prefix_mask([entropy_of(b) for b in batches],
                                        [b.response_mask for b in batches],
                                        [b.prefix_mask for b in batches],
                                        entropy_top_fraction=self.top_fraction)
