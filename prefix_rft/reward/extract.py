r"""Final-answer extraction: the one ``\boxed{...}`` parser of the project, plus fallbacks.

``extract_answer(text, fallback)`` returns the content of the last complete, non-empty
``\boxed{...}`` / ``\fbox{...}`` of a response, or, when there is none, what the named
fallbacks find (``"last_number"``, ``"answer_is"``); None when the response states no answer.
Pure string code: linear time, no imports beyond ``re``, never raises for ``str`` input.
"""

from __future__ import annotations

import collections
import re
from typing import Literal, Sequence

from ..checks import check_choice, choices

__all__ = ["FALLBACKS", "Fallback", "check_fallback", "extract_answer", "is_balanced"]

# What to take as the answer of a response without a box: nothing (reward 0), its last
# number, or the rest of the line after its last "answer is" / "answer:".
Fallback = Literal["none", "last_number", "answer_is"]
FALLBACKS = choices(Fallback)

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# An escaped brace or backslash (``\{``, ``\}``, ``\\``) or a grouping brace: one token
# each, so escaped braces never count and the scan is a single linear pass.
_BRACE_TOKEN = re.compile(r"\\[\\{}]|[{}]")
_UNBRACED_ARGUMENT = re.compile(r"[^\s$]+")
_SPACES = re.compile(r"\s*")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_ANSWER_MARKER = re.compile(r"answer(?:\s+is\b|\s*:)", re.IGNORECASE)  # no .lower(): it
# may change the length of some unicode strings, and with it the offsets
_TRAILING_JUNK = ".,;:"


def _brace_partners(text: str, start: int, last_command_end: int) -> dict[int, int]:
    """Map each ``{`` at or after ``start`` to its matching ``}`` (unclosed ones absent).

    Stops once every brace opened before ``last_command_end`` and the one right after it
    are resolved: later braces cannot belong to a box.
    """
    partner: dict[int, int] = {}
    open_positions: list[int] = []
    for token in _BRACE_TOKEN.finditer(text, start):
        char = token.group()
        if char == "{":
            open_positions.append(token.start())
        elif char == "}" and open_positions:
            partner[open_positions.pop()] = token.start()
            if not open_positions and token.start() > last_command_end:
                break
    return partner


def _clean_unbraced(argument: str) -> str:
    r"""Trim sentence punctuation and a closing ``\]``/``\)`` off a ``\boxed x`` argument."""
    for closer in ("\\]", "\\)"):
        cut = argument.find(closer)
        if cut >= 0:
            argument = argument[:cut]
    return argument.rstrip(_TRAILING_JUNK)


def _last_boxed(text: str) -> str | None:
    r"""Content of the last complete, non-empty ``\boxed``/``\fbox``; None if there is none.

    Boxes whose brace never closes (a truncated response) or that are empty are skipped in
    favour of the previous box. Linear time: one regex pass for the commands and one for
    the braces, however many unclosed boxes there are.
    """
    commands = [match.end() for match in _BOX_COMMAND.finditer(text)]
    if not commands:
        return None
    partners: dict[int, int] | None = None
    for after_command in reversed(commands):
        position = _SPACES.match(text, after_command).end()
        if position < len(text) and text[position] == "{":
            if partners is None:  # built lazily, once, from the first box on
                partners = _brace_partners(text, commands[0], commands[-1])
            close = partners.get(position)
            content = text[position + 1 : close].strip() if close is not None else ""
        else:
            match = _UNBRACED_ARGUMENT.match(text, position)
            content = _clean_unbraced(match.group()) if match else ""
        if content:
            return content
    return None


def _last_number(text: str) -> str | None:
    """The last number in ``text`` (``-1,234.5`` -> ``-1234.5``; ``3/4`` kept), or None."""
    last = collections.deque(_NUMBER.finditer(text), maxlen=1)  # O(1) memory
    return last[0].group().replace(",", "") if last else None


def _after_answer_marker(text: str) -> str | None:
    """The rest of the line after the last "answer is" / "answer:" (any case), or None."""
    last = collections.deque(_ANSWER_MARKER.finditer(text), maxlen=1)
    if not last:
        return None
    best_end = last[0].end()
    line_end = text.find("\n", best_end)
    rest = text[best_end : line_end if line_end >= 0 else len(text)]
    return rest.strip(" \t:$").rstrip(_TRAILING_JUNK + " \t$") or None


_FALLBACK_FUNCTIONS = {"last_number": _last_number, "answer_is": _after_answer_marker}


def check_fallback(fallback: str | Sequence[str]) -> tuple[str, ...]:
    """``fallback`` (a name or a sequence of names from ``FALLBACKS``) as a tuple of names;
    ValueError naming it otherwise."""
    names = (fallback,) if isinstance(fallback, str) else tuple(fallback)
    for name in names:
        check_choice("fallback", name, Fallback)
    return names


def extract_answer(text: str, fallback: str | Sequence[str] = "none") -> str | None:
    r"""The final answer of a response, or None when it states none.

    Rule: the content of the last complete, non-empty ``\boxed{...}`` / ``\fbox{...}``
    (nested braces handled, escaped ``\{ \}`` ignored; ``\boxed x`` without braces takes
    the run up to whitespace or ``$``). With no such box, the fallbacks are tried in order:
    ``"none"`` (give up), ``"last_number"`` (last number in the text),
    ``"answer_is"`` (rest of the line after the last "answer is" / "Answer:").

    Linear in ``len(text)`` (no backtracking-prone regexes); a 1 MB string takes well under
    a second. Raises ValueError only for an unknown ``fallback`` name.

    >>> extract_answer(r"first \boxed{1}, then \boxed{\frac{1}{2}}")
    '\\frac{1}{2}'
    >>> extract_answer("so 3 + 4 = 7", fallback="last_number")
    '7'
    """
    names = check_fallback(fallback)
    answer = _last_boxed(text)
    for name in names:
        if answer is not None:
            break
        if name != "none":
            answer = _FALLBACK_FUNCTIONS[name](text)
    return answer


def is_balanced(text: str) -> bool:
    """True when the grouping braces of ``text`` (escaped ``\\{ \\}`` aside) pair up."""
    depth = 0
    for token in _BRACE_TOKEN.finditer(text):
        depth += 1 if token.group() == "{" else -1 if token.group() == "}" else 0
        if depth < 0:
            return False
    return depth == 0
