"""The presets' comments say what the sources say: no stale claim about the authors' advantage
or dual clip, and every setting where this trainer differs from the authors' code says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["qwen2.5-math-1.5b-24gb.yaml", "qwen2.5-math-7b-80gb.yaml",
                                  "demo.yaml"])
def test_no_stale_advantage_or_dual_clip_labels(name):
    text = (CONFIGS / name).read_text(encoding="utf-8")
    assert "official code averages on-policy rewards only" not in text
    assert "the official code's variant" not in text
    assert "# unknown; dual clip off" not in text


@pytest.mark.parametrize("name", ["qwen2.5-math-1.5b-authors.yaml",
                                  "qwen2.5-math-7b-authors.yaml"])
def test_authors_presets_flag_where_they_differ(name):
    lines = (CONFIGS / name).read_text(encoding="utf-8").splitlines()

    def comment(key):  # the comment of `key:` and its continuation lines
        i = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"{key}:"))
        out = [lines[i].split("#", 1)[1]]
        out += [ln.split("#", 1)[1] for ln in lines[i + 1:] if ln.strip().startswith("#")
                and ln.startswith(" " * 20)][:4]
        return " ".join(out)

    assert "DIFFERS" in comment("max_prompt_tokens") and "prefix" in comment("max_prompt_tokens")
    assert "DIFFERS" in comment("overlong_prompts")
    assert "filter_overlong_prompts: False" in comment("overlong_prompts")
    assert "DIFFERS" in comment("mini_batch_size") and "16" in comment("mini_batch_size")
    assert "[code]" not in comment("fallback") and "not published" in comment("fallback")


def test_demo_default_advantage_is_official():
    cfg = yaml.safe_load((CONFIGS / "demo.yaml").read_text(encoding="utf-8"))
    assert cfg["loss"]["baseline"] == "official"
