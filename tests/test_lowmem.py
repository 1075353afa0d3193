"""LoRA (peft), the low-memory optimizers (torchao) and optimizer offload on CPU: exact
checkpoint resume, merged-weight export, offload == no offload."""

from __future__ import annotations

import copy

import pytest
import torch

from prefix_rft.run import checkpoint as ckpt
from prefix_rft.runtime.optim import make_optimizer

peft = pytest.importorskip("peft")


def tiny_qwen(dtype=torch.float32, tied=True, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=64, use_cache=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(dtype)


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 131, (2, 12), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _build(case):
    from prefix_rft.runtime.lora import apply_lora

    name, dtype, lora = case
    model = tiny_qwen(dtype)
    if lora:
        apply_lora(model, r=4, alpha=8, dropout=0.0)
    return model, make_optimizer(name, model.parameters(), lr=1e-2)


CASES = [("adamw", torch.float32, True), ("adamw", torch.float32, False),
         ("adamw8bit", torch.float32, False), ("adamw_bf16_sr", torch.bfloat16, False)]


@pytest.mark.parametrize("case", CASES, ids=["lora", "adamw", "adamw8bit", "adamw_bf16_sr"])
def test_resume_is_bit_exact(tmp_path, case):
    if case[0] != "adamw":
        pytest.importorskip("torchao")
    model, opt = _build(case)
    for s in range(2):
        _step(model, opt, s)
    ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    rng = ckpt.capture_rng_state()  # SR draws from the global generator
    cont = [_step(model, opt, s) for s in range(2, 4)]
    fresh, opt2 = _build(case)
    if case[2]:  # LoRA: the base comes from the pretrained weights, the adapters from the ckpt
        with torch.no_grad():
            for (_n, p), (_, q) in zip(fresh.named_parameters(), model.named_parameters()):
                if not p.requires_grad:
                    p.copy_(q)
    ckpt.load_checkpoint(ckpt.find_latest(tmp_path), model=fresh, optimizer=opt2)
    ckpt.restore_rng_state(rng)
    again = [_step(fresh, opt2, s) for s in range(2, 4)]
    assert all(torch.equal(a, b) for a, b in zip(cont, again))
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_lora_trains_only_adapters_and_merges():
    from prefix_rft.runtime.lora import apply_lora, merge_lora_state, scalings

    model = tiny_qwen()
    ids = torch.randint(0, 131, (2, 10))
    before = model(input_ids=ids).logits
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    assert torch.allclose(model(input_ids=ids).logits, before)  # B = 0 at init
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert model.lm_head.weight.requires_grad is False
    opt = make_optimizer("adamw", model.parameters(), lr=5e-2)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    for s in range(3):
        _step(model, opt, s)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    merged = merge_lora_state(model.state_dict(), scalings(model))
    plain = tiny_qwen(seed=1)
    plain.load_state_dict(merged)  # strict: exactly the plain model's keys
    from prefix_rft.runtime.distributed import gather_merged_state_dict

    synced = gather_merged_state_dict(model, rank0_only=False)  # what vLLM's sync receives
    assert synced.keys() == merged.keys()
    assert all(torch.equal(synced[k], merged[k]) for k in merged)
    after = model(input_ids=ids).logits
    assert not torch.allclose(after, before)
    torch.testing.assert_close(plain(input_ids=ids).logits, after, rtol=1e-5, atol=1e-5)


def test_lora_rejects_bad_settings():
    from prefix_rft.runtime.lora import apply_lora

    with pytest.raises(ValueError, match="model.lora.r"):
        apply_lora(tiny_qwen(), r=0, alpha=8)
    with pytest.raises(ValueError, match="matched no module|target"):
        apply_lora(tiny_qwen(), r=4, alpha=8, target_modules=("nope",))


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_host_optimizer_equals_on_device(name):
    if name != "adamw":
        pytest.importorskip("torchao")
    from prefix_rft.runtime.offload import HostOptimizer

    a = tiny_qwen()
    b = copy.deepcopy(a)
    opt_a = make_optimizer(name, a.parameters(), lr=1e-2)
    opt_b = HostOptimizer(b.parameters(), lambda ps: make_optimizer(name, ps, lr=1e-2))
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1 / (k + 1)) for o in (opt_a, opt_b)]
    for s in range(3):
        assert torch.equal(_step(a, opt_a, s), _step(b, opt_b, s))
        for sc in sched:
            sc.step()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
