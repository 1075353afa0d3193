"""No data lost: the two former crash windows (re-saving a checkpoint step, rewriting the
metrics log on resume) killed with SIGKILL inside the window, a disk that fills mid-save,
NaN weights refused at save/export, NaN/Inf metrics kept visible, one run per directory."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from prefix_rft.errors import NonFiniteError, UserError
from prefix_rft.metrics_log import MetricsLogger, read_metrics
from prefix_rft.run import checkpoint as C
from prefix_rft.run.runlock import RunDirLocked, RunLock

ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _kill_inside(script: str, pause: str, tmp_path: Path) -> None:
    """Run ``script`` in a subprocess with the test pause ``pause``; SIGKILL it once it
    reports being inside the window."""
    env = dict(os.environ, PREFIX_RFT_TEST_PAUSE=f"{pause}:60", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(tmp_path)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            if f"test pause at {pause}" in line:
                break
            assert time.monotonic() < deadline
        else:
            pytest.fail(f"the subprocess never reached the pause (rc {proc.wait()})")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


_RESAVE = """
import sys, torch
from prefix_rft.run import checkpoint as C
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
with torch.no_grad():
    model[0].weight.add_(1.0)      # the re-save holds different weights
C.save_checkpoint(sys.argv[1], 1, model=model, keep_last=1)
"""


def test_kill_during_checkpoint_resave_keeps_a_checkpoint(tmp_path):
    model = _model()
    C.save_checkpoint(tmp_path, 1, model=model, keep_last=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _kill_inside(_RESAVE, "checkpoint-replace", tmp_path)
    # the old step_000001 is aside, the new one still a temp directory: resume finds the old
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".old-step_000001", ".tmp-step_000001"]
    latest = C.resolve_resume("auto", tmp_path)
    assert latest is not None and [s for s, _ in C.list_checkpoints(tmp_path)] == [1]
    fresh = _model(seed=3)
    assert C.load_checkpoint(latest, model=fresh)["step"] == 1
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key])
    # the next save tidies up: the old copy is put back, the temp removed
    C.save_checkpoint(tmp_path, 2, model=model, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]


def test_resave_replaces_old_copy(tmp_path):
    model = _model()
    C.save_checkpoint(tmp_path, 1, model=model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    C.save_checkpoint(tmp_path, 1, model=model)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    state = torch.load(tmp_path / "checkpoints/step_000001/model.pt", weights_only=True)
    assert torch.equal(state["0.weight"], model[0].weight)


_REWRITE = """
import sys
from prefix_rft.metrics_log import MetricsLogger
MetricsLogger(sys.argv[1], total_steps=5, start_step=1, tensorboard="false", progress=False)
"""


def test_kill_during_metrics_rewrite_keeps_every_row(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=5, tensorboard="false", progress=False)
    for step in (1, 2, 3):
        log.log(step, {"reward_mean": step / 10})
    log.close()
    original = (tmp_path / "metrics.jsonl").read_text()
    _kill_inside(_REWRITE, "metrics-rewrite", tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == original
    MetricsLogger(tmp_path, total_steps=5, start_step=1, tensorboard="false",
                  progress=False).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    assert not list(tmp_path.glob(".tmp-*"))


def test_torn_last_line_is_dropped_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    log = MetricsLogger(tmp_path, total_steps=5, start_step=2, tensorboard="false", progress=False)
    log.log(3, {"loss": 0.25})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 3]


def test_non_finite_metrics_stay_visible(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=2, tensorboard="false", progress=False)
    log.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "neg": float("-inf"),
                "ok": 1.5, "text": "n/a"})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" in line and "-Infinity" in line and "null" in line  # null: not a number
    row = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert math.isnan(row["loss"]) and row["grad_norm"] == math.inf and row["neg"] == -math.inf
    assert row["ok"] == 1.5 and row["text"] is None
    assert json.loads(line)["grad_norm"] == math.inf  # plain json.loads reads it back


def test_non_finite_weights_are_never_saved(tmp_path):
    model = _model()
    C.save_checkpoint(tmp_path, 1, model=model, keep_last=1)
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step_000002.*2\.bias \(1 NaN"):
        C.save_checkpoint(tmp_path, 2, model=model, keep_last=1)
    with pytest.raises(NonFiniteError, match="refusing to export"):
        C.save_hf_model(model, None, tmp_path / "final")
    # keep_last=1, yet the good step 1 survives and nothing else was written
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    assert not (tmp_path / "final").exists()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not permitted'})")


def test_disk_full_mid_save_is_one_clear_error(tmp_path):
    small = tmp_path / "small"
    _mount_tmpfs(small, "96k")
    try:
        model = torch.nn.Linear(40, 40)  # ~6.5 KB of weights, ~20 KB with the optimizer
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 40)).sum().backward()
        opt.step()
        C.save_checkpoint(small, 1, model=model, optimizer=opt, keep_last=0)
        big = torch.nn.Linear(200, 200)  # 160 KB: does not fit
        with pytest.raises(UserError, match=r"^no space left on device: .*model\.pt"):
            C.save_checkpoint(small, 2, model=big, keep_last=0)
        # the partial checkpoint is gone (space given back), the good one resumable
        assert [s for s, _ in C.list_checkpoints(small)] == [1]
        assert not list((small / "checkpoints").glob(".tmp-*"))
        C.load_checkpoint(C.find_latest(small), model=torch.nn.Linear(40, 40))
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_second_lock_on_a_run_dir_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirLocked, match=r"train.run_dir .* is in use by another run "
                                               r"\(pid \d+"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path) as lock:  # released: free again
        assert lock.held


_HOLD = """
import sys, time
from prefix_rft.errors import crash_point
from prefix_rft.run.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
crash_point("holding-lock")
"""


def test_lock_of_a_killed_run_is_not_stale(tmp_path):
    env_pause = "holding-lock"
    _kill_inside(_HOLD, env_pause, tmp_path)
    assert (tmp_path / ".lock").exists()  # the file stays, the lock died with its process
    with RunLock(tmp_path) as lock:
        assert lock.held


def test_lock_in_read_only_dir_is_one_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs and root ignores permissions")
        ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match=r"^(read-only file system|permission denied): "
                                            r".*ro/run"):
            RunLock(ro / "run").acquire()
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=False)
        else:
            ro.chmod(0o700)
