r"""Math reward: final-answer extraction + math-verify checking, safe on any string.

``math_reward(response, gold)`` is 1.0 when the response's final answer (the last
``\boxed{...}``, else a configured fallback) is mathematically equal to the gold answer
according to math-verify, and 0.0 otherwise. It never raises: garbage, parser errors,
crashes and timeouts all give 0.0 and are counted in :class:`RewardStats`.

Why a worker process. math-verify (sympy underneath) can run for minutes or forever on
adversarial answers (``10^{10^{10}}``, deep parentheses). Its own time limit uses
``signal.alarm``, which only works in the main thread of the main interpreter, so it is
useless in a trainer's reward thread or a dataloader worker. A hung computation in the
calling process cannot be interrupted from another thread either. So verification runs in
a persistent helper process (``subprocess.Popen`` of this module, talking over two OS
pipes): the caller waits on the pipe with a deadline and, past it, kills the helper and
starts a fresh one. ``subprocess`` rather than ``multiprocessing.Process`` because daemonic
``multiprocessing.Pool`` workers may not start ``multiprocessing`` children but may start
subprocesses, and because it needs no ``__main__`` guard or pickling of the caller's
state. Inside the helper (a single-threaded process we own) a *soft* ``setitimer`` timer
interrupts Python-level slowness at the limit, so most slow inputs cost no restart; the
caller's kill, ``HARD_KILL_GRACE_S`` later, covers computations stuck in C. A round trip
costs ~0.1 ms on top of math-verify's ~1-3 ms parse. Gold answers are parsed once per
helper (``lru_cache``) and verdicts memoized there (a group's rollouts often agree).

Concurrency: each calling thread checks a helper out of a process-wide pool (a new one is
started only when all are busy), so threads never share a pipe. Helpers exit when their
pipe closes (caller exit or :func:`shutdown_workers`, also run at interpreter exit);
after ``os.fork`` the child forgets the parent's helpers and starts its own.

Example::

    >>> math_reward(r"so the answer is \boxed{\dfrac{1}{2}}.", "0.5")
    1.0
    >>> math_rewards([r"\boxed{3}", "no idea"], ["3", "4"])[1].no_answer
    1
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import functools
import os
import re
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Sequence

__all__ = ["FALLBACKS", "HARD_KILL_GRACE_S", "RewardStats", "extract_answer", "math_reward",
           "math_rewards", "shutdown_workers", "warmup"]

FALLBACKS = ("none", "last_number", "answer_is")
DEFAULT_TIMEOUT_S = 5.0  # math-verify's own default per operation
DEFAULT_MAX_ANSWER_CHARS = 1000  # longer "answers" are garbage: counted as parse failures
_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine; not part of the call limit
HARD_KILL_GRACE_S = 0.25  # the helper's timer fires at the limit; we kill it this much later

# ---------------------------------------------------------------- answer extraction

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


def _check_fallback(fallback: str | Sequence[str]) -> tuple[str, ...]:
    names = (fallback,) if isinstance(fallback, str) else tuple(fallback)
    for name in names:
        if name not in FALLBACKS:
            raise ValueError(f"fallback: expected one of {FALLBACKS} or a sequence of "
                             f"them, got {name!r}")
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
    names = _check_fallback(fallback)
    answer = _last_boxed(text)
    for name in names:
        if answer is not None:
            break
        if name != "none":
            answer = _FALLBACK_FUNCTIONS[name](text)
    return answer


# ---------------------------------------------------------------- the helper process side


class _SoftTimeout(BaseException):
    """Raised by the helper's own timer; a BaseException so math-verify's
    ``except Exception`` clauses do not swallow it."""


def _balanced(text: str) -> bool:
    depth = 0
    for token in _BRACE_TOKEN.finditer(text):
        depth += 1 if token.group() == "{" else -1 if token.group() == "}" else 0
        if depth < 0:
            return False
    return depth == 0


def _parse_latex_or_plain(text: str) -> list:
    r"""math-verify parse of an answer string, trying the wrappings it understands.

    ``\boxed{...}`` first (only if braces balance, else the box would swallow the rest),
    then ``$...$``, then the raw string: plain-expression parsing alone misreads things
    like ``1,2`` (as 1.2) or ``(1,2]``. An already delimited string is parsed as is first.
    """
    from math_verify import parse

    candidates = []
    if any(mark in text for mark in ("\\boxed", "\\fbox", "$", "\\(", "\\[")):
        candidates.append(text)
    if _balanced(text):
        candidates.append("\\boxed{" + text + "}")
    if "$" not in text:
        candidates.append("$" + text + "$")
    candidates.append(text)
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=None)  # None: no signal.alarm inside
        if parsed:
            return parsed
    return []


def _default_verify(gold_parsed: list, answer_parsed: list) -> bool:
    from math_verify import verify

    return verify(gold_parsed, answer_parsed, timeout_seconds=None)  # None: no alarm


def _load_verify_fn(spec: str | None):
    if spec is None:
        return _default_verify
    import importlib

    module_name, _, function_name = spec.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


@functools.lru_cache(maxsize=8192)
def _parse_gold(gold: str) -> list:
    return _parse_latex_or_plain(gold)


@functools.lru_cache(maxsize=16384)
def _verdict(answer: str, gold: str, spec: str | None) -> str:
    """Outcome of a finished verification. Memoized (in the helper): a group's rollouts
    often share an answer. Timeouts and errors are exceptions, hence never cached."""
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return "parse_failures"
    answer_parsed = _parse_latex_or_plain(answer)
    if not answer_parsed:
        return "parse_failures"
    return "correct" if _load_verify_fn(spec)(gold_parsed, answer_parsed) else "wrong"


def _verify_in_helper(answer: str, gold: str, soft_timeout_s: float, spec) -> str:
    """One verification inside the helper -> outcome name (see :class:`RewardStats`)."""
    import signal

    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
            return _verdict(answer, gold, spec)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:  # also catches a timer firing inside the finally above
        return "timeouts"
    except Exception:  # noqa: BLE001 -- any parser/sympy failure is a 0.0, by contract
        return "errors"


def _helper_main(read_fd: int, write_fd: int) -> None:
    """Entry point of a helper process: serve requests until the pipe closes."""
    import logging
    import signal

    requests = Connection(read_fd, writable=False)
    replies = Connection(write_fd, readable=False)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "timeout disabled" warnings
    import math_verify  # noqa: F401 -- pay the sympy import before saying "ready"

    def on_timer(signum, frame):
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, on_timer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    replies.send(("ready", os.getpid()))
    while True:
        try:
            request = requests.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            replies.send(_verify_in_helper(*request))
        except OSError:  # the caller has gone
            return


# ---------------------------------------------------------------- the caller side


class _HelperFailed(Exception):
    """The helper died, missed its deadline, or could not start; it has been killed.
    ``args[0]`` is the outcome name to count ("timeouts" or "errors")."""


class _Helper:
    """One helper process and the caller's ends of its two pipes."""

    def __init__(self):
        child_read, parent_write = os.pipe()
        parent_read, child_write = os.pipe()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        code = ("import sys; from prefix_rft.reward import _helper_main; "
                "_helper_main(int(sys.argv[1]), int(sys.argv[2]))")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, str(child_read), str(child_write)],
                pass_fds=(child_read, child_write), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, env=env, close_fds=True,
            )
        finally:
            os.close(child_read)
            os.close(child_write)
        self.requests = Connection(parent_write, readable=False)
        self.replies = Connection(parent_read, writable=False)
        self.ready = False

    def _wait_ready(self) -> None:
        if not self.ready:
            if not self.replies.poll(_STARTUP_TIMEOUT_S):
                raise EOFError("helper did not start in time")
            self.replies.recv()  # ("ready", pid), or EOFError if it died importing
            self.ready = True

    def verify(self, answer: str, gold: str, timeout_s: float, spec) -> str:
        """Outcome name from the helper; raises _HelperFailed (helper killed) otherwise."""
        try:
            self._wait_ready()  # startup is not charged to the call's time limit
            self.requests.send((answer, gold, timeout_s, spec))
            if not self.replies.poll(timeout_s + HARD_KILL_GRACE_S):
                self.kill()
                raise _HelperFailed("timeouts")
            return self.replies.recv()
        except _HelperFailed:
            raise
        except Exception as error:  # died, never started, or sent something unreadable
            self.kill()
            raise _HelperFailed("errors") from error

    def forget(self) -> None:
        """Close our ends of the pipes (in a forked child: the helper stays the parent's)."""
        self.requests.close()  # idempotent
        self.replies.close()

    def close(self) -> None:
        """Ask the helper to exit (pipe EOF), then make sure it did."""
        self.forget()
        try:
            self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.forget()


class _HelperPool:
    """Idle helpers of this process; a thread checks one out per verification."""

    def __init__(self):
        self.lock = threading.Lock()
        self.idle: list[_Helper] = []
        self.live: set[_Helper] = set()
        self.started = 0  # helpers started so far (tests use it to discount startups)

    def _start(self) -> _Helper:
        helper = _Helper()
        with self.lock:
            self.started += 1
            self.live.add(helper)
        return helper

    def acquire(self) -> _Helper:
        with self.lock:
            if self.idle:
                return self.idle.pop()
        return self._start()

    def release(self, helper: _Helper) -> None:
        with self.lock:
            self.idle.append(helper)

    def discard(self, dead: _Helper) -> None:
        with self.lock:
            self.live.discard(dead)

    def replace(self, dead: _Helper) -> None:
        """Drop a killed helper and start its successor now, so it warms up meanwhile."""
        self.discard(dead)
        try:
            self.release(self._start())
        except OSError:  # the next call will try again
            pass

    def shutdown(self) -> None:
        with self.lock:
            helpers, self.idle, self.live = list(self.live), [], set()
        for helper in helpers:
            helper.close()

    def forget_after_fork(self) -> None:
        for helper in list(self.live):
            helper.forget()
        self.lock = threading.Lock()
        self.idle, self.live = [], set()


_POOL = _HelperPool()
atexit.register(_POOL.shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.forget_after_fork)


def shutdown_workers() -> None:
    """Stop every helper process of this process (new calls start fresh ones)."""
    _POOL.shutdown()


def warmup(num_workers: int = 1) -> int:
    """Have ``num_workers`` helpers started and done importing math-verify; returns how
    many are ready (fewer if some could not start; never raises)."""
    helpers = []
    try:
        while len(helpers) < num_workers:
            helpers.append(_POOL.acquire())
    except OSError:  # could not start one: report fewer
        pass
    ready = 0
    for helper in helpers:
        try:
            helper._wait_ready()
            ready += 1
            _POOL.release(helper)
        except (EOFError, OSError):
            helper.kill()
            _POOL.discard(helper)
    return ready


# ---------------------------------------------------------------- public reward API


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


def _check_options(fallback, timeout_s, verify_fn) -> None:
    _check_fallback(fallback)
    if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < float("inf")):
        raise ValueError(f"timeout_s: expected a positive finite number, got {timeout_s!r}")
    if verify_fn is not None and not (isinstance(verify_fn, str) and ":" in verify_fn):
        raise ValueError(f"verify_fn: expected 'module:function' or None, got {verify_fn!r}")


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
    try:
        helper = _POOL.acquire()
    except OSError:  # cannot start a process (fd or memory exhaustion)
        return "errors"
    try:
        outcome = helper.verify(answer, gold, timeout_s, verify_fn)
    except _HelperFailed as failure:
        _POOL.replace(helper)
        return failure.args[0]
    except BaseException:  # e.g. KeyboardInterrupt mid-call: do not return a busy pipe
        helper.kill()
        _POOL.discard(helper)
        raise
    _POOL.release(helper)
    return outcome


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
    _check_options(fallback, timeout_s, verify_fn)
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
        raise ValueError(f"golds: expected one per response ({len(responses)}), got {len(golds)}")
    if not (isinstance(num_workers, int) and num_workers >= 1):
        raise ValueError(f"num_workers: expected an int >= 1, got {num_workers!r}")
    _check_options(fallback, timeout_s, verify_fn)

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
