"""Prompt building, the same for training, evaluation and the demo.

The question's messages get ``instruction`` appended to the last user message and the system
message set by ``system_prompt`` (None keeps the dataset's, "" removes it, other text replaces
it); the messages then go through the tokenizer's chat template (``add_generation_prompt``),
or become a plain ``system\\n\\nquestion\\n`` text when the tokenizer has none. A
demonstration's token ids are the assistant response that follows: ``encode(demo) + [eos]``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["demo_token_ids", "prompt_messages", "prompt_text", "with_instruction"]


def with_instruction(question: str, instruction: str) -> str:
    """The question with the instruction appended after a space (unless empty or already
    there)."""
    if not instruction or question.rstrip().endswith(instruction):
        return question
    return f"{question.rstrip()} {instruction}"


def prompt_messages(messages: list[dict], instruction: str,
                    system_prompt: str | None) -> list[dict]:
    """A copy of ``messages`` with the instruction and the system prompt applied."""
    messages = [dict(m) for m in messages]
    last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    messages[last_user]["content"] = with_instruction(messages[last_user]["content"],
                                                      instruction)
    if system_prompt is not None:
        messages = [m for m in messages if m.get("role") != "system"]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_text(tokenizer: Any, messages: list[dict]) -> str:
    """The templated prompt ending where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    # No chat template (e.g. a base model's tokenizer): system text, blank line, question.
    parts = [m["content"] for m in messages if m.get("role") in ("system", "user")]
    return "\n\n".join(parts) + "\n"


def demo_token_ids(tokenizer: Any, demo: str) -> list[int]:
    """Assistant response ids for a demonstration: ``encode(demo) + [eos_token_id]``."""
    ids = list(tokenizer.encode(demo, add_special_tokens=False))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer must define eos_token_id (demonstrations end with EOS)")
    return ids + [int(eos)]
