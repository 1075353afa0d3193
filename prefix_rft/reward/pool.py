r"""Sandboxed answer verification: math-verify in helper processes, with a hard time limit.

``verify(answer, gold, timeout_s, verify_fn)`` returns an outcome name (``"correct"``,
``"wrong"``, ``"parse_failures"``, ``"timeouts"``, ``"errors"``; see
:class:`prefix_rft.reward.RewardStats`) and never raises.

Why a helper process. math-verify (sympy underneath) can run for minutes or forever on
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
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from .extract import is_balanced

__all__ = ["HARD_KILL_GRACE_S", "shutdown_workers", "verify", "warmup"]

_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine; not part of the call limit
HARD_KILL_GRACE_S = 0.25  # the helper's timer fires at the limit; we kill it this much later

# ---------------------------------------------------------------- the helper process side


class _SoftTimeout(BaseException):
    """Raised by the helper's own timer; a BaseException so math-verify's
    ``except Exception`` clauses do not swallow it."""


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
    if is_balanced(text):
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

    # Also pay the parsers' and sympy's lazy first-use set-up (hundreds of ms, seconds on a
    # busy machine) now: charged to the first real call's time limit, it turned correct
    # answers into timeouts.
    with contextlib.suppress(Exception):
        _default_verify(_parse_latex_or_plain("1"), _parse_latex_or_plain(r"\frac{2}{2}"))

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
        # the directory holding the prefix_rft package: this file is prefix_rft/reward/pool.py
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        code = ("import sys; from prefix_rft.reward.pool import _helper_main; "
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


def verify(answer: str, gold: str, timeout_s: float, verify_fn: str | None) -> str:
    """Outcome name of checking ``answer`` against ``gold`` in a helper; never raises
    (except KeyboardInterrupt and the like, after killing the helper it interrupted).

    A helper that misses its deadline or dies is killed and replaced (the outcome is then
    ``"timeouts"`` or ``"errors"``); one that cannot be started gives ``"errors"``.
    """
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
