"""torchrun worker for tests/test_distributed.py: one FSDP2 training step of a tiny Qwen2.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT.pt

Each rank takes its half of a fixed global batch, computes the loss with the fused kernel
through ``forward_with_head`` (the way the training loop must), takes one AdamW step, and
rank 0 saves {tied: {"loss": global loss, "state": full state dict}} to OUT.pt. The test
compares this with a plain single-process step on the whole batch.
"""

from __future__ import annotations

import sys

import torch

from prefix_rft.distributed import (
    all_reduce_mean,
    destroy_distributed,
    forward_with_head,
    gather_full_state_dict,
    get_world_size,
    init_distributed,
    is_main,
    shard_range,
    wrap_fsdp2,
)
from prefix_rft.kernels import linear_logprob_entropy

ENTROPY_WEIGHT = 0.1  # exercise the entropy gradient as well as the log-prob one


def build_model(tied: bool) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=tied, attn_implementation="eager", torch_dtype=torch.float32,
    )
    torch.manual_seed(1234)
    return Qwen2ForCausalLM(config).float()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [4, 12] and next-token labels with some positions masked (-100)."""
    gen = torch.Generator().manual_seed(99)
    input_ids = torch.randint(0, 128, (4, 12), generator=gen)
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    labels[0, :5] = -100  # e.g. prompt positions
    labels[3, :2] = -100
    return input_ids, labels


def loss_terms(logprob: torch.Tensor, entropy: torch.Tensor, labels: torch.Tensor):
    """Sum over valid tokens of -logprob - w * entropy; and the valid-token count."""
    valid = labels.reshape(-1) != -100
    return (-(logprob * valid) - ENTROPY_WEIGHT * entropy * valid).sum(), valid.sum()


def run(tied: bool) -> dict:
    model = build_model(tied)
    optimizer_params = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    input_ids, labels = global_batch()
    total_valid = int((labels != -100).sum())
    world = get_world_size()
    rows = shard_range(input_ids.shape[0])
    ids, lab = input_ids[rows.start:rows.stop], labels[rows.start:rows.stop]
    if world > 1:
        wrap_fsdp2(model, mixed_precision_bf16=False)
    optimizer = torch.optim.AdamW(model.parameters(), **optimizer_params)

    def head_fn(hidden, weight, bias):
        return linear_logprob_entropy(hidden.flatten(0, 1), weight, lab.flatten(), bias=bias,
                                      impl="torch")

    logprob, entropy = forward_with_head(model, head_fn, ids)
    local_sum, _ = loss_terms(logprob, entropy, lab)
    # FSDP2 averages gradients over ranks, so scale the local sum by world / global count.
    (local_sum * world / total_valid).backward()
    # Adam's first step is nearly sign(grad), blind to a wrong gradient scale: save the
    # full gradients too, so the test can compare them directly.
    grads = {name: _full(p.grad).cpu().clone() for name, p in model.named_parameters()}
    optimizer.step()
    global_loss = all_reduce_mean(local_sum.detach() * world / total_valid)
    state = gather_full_state_dict(model)
    return {"loss": float(global_loss), "state": state, "grads": grads}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main(out_path: str) -> None:
    init_distributed("cpu")
    results = {tied: run(tied) for tied in (False, True)}
    if is_main():
        torch.save(results, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
