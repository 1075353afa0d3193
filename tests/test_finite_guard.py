"""Never train on, save or resume from NaN: a poisoned run stops with a clear error, its last
good checkpoint survives (keep_last=1) and resumes; bad optimizer steps are skipped and
counted; non-finite advantages are zeroed or stop the run; NaN weights are refused at load."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from train_helpers import shared_assets, tiny_config

import prefix_rft.train as train_module
from prefix_rft.errors import NonFiniteError
from prefix_rft.metrics_log import MetricsLogger, read_metrics
from prefix_rft.run.checkpoint import list_checkpoints
from prefix_rft.train import train


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def _config(assets, run_dir, **overrides):
    base = dict(train__steps=3, train__mini_batch_size=1, checkpoint__every=1,
                checkpoint__keep_last=1, model__gradient_checkpointing=False, log__plots=False)
    base.update(overrides)
    return tiny_config(assets, run_dir, **base)


def _poison_weights_at(monkeypatch, step: int) -> list:
    """NaN into one weight when step ``step`` (1-based) scores its rollouts (before its
    update): the rollout of that step ran on good weights, its update sees NaN."""
    runs, calls = [], []
    real_start, real_score = train_module.start_run, train_module.score

    def start_run(cfg):
        runs.append(real_start(cfg))
        return runs[-1]

    def score(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            with torch.no_grad():
                next(runs[-1].model.parameters()).fill_(float("nan"))
        return real_score(*args, **kwargs)

    monkeypatch.setattr(train_module, "start_run", start_run)
    monkeypatch.setattr(train_module, "score", score)
    return runs


def test_poisoned_run_keeps_last_good_checkpoint_and_resumes(tiny_assets, tmp_path, monkeypatch,
                                                              capsys):
    _poison_weights_at(monkeypatch, 2)
    with pytest.raises(NonFiniteError, match=r"refusing to save checkpoint step_000002 .*"
                                             r"non-finite weights in model\.embed_tokens"):
        train(_config(tiny_assets, tmp_path))
    out = capsys.readouterr().out
    assert "step 2: skipped the optimizer step: loss nan in micro-batch 0" in out
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]  # keep_last=1, yet step 1 survives
    assert not any(p.name.startswith("crash-") for p in tmp_path.iterdir())
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert math.isnan(rows[1]["loss"]) and rows[1]["skipped_steps"] == 2  # visible, not null
    assert rows[0]["skipped_steps"] == 0
    monkeypatch.undo()
    result = train(_config(tiny_assets, tmp_path, checkpoint__resume="auto"))
    assert result["resumed_from"].endswith("step_000001") and result["steps_done"] == 3
    state = torch.load(list_checkpoints(tmp_path)[-1][1] / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_consecutive_bad_steps_stop_the_run(tiny_assets, tmp_path, monkeypatch):
    _poison_weights_at(monkeypatch, 2)
    # 2 questions per step, 1 per optimizer step: step 2 has 2 bad optimizer steps in a row
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row had a non-finite "
                                             r"loss.*train\.max_bad_steps"):
        train(_config(tiny_assets, tmp_path, train__max_bad_steps=2))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


def _poison_advantages_at(monkeypatch, *steps: int) -> None:
    real, calls = train_module.rollout_advantages, []

    def rollout_advantages(*args, **kwargs):
        calls.append(1)
        adv, prefix_adv = real(*args, **kwargs)
        if len(calls) in steps:
            adv = adv.clone()
            adv[0] = float("nan")
            adv[1] = float("inf")
        return adv, prefix_adv

    monkeypatch.setattr(train_module, "rollout_advantages", rollout_advantages)


def test_non_finite_advantages_are_zeroed_and_counted(tiny_assets, tmp_path, monkeypatch,
                                                      capsys):
    _poison_advantages_at(monkeypatch, 2, 3)
    result = train(_config(tiny_assets, tmp_path, train__steps=3))
    assert result["steps_done"] == 3
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["non_finite_advantages"] for r in rows] == [0, 2, 2]
    assert all(r["skipped_steps"] == 0 and math.isfinite(r["loss"]) for r in rows)
    # zeroing is not silent: one line, the first time only, naming the way to stop instead
    notices = [line for line in capsys.readouterr().out.splitlines() if "non-finite" in line]
    assert len(notices) == 1, notices
    assert "step 2: 2 non-finite advantages set to 0" in notices[0]
    assert "reward.non_finite: error" in notices[0]


def test_progress_bar_shows_the_steps_non_finite_count(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=2, progress=True)
    logger.log(1, {"reward_mean": 0.5, "non_finite_rewards": 0, "non_finite_advantages": 0})
    logger.log(2, {"reward_mean": 0.5, "non_finite_rewards": 1, "non_finite_advantages": 2})
    logger.close()
    bar = capsys.readouterr().err
    assert "non-finite=3" in bar and "non-finite=0" not in bar


def test_non_finite_advantages_can_stop_the_run(tiny_assets, tmp_path, monkeypatch):
    _poison_advantages_at(monkeypatch, 2)
    with pytest.raises(NonFiniteError, match=r"step 2: 2 non-finite advantages.*reward\."
                                             r"non_finite"):
        train(_config(tiny_assets, tmp_path, reward__non_finite="error"))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


def test_nan_weights_in_model_path_are_refused(tiny_assets, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], model_dir)
    weights = load_file(model_dir / "model.safetensors")
    name = sorted(weights)[-1]
    weights[name].view(-1)[3] = float("inf")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"^model.path '.*model' .*non-finite weights in "
                                             r".*\(0 NaN, 1 Inf\)"):
        train(_config(tiny_assets, tmp_path / "run", model__path=str(model_dir)))
    assert not list_checkpoints(tmp_path / "run")
