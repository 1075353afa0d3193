"""The trainer skips the old-log-prob pass when the update is exactly on-policy (one optimizer
step per rollout batch): same weights after the step as with the pass, mismatch still logged."""

from __future__ import annotations

import pytest
import torch
from train_helpers import shared_assets, tiny_config

import prefix_rft.train as T
from prefix_rft.run.setup import start_run


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def test_is_exactly_on_policy(tiny_assets, tmp_path):
    assert T.is_exactly_on_policy(tiny_config(tiny_assets, tmp_path))
    assert not T.is_exactly_on_policy(tiny_config(tiny_assets, tmp_path, train__ppo_epochs=2))
    assert not T.is_exactly_on_policy(tiny_config(tiny_assets, tmp_path, train__mini_batch_size=1))
    assert not T.is_exactly_on_policy(
        tiny_config(tiny_assets, tmp_path, loss__entropy_mask_scope="mini_batch"))
    assert not T.is_exactly_on_policy(tiny_config(tiny_assets, tmp_path, loss__algo="sft"))


def _one_step(cfg, monkeypatch, on_policy: bool):
    calls = []
    monkeypatch.setattr(T, "is_exactly_on_policy", lambda c: on_policy)
    real_old = T.old_logprobs
    monkeypatch.setattr(T, "old_logprobs", lambda run, rows: calls.append(1) or real_old(run, rows))
    run = start_run(cfg)
    metrics = T.train_step(run, 0)
    weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    return metrics, weights, len(calls)


def test_skipping_the_old_pass_gives_the_same_update(tiny_assets, tmp_path, monkeypatch):
    m_skip, w_skip, calls_skip = _one_step(tiny_config(tiny_assets, tmp_path / "a"), monkeypatch,
                                           True)
    m_old, w_old, calls_old = _one_step(tiny_config(tiny_assets, tmp_path / "b"), monkeypatch,
                                        False)
    assert (calls_skip, calls_old) == (0, 1)
    assert m_skip["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m_skip["mismatch_mean"] == pytest.approx(m_old["mismatch_mean"], rel=1e-4, abs=1e-6)
    assert m_skip["loss"] == pytest.approx(m_old["loss"], rel=1e-4, abs=1e-7)
    for name, w in w_old.items():
        assert torch.allclose(w_skip[name], w, atol=1e-6), name
