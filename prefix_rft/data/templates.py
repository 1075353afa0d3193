"""Prompt templates by name: how a question becomes the chat messages the policy sees.

``data.prompt_template`` picks one of these (or is a custom string containing ``{question}``):

============  ===================================================================================
name          what the policy sees, and where it comes from
============  ===================================================================================
``authors``   no system message; user = question + ``"\\nPlease reason step by step, and put your
              final answer within \\boxed{}"``. The Prefix-RFT authors' data preparation
              (``recipe/prepare_data/luffy_train.py`` in their verl repository) drops LUFFY's
              system prompt and appends exactly this text, newline-separated, no final period.
``luffy``     LUFFY's system prompt + the bare question. LUFFY's training rows
              (OpenR1-Math-46k-8192, verl schema) carry that system message, so on those rows the
              dataset's own system message is kept; rows without one get
              :data:`LUFFY_SYSTEM_PROMPT` (LUFFY's text as its evaluation code and paper quote it).
``verl``      the dataset's own system message (if any) + question + ``" Let's think step by step
              and output the final answer within \\boxed{}."``: verl's example preprocessing of
              MATH (``examples/data_preprocess/math_dataset.py``), a space-separated suffix.
``none``      the dataset's own system message (if any) + the bare question.
custom        any other string is a format string with one ``{question}`` placeholder, e.g.
              ``"{question}\\nAnswer in \\boxed{}."`` (literal braces doubled: ``\\boxed{{}}``);
              the dataset's own system message is kept.
============  ===================================================================================

``data.system_prompt`` still overrides the system message of any template (``null`` = the
template's choice above, ``""`` = none, other text = that text).

    >>> build_messages("What is 1+1?", "authors")[0]["content"].splitlines()
    ['What is 1+1?', 'Please reason step by step, and put your final answer within \\boxed{}']
"""

from __future__ import annotations

from dataclasses import dataclass

AUTHORS_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}"
VERL_INSTRUCTION = " Let's think step by step and output the final answer within \\boxed{}."
LUFFY_SYSTEM_PROMPT = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final "
    "solution. This involves analyzing, summarizing, exploring, reassessing, and refining your "
    "thought process through multiple iterations. Structure your response into two sections: "
    "Thought and Solution. In the Thought section, present your reasoning using the format: "
    "\"<think>\\n {thoughts} </think>\\n\". Each thought should include detailed analysis, "
    "brainstorming, verification, and refinement of ideas. After \"</think>\\n,\" in the Solution "
    "section, provide the final, logical, and accurate answer, clearly derived from the "
    "exploration in the Thought section. If applicable, include the answer in \\boxed{} for "
    "closed-form results like multiple choices or mathematical solutions."
)

KEEP = None  # sentinel: keep the dataset's own system message


@dataclass(frozen=True)
class PromptTemplate:
    """``user`` formats the question (``{question}``); ``system`` is the system message:
    ``None`` keeps the dataset's own, ``""`` removes it; ``fallback_system`` is used when the
    dataset has none and ``system`` is None."""

    user: str
    system: str | None = KEEP
    fallback_system: str | None = None


TEMPLATES: dict[str, PromptTemplate] = {
    "authors": PromptTemplate(user="{question}" + AUTHORS_INSTRUCTION.replace("{}", "{{}}"),
                              system=""),
    "luffy": PromptTemplate(user="{question}", system=KEEP, fallback_system=LUFFY_SYSTEM_PROMPT),
    "verl": PromptTemplate(user="{question}" + VERL_INSTRUCTION.replace("{}", "{{}}")),
    "none": PromptTemplate(user="{question}"),
}


def get_template(spec: str) -> PromptTemplate:
    """The named template, or a custom one from a string with one ``{question}`` placeholder.

    Raises a one-line ValueError naming ``data.prompt_template`` for anything else.
    """
    if not isinstance(spec, str):
        raise ValueError(f"data.prompt_template must be a string, got {type(spec).__name__}")
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    try:
        rendered = spec.format(question="\0")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"data.prompt_template must be one of {'|'.join(TEMPLATES)} or a format string whose "
            f"only field is {{question}} (double literal braces), got {spec!r} ({error!r})"
        ) from None
    if rendered.count("\0") != 1:
        raise ValueError(
            f"data.prompt_template must be one of {'|'.join(TEMPLATES)} or contain {{question}} "
            f"exactly once, got {spec!r}"
        )
    return PromptTemplate(user=spec)


def check_template(spec: str) -> None:
    """Validate ``data.prompt_template`` (raises ValueError)."""
    get_template(spec)


def render_question(question: str, template: str) -> str:
    """The user message for ``question``. A template that appends a suffix leaves a question
    that already ends with it unchanged (datasets that carry the instruction already)."""
    t = get_template(template)
    prefix, _, suffix = t.user.partition("{question}")
    suffix = suffix.replace("{{", "{").replace("}}", "}")
    if not prefix and suffix.strip() and question.rstrip().endswith(suffix.strip()):
        return question
    return t.user.format(question=question)


def system_message(template: str, *, dataset_system: str | None = None,
                   system_prompt: str | None = None) -> str | None:
    """The system message: ``system_prompt`` when set, else the template's choice (the
    dataset's own, none, or the template's fallback when the dataset has none)."""
    if system_prompt is not None:
        return system_prompt
    t = get_template(template)
    if t.system is not KEEP:
        return t.system
    return dataset_system if dataset_system else t.fallback_system


def build_messages(question: str, template: str, *, dataset_system: str | None = None,
                   system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one question.

    Args:
        question: the bare problem text.
        template: a name in :data:`TEMPLATES` or a custom ``{question}`` format string.
        dataset_system: the row's own system message, if it has one.
        system_prompt: ``data.system_prompt``: None = the template's choice, "" = no system
            message, other text = that system message.

    Returns:
        ``[{"role": "system", ...}?, {"role": "user", "content": ...}]``.
    """
    system = system_message(template, dataset_system=dataset_system, system_prompt=system_prompt)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": render_question(question, template)})
    return messages
