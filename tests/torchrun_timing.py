"""Timeouts for the tests that start ``torchrun``, derived from measured durations.

A fixed timeout either fails on a loaded machine (the FSDP2 test took 82-84 s of a fixed 90 s
on the 2-core CI machine under load) or, set generously, lets a hung job block CI for long.
Here each torchrun command has its measured wall time and the load at which it was measured;
its timeout is ``SAFETY x measured x max(1, load now / load then)`` (load = 1-minute load
average per core), at least ``MIN_TIMEOUT_S``, so a busier machine waits proportionally
longer and a hung job still fails within minutes.

Re-measure after a change that makes a worker slower (the times are appended as JSON lines):

    PREFIX_RFT_TORCHRUN_TIMES=/tmp/times.jsonl python -m pytest -q -m distributed
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

SAFETY = 4.0
MIN_TIMEOUT_S = 120.0  # torchrun's start-up alone varies by tens of seconds on a busy machine
# command name -> (wall seconds measured, 1-minute load average per core at the time), from
# `PREFIX_RFT_TORCHRUN_TIMES=... python -m pytest -m distributed` on the 2-core machine shared
# with four other jobs (2026-12-07, load per core 6.7-7.9). Entries marked (call) are the whole
# test's time (torchrun plus the single-process reference), an upper bound for the command.
MEASURED: dict[str, tuple[float, float]] = {
    "fsdp2_step": (36.1, 7.9),  # tests/test_distributed.py (dist_worker.py)
    "save_fault": (24.6, 7.7),  # tests/test_distributed_save.py, slowest of the 3 faults
    "save_stall": (26.6, 6.7),  # tests/test_distributed_save.py, a rank 12 s late
    "packing_update": (66.0, 7.7),  # (call) tests/test_packing_update.py
    "precision_step": (31.5, 7.7),  # (call) tests/test_precision.py, slower dtype (bf16)
    "train_loop": (36.3, 7.7),  # (call) tests/test_train_e2e.py, 2 steps of the real loop
    "lowmem_offload": (41.5, 7.7),  # (call) tests/test_lowmem_train.py, optimizer offload
    "family_loop": (12.1, 0.39),  # tests/test_prefix_family_train.py (2026-12-07, idle machine)
}


def load_per_core() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def torchrun_timeout(name: str, load: float | None = None) -> float:
    """Seconds to allow the torchrun command ``name`` (a key of ``MEASURED``) at ``load``
    (1-minute load average per core; default: now)."""
    measured_s, measured_load = MEASURED[name]
    load = load_per_core() if load is None else load
    return max(MIN_TIMEOUT_S, SAFETY * measured_s * max(1.0, load / measured_load))


def run_torchrun(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` with the timeout of ``name``; a timeout fails the test saying
    what was measured, what was allowed and the load now."""
    timeout = torchrun_timeout(name)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-3000:]
        pytest.fail(f"torchrun {name!r} still running after {timeout:.0f} s (measured "
                    f"{MEASURED[name][0]:.0f} s at load {MEASURED[name][1]:.1f}/core, now "
                    f"{load_per_core():.1f}/core): {tail!r}")
    record = os.environ.get("PREFIX_RFT_TORCHRUN_TIMES")
    if record:
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"name": name, "wall_s": round(time.monotonic() - start, 1),
                                     "load_per_core": round(load_per_core(), 2)}) + "\n")
    return proc
