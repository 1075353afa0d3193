"""A save in which one rank fails stops every rank with the same line (2 gloo ranks under
torchrun, faults injected by tests/dist_save_worker.py); torchrun timeouts come from measured
durations (tests/torchrun_timing.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from torchrun_timing import run_torchrun, torchrun_timeout

TESTS = Path(__file__).resolve().parent


def _save_with_fault(tmp_path: Path, fault: str, name: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "dist_save_worker.py"), str(tmp_path), fault]
    proc = run_torchrun(name, cmd, env)
    lines = {rank: (tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)
             if (tmp_path / f"rank{rank}.txt").exists()}
    return proc, lines


@pytest.mark.distributed
@pytest.mark.parametrize("fault,message", [
    ("write@0", "saving checkpoint step_000001 failed on rank 0: no space left on device: "),
    ("create@0", "saving checkpoint step_000001 failed on rank 0: read-only file system: "),
    ("write@1", "saving checkpoint step_000001 failed on rank 1: no space left on device: "),
])
def test_a_failed_save_on_one_rank_stops_every_rank_with_the_same_line(tmp_path, fault, message):
    proc, lines = _save_with_fault(tmp_path, fault, "save_fault")
    assert proc.returncode != 0
    assert set(lines) == {0, 1}, proc.stderr[-3000:]
    assert lines[0] == lines[1], lines
    assert lines[0].startswith(f"UserError: {message}") and "\n" not in lines[0], lines[0]
    checkpoints = tmp_path / "checkpoints"
    assert not list(checkpoints.glob("step_*")) and not list(checkpoints.glob(".tmp-*"))


@pytest.mark.distributed
def test_a_rank_that_does_not_answer_stops_the_others_after_the_timeout(tmp_path):
    start = time.monotonic()
    proc, lines = _save_with_fault(tmp_path, "stall@1", "save_stall")
    assert proc.returncode != 0
    assert lines[0] == ("UserError: saving checkpoint step_000001: another rank did not answer "
                        "within 3 s; stopping (rank 0)"), lines
    assert time.monotonic() - start < torchrun_timeout("save_stall")
