"""The prefix-guided family through the training loop on CPU: ``prefix.when: on_failure``,
``train_on_prefix: false``, ``source: self`` and the ``step`` schedule, together and each
alone, and their exact resume: 4 uninterrupted steps == 2 steps, stop, resume, 2 more
(weights, every non-timing metric and the ``self`` store's content identical).

Two questions, both in every step, so questions come back and can use their stored responses.
The tiny model solves nothing, so the reward is replaced by a deterministic rule on the
response text (about one response in four is "correct"): groups then both fail and succeed,
the store fills, and the test checks that it did (otherwise the comparison would be vacuous).
"""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import shared_assets, tiny_config

import prefix_rft.reward as reward_module
from prefix_rft.metrics_log import read_metrics
from prefix_rft.prefix_store import SelfPrefixStore
from prefix_rft.reward import RewardStats
from prefix_rft.run.checkpoint import list_checkpoints
from prefix_rft.train import train

TIMING_KEYS = {"time", "tokens_per_s", "peak_mem_gb"}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


@pytest.fixture
def rule_reward(monkeypatch):
    def fake(responses, golds, **_):
        stats = RewardStats()
        stats.total = len(responses)
        return [1.0 if sum(map(ord, text)) % 4 == 0 else 0.0 for text in responses], stats
    monkeypatch.setattr(reward_module, "math_rewards", fake)


# Every family option at once; OPTIONS_ALONE keeps one of them and today's defaults for the rest.
ALL_OPTIONS = dict(prefix__schedule="step", prefix__start=0.5, prefix__end=0.25,
                   prefix__decay_steps=2, prefix__when="on_failure",
                   prefix__train_on_prefix=False, prefix__source="self")
DEFAULTS = dict(prefix__schedule="cosine", prefix__when="always", prefix__train_on_prefix=True,
                prefix__source="demonstration")
OPTIONS_ALONE = {
    "when_on_failure": dict(DEFAULTS, prefix__when="on_failure"),
    "untrained_prefix": dict(DEFAULTS, prefix__train_on_prefix=False),
    "source_self": dict(DEFAULTS, prefix__source="self"),
    "step_schedule": dict(DEFAULTS, prefix__schedule="step", prefix__start=0.5,
                          prefix__end=0.25, prefix__decay_steps=2),
}


def _config(assets, run_dir, **overrides):
    base = dict(train__steps=4, rollout__max_response_tokens=24, train__mini_batch_size=1,
                checkpoint__every=0, data__max_rows=2, model__gradient_checkpointing=False,
                log__plots=False, **ALL_OPTIONS)
    base.update(overrides)
    return tiny_config(assets, run_dir, **base)


def _assert_resume_exact(assets, tmp_path, ref_state, ref_store, ref_rows, **overrides):
    resumed = tmp_path / "resumed"
    first = train(_config(assets, resumed, train__max_steps_per_run=2, **overrides))
    assert first["stopped_early"] and first["steps_done"] == 2
    train(_config(assets, resumed, checkpoint__resume="auto", **overrides))
    state, store, rows = _final(resumed)
    assert store == ref_store
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows == ref_rows
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        assert torch.equal(state[key], ref_state[key]), key


def _final(run_dir):
    step, path = list_checkpoints(run_dir)[-1]
    assert step == 4
    assert "prefix_store" not in json.loads((path / "state.json").read_text())["extra"]
    store = {}  # prefix_store.pt is written only for ``source: self``
    if (path / "prefix_store.pt").is_file():
        loaded = SelfPrefixStore(capacity=4)
        loaded.load_state_dict(torch.load(path / "prefix_store.pt", weights_only=True))
        store = loaded.as_dict()
    rows = [{k: v for k, v in row.items() if k not in TIMING_KEYS and not k.endswith("_time_s")}
            for row in read_metrics(run_dir / "metrics.jsonl")]
    return torch.load(path / "model.pt", weights_only=True), store, rows


@pytest.mark.parametrize("packing", [True, False])
def test_family_options_train_and_resume_exactly(tiny_assets, tmp_path, packing, rule_reward):
    reference = tmp_path / "reference"
    train(_config(tiny_assets, reference, train__packing=packing))
    ref_state, ref_store, ref_rows = _final(reference)
    # not vacuous: some questions failed and got a prefix, some did not; the store filled
    fracs = [row["prefix_question_frac"] for row in ref_rows]
    assert 0 < sum(fracs) < len(fracs), fracs
    assert ref_store and ref_rows[-1]["self_store_size"] > 0
    assert any(row["prefix_self_frac"] > 0 for row in ref_rows)  # a stored prefix was used
    assert all(len(e) <= 4 for e in ref_store.values())

    _assert_resume_exact(tiny_assets, tmp_path, ref_state, ref_store, ref_rows,
                         train__packing=packing)


@pytest.mark.parametrize("option", sorted(OPTIONS_ALONE))
def test_each_family_option_alone_resumes_exactly(tiny_assets, tmp_path, option, rule_reward):
    """One option at a time (packed path; the padded one is covered above with all of them):
    an option whose resume depends on state another option also restores (the ``self`` store,
    the schedule's step) is not hidden behind it."""
    overrides = OPTIONS_ALONE[option]
    reference = tmp_path / "reference"
    train(_config(tiny_assets, reference, **overrides))
    ref_state, ref_store, ref_rows = _final(reference)
    fracs = [row["prefix_question_frac"] for row in ref_rows]
    if option == "when_on_failure":  # some questions got a prefix, some did not
        assert 0 < sum(fracs) < len(fracs), fracs
    if option == "source_self":  # the store filled and a stored prefix was used
        assert ref_store and any(row["prefix_self_frac"] > 0 for row in ref_rows)
    else:
        assert not ref_store
    _assert_resume_exact(tiny_assets, tmp_path, ref_state, ref_store, ref_rows, **overrides)


@pytest.mark.distributed
def test_family_options_under_torchrun_match_one_process(tiny_assets, tmp_path):
    """``on_failure`` (a second engine call inside FSDP2's gather on every rank),
    ``train_on_prefix: false`` and ``source: self`` (the store's additions gathered from both
    ranks) under ``torchrun --nproc_per_node 2`` (FSDP2, gloo) equal one process: same
    rewards, prefix shares, loss and weights. The real reward runs here (the subprocesses
    cannot see a monkeypatch): the tiny model solves nothing alone, so every question fails and
    gets a near-whole demonstration prefix, which does solve it; so neither a rank without a
    failing question nor a non-empty store is exercised here (the store's content and resume
    are checked in one process above)."""
    import os
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from torchrun_timing import run_torchrun

    from prefix_rft.config import save_config

    overrides = dict(train__steps=2, rollout__max_response_tokens=24, prefix__start=1.0,
                     prefix__end=0.95, prefix__high=1.0, loss__entropy_top_fraction=1.0,
                     prefix__when="on_failure", prefix__train_on_prefix=False,
                     prefix__source="self", log__plots=False, checkpoint__every=0)
    single = train(tiny_config(tiny_assets, tmp_path / "single", **overrides))
    save_config(tiny_config(tiny_assets, tmp_path / "multi", **overrides),
                tmp_path / "multi.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prefix_rft.cli", "train", "--config", str(tmp_path / "multi.yaml")]
    proc = run_torchrun("family_loop", cmd, env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    multi_rows = read_metrics(tmp_path / "multi" / "metrics.jsonl")
    single_rows = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert len(multi_rows) == len(single_rows) == 2
    assert any(row["prefix_question_frac"] > 0 for row in single_rows)
    for m, s in zip(multi_rows, single_rows):
        for key in ("reward_mean", "reward_hybrid", "pass_rate", "prefix_question_frac",
                    "self_store_size"):
            assert m[key] == s[key], key
        assert m["loss"] == pytest.approx(s["loss"], rel=1e-4, abs=1e-7)
    got = load_file(str(tmp_path / "multi" / "final" / "model.safetensors"))
    want = load_file(str(Path(single["final_model_dir"]) / "model.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=5e-5, msg=key)
