"""Fixtures for the trainer tests: a tiny task, tokenizer and Qwen2 model in a tmp dir.

Built with the demo builders (``prefix_rft.demo``): a byte-level BPE tokenizer trained on
the task text and a "micro" Qwen2ForCausalLM (hidden 64, 2 layers, head_dim 32) saved as a
HF directory, so the trainer loads it with ``from_pretrained`` like a real checkpoint.
Building takes about a second; the artifacts are cached per pytest session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prefix_rft.config import Config, resolve_config, validate_config


def build_assets(root: Path, num_rows: int = 16, seed: int = 0) -> dict[str, str]:
    """Write ``train.jsonl`` (flat schema), ``test.jsonl`` and ``model/`` under ``root``."""
    from prefix_rft.demo.model import build_tiny_model
    from prefix_rft.demo.task import INSTRUCTION, make_split, write_jsonl
    from prefix_rft.demo.tokenizer import build_tokenizer

    root = Path(root)
    train_rows = make_split("train", num_rows, "easy", seed)
    test_rows = make_split("test", 4, "easy", seed)
    write_jsonl(train_rows, str(root / "train.jsonl"))
    write_jsonl(test_rows, str(root / "test.jsonl"))
    build_tokenizer(train_rows + test_rows, str(root / "tokenizer"), INSTRUCTION)
    build_tiny_model(str(root / "tokenizer"), str(root / "model"), size="micro", seed=seed)
    return {"root": str(root), "model": str(root / "model"), "train": str(root / "train.jsonl"),
            "test": str(root / "test.jsonl")}


def tiny_config(assets: dict[str, str], run_dir: Path, **overrides) -> Config:
    """A CPU config small enough for a test: 2 questions x 4 rollouts, 12-token responses.

    ``overrides`` are dotted keys with ``__`` for the dot, e.g. ``loss__algo="sft"``.
    """
    cfg = Config()
    cfg.model.path = assets["model"]
    cfg.data.train_files = [assets["train"]]
    cfg.data.max_prompt_tokens = 256
    cfg.rollout.group_size = 4
    cfg.rollout.max_response_tokens = 12
    cfg.prefix.num_prefixed = 1
    cfg.train.steps = 3
    cfg.train.prompts_per_step = 2
    cfg.train.micro_batch_tokens = 256
    cfg.train.device = "cpu"
    cfg.train.run_dir = str(run_dir)
    cfg.optim.lr = 1e-3  # large, so that a few steps visibly move the weights
    cfg.loss.kernel_impl = "torch"
    cfg.log.progress = False
    cfg.log.tensorboard = "false"
    cfg.checkpoint.every = 1
    cfg.checkpoint.keep_last = 0
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return validate_config(resolve_config(cfg))


_SHARED: dict[str, dict[str, str]] = {}


def shared_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``build_assets`` once per pytest session, shared by every test file's fixture."""
    if "assets" not in _SHARED:
        _SHARED["assets"] = build_assets(tmp_path_factory.mktemp("tiny_assets"))
    return _SHARED["assets"]
