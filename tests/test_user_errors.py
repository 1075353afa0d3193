"""One clean line per user mistake: the model-free preflight checks (paths, data format,
resume, device) and the error reporting around a command."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from train_helpers import shared_assets, tiny_config

from prefix_rft.errors import UserError, report_user_errors, user_error_from
from prefix_rft.preflight import preflight


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def _cfg(assets, tmp_path, **overrides):
    return tiny_config(assets, tmp_path / "run", **overrides)


def test_good_config_passes(tiny_assets, tmp_path):
    preflight(_cfg(tiny_assets, tmp_path, eval__files=[tiny_assets["test"]]))


def _expect(cfg, pattern):
    with pytest.raises(UserError, match=pattern) as info:
        preflight(cfg)
    assert "\n" not in str(info.value)


def test_model_path_mistakes(tiny_assets, tmp_path):
    _expect(_cfg(tiny_assets, tmp_path, model__path=""), r"^model.path is not set")
    _expect(_cfg(tiny_assets, tmp_path, model__path=str(tmp_path / "nope")),
            r"^model.path '.*nope' does not exist")
    (tmp_path / "empty").mkdir()
    _expect(_cfg(tiny_assets, tmp_path, model__path=str(tmp_path / "empty")),
            r"^model.path '.*empty' is not a HF model directory \(no config.json\)")


def test_tokenizer_path_mistakes(tiny_assets, tmp_path):
    _expect(_cfg(tiny_assets, tmp_path, model__tokenizer_path=str(tmp_path / "tok")),
            r"^model.tokenizer_path '.*tok' is not a directory")
    (tmp_path / "tok").mkdir()
    _expect(_cfg(tiny_assets, tmp_path, model__tokenizer_path=str(tmp_path / "tok")),
            r"^model.tokenizer_path '.*tok' has no tokenizer files")


def test_data_file_mistakes(tiny_assets, tmp_path):
    _expect(_cfg(tiny_assets, tmp_path, data__train_files=[]), r"^data.train_files is empty")
    _expect(_cfg(tiny_assets, tmp_path, data__train_files=[str(tmp_path / "x.jsonl")]),
            r"^data.train_files\[0\]: '.*x.jsonl' does not exist")
    (tmp_path / "empty.jsonl").write_text("")
    _expect(_cfg(tiny_assets, tmp_path, data__train_files=[str(tmp_path / "empty.jsonl")]),
            r"^data.train_files\[0\]: '.*empty.jsonl' is empty")
    _expect(_cfg(tiny_assets, tmp_path, data__format="parquet"),
            r"^data.train_files\[0\]: '.*train.jsonl' is not a parquet file")
    shutil.copy(tiny_assets["train"], tmp_path / "rows.txt")
    _expect(_cfg(tiny_assets, tmp_path, data__train_files=[str(tmp_path / "rows.txt")]),
            r"cannot tell the format of '.*rows.txt'.*set data.format")
    _expect(_cfg(tiny_assets, tmp_path, data__format="disk"), r"set data.format")
    (tmp_path / "t.parquet").write_bytes(b"PAR1" + b"\0" * 16)
    _expect(_cfg(tiny_assets, tmp_path, data__train_files=[str(tmp_path / "t.parquet")],
                 data__format="jsonl"), r"is a parquet file but .* says jsonl")


def test_eval_files_checked_before_training(tiny_assets, tmp_path):
    _expect(_cfg(tiny_assets, tmp_path, eval__files=[str(tmp_path / "bench.jsonl")]),
            r"^eval.files\[0\]: '.*bench.jsonl' does not exist")


def test_resume_mistakes(tiny_assets, tmp_path):
    _expect(_cfg(tiny_assets, tmp_path, checkpoint__resume=str(tmp_path / "old-run")),
            r"^checkpoint.resume '.*old-run' does not exist")
    (tmp_path / "old-run").mkdir()
    _expect(_cfg(tiny_assets, tmp_path, checkpoint__resume=str(tmp_path / "old-run")),
            r"^checkpoint.resume '.*old-run' holds no checkpoint")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(tiny_assets, tmp_path):
    _expect(_cfg(tiny_assets, tmp_path, train__device="cuda"),
            r"^train.device is cuda but no CUDA GPU is available")


def test_report_user_errors(capsys):
    def user_mistake():
        raise UserError("data.train_files[0]: 'x' does not exist: check the path")

    assert report_user_errors("prefix-rft train", user_mistake) == 2
    assert capsys.readouterr().err == ("prefix-rft train: error: data.train_files[0]: 'x' does "
                                       "not exist: check the path\n")

    def disk_full():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("unexpected pos 280576 vs 280468") from err

    assert report_user_errors("prefix-rft train", disk_full) == 2
    assert capsys.readouterr().err.startswith("prefix-rft train: error: no space left on device")

    def bug():
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        report_user_errors("prefix-rft train", bug)
    assert report_user_errors("x", lambda: 0) == 0


def test_debug_shows_the_traceback(capsys):
    def user_mistake():
        raise UserError("model.path is not set")

    assert report_user_errors("prefix-rft train", user_mistake, debug=True) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("prefix-rft train: error: model.path is not set\n")


def test_os_errors_name_the_path():
    err = user_error_from(OSError(errno.EROFS, "Read-only file system", "/runs/x/metrics.jsonl"))
    assert str(err).startswith("read-only file system: /runs/x/metrics.jsonl")
    assert user_error_from(OSError(errno.ENOENT, "nope")) is None  # not a user-fixable class


# ---------------------------------------------------------------- the command line
def _cli(argv, capsys):
    from prefix_rft.cli import main

    rc = main(["train", *argv])
    err = capsys.readouterr().err
    # progress bars (transformers' weight loading, datasets' split generation) are not errors
    lines = [line for line in err.splitlines()
             if line.strip() and not re.search(r"\[\d\d:\d\d", line)]
    return rc, lines


def _base_args(assets, run_dir):
    return [f"--model.path={assets['model']}", f"--data.train_files=[{assets['train']}]",
            f"--train.run_dir={run_dir}", "--train.device=cpu", "--train.steps=1",
            "--train.prompts_per_step=2", "--rollout.group_size=2",
            "--rollout.max_response_tokens=8", "--log.progress=false",
            "--log.tensorboard=false", "--log.plots=false", "--loss.kernel_impl=torch",
            "--model.gradient_checkpointing=false", "--checkpoint.save_final=false"]


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=nan", r"optim.lr must be a finite number, got nan"),
    ("--prefix.start=nan", r"prefix.start must be a finite number"),
    ("--reward.timeout_s=inf", r"reward.timeout_s must be a finite number, got inf"),
    ("--optim.betas=[0.9,.nan]", r"optim.betas\[1\] must be a finite number"),
    ("--model.path=/does/not/exist", r"model.path '/does/not/exist' does not exist"),
    ("--data.train_files=[/no/such.jsonl]", r"data.train_files\[0\]: '/no/such.jsonl' does "
                                            r"not exist"),
    ("--checkpoint.resume=/no/run", r"checkpoint.resume '/no/run' does not exist"),
    ("--data.problem_key=nope", r"no usable rows"),
])
def test_cli_user_errors_are_one_line(tiny_assets, tmp_path, capsys, override, message):
    rc, lines = _cli(_base_args(tiny_assets, tmp_path / "run") + [override], capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("prefix-rft train: error: ")
    assert re.search(message, lines[0]), lines[0]


def test_cli_yaml_syntax_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\ntrain:\n  steps: 3\n")
    rc, lines = _cli(["--config", str(bad)], capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert re.search(r"config file '.*bad.yaml' is not valid YAML .*line \d+", lines[0])


def test_cli_second_run_on_a_locked_dir(tiny_assets, tmp_path, capsys):
    from prefix_rft.run.runlock import RunLock

    with RunLock(tmp_path / "run"):
        rc, lines = _cli(_base_args(tiny_assets, tmp_path / "run"), capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert re.search(r"train.run_dir '.*run' is in use by another run \(pid \d+", lines[0])


def test_cli_read_only_run_dir(tiny_assets, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        rc, lines = _cli(_base_args(tiny_assets, ro / "run"), capsys)
    finally:
        subprocess.run(["umount", str(ro)], check=False)
    assert rc == 2 and len(lines) == 1, lines
    assert re.search(r"read-only file system: .*ro/run", lines[0])


def test_cli_disk_full_during_training(tiny_assets, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        rc, lines = _cli(_base_args(tiny_assets, small / "run"), capsys)
    finally:
        subprocess.run(["umount", str(small)], check=False)
    assert rc == 2, lines
    assert re.search(r"^prefix-rft train: error: no space left on device: .*small/run",
                     lines[-1]), lines


def test_cli_checks_run_before_heavy_imports(tmp_path):
    code = ("import sys; from prefix_rft.cli import main; "
            "rc = main(['train', '--model.path=/does/not/exist', '--train.device=cpu']); "
            "print('heavy:', [m for m in ('transformers', 'vllm', 'datasets') "
            "if m in sys.modules]); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 2, result.stderr
    assert "heavy: []" in result.stdout
    assert result.stderr.strip().splitlines() == [
        "prefix-rft train: error: model.path '/does/not/exist' does not exist: set it to a "
        "local HF model directory (with config.json and the weights)"]


def test_two_concurrent_runs_and_a_killed_one(tiny_assets, tmp_path, capsys):
    """A real run paused inside its first checkpoint save holds the directory: a second run
    stops at once with one line; after kill -9 of the first, a run starts again (no stale
    lock) and the killed run's half-written checkpoint is not taken for a checkpoint."""
    run_dir = tmp_path / "run"
    args = _base_args(tiny_assets, run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", PREFIX_RFT_TEST_PAUSE="checkpoint-replace:120")
    first = subprocess.Popen([sys.executable, "-m", "prefix_rft.cli", "train", *args],
                             env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True)
    try:
        for line in first.stderr:
            if "test pause at checkpoint-replace" in line:
                break
        else:
            pytest.fail(f"the first run never reached its checkpoint save (rc {first.wait()})")
        rc, lines = _cli(args, capsys)
        assert rc == 2 and len(lines) == 1, lines
        assert f"is in use by another run (pid {first.pid} " in lines[0]
    finally:
        first.kill()
        first.wait()
    from prefix_rft.run.checkpoint import list_checkpoints

    assert list_checkpoints(run_dir) == []  # only a .tmp- directory was left
    rc, lines = _cli(args + ["--resume", "auto"], capsys)
    assert rc == 0, lines
    assert [s for s, _ in list_checkpoints(run_dir)] == [1]
