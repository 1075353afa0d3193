"""Packed vs padded updates through the trainer's own passes (prefix_rft/train.py).

The same rollouts and initial weights go through ``old_logprobs`` and ``policy_update`` once
with ``train.packing: false`` (right-padded rows, in-order padded cut) and once with ``true``
(packed rows, token-balanced or in-order real-token cut). An optimizer that records each
step's gradients and then takes a plain SGD step stands in for AdamW (Adam's first step is
~lr * sign(g), which would turn fp32 noise on tiny gradient entries into sign flips).
"""

from __future__ import annotations

import pytest
import torch
from torchrun_timing import run_torchrun

from prefix_rft.config import Config
from prefix_rft.run.setup import Run, build_loss
from prefix_rft.train import old_logprobs, policy_update, sft_update
from prefix_rft.update import Rollout
from prefix_rft.update.varlen_attention import enable_packed_attention

VOCAB, G = 61, 4
# (prompt, response) lengths of 4 questions x 4 rollouts: a wide spread
LENGTHS = [(5, 3), (7, 19), (4, 2), (6, 11), (3, 25), (8, 4), (5, 9), (4, 1),
           (6, 14), (9, 6), (3, 22), (7, 2), (4, 30), (5, 5), (6, 1), (3, 12)]
QUESTIONS = len(LENGTHS) // G


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every step's gradients."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups
                           for p in g["params"] if p.grad is not None])
        return super().step(closure)


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).train()


def _rollouts():
    g = torch.Generator().manual_seed(3)
    out = []
    for i, (P, n) in enumerate(LENGTHS):
        hybrid = i % G == 1
        prefix = n // 2 if hybrid else 0
        out.append(Rollout(prompt_ids=torch.randint(1, VOCAB, (P,), generator=g).tolist(),
                           response_ids=torch.randint(1, VOCAB, (n,), generator=g).tolist(),
                           prefix_len=prefix, group=i // G, is_prefixed=hybrid,
                           advantage=float(torch.randn((), generator=g)),
                           engine_logprobs=[-1.0] * (n - prefix)))
    return out


def _run(tmp_path, *, packing, budget, scope="mini_batch", fraction=0.2, mini_batch=QUESTIONS,
         epochs=1, lr=0.0, algo="prefix_rft", coef=0.0):
    cfg = Config()
    cfg.train.packing, cfg.train.micro_batch_tokens = packing, budget
    cfg.train.prompts_per_step, cfg.train.mini_batch_size = QUESTIONS, mini_batch
    cfg.train.ppo_epochs, cfg.optim.grad_clip = epochs, 0.0
    cfg.rollout.group_size, cfg.rollout.max_response_tokens = G, 32
    cfg.loss.algo, cfg.loss.kernel_impl, cfg.loss.entropy_coef = algo, "torch", coef
    cfg.loss.entropy_mask_scope, cfg.loss.entropy_top_fraction = scope, fraction
    model = _model()
    if packing:
        enable_packed_attention(model)
    optimizer = RecordingSGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    return Run(cfg=cfg, model=model, tokenizer=None, engine=None, optimizer=optimizer,
               scheduler=scheduler, loss_fn=build_loss(cfg), dataset=None, sampler=None,
               device=torch.device("cpu"), rank=0, world=1, run_dir=tmp_path, pad_id=0)


def _update(run, algo="prefix_rft"):
    rollouts = _rollouts()
    if algo == "sft":
        return rollouts, sft_update(run, rollouts[::G])
    old_logprobs(run, rollouts)
    return rollouts, policy_update(run, rollouts)


def _max_rel_err(a_list, b_list):
    return max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(a_list, b_list))


def _assert_same(run_a, run_b, metrics_a, metrics_b, tol=1e-4):
    assert len(run_a.optimizer.grads) == len(run_b.optimizer.grads) > 0
    for ga, gb in zip(run_a.optimizer.grads, run_b.optimizer.grads):
        assert len(ga) == len(gb) > 0
        assert _max_rel_err(ga, gb) < tol
    assert metrics_a["loss"] == pytest.approx(metrics_b["loss"], rel=tol, abs=1e-7)
    for key in ("kept_prefix_frac", "clip_frac", "update_tokens"):
        if key in metrics_b:
            assert metrics_a[key] == pytest.approx(metrics_b[key], rel=tol, abs=1e-7), key


@pytest.mark.parametrize("scope,fraction,budget", [
    ("mini_batch", 0.2, 60),    # several micro-batches, joint ranking, balanced packed split
    ("micro_batch", 1.0, 60),   # no ranking: balanced packed split
    ("micro_batch", 0.2, 4096),  # per-micro-batch ranking, one micro-batch in both layouts
])
def test_packed_update_equals_padded(tmp_path, scope, fraction, budget):
    padded, packed = (_run(tmp_path, packing=p, budget=budget, scope=scope, fraction=fraction)
                      for p in (False, True))
    rows_a, m_padded = _update(padded)
    rows_b, m_packed = _update(packed)
    for a, b in zip(rows_a, rows_b):  # the old-log-prob pass
        assert torch.allclose(a.old_logprob, b.old_logprob, atol=1e-5, rtol=1e-5)
        assert torch.allclose(a.old_entropy, b.old_entropy, atol=1e-5, rtol=1e-5)
    _assert_same(packed, padded, m_packed, m_padded)
    assert m_packed["update_padding_frac"] == 0.0
    assert m_packed["update_padded_tokens"] == m_packed["update_tokens"]
    assert m_padded["update_padded_tokens"] > m_padded["update_tokens"]
    assert m_packed["update_padding_frac_if_padded"] == pytest.approx(
        m_padded["update_padding_frac"])


def test_packed_micro_batch_accumulation(tmp_path):
    """Many small packed micro-batches accumulate the gradient of one big one; two epochs of
    two mini-batches with a moving policy (the later entropy passes run on new weights)."""
    kwargs = dict(mini_batch=1, epochs=2, lr=0.5, coef=0.01)
    small, big = (_run(tmp_path, packing=True, budget=b, **kwargs) for b in (30, 4096))
    padded = _run(tmp_path, packing=False, budget=30, **kwargs)
    _, m_small = _update(small)
    _, m_big = _update(big)
    _, m_padded = _update(padded)
    assert len(small.optimizer.grads) == 2 * QUESTIONS  # 2 epochs x 1-question mini-batches
    _assert_same(small, big, m_small, m_big)
    _assert_same(small, padded, m_small, m_padded)
    for pa, pb in zip(small.model.parameters(), padded.model.parameters()):
        assert (pa - pb).abs().max() < 1e-5


def test_micro_batch_scope_keeps_in_order_split(tmp_path):
    """micro_batch scope with fraction < 1: packed micro-batches are consecutive rollouts."""
    import prefix_rft.train as train_module

    seen = []
    real = train_module.make_micro_batches

    def spy(*args, **kwargs):
        seen.append(kwargs["balanced"])
        return real(*args, **kwargs)

    run = _run(tmp_path, packing=True, budget=40, scope="micro_batch", fraction=0.2)
    train_module.make_micro_batches = spy
    try:
        _update(run)
    finally:
        train_module.make_micro_batches = real
    assert seen == [True, False]  # old-log-prob pass balanced, update in order


def test_packed_sft_update_equals_padded(tmp_path):
    padded, packed = (_run(tmp_path, packing=p, budget=40, algo="sft") for p in (False, True))
    _, m_padded = _update(padded, "sft")
    _, m_packed = _update(packed, "sft")
    _assert_same(packed, padded, m_packed, m_padded)
    assert m_packed["nll_per_token"] == pytest.approx(m_padded["nll_per_token"], rel=1e-5)


@pytest.mark.distributed
def test_fsdp2_packed_update_equals_single_process_padded(tmp_path):
    """2 CPU ranks (FSDP2, gloo), each packing its own questions, vs one process, padded."""
    import os
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    out = tmp_path / "packed_fsdp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tests.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tests / "dist_packing_worker.py"), str(out)]
    proc = run_torchrun("packing_update", cmd, env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    ref = _run(tmp_path, packing=False, budget=40, epochs=2, lr=0.5, coef=0.01)
    _, m_ref = _update(ref)
    assert len(got["grads"]) == len(ref.optimizer.grads) == 2
    for ga, gb in zip(got["grads"], ref.optimizer.grads):
        assert _max_rel_err(ga, gb) < 1e-4
    # per-rank loss is its share of the global mini-batch (x world); the rank mean is the total
    assert got["metrics"]["loss"] == pytest.approx(m_ref["loss"], rel=1e-4)
