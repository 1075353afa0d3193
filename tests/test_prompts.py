"""Prompt templates by name (prefix_rft.data.templates)."""

from __future__ import annotations

import pytest

from prefix_rft.data.templates import LUFFY_SYSTEM_PROMPT, TEMPLATES, build_messages, check_template

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


def test_suffix_templates_do_not_repeat_an_instruction_already_there():
    from prefix_rft.data.templates import render_question

    once = render_question(Q, "verl")
    assert render_question(once, "verl") == once
    assert render_question(Q, "none") == Q


def test_training_prompts_follow_the_template(tmp_path):
    """Through the data layer: OpenR1-style rows (LUFFY's system + user), authors vs luffy."""
    import datasets

    from prefix_rft.config import DataConfig
    from prefix_rft.data import load_prompt_dataset
    from prefix_rft.data.prompts import prompt_messages

    rows = [{"prompt": [{"role": "system", "content": "LUFFY SYS"},
                        {"role": "user", "content": Q}],
             "target": [{"role": "assistant", "content": "\\boxed{2}"}],
             "reward_model": {"ground_truth": "2"}}]
    assert prompt_messages(rows[0]["prompt"], "authors", None) == build_messages(Q, "authors")
    assert prompt_messages(rows[0]["prompt"], "luffy", None) == rows[0]["prompt"]
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))

    class Tok:  # records the text the dataset tokenizes
        chat_template = "x"
        eos_token_id = 0
        texts: list = []

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return repr(messages)

        def __call__(self, texts, add_special_tokens):
            Tok.texts.extend(texts)
            return {"input_ids": [[1] for _ in texts]}

    cfg = DataConfig(train_files=[str(path)], schema="verl", prompt_template="authors")
    load_prompt_dataset(cfg, Tok(), need_demo=False)
    assert Tok.texts[-1] == repr(build_messages(Q, "authors"))
