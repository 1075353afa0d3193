"""Row schemas: how a row of a question file becomes a :class:`Question`.

A schema is one function ``fields(row, cfg) -> RowFields`` (the prompt's chat messages, the
gold answer, the demonstration; None for what the row lacks), registered in ``SCHEMAS``.
Field names come from ``DataConfig`` (``problem_key`` ... ``ground_truth_key``). Built in:

- ``flat``: ``{"problem": str, "solution": str, "answer": str}``; the solution is the
  demonstration (the expert's full response).
- ``verl`` (LUFFY's / Prefix-RFT's OpenR1-Math-46k-8192): ``{"prompt": [{"role": "system",
  ...}, {"role": "user", "content": question}], "target": [{"role": "assistant", "content":
  demonstration}], "reward_model": {"ground_truth": answer}, ...}``.

``"auto"`` (:func:`detect_schema`) picks, per file, the first registered schema that finds
a question in the file's first rows. To add a schema: write its ``fields`` function and add
one ``SCHEMAS`` entry; training, evaluation and ``data.schema`` checking all read it from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..checks import check_choice
from .options import DataConfig

__all__ = ["SCHEMAS", "Question", "RowFields", "check_schema", "detect_schema", "parse_row"]


@dataclass
class Question:
    """One question, whatever file and schema it came from."""

    problem: str  # the question text: the last user message, as the dataset has it
    answer: str  # gold final answer, as text (numbers are stringified)
    messages: list[dict[str, Any]]  # the dataset's prompt chat messages (system, user, ...)
    demo: str | None = None  # demonstration: the expert's full response text; None = none
    index: int = -1  # position in its PromptDataset; -1 outside one
    prompt_ids: list[int] | None = None  # templated prompt token ids (PromptDataset fills it)
    demo_ids: list[int] | None = None  # demonstration ids + EOS (PromptDataset, when needed)


class RowFields(NamedTuple):
    """What a schema finds in a row; None for what is missing."""

    messages: list[dict[str, Any]] | None  # prompt chat messages; the last user one is the question
    answer: str | None  # gold final answer
    demo: str | None  # demonstration text


# ---------------------------------------------------------------- value helpers
def lookup(row: dict, dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; None when any part is missing."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def text(value: Any) -> str | None:
    """A non-empty string (numbers become strings), else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, str):
        return value if value.strip() else None
    return None


def messages_of(value: Any) -> list[dict] | None:
    """Chat messages (dicts with a ``content``) from a list / array; None if not a list."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None
    return [dict(m) for m in value if isinstance(m, dict) and "content" in m]


# ---------------------------------------------------------------- the schemas
def flat_fields(row: dict, cfg: DataConfig) -> RowFields:
    """``problem_key`` / ``answer_key`` (dotted) / ``solution_key`` text fields."""
    problem = text(row.get(cfg.problem_key))
    messages = [{"role": "user", "content": problem}] if problem else None
    return RowFields(messages, text(lookup(row, cfg.answer_key)), text(row.get(cfg.solution_key)))


def verl_fields(row: dict, cfg: DataConfig) -> RowFields:
    """``prompt_key`` messages (or a plain string), ``ground_truth_key`` (dotted) answer,
    ``target_key`` demonstration (the first assistant message, or a plain string)."""
    messages = messages_of(row.get(cfg.prompt_key))
    if messages is None and text(row.get(cfg.prompt_key)):  # a plain-string prompt
        messages = [{"role": "user", "content": row[cfg.prompt_key]}]
    target = row.get(cfg.target_key)
    target_messages = messages_of(target)
    if target_messages is not None:
        replies = [m["content"] for m in target_messages
                   if m.get("role", "assistant") == "assistant"]
        demo = text(replies[0]) if replies else None
    else:
        demo = text(target)
    return RowFields(messages, text(lookup(row, cfg.ground_truth_key)), demo)


# schema name -> fields function; the only list of schema names
SCHEMAS: dict[str, Callable[[dict, DataConfig], RowFields]] = {
    "flat": flat_fields,
    "verl": verl_fields,
}


def check_schema(name: str, key: str = "data.schema") -> str:
    """``name`` if it is ``"auto"`` or a registered schema, else a ValueError naming ``key``."""
    check_choice(key, name, ("auto", *SCHEMAS))
    return name


# ---------------------------------------------------------------- rows -> questions
def _problem(messages: list[dict] | None) -> str | None:
    users = [m for m in messages or [] if m.get("role") == "user"]
    return text(users[-1]["content"]) if users else None


def parse_row(row: dict, cfg: DataConfig, schema: str) -> tuple[Question | None, str | None]:
    """``(Question, None)``, or ``(None, reason)``: ``"no problem"`` or ``"no answer"``."""
    messages, answer, demo = SCHEMAS[schema](row, cfg)
    problem = _problem(messages)
    if problem is None:
        return None, "no problem"
    if answer is None:
        return None, "no answer"
    return Question(problem=problem, answer=answer, messages=messages, demo=demo), None


def detect_schema(rows: Sequence[dict], cfg: DataConfig, source: str = "",
                  probe_rows: int = 100) -> str:
    """``cfg.schema`` unless it is ``"auto"``; then the first registered schema that finds a
    question in one of the first ``probe_rows`` rows (ValueError when none does)."""
    if cfg.schema != "auto":
        return check_schema(cfg.schema)
    for index in range(min(probe_rows, len(rows))):
        row = rows[index]
        for name, fields in SCHEMAS.items():
            if _problem(fields(row, cfg).messages) is not None:
                return name
    raise ValueError(f"data.schema: no schema ({'|'.join(SCHEMAS)}) finds a question in the "
                     f"first rows of {source or 'the file'}; check the *_key fields")
