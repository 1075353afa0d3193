"""torchrun worker for tests/test_distributed.py: one FSDP2 training step of a tiny Qwen2.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT.pt CHECKPOINT_ROOT

Each rank takes its half of a fixed global batch, computes the loss with the fused kernel
through ``forward_with_head`` (the way the training loop must), takes one AdamW step, and
rank 0 saves {tied: {"loss", "state", "grads"}} to OUT.pt. The test compares this with a
plain single-process step on the whole batch. It also checkpoints under FSDP2 (to
CHECKPOINT_ROOT), resumes into a fresh sharded model, and reports whether the next step
matches (``results["checkpoint"]``).
"""

from __future__ import annotations

import sys

import torch

from prefix_rft.kernels import linear_logprob_entropy
from prefix_rft.run.checkpoint import find_latest, load_checkpoint, save_checkpoint
from prefix_rft.runtime.distributed import (
    all_reduce_mean,
    clip_grad_norm,
    destroy_distributed,
    forward_with_head,
    gather_full_state_dict,
    get_world_size,
    init_distributed,
    is_main,
    shard_range,
    wrap_fsdp2,
)

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


def setup(tied: bool):
    """Model (FSDP2-wrapped when there are several ranks), AdamW, this rank's batch share."""
    model = build_model(tied)
    input_ids, labels = global_batch()
    rows = shard_range(input_ids.shape[0])
    if get_world_size() > 1:
        wrap_fsdp2(model, mixed_precision_bf16=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    return model, optimizer, input_ids[rows.start:rows.stop], labels[rows.start:rows.stop]


def train_step(model, optimizer, ids, lab, total_valid: int) -> torch.Tensor:
    """Forward through forward_with_head, backward, AdamW step; returns the global loss."""
    world = get_world_size()

    def head_fn(hidden, weight, bias):
        return linear_logprob_entropy(hidden.flatten(0, 1), weight, lab.flatten(), bias=bias,
                                      impl="torch")

    optimizer.zero_grad()
    logprob, entropy = forward_with_head(model, head_fn, ids)
    local_sum, _ = loss_terms(logprob, entropy, lab)
    # FSDP2 averages gradients over ranks, so scale the local sum by world / global count.
    (local_sum * world / total_valid).backward()
    train_step.grad_norm = clip_grad_norm(model, 0.0)  # 0: measure only (DTensor grads)
    optimizer.step()
    return all_reduce_mean(local_sum.detach() * world / total_valid)


def checkpoint_round_trip(model, optimizer, ids, lab, total_valid: int, ckpt_root: str) -> dict:
    """Save (FSDP2 + full optimizer state), load into a fresh wrapped model and optimizer,
    take one more step on both: identical weights prove model and AdamW state restored."""
    save_checkpoint(ckpt_root, 1, model=model, optimizer=optimizer,
                    sampler_state={"epoch": 0, "position": 2})
    fresh, fresh_optimizer, _, _ = setup(tied=False)
    meta = load_checkpoint(find_latest(ckpt_root), model=fresh, optimizer=fresh_optimizer)
    train_step(model, optimizer, ids, lab, total_valid)
    train_step(fresh, fresh_optimizer, ids, lab, total_valid)
    a, b = gather_full_state_dict(model), gather_full_state_dict(fresh)
    diff = max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0)
    return {"resume_max_diff": diff, "sampler": meta["sampler"]}


def run(tied: bool) -> dict:
    model, optimizer, ids, lab = setup(tied)
    total_valid = int((global_batch()[1] != -100).sum())
    grads = {}

    def keep_grads(*_):
        # Adam's first step is nearly sign(grad), blind to a wrong gradient scale: keep the
        # full gradients too, so the test can compare them directly.
        grads.update({n: _full(p.grad).cpu().clone() for n, p in model.named_parameters()})

    optimizer.register_step_pre_hook(keep_grads)
    global_loss = train_step(model, optimizer, ids, lab, total_valid)
    return {"loss": float(global_loss), "state": gather_full_state_dict(model), "grads": grads,
            "grad_norm": train_step.grad_norm}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main(out_path: str, ckpt_root: str) -> None:
    init_distributed("cpu")
    results = {tied: run(tied) for tied in (False, True)}
    model, optimizer, ids, lab = setup(tied=False)
    total_valid = int((global_batch()[1] != -100).sum())
    train_step(model, optimizer, ids, lab, total_valid)
    results["checkpoint"] = checkpoint_round_trip(model, optimizer, ids, lab, total_valid,
                                                  ckpt_root)
    if is_main():
        torch.save(results, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
