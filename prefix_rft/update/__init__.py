"""The path from scored rollouts to gradients, below the loss and the loop.

* :mod:`~prefix_rft.update.batch` -- :class:`Rollout` (one scored sequence), the right-padded
  :class:`UpdateBatch` and the :class:`MicroBatch` protocol both layouts satisfy.
* :mod:`~prefix_rft.update.packed` -- :class:`PackedBatch`: a micro-batch as one padding-free row.
* :mod:`~prefix_rft.update.split` -- the one splitter (in order or balanced; padded or real
  tokens) and the micro-batches of a pass.
* :mod:`~prefix_rft.update.head` -- the forward-with-head over either layout (FSDP2-safe), the
  fused log-probs/entropies through it, the idle forwards of a rank with fewer micro-batches.
* :mod:`~prefix_rft.update.varlen_attention` -- attention that never crosses a packed row's
  sequence boundaries (flash-attn varlen on CUDA, per-sequence SDPA otherwise).

The loss over a micro-batch is :mod:`prefix_rft.loss` (its settings one frozen object); the
loop that calls it, :mod:`prefix_rft.train`.
"""

from .batch import MicroBatch, Rollout, UpdateBatch, collate
from .head import (
    head_inputs,
    idle_forwards,
    response_hidden,
    response_logprob_entropy,
    run_head,
)
from .packed import PackedBatch, gather_per_token, pack
from .split import (
    make_micro_batches,
    padded_cut_tokens,
    split_micro_batches,
    split_rows,
)

__all__ = ["MicroBatch", "PackedBatch", "Rollout", "UpdateBatch", "collate", "gather_per_token",
           "head_inputs", "idle_forwards", "make_micro_batches", "pack", "padded_cut_tokens",
           "response_hidden", "response_logprob_entropy", "run_head", "split_micro_batches",
           "split_rows"]
