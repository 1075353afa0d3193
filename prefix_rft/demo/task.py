"""The embedded demo task: seeded multi-step arithmetic with step-by-step demonstrations.

A problem is a left-nested chain of integer operations written as one expression,
for example ``Compute (17 + 25) * 3 - 41.``; its demonstration works it one operation
per line and ends in ``\\boxed{answer}``::

    17+25=42
    42*3=126
    126-41=85
    The answer is \\boxed{85}.

Every intermediate value stays in ``[0, max_value]``, so all answers are non-negative
integers written in plain digits (``math_verify`` parses them directly). Difficulty is
the number of operations and the operand size (``DIFFICULTIES``): a tiny model trained
on the "easy" chains rarely finishes a "hard" chain correctly, while the worked
demonstration of a hard chain shows exactly the intermediate results it needs.

Splits are disjoint by construction and by *content*: whether a problem may appear in the
held-out split is decided by a hash of its arithmetic chain alone (operands and operators in
order, ``problem_chain``; about ``HELD_OUT_SHARE`` of all chains), never of its wording, so no
seed, difficulty, row count or template can put the same computation on both sides ("Compute
3 * 5 + 2 - 8." and "What is 3 * 5 + 2 - 8?" are one chain).

Rows are flat dicts -- ``problem``, ``solution`` (the demonstration), ``answer`` (gold
string) -- the ``flat`` schema of ``prefix_rft.data``, plus ``difficulty`` and ``num_steps``;
``write_jsonl`` writes them and ``prefix_rft.data.read_rows`` / ``read_questions`` read them.
Responses are scored by ``prefix_rft.reward`` like any other task's.

Demonstrator variants (``DEMONSTRATORS``, ``apply_demonstrator``; the demo's default is
``expert``, the exact worked solution above): ``systematic`` mis-applies multiplication on
the recognizable subclass of problems whose expression contains ``*`` -- every ``x*k`` line
is computed as ``x+k`` and the error is carried through the following lines -- while the
gold ``answer`` stays correct. SFT imitates that wrong mode; a reward can unlearn it.
``off_style`` is correct but written in words the base model never writes (``17 plus 25
makes 42.`` ... ``So we get \\boxed{85}.``), as an R1 trace is for a Qwen base: imitation
has to learn a new format, and a continuation from its prefix switches styles mid-answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from typing import Iterable

# The trainer's default instruction (``data.prompt_template: verl``, appended to the question
# after a space). The base step trains on prompts with and without it, so the demo works with
# ``data.prompt_template`` at its default or ``none`` (shorter, faster).
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."

# Share of the problem space (by text hash) that may only ever appear in held-out splits.
HELD_OUT_SHARE = 0.1

_PROBLEM_TEMPLATES = ("Compute {expr}.", "What is {expr}?", "Evaluate {expr}.")
_OPS = ("+", "-", "*")


@dataclass(frozen=True)
class Difficulty:
    """How hard a problem is: number of operations and operand / value ranges."""

    min_steps: int  # fewest operations in a chain (>= 1)
    max_steps: int  # most operations in a chain (>= min_steps)
    max_operand: int  # largest addend / subtrahend and the largest starting number
    max_multiplier: int  # largest factor k in "x * k" (0 disables multiplication)
    max_value: int  # every intermediate and final value stays in [0, max_value]

    def validate(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"difficulty: expected 1 <= min_steps <= max_steps, got "
                f"{self.min_steps}, {self.max_steps}"
            )
        if self.max_operand < 2 or self.max_value < self.max_operand:
            raise ValueError(
                f"difficulty: expected 2 <= max_operand <= max_value, got "
                f"max_operand={self.max_operand}, max_value={self.max_value}"
            )
        if self.max_multiplier == 1 or self.max_multiplier < 0:
            raise ValueError(
                f"difficulty.max_multiplier: expected 0 (off) or >= 2, got {self.max_multiplier}"
            )


DIFFICULTIES: dict[str, Difficulty] = {
    # what the base step mostly trains on: short chains
    "easy": Difficulty(min_steps=1, max_steps=2, max_operand=9, max_multiplier=5, max_value=99),
    "medium": Difficulty(min_steps=2, max_steps=3, max_operand=9, max_multiplier=5, max_value=99),
    # the demo's target: longer chains of the same operations; a tiny model's errors are
    # mostly in reading the chain (which operand, which operation comes next), which the
    # demonstration's lines spell out
    "hard": Difficulty(min_steps=3, max_steps=4, max_operand=9, max_multiplier=5, max_value=99),
    # two-digit operands: far slower for a tiny model to learn (kept for bigger models)
    "hard_big": Difficulty(min_steps=3, max_steps=4, max_operand=50, max_multiplier=9,
                           max_value=999),
}


def get_difficulty(difficulty: str | Difficulty) -> Difficulty:
    """Return a ``Difficulty`` for a preset name or pass one through (validated)."""
    if isinstance(difficulty, Difficulty):
        difficulty.validate()
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(
            f"difficulty: expected one of {sorted(DIFFICULTIES)} or a Difficulty, got "
            f"{difficulty!r}"
        )
    return DIFFICULTIES[difficulty]


_CHAIN_TOKEN = re.compile(r"\d+|[+*-]")


def problem_chain(problem: str) -> str:
    """The arithmetic chain of a problem text, wording and parentheses dropped:
    ``"Compute (17 + 25) * 3 - 41."`` -> ``"17+25*3-41"``. Chains are left-nested, so the
    operands and operators in order identify the computation; the templates hold no digits or
    operator characters."""
    return "".join(_CHAIN_TOKEN.findall(problem))


def chain_fraction(problem: str, salt: str = "") -> float:
    """A uniform [0, 1) number from a hash of ``salt`` + the problem's chain."""
    digest = hashlib.sha256((salt + problem_chain(problem)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out_problem(problem: str) -> bool:
    """True when ``problem``'s chain belongs to the held-out part of the problem space."""
    return chain_fraction(problem) < HELD_OUT_SHARE


def _apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    return value * operand


def _pick_step(rng: random.Random, value: int, d: Difficulty) -> tuple[str, int]:
    """One operation keeping the running value in [0, max_value] (why: plain answers)."""
    choices = []
    if value + 1 <= d.max_value:
        choices.append("+")
    if value >= 1:
        choices.append("-")
    if d.max_multiplier >= 2 and 2 <= value and value * 2 <= d.max_value:
        choices.append("*")
    op = rng.choice(choices)
    if op == "+":
        return op, rng.randint(1, min(d.max_operand, d.max_value - value))
    if op == "-":
        return op, rng.randint(1, min(d.max_operand, value))
    return op, rng.randint(2, min(d.max_multiplier, d.max_value // value))


def render_expression(start: int, steps: list[tuple[str, int]]) -> str:
    """Left-nested chain as a minimal-parenthesis expression: ``(17 + 25) * 3 - 41``."""
    expr, top_level_additive = str(start), False
    for op, operand in steps:
        if op == "*" and top_level_additive:
            expr = f"({expr})"  # why: '*' binds tighter, the chain is evaluated left to right
        expr = f"{expr} {op} {operand}"
        top_level_additive = op in "+-"
    return expr


def make_problem(rng: random.Random, difficulty: str | Difficulty) -> dict:
    """One row drawn from ``rng``: {problem, solution, answer, difficulty, num_steps}."""
    d = get_difficulty(difficulty)
    num_steps = rng.randint(d.min_steps, d.max_steps)
    value = rng.randint(2, d.max_operand)
    start, steps, lines = value, [], []
    for _ in range(num_steps):
        op, operand = _pick_step(rng, value, d)
        new_value = _apply(value, op, operand)
        lines.append(f"{value}{op}{operand}={new_value}")  # why no spaces: fewer tokens
        steps.append((op, operand))
        value = new_value
    expr = render_expression(start, steps)
    template = rng.choice(_PROBLEM_TEMPLATES)
    lines.append(f"The answer is \\boxed{{{value}}}.")
    name = difficulty if isinstance(difficulty, str) else "custom"
    return {
        "problem": template.format(expr=expr),
        "solution": "\n".join(lines),
        "answer": str(value),
        "difficulty": name,
        "num_steps": num_steps,
    }


def make_split(
    split: str, num_rows: int, difficulty: str | Difficulty, seed: int,
    exclude: Iterable[str] = (),
) -> list[dict]:
    """``num_rows`` distinct problems of one split ("train" or "test"), seeded.

    "test" rows come only from the held-out part of the problem space (by chain) and "train"
    rows never do, so splits are disjoint for any seeds. "test" rows have distinct chains;
    "train" rows distinct texts (one chain in two wordings is harmless inside a training set,
    and the easy space has too few chains otherwise). ``exclude`` drops the chains of given
    problem texts (e.g. to keep two train sets apart). Raises ValueError when the space runs
    dry.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if num_rows < 0:
        raise ValueError(f"num_rows: expected >= 0, got {num_rows}")
    want_held_out = split == "test"
    # why the string seed: independent streams per (seed, split, difficulty)
    rng = random.Random(f"{seed}/{split}/{difficulty}")
    excluded, seen, rows = {problem_chain(e) for e in exclude}, set(), []
    misses = 0  # draws since the last new row: many in a row means the space is used up
    while len(rows) < num_rows and misses < 20_000:
        row = make_problem(rng, difficulty)
        chain = problem_chain(row["problem"])
        key = chain if want_held_out else row["problem"]
        if (key in seen or chain in excluded
                or is_held_out_problem(row["problem"]) != want_held_out):
            misses += 1
            continue
        seen.add(key)
        rows.append(row)
        misses = 0
    if len(rows) < num_rows:
        raise ValueError(
            f"num_rows: only {len(rows)} distinct {split} problems of difficulty "
            f"{difficulty!r} found, asked for {num_rows}"
        )
    for i, row in enumerate(rows):
        row["id"] = f"{split}-{row['difficulty']}-{seed}-{i}"
    return rows


def write_jsonl(rows: Iterable[dict], path: str) -> str:
    """Write rows one JSON object per line (atomic: temp file then rename); returns path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


DEMONSTRATORS = ("expert", "systematic", "off_style")
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def in_systematic_subclass(row: dict) -> bool:
    """The ``systematic`` demonstrator's subclass: problems with a multiplication."""
    return "*" in row["problem"]


def solution_steps(solution: str) -> list[tuple[int, str, int]]:
    """``"17+25=42\\n..."`` -> ``[(17, "+", 25), ...]``: a demonstration's operation lines."""
    out = []
    for line in solution.splitlines():
        if "=" not in line or line.startswith("The answer"):
            continue
        left = line.split("=")[0]
        for op in "+*-":
            head, sep, tail = left[1:].partition(op)  # [1:]: skip a leading minus sign
            if sep:
                out.append((int(left[0] + head), op, int(tail)))
                break
    return out


def systematic_solution(row: dict) -> str:
    """The ``systematic`` demonstrator's text for ``row``: ``x*k`` computed as ``x+k``."""
    steps = solution_steps(row["solution"])
    value, lines = steps[0][0], []
    for _, op, operand in steps:
        new = value - operand if op == "-" else value + operand  # '*' mis-applied as '+'
        lines.append(f"{value}{op}{operand}={new}")
        value = new
    lines.append(f"The answer is \\boxed{{{value}}}.")
    return "\n".join(lines)


def off_style_solution(row: dict) -> str:
    """The ``off_style`` demonstrator's text for ``row``: the same correct steps in words
    (``17 plus 25 makes 42.``), one per line, then ``So we get \\boxed{85}.``."""
    lines, value = [], row["answer"]
    for start, op, operand in solution_steps(row["solution"]):
        value = _apply(start, op, operand)
        lines.append(f"{start} {_OP_WORDS[op]} {operand} makes {value}.")
    lines.append(f"So we get \\boxed{{{value}}}.")
    return "\n".join(lines)


def apply_demonstrator(rows: list[dict], demonstrator: str) -> list[dict]:
    """Copies of ``rows`` with ``demonstrator``'s solutions; problems and answers unchanged."""
    if demonstrator not in DEMONSTRATORS:
        raise ValueError(f"demonstrator: expected one of {DEMONSTRATORS}, got {demonstrator!r}")
    out = []
    for row in rows:
        new = dict(row, demonstrator=demonstrator)
        if demonstrator == "systematic" and in_systematic_subclass(row):
            new["solution"] = systematic_solution(row)
        elif demonstrator == "off_style":
            new["solution"] = off_style_solution(row)
        out.append(new)
    return out


def difficulty_dict(difficulty: str | Difficulty) -> dict:
    """Plain dict of a difficulty's settings (for manifests)."""
    return asdict(get_difficulty(difficulty))
