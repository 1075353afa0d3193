r"""Math reward: final-answer extraction + math-verify checking, safe on any string.

``math_reward(response, gold)`` is 1.0 when the response's final answer (the last
``\boxed{...}``, else a configured fallback) is mathematically equal to the gold answer
according to math-verify, and 0.0 otherwise. It never raises: garbage, parser errors,
crashes and timeouts all give 0.0 and are counted in :class:`RewardStats`.

The package is split by concern:

- ``extract.py``: which part of a response is its answer (the ``\boxed{}`` parser and the
  fallbacks); pure string code.
- ``pool.py``: verification in helper processes with a hard time limit (math-verify can
  hang on adversarial input, and its own ``signal.alarm`` limit only works in the main
  thread).
- here: the public API (options checked, outcomes counted).

Example::

    >>> math_reward(r"so the answer is \boxed{\dfrac{1}{2}}.", "0.5")
    1.0
    >>> math_rewards([r"\boxed{3}", "no idea"], ["3", "4"])[1].no_answer
    1
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Sequence

from ..checks import check_int, check_number
from .extract import FALLBACKS, Fallback, check_fallback, extract_answer
from .pool import HARD_KILL_GRACE_S, shutdown_workers, verify, warmup

__all__ = ["FALLBACKS", "HARD_KILL_GRACE_S", "Fallback", "RewardStats", "check_reward_options",
           "extract_answer", "math_reward", "math_rewards", "shutdown_workers", "warmup"]

DEFAULT_TIMEOUT_S = 5.0  # math-verify's own default per operation
DEFAULT_MAX_ANSWER_CHARS = 1000  # longer "answers" are garbage: counted as parse failures


@dataclasses.dataclass
class RewardStats:
    """Counts over verified responses; every response lands in exactly one outcome.

    total: responses scored. correct: rewarded 1.0. wrong: verified and unequal.
    no_answer: nothing extracted (no box, fallback found nothing). parse_failures: the
    answer (or the gold) did not parse, or the answer exceeded ``max_answer_chars``.
    timeouts: verification passed its time limit. errors: the verifier raised or crashed,
    or the inputs were not strings.
    """

    total: int = 0
    correct: int = 0
    wrong: int = 0
    no_answer: int = 0
    parse_failures: int = 0
    timeouts: int = 0
    errors: int = 0

    def record(self, outcome: str) -> None:
        """Count one response whose outcome is ``outcome``, a field name (``"timeouts"``)."""
        self.total += 1
        setattr(self, outcome, getattr(self, outcome) + 1)

    def merge(self, other: RewardStats) -> None:
        """Add ``other``'s counts into this one."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict[str, int]:
        """Plain dict for logging."""
        return dataclasses.asdict(self)


def check_reward_options(*, fallback: str | Sequence[str] = "none",
                         timeout_s: float = DEFAULT_TIMEOUT_S, verify_fn: str | None = None,
                         num_workers: int = 1) -> None:
    """The reward's options; a ValueError naming the first bad one."""
    check_fallback(fallback)
    check_number("timeout_s", timeout_s, 0.0, lo_open=True)
    if verify_fn is not None and not (isinstance(verify_fn, str) and ":" in verify_fn):
        raise ValueError(f"verify_fn must be 'module:function' or None, got {verify_fn!r}")
    check_int("num_workers", num_workers, 1)


def _score(response, gold, fallback, timeout_s, max_answer_chars, verify_fn) -> str:
    """Outcome name of one response; never raises."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(response, str) or not isinstance(gold, str):
        return "errors"
    try:
        answer = extract_answer(response, fallback)
    except Exception:  # noqa: BLE001 -- cannot happen for str input; belt and braces
        return "errors"
    if answer is None:
        return "no_answer"
    gold = gold.strip()
    if not gold or len(answer) > max_answer_chars:
        return "parse_failures"
    return verify(answer, gold, timeout_s, verify_fn)


def math_reward(response_text: str, gold_answer: str, *, fallback="none",
                timeout_s: float = DEFAULT_TIMEOUT_S,
                max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
                verify_fn: str | None = None, stats: RewardStats | None = None) -> float:
    r"""1.0 if the response's final answer equals ``gold_answer`` per math-verify, else 0.0.

    Args:
        response_text: the model's response (any string; non-strings score 0.0).
        gold_answer: reference answer, LaTeX (``\frac{1}{2}``, ``$...$``, ``\boxed{..}``)
            or plain (``0.5``, ``(1, 2]``); numbers are accepted and stringified.
        fallback: what to use when there is no box: a name from ``FALLBACKS`` or a
            sequence of them tried in order (see :func:`extract_answer`).
        timeout_s: limit on verifying this one answer, enforced from any thread or
            process: the call returns after about ``timeout_s``, at most
            ``HARD_KILL_GRACE_S`` more when a stuck helper must be killed. Starting a
            helper (first call, or after a kill) is not charged to it.
        max_answer_chars: extracted answers longer than this score 0.0 unverified.
        verify_fn: ``"module:function"`` replacing math-verify's ``verify`` inside the
            helper, called as ``fn(gold_parsed, answer_parsed) -> bool``; None = default.
        stats: if given, this call's outcome is counted into it.

    Returns 0.0 on every failure (no answer, parse failure, timeout, error); never raises
    except ValueError for an invalid ``fallback`` / ``timeout_s`` / ``verify_fn``.
    """
    check_reward_options(fallback=fallback, timeout_s=timeout_s, verify_fn=verify_fn)
    outcome = _score(response_text, gold_answer, fallback, timeout_s, max_answer_chars,
                     verify_fn)
    if stats is not None:
        stats.record(outcome)
    return 1.0 if outcome == "correct" else 0.0


def math_rewards(responses: Sequence[str], golds: Sequence[str], *, fallback="none",
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
                 verify_fn: str | None = None,
                 num_workers: int = 1) -> tuple[list[float], RewardStats]:
    """Batch :func:`math_reward`: ``(rewards [len(responses)], RewardStats)``.

    ``golds[i]`` is the gold answer of ``responses[i]`` (repeat a question's gold for each
    of its rollouts; its parse is cached). ``num_workers`` > 1 verifies in that many
    helper processes at once. Raises ValueError on mismatched lengths or bad options.
    """
    if len(responses) != len(golds):
        raise ValueError(f"golds must hold one answer per response ({len(responses)}), "
                         f"got {len(golds)}")
    check_reward_options(fallback=fallback, timeout_s=timeout_s, verify_fn=verify_fn,
                         num_workers=num_workers)

    def score(response, gold) -> str:
        return _score(response, gold, fallback, timeout_s, max_answer_chars, verify_fn)

    if num_workers == 1 or len(responses) <= 1:
        outcomes = list(map(score, responses, golds))
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as executor:
            outcomes = list(executor.map(score, responses, golds))
    stats = RewardStats()
    for outcome in outcomes:
        stats.record(outcome)
    return [1.0 if outcome == "correct" else 0.0 for outcome in outcomes], stats
