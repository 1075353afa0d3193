"""torchrun worker for tests/test_packing_update.py: the trainer's old-log-prob pass and
policy update with packed micro-batches on an FSDP2-sharded model (2 CPU ranks, gloo).

Each rank holds its share of the questions (``shard_range``), as under ``prefix-rft train``;
rank 0 writes the loss, the metrics and every optimizer step's full (unsharded) gradients to
``argv[1]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_packing_update import G, _rollouts, _run  # noqa: E402

from prefix_rft.runtime import distributed as D  # noqa: E402
from prefix_rft.train import old_logprobs, policy_update  # noqa: E402


class FullGradSGD(torch.optim.SGD):
    """SGD that records each step's gradients, gathered to full tensors (collective)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    grads.append((g.full_tensor() if hasattr(g, "full_tensor") else g).clone())
        self.grads.append(grads)
        return super().step(closure)


def main(out_path: str) -> None:
    rank, world, _ = D.init_distributed("cpu")
    run = _run(Path(out_path).parent, packing=True, budget=40, epochs=2, lr=0.5, coef=0.01)
    D.wrap_fsdp2(run.model, mixed_precision_bf16=False)
    run.optimizer = FullGradSGD(run.model.parameters(), lr=0.5)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda k: 1.0)
    run.world = world
    questions = D.shard_range(len(_rollouts()) // G)
    rows = [r for r in _rollouts() if r.group in questions]
    old_logprobs(run, rows)
    metrics = D.all_reduce_mean(policy_update(run, rows))
    if rank == 0:
        torch.save({"metrics": metrics, "grads": run.optimizer.grads}, out_path)
    D.destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
