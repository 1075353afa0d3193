"""prefix_rft.run.checkpoint: atomic save, keep-last-K, exact RNG / optimizer / scheduler
restore, resume resolution, signal flag, final HF directory."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from prefix_rft.run import checkpoint as C


def _tiny_qwen(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=32)
    return Qwen2ForCausalLM(config)


def _train_objects(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler):
    x = torch.randn(4, 6)  # consumes the global torch RNG, like dropout/sampling would
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def test_rng_restore_repeats_draws():
    state = C.capture_rng_state()
    first = _draws()
    _draws()
    C.restore_rng_state(state)
    assert _draws() == first


def test_round_trip_continues_training_identically(tmp_path):
    """2 steps, save, 2 more steps == 2 steps, save, load into fresh objects, 2 more steps."""
    model, opt, sched = _train_objects()
    for _ in range(2):
        _train_step(model, opt, sched)
    C.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched,
                      sampler_state={"epoch": 1, "position": 7}, extra={"reward": 0.5})
    expected_losses = [_train_step(model, opt, sched) for _ in range(2)]

    model2, opt2, sched2 = _train_objects(seed=123)  # different init: all must come from disk
    torch.manual_seed(999)  # different RNG: must be restored too
    meta = C.load_checkpoint(C.find_latest(tmp_path), model=model2, optimizer=opt2,
                             scheduler=sched2)
    assert meta["step"] == 2 and meta["sampler"] == {"epoch": 1, "position": 7}
    assert meta["extra"] == {"reward": 0.5}
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == pytest.approx(0.05 / 3)
    assert [_train_step(model2, opt2, sched2) for _ in range(2)] == expected_losses
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _train_objects()
    C.save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, opt, sched)

    real_save = torch.save
    calls = []

    def dying_save(obj, path, *args, **kwargs):
        calls.append(str(getattr(path, "name", path)))  # a path or an open file
        if calls[-1].endswith("optimizer.pt"):  # die after the model file is written
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    monkeypatch.setattr(torch, "save", real_save)
    assert any(c.endswith("model.pt") for c in calls)  # the crash really was mid-write
    assert C.find_latest(tmp_path).name == "step_000001"
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [1]

    fresh, fresh_opt, _ = _train_objects(seed=5)
    C.load_checkpoint(C.find_latest(tmp_path), model=fresh, optimizer=fresh_opt)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key])
    # the next save cleans the leftover temporary directory
    C.save_checkpoint(tmp_path, 3, model=model)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_keep_last_k(tmp_path):
    model, _, _ = _train_objects()
    for step in (5, 10, 15, 20):
        C.save_checkpoint(tmp_path, step, model=model, keep_last=2)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [15, 20]
    C.save_checkpoint(tmp_path, 25, model=model, keep_last=0)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [15, 20, 25]


def test_resolve_resume(tmp_path):
    assert C.resolve_resume("none", tmp_path) is None
    assert C.resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    model, _, _ = _train_objects()
    C.save_checkpoint(tmp_path, 3, model=model)
    C.save_checkpoint(tmp_path, 12, model=model)
    latest = tmp_path / "checkpoints" / "step_000012"
    assert C.resolve_resume("auto", tmp_path) == latest
    assert C.resolve_resume(str(tmp_path), tmp_path / "other") == latest
    first = tmp_path / "checkpoints" / "step_000003"
    assert C.resolve_resume(str(first), tmp_path) == first
    with pytest.raises(ValueError, match="checkpoint.resume"):
        C.resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_bad_arguments(tmp_path):
    model, _, _ = _train_objects()
    with pytest.raises(ValueError, match="keep_last"):
        C.save_checkpoint(tmp_path, 1, model=model, keep_last=-1)
    with pytest.raises(TypeError):  # not JSON: fails before anything is written
        C.save_checkpoint(tmp_path, 1, model=model, extra={"x": object()})
    assert C.find_latest(tmp_path) is None
    with pytest.raises(ValueError, match="checkpoint directory"):
        C.load_checkpoint(tmp_path, model=model)


def test_signal_sets_flag_instead_of_exiting():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        flag = C.install_signal_handlers()
        assert not C.stop_requested(flag)
        os.kill(os.getpid(), signal.SIGTERM)
        assert C.stop_requested(flag) and flag.signals == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):  # second Ctrl-C: really stop
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_save_hf_model_loads_with_from_pretrained(tmp_path):
    from test_data import make_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _tiny_qwen()
    tokenizer = make_tokenizer()
    out = C.save_hf_model(model, tokenizer, tmp_path / "final")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded_tok("2+3=5")["input_ids"] == tokenizer("2+3=5")["input_ids"]
    assert reloaded_tok.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert not list(tmp_path.glob(".tmp-*"))
    half = C.save_hf_model(model, None, tmp_path / "final_bf16", dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(half, dtype=torch.bfloat16)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16)), key
