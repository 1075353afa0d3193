"""Every documented choice passes on the command line exactly as spelled, and a config error
names the field the user set (not a field derived from it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from prefix_rft.config import (
    Config,
    apply_overrides,
    choice_fields,
    load_config,
    split_overrides,
)
from prefix_rft.data.read import FORMATS
from prefix_rft.data.schemas import SCHEMAS
from prefix_rft.data.templates import TEMPLATES
from prefix_rft.rollout import engine_names

README = Path(__file__).resolve().parent.parent / "README.md"


def _documented_choices() -> list[tuple[str, str]]:
    """(key, value) for every Literal choice of every config field, and every name of the
    registries that a text field takes (templates, formats, schemas, engines)."""
    pairs = [(key, value) for key, allowed in choice_fields().items() for value in allowed]
    pairs += [("data.prompt_template", name) for name in TEMPLATES]
    pairs += [("data.format", name) for name in ("auto", *FORMATS)]
    pairs += [("data.schema", name) for name in ("auto", *SCHEMAS)]
    pairs += [("rollout.engine", name) for name in engine_names()]
    return pairs


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("key,value", _documented_choices())
def test_every_choice_passes_through_the_cli_parser(key, value):
    overrides = split_overrides([f"--{key}={value}"])  # what `prefix-rft train` does
    cfg = apply_overrides(Config(), overrides)
    assert _get(cfg, key) == value
    # the space-separated spelling (--key value) reads the same
    assert _get(apply_overrides(Config(), split_overrides([f"--{key}", value])), key) == value
    try:
        load_config(None, overrides)
    except ValueError as err:  # a cross-field rule may refuse the combination, never the value
        assert not str(err).startswith(f"{key} must"), str(err)


def test_prompt_template_none_is_the_template_not_null():
    assert load_config(None, ["--data.prompt_template=none"]).data.prompt_template == "none"
    # an optional text field is still cleared by none / null
    cfg = load_config(None, ["--data.system_prompt=x", "--data.system_prompt=none"])
    assert cfg.data.system_prompt is None


def test_every_readme_override_parses():
    text = README.read_text(encoding="utf-8")
    found = re.findall(r"--([a-z_]+\.[a-z_.]+)=(\[[^\]]*\]|[^\s`|)]+)", text)
    found = [(k, v) for k, v in found if k != "section.field"]
    assert len(found) >= 5
    for key, value in found:
        apply_overrides(Config(), [f"--{key}={value}"])


@pytest.mark.parametrize("override,named,not_named", [
    ("--rollout.max_response_tokens=-5", "rollout.max_response_tokens",
     "eval.max_response_tokens"),
    ("--rollout.max_response_tokens=0", "rollout.max_response_tokens",
     "eval.max_response_tokens"),
    ("--train.steps=0", "train.steps", "prefix.decay_steps"),
    ("--train.prompts_per_step=0", "train.prompts_per_step", "train.mini_batch_size"),
    ("--train.seed=abc", "train.seed", "data.seed"),
    ("--eval.max_response_tokens=-5", "eval.max_response_tokens", "rollout.max_response_tokens"),
])
def test_errors_name_the_field_set_not_the_one_derived_from_it(override, named, not_named):
    with pytest.raises(ValueError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(named + " ") and not_named not in message, message
