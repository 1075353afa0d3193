"""The policy update never materializes a [tokens x vocab] tensor.

Two independent checks on the trainer's own functions (``old_logprobs`` and ``policy_update``
from prefix_rft.train, the ones the loop calls): ``lm_head.forward`` is replaced by a function that
fails (so the model's own logits are never computed), and a ``TorchDispatchMode`` records the
size of every tensor produced by every op, forward and backward. A full-logits update would
produce ``[N_response, V]`` (and bigger) tensors; the fused path's largest tensor stays below
that. The vocabulary (20,011) is larger than the chunked kernel's vocab tile (8,192) so the
tile itself is smaller than a full row block. A control run through ``model(...).logits``
shows the tracker does catch the full-logits tensor: there, tensors of shape
``[B, T, V]`` appear, while the fused update only ever has the ``[V, H]`` weight-shaped ones.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from prefix_rft.config import Config, resolve_config, validate_config
from prefix_rft.loss import PrefixRFTLoss
from prefix_rft.run.setup import Run, build_optimizer
from prefix_rft.train import old_logprobs, policy_update
from prefix_rft.update import Rollout

VOCAB, HIDDEN = 20_011, 32


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (numel, shape, op) any op outputs while active, and every
    output shape that has a dimension of size VOCAB (with the op that made it)."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape, self.op = 0, None, None
        self.vocab_shapes: dict[tuple[int, ...], str] = {}
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if t.numel() > self.numel:
                self.numel, self.shape, self.op = t.numel(), tuple(t.shape), str(func)
            if VOCAB in t.shape:
                self.vocab_shapes.setdefault(tuple(t.shape), str(func))
        return out


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _config() -> Config:
    cfg = Config()
    cfg.rollout.group_size = 4
    cfg.rollout.max_response_tokens = 40
    cfg.train.prompts_per_step = 2
    cfg.train.mini_batch_size = 1
    cfg.train.micro_batch_tokens = 160  # several micro-batches per mini-batch
    cfg.loss.kernel_impl = "torch"
    return validate_config(resolve_config(cfg))


def _rollouts(g: torch.Generator) -> list[Rollout]:
    rollouts = []
    for i in range(8):
        prompt = torch.randint(0, VOCAB, (10 + i,), generator=g).tolist()
        response = torch.randint(0, VOCAB, (30 + i % 3,), generator=g).tolist()
        prefix_len = 12 if i % 4 == 0 else 0
        rollouts.append(Rollout(prompt_ids=prompt, response_ids=response, prefix_len=prefix_len,
                                group=i // 4, is_prefixed=i % 4 == 0, advantage=(-1.0) ** i * 0.5,
                                engine_logprobs=[0.0] * (len(response) - prefix_len)))
    return rollouts


@pytest.mark.parametrize("head_path", ["autograd", "fused_loss"])
def test_update_never_builds_token_by_vocab_tensors(head_path):
    """autograd: only [V, H]-shaped tensors span the vocabulary. fused_loss (the gradient in
    the head's forward): also [C, V] rows of one token chunk, C bounded by the chunk budget
    (1 MiB here: 13 rows) -- never all of a micro-batch's tokens."""
    cfg, model = _config(), _model()
    cfg.train.head_path, cfg.train.head_chunk_mb = head_path, 1
    chunk = 2**20 // (4 * VOCAB)
    rollouts = _rollouts(torch.Generator().manual_seed(1))
    n_response = sum(len(r.response_ids) for r in rollouts)
    loss_fn = PrefixRFTLoss(max_response_tokens=40, impl="torch", entropy_top_fraction=0.2)
    optimizer, scheduler = build_optimizer(cfg, model)
    before = model.lm_head.weight.detach().clone()

    def no_logits(*args, **kwargs):
        raise AssertionError("lm_head.forward was called: the update computed full logits")

    model.lm_head.forward = no_logits
    run = Run(cfg=cfg, model=model, tokenizer=None, engine=None, optimizer=optimizer,
              scheduler=scheduler, loss_fn=loss_fn, dataset=None, sampler=None,
              device=torch.device("cpu"), rank=0, world=1, run_dir=None, pad_id=0)
    tracker = LargestTensor()
    with tracker:
        old_logprobs(run, rollouts)
        metrics = policy_update(run, rollouts)
    # Only the lm_head weight itself (its grad, Adam moments, update temporaries) spans the
    # vocabulary; the kernel works on [token chunk, vocab chunk <= 8192] tiles.
    chunks = {s for s in tracker.vocab_shapes if s not in ((VOCAB, HIDDEN), (HIDDEN, VOCAB))}
    if head_path == "autograd":
        assert set(tracker.vocab_shapes) == {(VOCAB, HIDDEN)}, tracker.vocab_shapes
    else:  # chunk rows [c, V] and their transposed views [V, c]
        assert chunks and all(len(s) == 2 and sorted(s)[0] <= chunk for s in chunks), \
            tracker.vocab_shapes
    assert metrics["head_path_fused"] == float(head_path == "fused_loss")
    assert any("silu_backward" in op for op in tracker.ops)  # the backward pass was watched too
    assert tracker.numel < n_response * VOCAB, (tracker.shape, tracker.op)
    # the update did happen, through the lm_head weight too
    assert metrics["grad_norm"] > 0 and not torch.equal(before, model.lm_head.weight.detach())


def test_tracker_catches_the_full_logits_path():
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 40))
    tracker = LargestTensor()
    with tracker:
        logits = model(input_ids=ids).logits
        torch.log_softmax(logits.float(), -1).mean().backward()
    assert tracker.numel >= 2 * 40 * VOCAB, tracker.shape
    assert (2, 40, VOCAB) in tracker.vocab_shapes


def test_lm_head_hook_catches_the_full_logits_path():
    model = _model()
    model.lm_head.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("logits"))
    with pytest.raises(AssertionError, match="logits"):
        model(input_ids=torch.randint(0, VOCAB, (1, 8)))


def test_train_step_benchmark_paths_compute_the_same_loss():
    """benchmarks/train_step.py times two paths to one loss: check they agree (fp32, CPU)."""
    from benchmarks.train_step import SHAPES, build_model, loss_of, make_inputs

    model = build_model("smoke", "cpu", checkpointing=False)
    x, P, T = make_inputs(SHAPES["smoke"][5], 4, 24, "cpu")
    fused = loss_of(model, "fused", x, P, T, "torch")
    full = loss_of(model, "full_logits", x, P, T, "torch")
    assert torch.isfinite(fused) and fused.item() != 0.0
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-6)
    fused.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full.backward()
    for g, p in zip(fused_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
