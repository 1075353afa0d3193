"""One clean line per user mistake: the model-free preflight checks (paths, data format,
resume, device) and the error reporting around a command."""

from __future__ import annotations

import errno
import shutil

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
