"""The recipe overlays (configs/recipes/*.yaml): loaded after a base config, through
``load_config`` and the CLI's repeated ``--config``, they set their prefix-family fields and
nothing else. (They rehearse on CPU in tests/test_config_rehearsal.py.)"""

from __future__ import annotations

from pathlib import Path

import yaml

from prefix_rft.cli import main
from prefix_rft.config import config_to_dict, load_config


def test_recipe_overlays_set_only_their_fields(capsys):
    root = Path(__file__).resolve().parents[1] / "configs"
    base = load_config(root / "qwen2.5-math-1.5b.yaml")
    for name, expected in [("bread", {"when": "on_failure"}),
                           ("questa", {"train_on_prefix": False, "schedule": "step",
                                       "start": 0.5, "end": 0.25}),
                           ("prefixrl", {"source": "self", "train_on_prefix": False})]:
        recipe = root / "recipes" / f"{name}.yaml"
        cfg = load_config([root / "qwen2.5-math-1.5b.yaml", recipe])
        for key, value in expected.items():
            assert getattr(cfg.prefix, key) == value, (name, key)
        changed = {s for s, fields in config_to_dict(cfg).items()
                   if fields != config_to_dict(base)[s]}
        assert changed == {"prefix"}, (name, changed)
        # the CLI takes the same overlay: --config base --config recipe
        assert main(["train", "--config", str(root / "qwen2.5-math-1.5b.yaml"),
                     "--config", str(recipe), "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["prefix"] == config_to_dict(cfg)["prefix"]
