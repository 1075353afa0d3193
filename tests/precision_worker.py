"""torchrun worker for tests/test_precision.py: one FSDP2 step at lr 1e-6 under the run's
precision policy on 2 CPU ranks (gloo).

    torchrun --nproc_per_node 2 tests/precision_worker.py OUT.pt MODEL_DTYPE

Rank 0 saves {"param_dtypes", "grad_dtypes", "compute_dtypes", "changed_frac", "mean_step"}:
the dtypes the sharded parameters / gradients are stored in, the dtypes the fused head saw,
the share of weight entries that moved and their mean absolute move.
"""

from __future__ import annotations

import sys

import torch

from prefix_rft.kernels import linear_logprob_entropy
from prefix_rft.runtime.distributed import (
    destroy_distributed,
    forward_with_head,
    init_distributed,
    is_main,
    shard_range,
    wrap_fsdp2,
)
from prefix_rft.runtime.precision import precision_policy

LR = 1e-6


def main(out_path: str, model_dtype: str) -> None:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import dist_worker

    rank, world, device = init_distributed("cpu")
    policy = precision_policy(model_dtype, "fp32", "auto", device)
    model = dist_worker.build_model(tied=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrap_fsdp2(model, mp_policy=policy.fsdp_mixed_precision())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    input_ids, labels = dist_worker.global_batch()
    rows = shard_range(input_ids.shape[0])
    ids, lab = input_ids[rows.start:rows.stop], labels[rows.start:rows.stop]
    seen = []

    def head(hidden, weight, bias):
        seen.append(str(hidden.dtype))
        return linear_logprob_entropy(hidden.flatten(0, 1), weight, lab.flatten(), impl="torch")

    with policy.autocast(model):
        logprob, _ = forward_with_head(model, head, ids)
    mask = lab.flatten() != -100
    (-(logprob[mask]).sum() / mask.sum()).backward()
    grad_dtypes = sorted({str(p.grad.dtype) for p in model.parameters()})
    optimizer.step()
    after = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    # every weight but the embedding (whose rows of tokens absent from the batch get no
    # gradient) has a gradient in every entry
    moved = torch.cat([(after[n] - before[n]).flatten() for n in before if "embed" not in n])
    result = {"param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
              "grad_dtypes": grad_dtypes, "compute_dtypes": sorted(set(seen)),
              "changed_frac": (moved != 0).float().mean().item(),
              "mean_abs_step": moved.abs().mean().item()}
    if is_main():
        torch.save(result, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
