"""The engine registry is the only list of engine names: a registered engine is accepted by the
config and by `prefix-rft eval --engine`, and the training loop builds, enters, syncs and closes
it through the interface alone (no engine name in train.py or evaluate.py)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
from train_helpers import shared_assets, tiny_config

from prefix_rft import rollout
from prefix_rft.config import load_config
from prefix_rft.rollout.hf import HFEngine

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


class RecordingEngine(HFEngine):
    """The HF engine plus a log of every interface call the loop makes."""

    name = "recording"
    calls: list[str] = []

    @classmethod
    def from_config(cls, cfg, model, tokenizer, *, device, rank):
        cls.calls.append("from_config")
        return super().from_config(cfg, model, tokenizer, device=device, rank=rank)

    @contextlib.contextmanager
    def generation_context(self, model):
        self.calls.append("generation_context")
        with super().generation_context(model):
            yield

    def generate(self, requests):
        self.calls.append("generate")
        return super().generate(requests)

    def sync_from(self, model):
        self.calls.append("sync_from")

    def close(self):
        self.calls.append("close")


@pytest.fixture
def recording_engine(monkeypatch):
    monkeypatch.setitem(rollout.ENGINES, "recording", RecordingEngine)
    RecordingEngine.calls = []
    return RecordingEngine


def test_registry_lists_the_built_in_engines_and_resolves_them_lazily():
    assert rollout.engine_names()[:2] == ("hf", "vllm")
    assert rollout.DEFAULT_ENGINE in rollout.engine_names()
    assert rollout.engine_class("hf") is HFEngine
    assert rollout.engine_class("vllm").__name__ == "VLLMEngine"  # vllm itself not imported
    with pytest.raises(ValueError, match="engine name must be one of hf|vllm, got 'nope'"):
        rollout.engine_class("nope")


def test_register_engine_checks_its_arguments(monkeypatch):
    monkeypatch.setattr(rollout, "ENGINES", dict(rollout.ENGINES))
    rollout.register_engine("lazy", "some.module:Engine")
    assert "lazy" in rollout.engine_names()
    with pytest.raises(ValueError, match="engine must be"):
        rollout.register_engine("bad", object)
    with pytest.raises(ValueError, match="engine must be"):
        rollout.register_engine("bad", "no_colon")
    with pytest.raises(ValueError, match="name must be"):
        rollout.register_engine("", HFEngine)


def test_config_and_eval_cli_accept_a_registered_engine(recording_engine):
    assert load_config(None, ["--rollout.engine=recording"]).rollout.engine == "recording"
    from prefix_rft.evaluate import build_parser

    args = build_parser().parse_args(["--model", "m", "--data", "d.jsonl", "--engine", "recording"])
    assert args.engine == "recording"


def test_unregistered_engine_is_rejected_everywhere():
    with pytest.raises(ValueError, match="rollout.engine must be one of"):
        load_config(None, ["--rollout.engine=recording"])
    from prefix_rft.evaluate import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--data", "d.jsonl", "--engine", "recording"])


def test_loop_uses_a_registered_engine_through_the_interface(recording_engine, tiny_assets,
                                                              tmp_path):
    from prefix_rft.train import train

    cfg = tiny_config(tiny_assets, tmp_path, train__steps=1, rollout__engine="recording",
                      checkpoint__save_final=False, log__plots=False)
    result = train(cfg)
    assert result["steps_done"] == 1
    calls = recording_engine.calls
    assert calls[0] == "from_config" and calls[-1] == "close"
    assert calls[1:4] == ["generation_context", "generate", "sync_from"]


def test_no_engine_name_in_the_loop_or_evaluate():
    names = "|".join(rollout.engine_names())
    for path in ("prefix_rft/train.py", "prefix_rft/evaluate.py", "prefix_rft/run/setup.py"):
        text = (ROOT / path).read_text()
        assert not re.search(rf"""["']({names})["']""", text), path
        assert "engine.name" not in text, path
