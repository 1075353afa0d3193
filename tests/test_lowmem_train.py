"""The real training loop on CPU with the limited-GPU options: LoRA (adapter checkpoints,
exact resume, merged final save), the torchao optimizers (exact resume), optimizer offload
(== no offload, in one process and under a 2-rank FSDP2 torchrun) and FSDP2 param offload."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torchrun_timing import run_torchrun
from train_helpers import shared_assets, tiny_config

from prefix_rft.config import resolve_config, save_config, validate_config
from prefix_rft.metrics_log import read_metrics
from prefix_rft.run.checkpoint import list_checkpoints
from prefix_rft.train import train

TIMING = {"time", "tokens_per_s", "peak_mem_gb"}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def _config(assets, run_dir, lora_r=0, **overrides):
    base = dict(train__steps=3, prefix__start=1.0, prefix__end=0.95, prefix__high=1.0,
                rollout__max_response_tokens=24, train__mini_batch_size=1, checkpoint__every=0,
                model__gradient_checkpointing=False, log__plots=False)
    base.update(overrides)
    cfg = tiny_config(assets, run_dir, **base)
    if lora_r:
        cfg.model.lora.r, cfg.model.lora.alpha = lora_r, 2.0 * lora_r
    return validate_config(resolve_config(cfg))


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING and not k.endswith("_time_s")}
            for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


def _final(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def _straight_vs_resumed(assets, tmp_path, **kw):
    straight = train(_config(assets, tmp_path / "straight", **kw))
    first = train(_config(assets, tmp_path / "resumed", train__max_steps_per_run=2, **kw))
    assert first["stopped_early"] and first["steps_done"] == 2
    second = train(_config(assets, tmp_path / "resumed", checkpoint__resume="auto", **kw))
    assert second["steps_done"] == 3 and second["resumed_from"].endswith("step_000002")
    assert _rows(tmp_path / "resumed") == _rows(tmp_path / "straight")
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight


def test_lora_run_saves_adapters_resumes_exactly_and_exports_merged(tiny_assets, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    result = _straight_vs_resumed(tiny_assets, tmp_path, lora_r=4, optim__lr=5e-3)
    _, ckpt_dir = list_checkpoints(tmp_path / "resumed")[-1]
    saved = torch.load(ckpt_dir / "model.pt", weights_only=True)
    assert saved and all(".lora_" in k for k in saved)  # adapters only
    merged = AutoModelForCausalLM.from_pretrained(result["final_model_dir"], dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    ms, bs = merged.state_dict(), base.state_dict()
    assert ms.keys() == bs.keys()  # plain HF keys, no adapter names
    changed = [k for k in bs if not torch.equal(ms[k], bs[k])]
    assert changed and all("proj" in k for k in changed)  # only LoRA targets moved
    assert torch.equal(ms["model.embed_tokens.weight"], bs["model.embed_tokens.weight"])


@pytest.mark.parametrize("name", ["adamw8bit", "adamw_bf16_sr"])
def test_torchao_optimizers_resume_exactly(tiny_assets, tmp_path, name):
    pytest.importorskip("torchao")
    result = _straight_vs_resumed(tiny_assets, tmp_path, optim__name=name)
    assert result["steps_done"] == 3


def test_optimizer_offload_equals_on_device(tiny_assets, tmp_path):
    train(_config(tiny_assets, tmp_path / "plain", train__steps=2))
    train(_config(tiny_assets, tmp_path / "offload", train__steps=2, train__offload="optimizer"))
    assert _rows(tmp_path / "plain") == _rows(tmp_path / "offload")
    a, b = _final(tmp_path / "plain"), _final(tmp_path / "offload")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_offload_resumes_exactly(tiny_assets, tmp_path):
    _straight_vs_resumed(tiny_assets, tmp_path, train__offload="optimizer")


def test_param_offload_single_process_matches(tiny_assets, tmp_path):
    """FSDP2 CPUOffloadPolicy on a one-rank group: same run as no offload (fp32, CPU)."""
    train(_config(tiny_assets, tmp_path / "plain", train__steps=2))
    train(_config(tiny_assets, tmp_path / "params", train__steps=2, train__offload="params"))
    for m, s in zip(_rows(tmp_path / "params"), _rows(tmp_path / "plain")):
        assert m["reward_mean"] == s["reward_mean"]
        assert m["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4)
    a, b = _final(tmp_path / "plain"), _final(tmp_path / "params")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=k)


@pytest.mark.distributed
def test_torchrun_two_ranks_with_optimizer_offload_match_one_process(tiny_assets, tmp_path):
    """2-rank FSDP2 (gloo) with train.offload=optimizer (each rank steps its shards in host
    RAM) == one process without offload, as the plain 2-rank test."""
    over = dict(train__steps=2, loss__entropy_top_fraction=1.0, train__mini_batch_size=2)
    train(_config(tiny_assets, tmp_path / "single", **over))
    cfg = _config(tiny_assets, tmp_path / "multi", train__offload="optimizer", **over)
    save_config(cfg, tmp_path / "multi.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prefix_rft.cli", "train", "--config", str(tmp_path / "multi.yaml")]
    proc = run_torchrun("lowmem_offload", cmd, dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for m, s in zip(_rows(tmp_path / "multi"), _rows(tmp_path / "single")):
        for key in ("reward_mean", "pass_rate", "response_len_mean"):
            assert m[key] == s[key], key
        assert m["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4)
    want, got = _final(tmp_path / "single"), _final(tmp_path / "multi")
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=5e-5, msg=key)
