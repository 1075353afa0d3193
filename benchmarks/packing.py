"""Update-phase throughput and memory, padded vs packed micro-batches, on CPU.

    nice python -m benchmarks.packing            # wide + narrow spreads, ~10 min on 2 cores
    python -m benchmarks.packing --smoke         # seconds; for CI (writes nothing)
    prefix-rft bench packing

One case = one policy update (``prefix_rft.train.policy_update``: micro-batched Prefix-RFT
loss, backward, AdamW step) of a random-init Qwen2-shaped model (hidden 256, 4 layers, GQA
4/2 heads, intermediate 768, the real Qwen2.5 vocabulary of 151,936, gradient checkpointing
on as in the trainer's default) over one mini-batch of rollouts whose old log-probs are set.
``train.packing`` is the only difference between the two layouts of a spread:

* ``padded``: micro-batches cut in order under ``micro_batch_tokens`` charged
  ``len(mb) x longest``, right-padded ``[B, W]`` rows.
* ``packed``: first-fit-decreasing micro-batches of real tokens, one packed row each, attention
  per sequence (prefix_rft/varlen_attention.py).

Spreads (response lengths; prompts 100-300 tokens for ``wide``, the demo's 13-19 for
``narrow``): ``wide`` = log-normal (median 256, sigma 1.0) clipped to [32, 2048] with 15% of
the rollouts truncated at the 2,048 cap -- R1-style traces next to short answers; ``narrow``
= the demo task's (responses ~N(32, 8) in [8, 64], 10% at the 64 cap).

Each case runs in a fresh subprocess with one torch thread (``OMP_NUM_THREADS=1``); time is
the wall clock of the whole update after a warm-up update on the same batch; tokens/s counts
real (prompt + response) tokens; peak memory is the process's peak RSS above its RSS after
building the model and the batch. Rows go to ``benchmarks/results/packing.csv`` (+ ``.md``,
``.png``) through ``benchmarks/results_io``.
"""

from __future__ import annotations

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYOUTS = ("padded", "packed")
# name -> (hidden, layers, heads, kv heads, intermediate, vocab)
SHAPES = {"cpu-small": (256, 4, 4, 2, 768, 151936), "smoke": (32, 2, 4, 2, 64, 1003)}
# name -> (number of rollouts, micro_batch_tokens, max_response_tokens)
SPREADS = {"wide": (16, 4096, 2048), "narrow": (64, 2048, 64)}


def sample_lengths(spread: str, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (prompt, response) token counts of a spread (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if spread == "wide":
        prompts = rng.integers(100, 301, n)
        resp = np.clip(rng.lognormal(np.log(256), 1.0, n), 32, 2048).astype(int)
        resp[rng.random(n) < 0.15] = 2048  # truncated at the cap
    elif spread == "narrow":
        prompts = rng.integers(13, 20, n)
        resp = np.clip(rng.normal(32, 8, n), 8, 64).astype(int)
        resp[rng.random(n) < 0.10] = 64
    else:
        raise ValueError(f"spread must be one of {tuple(SPREADS)}, got {spread!r}")
    return [(int(p), int(r)) for p, r in zip(prompts, resp)]


def build_rollouts(spread: str, n: int, vocab: int, group_size: int = 8):
    """Rollouts of the spread: random ids, every ``group_size``-th one a hybrid with a prefix,
    random advantages and old log-probs near the current policy's."""
    import torch

    from prefix_rft.batching import Rollout

    g = torch.Generator().manual_seed(1)
    rollouts = []
    for i, (P, R) in enumerate(sample_lengths(spread, n)):
        hybrid = i % group_size == 0
        rollouts.append(Rollout(
            prompt_ids=torch.randint(0, vocab, (P,), generator=g).tolist(),
            response_ids=torch.randint(0, vocab, (R,), generator=g).tolist(),
            prefix_len=R // 2 if hybrid else 0, group=i // group_size, is_prefixed=hybrid,
            advantage=float(torch.randn((), generator=g)),
            old_logprob=-torch.rand(R, generator=g) * 2 - 11.0,
            old_entropy=torch.rand(R, generator=g) * 5))
    return rollouts
