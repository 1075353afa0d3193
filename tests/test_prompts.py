"""Prompt templates by name (prefix_rft.prompts)."""

from __future__ import annotations

import pytest

from prefix_rft.prompts import LUFFY_SYSTEM_PROMPT, TEMPLATES, build_messages, check_template

Q = "Compute $1+1$."


def test_authors_template_is_their_data_preparation():
    # recipe/prepare_data/luffy_train.py: drop the system prompt, append with a newline
    msgs = build_messages(Q, "authors", dataset_system="LUFFY's system prompt")
    assert msgs == [{"role": "user", "content": Q + "\nPlease reason step by step, and put your "
                     "final answer within \\boxed{}"}]


def test_luffy_keeps_the_datasets_system_prompt_or_adds_luffys():
    assert build_messages(Q, "luffy", dataset_system="S") == [
        {"role": "system", "content": "S"}, {"role": "user", "content": Q}]
    msgs = build_messages(Q, "luffy")
    assert msgs[0] == {"role": "system", "content": LUFFY_SYSTEM_PROMPT}
    assert "\\boxed{}" in LUFFY_SYSTEM_PROMPT and msgs[1]["content"] == Q


def test_verl_and_none():
    assert build_messages(Q, "verl")[-1]["content"] == (
        Q + " Let's think step by step and output the final answer within \\boxed{}.")
    assert build_messages(Q, "none", dataset_system="S") == [
        {"role": "system", "content": "S"}, {"role": "user", "content": Q}]


def test_custom_template_and_system_override():
    msgs = build_messages(Q, "Problem: {question}\nAnswer in \\boxed{{}}.",
                          system_prompt="Be brief.")
    assert msgs == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"Problem: {Q}\nAnswer in \\boxed{{}}."}]
    assert build_messages(Q, "luffy", dataset_system="S", system_prompt="") == [
        {"role": "user", "content": Q}]


@pytest.mark.parametrize("bad", ["no placeholder", "{question} {question}", "{q}", "\\boxed{}", 3])
def test_bad_templates_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="data.prompt_template"):
        check_template(bad)


def test_every_named_template_renders():
    for name in TEMPLATES:
        assert build_messages(Q, name)[-1]["content"].startswith(Q)
