"""The prefix-guided family's three choices, as pure functions the training loop calls.

* **When** (``prefix.when``): ``always`` -- every question gets ``num_prefixed`` hybrids (the
  paper); ``on_failure`` -- only questions whose on-policy rollouts all failed (BREAD). The
  loop rolls out ``G`` on-policy samples per question first; for a failing question
  :func:`replace_failed_in_place` swaps its last ``num_prefixed`` on-policy samples for the
  hybrids of a second engine call. *In place, not added*: the dropped samples all scored 0,
  so the on-policy mean (0) and every remaining reward are unchanged, while each group keeps
  ``G`` rows -- the Dr. GRPO normalizer ``B`` and the mini-batch split by question stay those
  of ``always``. A group then has one of two shapes, ``G`` on-policy rows or ``G − k``
  on-policy + ``k`` hybrids, and every ``loss.baseline`` is defined on both (``official``
  needs ``k < G``, as always).
* **Trained or not** (``prefix.train_on_prefix``): ``false`` (QuestA, PrefixRL) makes the
  prefix part of the conditioning -- :func:`as_conditioning` moves it from the response into
  the prompt, so the update batch (padded or packed, and whatever loss path reads its masks)
  has no prefix tokens: no loss, no entropy-mask work, no old log-prob on them. The move
  happens after scoring, so the reward is that of prefix + continuation exactly as when the
  prefix is trained (the two settings differ only in the update), and the rollout stays a
  hybrid for the advantage (``baseline`` ``on_policy`` / ``official`` treat it so).
* **Whose prefix** (``prefix.source``): the demonstration, or (``self``, PrefixRL) a correct
  response of the policy from an earlier step (:mod:`prefix_rft.prefix_store`);
  :func:`prefix_source_ids` falls back to the demonstration, then to no prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from .prefix_store import SelfPrefixStore
from .update.batch import Rollout

When = Literal["always", "on_failure"]  # which questions get hybrids
Source = Literal["demonstration", "self"]  # whose response the prefix is cut from


def prefix_source_ids(source: str, question_index: int, demo_ids: Sequence[int] | None,
                      store: SelfPrefixStore | None, seed: int) -> tuple[list[int], str]:
    """``(ids, origin)``: the token ids a hybrid's prefix is cut from and where they came
    from. For ``self`` a stored correct response of the question (chosen by ``seed``,
    origin ``"self"``), else -- or when it has none -- the demonstration
    (``"demonstration"``), else ``([], "")``: an empty prefix, an ordinary on-policy rollout."""
    if source == "self" and store is not None:
        own = store.pick(question_index, seed)
        if own is not None:
            return own, "self"
    return (list(demo_ids), "demonstration") if demo_ids else ([], "")


def failing_groups(rollouts: Sequence[Rollout], rewards: Sequence[float]) -> set[int]:
    """Groups (questions) none of whose given rollouts earned a positive reward."""
    solved = {r.group for r, value in zip(rollouts, rewards) if value > 0}
    return {r.group for r in rollouts} - solved


def replace_failed_in_place(on_policy: Sequence[Rollout], hybrids: Sequence[Rollout],
                            failing: set[int], num_prefixed: int) -> list[Rollout]:
    """``on_failure``'s groups: a failing group's last ``num_prefixed`` on-policy rows are
    replaced by its hybrids (so it keeps its size); other groups are left whole. Rows stay
    grouped by question, on-policy rows first, as :func:`~prefix_rft.train.roll_out` orders
    them."""
    out: list[Rollout] = []
    by_group: dict[int, list[Rollout]] = {}
    for r in on_policy:
        by_group.setdefault(r.group, []).append(r)
    extra: dict[int, list[Rollout]] = {}
    for h in hybrids:
        extra.setdefault(h.group, []).append(h)
    for group in sorted(by_group):
        rows = by_group[group]
        if group in failing:
            added = extra.get(group, [])
            if len(added) != num_prefixed:
                raise ValueError(f"group {group} failed but has {len(added)} hybrids, "
                                 f"expected num_prefixed={num_prefixed}")
            rows = rows[: len(rows) - num_prefixed] + added
        out.extend(rows)
    return out


def as_conditioning(rollout: Rollout) -> Rollout:
    """``train_on_prefix: false``: the prefix joins the prompt (it conditions the continuation,
    which keeps its advantage and its engine log-probs); the response is the continuation
    only. The loop leaves room for at least one sampled token after every prefix, so the
    continuation is never empty."""
    if rollout.prefix_len == 0:
        return rollout
    if rollout.prefix_len >= len(rollout.response_ids):
        raise ValueError(f"a hybrid rollout has no continuation after its {rollout.prefix_len}"
                         f"-token prefix (the engine returned no sampled token)")
    cut = rollout.prefix_len
    return replace(rollout, prompt_ids=list(rollout.prompt_ids) + rollout.response_ids[:cut],
                   response_ids=rollout.response_ids[cut:], prefix_len=0)


def self_store_additions(rollouts: Sequence[Rollout], question_indices: Sequence[int]
                         ) -> list[tuple[int, list[int]]]:
    """``(dataset index, response ids)`` of this step's correct on-policy rollouts: the
    policy's own solutions, free of any demonstration prefix (hybrids are not stored)."""
    return [(question_indices[r.group], list(r.response_ids)) for r in rollouts
            if not r.is_prefixed and r.prefix_len == 0 and r.reward > 0]
