"""The ``prefix.source: self`` store: per question, the policy's own recent correct responses.

PrefixRL-style prefixes come from the policy itself: a response that earned reward 1 at an
earlier step is kept (as token ids, so a later prefix is exactly those ids, never decoded and
re-encoded) and a later hybrid of the same question continues a cut of it. The store is
bounded (``capacity`` newest responses per question), keyed by the question's dataset index,
identical on every rank (each step's additions are gathered from all ranks) and saved in the
checkpoint (``prefix_store.pt``, flat tensors), so a resumed run draws the same prefixes as
an uninterrupted one.

    store = SelfPrefixStore(capacity=4)
    store.add(question_index=7, response_ids=[5, 9, 2])
    store.pick(7, seed=123)          # -> [5, 9, 2]; None for a question with no entry
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .checks import check_int


class SelfPrefixStore:
    """Bounded per-question lists of correct response ids, oldest first."""

    def __init__(self, capacity: int):
        check_int("capacity", capacity, 1)
        self.capacity = capacity
        self._responses: dict[int, list[list[int]]] = {}

    def add(self, question_index: int, response_ids: Sequence[int]) -> None:
        """Keep ``response_ids`` as the newest entry of the question (a repeat of a stored
        response moves it to the newest place); the oldest entry beyond ``capacity`` goes."""
        ids = [int(x) for x in response_ids]
        if not ids:
            return
        entries = self._responses.setdefault(int(question_index), [])
        if ids in entries:
            entries.remove(ids)
        entries.append(ids)
        del entries[:-self.capacity]

    def add_all(self, additions: Sequence[tuple[int, Sequence[int]]]) -> None:
        """:meth:`add` each ``(question_index, response_ids)`` in order."""
        for question_index, response_ids in additions:
            self.add(question_index, response_ids)

    def pick(self, question_index: int, seed: int) -> list[int] | None:
        """One stored response of the question, chosen by ``seed`` (reproducible), or None."""
        entries = self._responses.get(int(question_index))
        if not entries:
            return None
        return list(random.Random(seed).choice(entries))

    def __len__(self) -> int:
        """Responses held, all questions together."""
        return sum(len(entries) for entries in self._responses.values())

    def num_questions(self) -> int:
        return len(self._responses)

    def state_dict(self) -> dict[str, Any]:
        """Flat tensors (compact for a large store; ``torch.load(weights_only=True)``-safe):
        ``question``/``length`` per entry (questions sorted, entries oldest first) and all
        entries' ids concatenated in ``ids``."""
        questions = sorted(self._responses)
        entries = [(q, e) for q in questions for e in self._responses[q]]
        flat = [x for _, e in entries for x in e]
        return {"capacity": torch.tensor(self.capacity),
                "question": torch.tensor([q for q, _ in entries], dtype=torch.long),
                "length": torch.tensor([len(e) for _, e in entries], dtype=torch.long),
                "ids": torch.tensor(flat, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s content; a smaller ``capacity`` keeps the newest."""
        self._responses = {}
        ids = state["ids"].tolist()
        start = 0
        for question, length in zip(state["question"].tolist(), state["length"].tolist()):
            self.add(question, ids[start:start + length])
            start += length

    def as_dict(self) -> dict[int, list[list[int]]]:
        """The content, ``{question index: [response ids, oldest first]}`` (a copy)."""
        return {q: [list(e) for e in entries] for q, entries in sorted(self._responses.items())}


def gather_additions(additions: list[tuple[int, list[int]]]) -> list[tuple[int, list[int]]]:
    """Every rank's additions, rank order (a no-op in one process): the store stays the same
    on all ranks, whichever rank a question is sampled on next."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return additions
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, additions)
    return [(q, ids) for rank_additions in everyone for q, ids in rank_additions]
