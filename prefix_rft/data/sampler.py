"""The seeded, resumable, rank-sharded sampler of dataset indices."""

from __future__ import annotations

import numpy as np

__all__ = ["StatefulSampler"]


class StatefulSampler:
    """Seeded, resumable, rank-sharded sampling of dataset indices.

    All ranks walk the same global order: a permutation per epoch seeded by
    ``(seed, epoch)`` (identity when ``shuffle`` is False). ``next_batch(n)`` takes the next
    ``n`` global indices (crossing into the next epoch when needed) and returns this rank's
    contiguous share (``distributed.shard_range``), so the ranks together cover the global
    batch exactly once. ``state_dict()`` is ``{"epoch", "position", ...}`` (JSON-able).
    """

    def __init__(self, num_items: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if num_items <= 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_items, self.seed, self.shuffle = num_items, int(seed), shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(self.num_items)
            else:
                self._order = np.arange(self.num_items)
        return self._order

    def next_global_batch(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` indices of the global order (same on every rank)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        out: list[int] = []
        while len(out) < batch_size:
            order = self._epoch_order()
            take = min(batch_size - len(out), self.num_items - self.position)
            out.extend(int(i) for i in order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_items:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return out

    def next_batch(self, batch_size: int) -> list[int]:
        """This rank's share of the next global batch of ``batch_size`` indices."""
        from ..runtime.distributed import shard_range

        batch = self.next_global_batch(batch_size)
        share = shard_range(len(batch), self.rank, self.world_size)
        return batch[share.start:share.stop]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_items": self.num_items}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_items", self.num_items) != self.num_items:
            raise ValueError(f"sampler state is for {state['num_items']} items, the dataset has "
                             f"{self.num_items} (did data.train_files change?)")
        if not 0 <= state["position"] < self.num_items:
            raise ValueError(f"sampler position must be in [0, {self.num_items}), got "
                             f"{state['position']}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self._order = None
