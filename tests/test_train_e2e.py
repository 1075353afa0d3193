"""End-to-end training runs of a micro Qwen2 on CPU: Prefix-RFT with the HF and the vLLM engine
(3 steps each), SFT and RFT (1 step), bad configs and bad data rows."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torchrun_timing import run_torchrun
from train_helpers import shared_assets, tiny_config

from prefix_rft.data import read_rows
from prefix_rft.metrics_log import read_metrics
from prefix_rft.train import train


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


# The metrics logged each step (docs/design.md, section 2), as metrics.jsonl keys.
STEP_METRICS = [
    "reward_mean", "reward_on_policy", "reward_hybrid", "pass_rate", "adv_mean", "adv_std",
    "adv_min", "adv_max", "prefix_low", "prefix_ratio_mean", "prefix_token_frac",
    "kept_prefix_token_frac", "kept_prefix_frac", "entropy_prefix", "entropy_continuation",
    "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "response_len_mean", "grad_norm",
    "tokens_per_s", "rollout_time_s", "update_time_s", "peak_mem_gb", "mismatch_mean",
    "mismatch_max", "loss", "lr",
]
PLOTS = ["reward", "pass_rate", "entropy", "prefix_ratio", "response_length", "clip_fraction",
         "tokens_per_s"]


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _prefix_rft_config(assets, run_dir, **overrides):
    # Prefix ratios in [0.95, 1]: hybrids start from (almost) the whole demonstration, so they
    # usually carry the boxed answer and the groups have non-zero advantages for a random model.
    # train.mini_batch_size 1: 2 optimizer steps per step, so ratios move off 1
    base = dict(prefix__start=1.0, prefix__end=0.95, prefix__high=1.0,
                rollout__max_response_tokens=40, train__mini_batch_size=1)
    base.update(overrides)
    return tiny_config(assets, run_dir, **base)


def _check_run(result, run_dir: Path, steps: int, initial: dict[str, torch.Tensor]):
    assert result["steps_done"] == steps and not result["stopped_early"]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        missing = [k for k in STEP_METRICS if k not in row]
        assert not missing, f"metrics.jsonl lacks {missing}"
        for key in STEP_METRICS:
            if key != "reward_hybrid":
                assert row[key] is not None and math.isfinite(row[key]), (key, row[key])
        assert 0.95 <= row["prefix_low"] <= 1.0
        assert 0 < row["prefix_token_frac"] < 1
        assert row["kept_prefix_token_frac"] <= row["prefix_token_frac"]
        assert row["tokens_per_s"] > 0 and row["update_time_s"] > 0
    assert any(r["adv_std"] > 0 for r in rows), (
        "no step had a non-zero advantage; the test is vacuous")
    assert any(r["grad_norm"] > 0 for r in rows)
    final = _weights(result["final_model_dir"])  # loads with from_pretrained
    changed = [k for k in initial if not torch.equal(initial[k], final[k])]
    assert changed, "training did not change any weight"
    assert (run_dir / "config.yaml").is_file()
    return rows


def test_prefix_rft_three_steps_hf_engine(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _prefix_rft_config(tiny_assets, run_dir, log__plots=True,
                             eval__files=[tiny_assets["test"]], eval__every=2, eval__k=2,
                             eval__max_response_tokens=8,
                             log__tensorboard="true", log__progress=True)
    initial = _weights(tiny_assets["model"])
    result = train(cfg)
    rows = _check_run(result, run_dir, 3, initial)
    # periodic eval at step 2 and at the end
    assert [("eval/test/avg@2" in r) for r in rows] == [False, True, True]
    assert all(0 <= r["eval/test/pass@2"] <= 1 for r in rows[1:])
    # The HF engine samples from the live policy: its log-probs are the trainer's up to fp32 noise.
    assert all(r["mismatch_max"] < 1e-3 for r in rows)
    for name in PLOTS:
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 1000
    assert len(list((run_dir / "checkpoints").iterdir())) == 3
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_prefix_rft_three_steps_vllm_engine(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _prefix_rft_config(tiny_assets, run_dir, rollout__engine="vllm", log__plots=False)
    initial = _weights(tiny_assets["model"])
    result = train(cfg)
    rows = _check_run(result, run_dir, 3, initial)
    # vLLM samples from its own copy, synced after every step: fp32 kernels differ only slightly.
    assert all(r["mismatch_mean"] < 0.05 for r in rows), [r["mismatch_mean"] for r in rows]


def test_rft_one_step_has_no_prefixes(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path / "run", loss__algo="rft", train__steps=1,
                      log__plots=False, checkpoint__save_final=False)
    assert cfg.prefix.num_prefixed == 0
    result = train(cfg)
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert result["final_model_dir"] is None
    assert row["prefix_token_frac"] == 0 and math.isnan(row["reward_hybrid"])  # NaN, visible
    assert math.isfinite(row["loss"]) and math.isfinite(row["entropy_continuation"])


def test_sft_one_step_with_bad_rows_skipped(tiny_assets, tmp_path, capsys):
    rows = list(read_rows(tiny_assets["train"]))[:6]
    bad = [{"problem": "What is 1 + 1?", "solution": "2"},  # no answer
           {"problem": "", "solution": "x", "answer": "1"},  # no problem
           {"problem": "What is 2 + 2?", "answer": "4"}]  # no demonstration (needed by sft)
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + bad + rows[2:]))
    cfg = tiny_config(tiny_assets, tmp_path / "run", loss__algo="sft", train__steps=1,
                      log__plots=False, data__train_files=[str(data)], checkpoint__save_final=False)
    initial = _weights(tiny_assets["model"])
    result = train(cfg)
    out = capsys.readouterr().out
    assert "9 rows from 1 file(s), 6 usable" in out
    assert "no answer 1 (rows 2)" in out and "no problem 1 (rows 3)" in out
    assert "no demonstration 1 (rows 4)" in out
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["nll_per_token"] > 0 and math.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert "reward_mean" in row and "pass_rate" in row  # still rolled out for logging
    from prefix_rft.run.checkpoint import find_latest

    state = torch.load(find_latest(result["run_dir"]) / "model.pt", weights_only=True)
    assert any(not torch.equal(state[k], initial[k]) for k in initial)


def test_dataset_without_usable_rows_is_an_error(tiny_assets, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "x"}) + "\n")
    cfg = tiny_config(tiny_assets, tmp_path / "run", data__train_files=[str(data)])
    with pytest.raises(ValueError, match="data.train_files: no usable rows"):
        train(cfg)


@pytest.mark.parametrize("field,value,message", [
    ("loss__algo", "ppo", "loss.algo must be one of sft|rft|prefix_rft"),
    ("loss__clip_low", 1.5, "loss.clip_low must be a number in"),
    ("rollout__group_size", 0, "rollout.group_size must be an int >= 1"),
    ("model__path", "/nonexistent/model", "model.path .*/nonexistent/model. does not exist"),
])
def test_bad_config_values_give_one_line_errors(tiny_assets, tmp_path, field, value, message):
    cfg = tiny_config(tiny_assets, tmp_path / "run")
    section, name = field.split("__")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ValueError, match=message) as info:
        train(cfg)
    assert "\n" not in str(info.value)


@pytest.mark.distributed
def test_torchrun_two_ranks_match_one_process(tiny_assets, tmp_path):
    """The real loop under `torchrun --nproc_per_node 2` (FSDP2, gloo) for 2 steps equals one
    process on the same global batch: rollouts are seeded per global question position, so the
    rewards are identical, and the update (entropy fraction 1: no per-micro-batch mask ranking)
    gives the same gradient norm and weights."""
    import os
    import sys

    from safetensors.torch import load_file

    overrides = dict(train__steps=2, rollout__max_response_tokens=24, prefix__start=1.0,
                     prefix__end=0.95, prefix__high=1.0, loss__entropy_top_fraction=1.0,
                     log__plots=False, checkpoint__every=0)
    single = train(tiny_config(tiny_assets, tmp_path / "single", **overrides))
    cfg = tiny_config(tiny_assets, tmp_path / "multi", **overrides)
    from prefix_rft.config import save_config

    save_config(cfg, tmp_path / "multi.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prefix_rft.cli", "train", "--config", str(tmp_path / "multi.yaml")]
    proc = run_torchrun("train_loop", cmd, env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    multi_rows = read_metrics(tmp_path / "multi" / "metrics.jsonl")
    single_rows = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert len(multi_rows) == len(single_rows) == 2
    for m, s in zip(multi_rows, single_rows):
        for key in ("reward_mean", "reward_hybrid", "pass_rate", "response_len_mean", "prefix_low"):
            assert m[key] == s[key], key
        assert m["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4)
        assert m["loss"] == pytest.approx(s["loss"], rel=1e-4, abs=1e-7)
    got = load_file(str(tmp_path / "multi" / "final" / "model.safetensors"))
    want = load_file(str(Path(single["final_model_dir"]) / "model.safetensors"))
    initial = load_file(str(Path(tiny_assets["model"]) / "model.safetensors"))
    assert set(got) == set(want)
    assert max((want[k] - initial[k]).abs().max().item() for k in want) > 1e-4  # it trained
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=5e-5, msg=key)
