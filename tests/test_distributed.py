"""prefix_rft.runtime.distributed: the single-process path, and FSDP2 on 2 CPU ranks (gloo) against
one process without FSDP on the same global batch (loss, full gradients, weights after
one AdamW step), for untied and tied lm_head/embeddings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from prefix_rft.kernels import linear_logprob_entropy
from prefix_rft.runtime import distributed as D

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import dist_worker  # noqa: E402
from torchrun_timing import run_torchrun  # noqa: E402


def _single_process_step(tied: bool) -> dict:
    """Reference: plain model, whole batch, lm_head.weight used directly (no helper)."""
    model = dist_worker.build_model(tied)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    input_ids, labels = dist_worker.global_batch()
    hidden = model.model(input_ids=input_ids).last_hidden_state
    logprob, entropy = linear_logprob_entropy(
        hidden.flatten(0, 1), model.lm_head.weight, labels.flatten(), impl="torch")
    total, count = dist_worker.loss_terms(logprob, entropy, labels)
    loss = total / count
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {"loss": loss.item(), "grads": grads, "state": model.state_dict(),
            "init": dist_worker.build_model(tied).state_dict()}


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rank, world, device = D.init_distributed("cpu")
    assert (rank, world, device.type) == (0, 1, "cpu")
    assert D.is_main() and D.get_world_size() == 1 and not D.is_distributed()
    D.barrier()
    assert D.all_reduce_mean({"a": 1.5, "b": -2}) == {"a": 1.5, "b": -2.0}
    assert D.all_reduce_mean(3) == 3.0
    tensor = torch.tensor([1.0, 2.0])
    assert torch.equal(D.all_reduce_mean(tensor), tensor)


def test_init_distributed_rejects_bad_device():
    with pytest.raises(ValueError, match="device"):
        D.init_distributed("tpu")


def test_wrap_fsdp2_needs_a_process_group():
    with pytest.raises(ValueError, match="process group"):
        D.wrap_fsdp2(dist_worker.build_model(False), mixed_precision_bf16=False)


@pytest.mark.parametrize("num_items,world", [(10, 3), (2, 4), (8, 2), (0, 2)])
def test_shard_range_partitions_items(num_items, world):
    shards = [D.shard_range(num_items, r, world) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert flat == list(range(num_items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="rank"):
        D.shard_range(num_items, world, world)


def test_forward_with_head_unwrapped_matches_logits():
    """On a plain model the helper feeds the last hidden states and lm_head weight: the
    fused log-probs equal log_softmax of the model's own logits (fp64 reference)."""
    model = dist_worker.build_model(True)
    input_ids, labels = dist_worker.global_batch()
    safe = labels.clamp(min=0)

    def head_fn(hidden, weight, bias):
        assert weight is model.lm_head.weight and bias is None
        return linear_logprob_entropy(hidden.flatten(0, 1), weight, safe.flatten(), impl="torch")

    logprob, _ = D.forward_with_head(model, head_fn, input_ids)
    logits = model(input_ids=input_ids).logits.double()
    expected = torch.log_softmax(logits, -1).gather(-1, safe[..., None]).squeeze(-1)
    torch.testing.assert_close(logprob.double(), expected.flatten(), rtol=1e-5, atol=1e-5)


def test_gather_full_state_dict_plain_model_is_a_cpu_copy():
    model = dist_worker.build_model(False)
    state = D.gather_full_state_dict(model)
    assert set(state) == set(model.state_dict())
    key = "model.embed_tokens.weight"
    state[key].add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(state[key], model.state_dict()[key])


@pytest.mark.distributed
def test_fsdp2_two_ranks_match_single_process(tmp_path):
    out, ckpt_root = tmp_path / "fsdp.pt", tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "dist_worker.py"), str(out), str(ckpt_root)]
    proc = run_torchrun("fsdp2_step", cmd, env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out)
    for tied in (False, True):
        ref, got = _single_process_step(tied), results[tied]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        ref_norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.double()) for g in ref["grads"].values()]))
        assert got["grad_norm"] == pytest.approx(float(ref_norm), rel=1e-5)
        assert set(got["grads"]) == set(ref["grads"])
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        assert set(got["state"]) == set(ref["state"])
        for name, value in ref["state"].items():
            moved = (value - ref["init"][name]).abs().max()
            assert moved > 1e-3 or "rotary" in name, f"{name} did not train"
            torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)

    # checkpoint written under FSDP2, resumed into a fresh sharded model: the next step matches
    assert results["checkpoint"]["resume_max_diff"] == 0.0
    assert results["checkpoint"]["sampler"] == {"epoch": 0, "position": 2}
    # ... and the same files load into a plain single-process model + AdamW: the full
    # optimizer state is keyed by parameter names and equals a single-process run's
    _check_fsdp_checkpoint_loads_in_one_process(ckpt_root)


def _check_fsdp_checkpoint_loads_in_one_process(ckpt_root):
    from prefix_rft.run.checkpoint import find_latest, load_checkpoint

    model = dist_worker.build_model(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    load_checkpoint(find_latest(ckpt_root), model=model, optimizer=optimizer, restore_rng=False)
    ref = dist_worker.build_model(False)
    ref_optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.99),
                                      weight_decay=0.01)
    input_ids, labels = dist_worker.global_batch()
    hidden = ref.model(input_ids=input_ids).last_hidden_state
    logprob, entropy = linear_logprob_entropy(
        hidden.flatten(0, 1), ref.lm_head.weight, labels.flatten(), impl="torch")
    total, count = dist_worker.loss_terms(logprob, entropy, labels)
    (total / count).backward()
    ref_optimizer.step()
    for (name, p), ref_p in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), ref_p.detach(), rtol=1e-4, atol=1e-5, msg=name)
        state, ref_state = optimizer.state[p], ref_optimizer.state[ref_p]
        assert float(state["step"]) == float(ref_state["step"]) == 1.0
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-9, msg=name)
