"""Exact resume on CPU: 4 uninterrupted steps == 2 steps, stop, resume auto, 2 more steps
(weights and every non-timing metric identical). The stop comes three ways: the
``train.max_steps_per_run`` limit, a SIGTERM during step 2, and an exception in step 3."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from train_helpers import shared_assets, tiny_config

import prefix_rft.train as train_module
from prefix_rft.metrics_log import read_metrics
from prefix_rft.run.checkpoint import list_checkpoints
from prefix_rft.train import train


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


TIMING_KEYS = {"time", "tokens_per_s", "peak_mem_gb"}


def _config(assets, run_dir, **overrides):
    base = dict(train__steps=4, prefix__start=1.0, prefix__end=0.95, prefix__high=1.0,
                rollout__max_response_tokens=24, train__mini_batch_size=1, checkpoint__every=0,
                model__gradient_checkpointing=False,
                log__plots=False)
    base.update(overrides)
    return tiny_config(assets, run_dir, **base)


def _final_state(run_dir) -> dict[str, torch.Tensor]:
    step, path = list_checkpoints(run_dir)[-1]
    assert step == 4
    return torch.load(path / "model.pt", weights_only=True)


def _comparable(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS and not k.endswith("_time_s")}
            for row in rows]


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    result = train(_config(tiny_assets, run_dir))
    assert result["steps_done"] == 4
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert any(r["adv_std"] > 0 for r in rows), (
        "no learning signal: the comparison would be vacuous")
    return _final_state(run_dir), _comparable(rows)


def _assert_same(reference, run_dir):
    ref_state, ref_rows = reference
    state = _final_state(run_dir)
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        assert torch.equal(state[key], ref_state[key]), key
    rows = _comparable(read_metrics(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows == ref_rows


def test_resume_after_max_steps_per_run(tiny_assets, tmp_path, reference):
    first = train(_config(tiny_assets, tmp_path, train__max_steps_per_run=2))
    assert first["steps_done"] == 2 and first["stopped_early"] and first["final_model_dir"] is None
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    second = train(_config(tiny_assets, tmp_path, checkpoint__resume="auto"))
    assert second["resumed_from"].endswith("step_000002") and second["steps_done"] == 4
    _assert_same(reference, tmp_path)


def test_resume_after_sigterm(tiny_assets, tmp_path, reference, monkeypatch):
    from prefix_rft.rollout.hf import HFEngine

    real_sync, calls = HFEngine.sync_from, []

    def sync_then_sigterm(engine, model):  # runs at the end of every step's update
        calls.append(1)
        real_sync(engine, model)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag

    monkeypatch.setattr(HFEngine, "sync_from", sync_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    first = train(_config(tiny_assets, tmp_path))
    assert first["steps_done"] == 2 and first["stopped_early"]
    monkeypatch.setattr(HFEngine, "sync_from", real_sync)
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    train(_config(tiny_assets, tmp_path, checkpoint__resume="auto"))
    _assert_same(reference, tmp_path)


def test_exception_saves_then_resume_matches(tiny_assets, tmp_path, reference, monkeypatch):
    real_score, calls = train_module.score, []

    def failing_score(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("verifier exploded")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(train_module, "score", failing_score)
    with pytest.raises(RuntimeError, match="verifier exploded"):
        train(_config(tiny_assets, tmp_path))
    # checkpoint.every=0, yet the failure in step 3 (before any update) saved step 2
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    monkeypatch.setattr(train_module, "score", real_score)
    train(_config(tiny_assets, tmp_path, checkpoint__resume="auto"))
    _assert_same(reference, tmp_path)
