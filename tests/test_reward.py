"""Tests for prefix_rft.reward: answer extraction, math-verify rewards, time limits, stats.

All CPU. Verification runs in helper processes started by the module; a tiny verifier
module written to a temp dir (on PYTHONPATH for the helpers) stands in for a verifier
that sleeps (interruptible: the helper's soft timer) or is stuck in C (signals blocked:
only the caller's hard kill stops it).
"""

import functools
import multiprocessing
import os
import random
import sys
import textwrap
import threading
import time

import psutil
import pytest

from prefix_rft.reward import (
    RewardStats,
    extract_answer,
    math_reward,
    math_rewards,
    shutdown_workers,
    warmup,
)
from prefix_rft.reward import pool as reward_pool

# Scheduling slack on top of a time limit: this machine is small and shared.
SLACK_S = 0.75

FAKE_VERIFIERS = textwrap.dedent(
    """
    import os, signal, time

    def sleepy(gold, answer):          # slow in Python: the helper's own timer cuts it
        time.sleep(60)
        return True

    def stuck(gold, answer):           # deaf to signals, like a C loop: needs a kill
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
        return True

    def crash(gold, answer):           # the helper process dies mid-call
        os._exit(3)

    def selective(gold, answer):       # normal, except gold 999 hangs and gold 666 raises
        from math_verify import verify
        text = " ".join(str(g) for g in gold)
        if "999" in text:
            time.sleep(60)
        if "666" in text:
            raise RuntimeError("verifier bug")
        return verify(gold, answer, timeout_seconds=None)
    """
)


@pytest.fixture(scope="module", autouse=True)
def fake_verifier_path(tmp_path_factory):
    """Put the fake verifiers on the helpers' PYTHONPATH; helpers start after this."""
    folder = tmp_path_factory.mktemp("verifiers")
    (folder / "fake_verifiers.py").write_text(FAKE_VERIFIERS)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), old]))
    shutdown_workers()
    warmup()
    yield folder
    shutdown_workers()
    if old is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = old


def _helper_pids() -> set[int]:
    """Live helper processes started by this process."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and any(
                "_helper_main" in part for part in child.cmdline()
            ):
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


# ---------------------------------------------------------------- answer-pair table
# (response, gold, expected reward, fallback). Each expectation was checked against
# math-verify 0.9; pairs where its verdict hinges on a tolerance or a convention
# (0.3333 vs 1/3, 3.14 vs pi, 1e3, degrees vs radians) were left out.
PAIRS = [
    # fractions and decimals
    (r"so \boxed{\frac{1}{2}}.", "0.5", 1.0, "none"),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0, "none"),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0, "none"),
    (r"\boxed{\tfrac{3}{4}}", r"\frac34", 1.0, "none"),
    (r"\boxed{1/3}", r"\frac{1}{3}", 1.0, "none"),
    (r"\boxed{2/4}", r"\frac{1}{2}", 1.0, "none"),
    (r"\boxed{\dfrac{1}{2}}", r"\dfrac{2}{4}", 1.0, "none"),
    (r"\boxed{\frac{1}{2}}", "1/2", 1.0, "none"),
    (r"\boxed{\frac{2}{3}}", r"\frac{3}{2}", 0.0, "none"),
    (r"\boxed{7/2}", "$3.5$", 1.0, "none"),
    (r"\boxed{3.5}", r"\boxed{\frac72}", 1.0, "none"),
    (r"\boxed{2}", "2.0", 1.0, "none"),
    (r"\boxed{2.0001}", "2", 0.0, "none"),
    (r"\boxed{1000}", "1,000", 1.0, "none"),
    (r"\boxed{10^{3}}", "1000", 1.0, "none"),
    # intervals, sets, tuples
    (r"\boxed{(1, 2]}", "(1,2]", 1.0, "none"),
    (r"\boxed{[1, 2]}", "(1,2]", 0.0, "none"),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", 1.0, "none"),
    (r"\boxed{[0, \infty)}", r"[0,\infty)", 1.0, "none"),
    (r"\boxed{x \in [1,2]}", "[1,2]", 1.0, "none"),
    (r"\boxed{\{1, 2\}}", r"\{2,1\}", 1.0, "none"),
    (r"\boxed{1,2}", "2,1", 1.0, "none"),
    (r"\boxed{(1,2)}", "(1,2)", 1.0, "none"),
    (r"\boxed{(2,1)}", "(1,2)", 0.0, "none"),
    # units, percentages, currency
    (r"\boxed{5 \text{ cm}}", "5", 1.0, "none"),
    (r"\boxed{5\text{cm}}", "5", 1.0, "none"),
    (r"\boxed{6 \text{ cm}}", "5", 0.0, "none"),
    (r"\boxed{50\%}", "50", 1.0, "none"),
    (r"\boxed{50\%}", r"50\%", 1.0, "none"),
    (r"\boxed{\$5}", "5", 1.0, "none"),
    (r"\boxed{90^\circ}", "90", 1.0, "none"),
    # signs, roots, constants, expressions
    (r"\boxed{-3}", "-3", 1.0, "none"),
    (r"\boxed{-3}", "3", 0.0, "none"),
    (r"\boxed{- 3}", "-3", 1.0, "none"),
    (r"\boxed{0}", "-0", 1.0, "none"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0, "none"),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0, "none"),
    (r"\boxed{\pi}", r"\pi", 1.0, "none"),
    (r"\boxed{2\pi}", r"2\pi", 1.0, "none"),
    (r"\boxed{\infty}", r"\infty", 1.0, "none"),
    (r"\boxed{-\infty}", r"\infty", 0.0, "none"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0, "none"),
    (r"\boxed{x^2+1}", "(x+1)^2", 0.0, "none"),
    (r"\boxed{x = 5}", "5", 1.0, "none"),
    (r"\boxed{a}", "b", 0.0, "none"),
    (r"\boxed{\text{(B)}}", "B", 1.0, "none"),
    # nested braces and box forms
    (r"\boxed{{{7}}}", "7", 1.0, "none"),
    (r"\boxed{\frac{1}{\frac{1}{2}}}", "2", 1.0, "none"),
    (r"\fbox{7}", "7", 1.0, "none"),
    (r"$\boxed 5$", "5", 1.0, "none"),
    (r"hence \boxed 5.", "5", 1.0, "none"),
    (r"\boxed x", "x", 1.0, "none"),
    # several boxes: the last complete one wins
    (r"\boxed{1} then \boxed{2}", "2", 1.0, "none"),
    (r"\boxed{1} then \boxed{2}", "1", 0.0, "none"),
    (r"\boxed{3} and finally \boxed{4", "3", 1.0, "none"),
    (r"\boxed{3} and \boxed{}", "3", 1.0, "none"),
    # no box: the fallback decides
    (r"\boxed{}", "0", 0.0, "none"),
    (r"\boxed{3", "3", 0.0, "none"),
    ("the answer is 7", "7", 0.0, "none"),
    ("The answer is $7$.", "7", 1.0, "answer_is"),
    ("Answer: 1/2", "0.5", 1.0, "answer_is"),
    ("so 3 + 4 = 7", "7", 1.0, "last_number"),
    ("so 3 + 4 = 7", "8", 0.0, "last_number"),
    ("total: 1,234.5 dollars", "1234.5", 1.0, "last_number"),
    ("Answer: 9\nCheck: 2 + 7", "9", 1.0, ("answer_is", "last_number")),
    ("we got 3 and then 7", "7", 1.0, ("answer_is", "last_number")),
    ("no answer at all", "7", 0.0, ("answer_is", "last_number")),
    ("", "7", 0.0, "last_number"),
]


@pytest.mark.parametrize("response, gold, expected, fallback", PAIRS)
def test_answer_pairs(response, gold, expected, fallback):
    assert math_reward(response, gold, fallback=fallback, timeout_s=10.0) == expected


def test_table_is_large_and_mixed():
    assert len(PAIRS) >= 40
    assert {expected for _, _, expected, _ in PAIRS} == {0.0, 1.0}


def test_single_box_rows_agree_with_math_verify_end_to_end():
    """Independent reference: math-verify's own extraction on the raw response (it finds
    a single braced ``\\boxed{}`` itself), in this process, gold wrapped in ``\\boxed{}``."""
    from math_verify import parse, verify

    rows = [
        (response, gold) for response, gold, _, fallback in PAIRS
        if fallback == "none" and response.count(r"\boxed{") == 1
        and r"\boxed{}" not in response and response.rstrip(".").endswith("}")
    ]
    assert len(rows) >= 35
    ours, _ = math_rewards([r for r, _ in rows], [g for _, g in rows], timeout_s=10.0)
    for (response, gold), our_reward in zip(rows, ours):
        wrapped = gold if ("$" in gold or r"\boxed" in gold) else r"\boxed{" + gold + "}"
        reference = verify(parse(wrapped, parsing_timeout=None),
                           parse(response, parsing_timeout=None), timeout_seconds=None)
        assert our_reward == float(reference), (response, gold)


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{\frac{a}{b}}", r"\frac{a}{b}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\boxed{a \} b}", r"a \} b"),
        (r"\boxed {4}", "4"),
        (r"\boxed{1}\fbox{2}", "2"),
        (r"\fbox{1}\boxed{2}", "2"),
        (r"\[\boxed 12\]", "12"),
        (r"\boxed{\boxed{3}}", "3"),
        (r"\boxed{1} \boxed{2", "1"),
        (r"\boxed{1} \boxed{  }", "1"),
        (r"\boxedtext{1}", None),
        ("no box here", None),
    ],
)
def test_extract_answer_boxes(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_fallbacks():
    text = "We get 3, then 12. The answer is: $-4.5$.\nDone, 99 words."
    assert extract_answer(text) is None
    assert extract_answer(text, fallback="answer_is") == "-4.5"
    assert extract_answer(text, fallback="last_number") == "99"
    assert extract_answer(r"\boxed{1} answer is 2", fallback="answer_is") == "1"
    # "İ".lower() is two characters: offsets must not come from a lowered copy
    assert extract_answer("İİİ final ANSWER IS: 42.\nmore", fallback="answer_is") == "42"
    with pytest.raises(ValueError, match="fallback"):
        extract_answer("x", fallback="first_number")


@functools.lru_cache(maxsize=1)
def _huge_inputs() -> dict[str, str]:
    megabyte = 1 << 20
    noise = "".join(random.Random(1).choices("ab{}\\$ 0123456789\n", k=megabyte))
    return {
        "open_boxes": r"\boxed{" * (megabyte // 7),
        "open_braces": "{" * megabyte + r"\boxed{5}",
        "close_braces": r"\boxed{5" + "}" * megabyte,
        "backslashes": "\\" * megabyte,
        "digits": "7" * megabyte,
        "answer_markers": "answer is " * (megabyte // 10),
        "unbraced": r"\boxed " + "x" * megabyte,
        "noise_then_box": noise + r"\boxed{5}",
    }


def test_extract_answer_is_linear_on_1mb_inputs():
    for name, text in _huge_inputs().items():
        for fallback in ("none", ("answer_is", "last_number")):
            start = time.perf_counter()
            extract_answer(text, fallback=fallback)
            elapsed = time.perf_counter() - start
            assert elapsed < 2.0, f"{name}: {elapsed:.2f}s"


# ---------------------------------------------------------------- adversarial strings


def _adversarial_strings(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = ("0123456789+-*/^_{}()[]\\$.,= abcxyz\x00\x07\x1b\x7f\u200b\u202e\ufeff"
                "\u00e9\u03c0\u221e\U0001F600\ud800")
    commands = [r"\frac", r"\sqrt", r"\boxed", r"\fbox", r"\left(", r"\right)", r"\\",
                r"\begin{matrix}", r"\end{matrix}", r"\text{", r"\infty", r"\pi", "^{",
                "_{", r"\{", r"\}", "$", "$$", r"\dfrac", "&", "%", "#"]
    strings = []
    for _ in range(1960):
        pieces = [rng.choice(commands) if rng.random() < 0.3 else rng.choice(alphabet)
                  for _ in range(rng.randint(0, 40))]
        text = "".join(pieces)
        strings.append(r"\boxed{" + text + "}" if rng.random() < 0.25 else text)
    for depth in range(2, 5):  # towers: 10^{10^{10}} and up
        for base in ("10", "9", "2"):
            strings.append(r"\boxed{" + (base + "^{") * depth + base + "}" * depth + "}")
    for depth in (3, 30, 200_000):  # deep nesting of every kind
        strings.append(r"\boxed{" + "{" * depth + "1" + "}" * depth + "}")
        strings.append(r"\boxed{" + "(" * depth + "1" + ")" * depth + "}")
        strings.append(r"\boxed{" + r"\frac{1}{" * depth + "2" + "}" * depth + "}")
        strings.append(r"\boxed{\sqrt{" * depth)
    strings += [r"\boxed{\frac{}", r"\boxed{\sqrt}", r"\boxed{^^^}", r"\boxed{\left(}",
                r"\boxed{\begin{matrix}}", r"\boxed{\}", r"\boxed{$}", r"\boxed{1/0}",
                r"\boxed{0/0}", r"\boxed{\infty - \infty}", r"\boxed{100000!!}",
                r"\boxed{\log(0)}", "\\boxed{\x00}", "\\boxed{\ud800}",
                r"\boxed{" + "9" * 999 + "}"]
    strings += list(_huge_inputs().values())
    return strings


def test_adversarial_strings_never_raise_or_overrun():
    strings = _adversarial_strings()
    assert len(strings) >= 2000
    limit = 0.25
    golds = ["5", r"\frac{1}{2}", "(1,2]", "x^2", r"\{"]
    stats = RewardStats()
    for index, text in enumerate(strings):
        starts_before = reward_pool._POOL.started
        begin = time.perf_counter()
        fallback = ("answer_is", "last_number") if index % 4 == 0 else "none"
        value = math_reward(text, golds[index % len(golds)], timeout_s=limit,
                            fallback=fallback, stats=stats)
        elapsed = time.perf_counter() - begin
        assert value in (0.0, 1.0)
        if reward_pool._POOL.started != starts_before:
            warmup()  # a helper was killed; let its successor import off the clock
        # The limit bounds verification; multi-MB inputs also pay the linear extraction
        # (timed on its own in test_extract_answer_is_linear_on_1mb_inputs).
        budget = limit + SLACK_S + (2.0 if len(text) > 100_000 else 0.0)
        assert elapsed <= budget, f"{elapsed:.2f}s on {text[:80]!r}"
    assert stats.total == len(strings)
    assert stats.timeouts >= 5  # the towers and 100000!! really hit the limit
    assert stats.errors == 0  # every input is a str: no crash escaped as an error
    parts = stats.correct + stats.wrong + stats.no_answer + stats.parse_failures
    assert parts + stats.timeouts == stats.total


def test_non_string_inputs_are_errors_not_exceptions():
    values, stats = math_rewards([None, b"\\boxed{1}", 5, r"\boxed{5}"], ["1", "1", "5", 5])
    assert values == [0.0, 0.0, 0.0, 1.0]
    assert stats.errors == 3 and stats.correct == 1


# ---------------------------------------------------------------- time limits


def _timed(function, *args, **kwargs):
    begin = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - begin


def test_slow_verifier_is_cut_by_the_helpers_timer():
    starts_before = reward_pool._POOL.started
    stats = RewardStats()
    value, elapsed = _timed(math_reward, r"\boxed{1}", "1", timeout_s=0.5,
                            verify_fn="fake_verifiers:sleepy", stats=stats)
    assert value == 0.0 and stats.timeouts == 1 and stats.total == 1
    assert elapsed <= 0.5 + SLACK_S
    assert reward_pool._POOL.started == starts_before  # soft path: no restart needed
    # verdicts are memoized, timeouts are not: the same call times out again
    math_reward(r"\boxed{1}", "1", timeout_s=0.3, verify_fn="fake_verifiers:sleepy", stats=stats)
    assert stats.timeouts == 2
    assert math_reward(r"\boxed{1}", "1") == 1.0


def test_stuck_verifier_is_killed_and_replaced():
    warmup()
    pids_before = _helper_pids()
    victim = reward_pool._POOL.idle[-1].process.pid  # the helper the next call checks out
    stats = RewardStats()
    value, elapsed = _timed(math_reward, r"\boxed{1}", "1", timeout_s=0.5,
                            verify_fn="fake_verifiers:stuck", stats=stats)
    assert value == 0.0 and stats.timeouts == 1
    assert elapsed <= 0.5 + SLACK_S
    assert victim in pids_before and not psutil.pid_exists(victim)  # killed and reaped
    assert len(_helper_pids()) == len(pids_before)  # one successor, nothing leaked
    assert math_reward(r"\boxed{1}", "1") == 1.0  # and it serves


def test_crashed_helper_is_an_error_and_replaced():
    stats = RewardStats()
    value = math_reward(r"\boxed{1}", "1", verify_fn="fake_verifiers:crash", stats=stats)
    assert value == 0.0 and stats.errors == 1 and stats.total == 1
    assert math_reward(r"\boxed{1}", "1") == 1.0


def test_real_slow_input_times_out():
    stats = RewardStats()
    value, elapsed = _timed(math_reward, r"\boxed{9^{9^{9^{9}}}}", "5", timeout_s=0.5,
                            stats=stats)
    assert value == 0.0 and stats.timeouts == 1
    assert elapsed <= 0.5 + SLACK_S


def test_time_limit_from_a_thread():
    results = {}

    def work():
        results["slow"] = _timed(math_rewards, [r"\boxed{1}"], ["1"], timeout_s=0.5,
                                 verify_fn="fake_verifiers:sleepy")
        results["fine"] = math_rewards([r"\boxed{\frac{1}{2}}"], ["0.5"])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    (values, stats), elapsed = results["slow"]
    assert values == [0.0] and stats.timeouts == 1
    assert elapsed <= 0.5 + SLACK_S
    assert results["fine"][0] == [1.0]


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_time_limit_inside_a_multiprocessing_worker(start_method):
    """Pool workers are daemonic (may not start multiprocessing children) and, with fork,
    inherit this process's helpers, which they must not use."""
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {start_method!r} is not available on {sys.platform}")
    responses = [r"\boxed{1}", r"\boxed{2}", "none", r"\boxed{3}"]
    golds = ["1", "999", "3", "666"]
    context = multiprocessing.get_context(start_method)
    with context.Pool(1) as pool:
        (values, stats), elapsed = _timed(
            pool.apply, math_rewards, (responses, golds),
            {"timeout_s": 0.5, "verify_fn": "fake_verifiers:selective"})
    assert values == [1.0, 0.0, 0.0, 0.0]
    assert (stats.correct, stats.timeouts, stats.no_answer, stats.errors) == (1, 1, 1, 1)
    assert elapsed < 60
    assert math_reward(r"\boxed{4}", "4") == 1.0  # our own helpers are intact


# ---------------------------------------------------------------- stats and batches


def test_stats_counts_on_a_hand_made_batch():
    batch = [
        (r"\boxed{\frac{1}{2}}", "0.5"),      # correct
        (r"\boxed{2}", "2"),                  # correct
        (r"\boxed{3}", "2"),                  # wrong
        ("I give up", "2"),                   # no answer
        (r"\boxed{}", "2"),                   # no answer (empty box)
        (r"\boxed{" + "1" * 2000 + "}", "2"),  # parse failure: over max_answer_chars
        (r"\boxed{2}", "   "),                # parse failure: empty gold
        (r"\boxed{2}", "999"),                # timeout
        (r"\boxed{2}", "666"),                # error: the verifier raised
        (None, "2"),                          # error: not a string
    ]
    values, stats = math_rewards([r for r, _ in batch], [g for _, g in batch],
                                 timeout_s=0.5, verify_fn="fake_verifiers:selective")
    assert values == [1.0, 1.0] + [0.0] * 8
    assert stats.as_dict() == {"total": 10, "correct": 2, "wrong": 1, "no_answer": 2,
                               "parse_failures": 2, "timeouts": 1, "errors": 2}
    merged = RewardStats()
    merged.merge(stats)
    merged.merge(stats)
    assert merged.total == 20 and merged.timeouts == 2


def test_parallel_batch_matches_serial_and_is_fast():
    responses = [rf"\boxed{{{i}/7}}" for i in range(60)]
    golds = [rf"\frac{{{i if i % 3 else i + 1}}}{{7}}" for i in range(60)]
    serial, serial_stats = math_rewards(responses, golds)
    parallel, parallel_stats = math_rewards(responses, golds, num_workers=2)
    assert serial == parallel and serial_stats == parallel_stats
    expected = [0.0 if i % 3 == 0 else 1.0 for i in range(60)]
    assert serial == expected
    _, elapsed = _timed(math_rewards, responses, golds)  # gold parses now cached
    assert elapsed < 3.0


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="golds"):
        math_rewards(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="timeout_s"):
        math_reward("a", "a", timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        math_reward("a", "a", timeout_s=float("nan"))
    with pytest.raises(ValueError, match="fallback"):
        math_rewards(["a"], ["a"], fallback="guess")
    with pytest.raises(ValueError, match="verify_fn"):
        math_reward("a", "a", verify_fn="math_verify.verify")
    with pytest.raises(ValueError, match="num_workers"):
        math_rewards(["a"], ["a"], num_workers=0)


def test_shutdown_leaves_no_helper_processes():
    assert math_reward(r"\boxed{1}", "1") == 1.0
    assert _helper_pids()
    shutdown_workers()
    assert not _helper_pids()
