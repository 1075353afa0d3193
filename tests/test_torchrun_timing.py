"""The torchrun tests' timeouts come from measured durations (tests/torchrun_timing.py), not
fixed numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torchrun_timing import MEASURED, MIN_TIMEOUT_S, SAFETY, torchrun_timeout

TESTS = Path(__file__).resolve().parent


def test_torchrun_timeouts_scale_with_the_measured_duration_and_load():
    measured_s, measured_load = MEASURED["packing_update"]
    assert SAFETY * measured_s > MIN_TIMEOUT_S  # else the floor below decides
    assert torchrun_timeout("packing_update", load=0.1) == SAFETY * measured_s  # never below
    assert torchrun_timeout("packing_update", load=2 * measured_load) == 2 * SAFETY * measured_s
    assert torchrun_timeout("save_fault", load=0.1) == MIN_TIMEOUT_S
    with pytest.raises(KeyError):
        torchrun_timeout("not measured")


def test_no_torchrun_test_has_a_fixed_timeout():
    """Every test that starts torchrun goes through run_torchrun (timeout from MEASURED)."""
    users = []
    for path in sorted(TESTS.glob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        if '"torch.distributed.run"' not in text:
            continue
        users.append(path.name)
        assert "run_torchrun(" in text, f"{path.name} starts torchrun without run_torchrun"
        assert not re.search(r"subprocess\.run\([^)]*timeout=\d", text), path.name
        for name in re.findall(r"run_torchrun\(\s*\"(\w+)\"", text):
            assert name in MEASURED, f"{path.name}: {name!r} has no measured duration"
    assert len(users) >= 5, users
