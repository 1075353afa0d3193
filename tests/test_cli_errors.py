"""Every `prefix-rft` command reports a user mistake the same way as `train`: one line,
``prefix-rft <command>: error: ...``, exit status 2; ``--debug`` adds the traceback."""

from __future__ import annotations

import pytest
from train_helpers import shared_assets

from prefix_rft import cli


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def _mistakes(assets: dict, tmp) -> list[tuple[str, list[str], str]]:
    """(command, its arguments, a piece of the expected message) per user mistake."""
    missing_yaml, missing_data = str(tmp / "missing.yaml"), str(tmp / "missing.jsonl")
    model, data = assets["model"], assets["test"]
    read_only = tmp / "read-only"
    read_only.mkdir(exist_ok=True)
    read_only.chmod(0o500)
    return [
        ("train", ["--config", missing_yaml], "does not exist"),
        ("train", ["stray"], "unexpected argument 'stray'"),
        ("eval", ["--model", model, "--data", missing_data], "does not exist"),
        ("eval", ["--model", str(tmp / "no-model"), "--data", data], "--model must be"),
        ("eval", ["--model", model, "--data", data, "--prompt-template", "bad"],
         "--prompt-template"),
        ("eval", ["--model", model, "--data", data, "--batch-questions", "0"],
         "--batch-questions"),
        ("eval", ["--model", model, "--data", data, "--device", "cpu", "--k", "1",
                  "--max-tokens", "2", "--max-rows", "1", "--no-progress",
                  "--out", str(read_only / "sub")], "read-only"),
        ("demo", ["--workdir", str(tmp / "demo"), "--optim.lrr=1"], "unknown config key"),
        ("demo", ["--workdir", str(tmp / "demo"), "--rollout.group_size=0"],
         "rollout.group_size"),
        ("plan", ["--config", missing_yaml], "does not exist"),
        ("plan", ["--config", missing_yaml, "--gpus", "0"], "--gpus must be >= 1"),
        ("bench", ["nope"], "unknown benchmark 'nope'"),
    ]


def test_user_mistakes_are_one_line_with_status_2(tiny_assets, tmp_path, capsys):
    import os

    for command, argv, message in _mistakes(tiny_assets, tmp_path):
        if message == "read-only" and os.geteuid() == 0:
            continue  # root writes into a read-only directory anyway
        code = cli.main([command, *argv])
        err = capsys.readouterr().err
        assert code == 2, (command, argv, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (command, argv, err[-2000:])
        prefix = f"prefix-rft {command}" + (" nope" if command == "bench" else "")
        assert lines[0].startswith(f"{prefix}: error: ") and message in lines[0], lines[0]


@pytest.mark.parametrize("argv", [
    ["plan", "--config", "missing.yaml", "--debug"],
    ["bench", "--debug", "nope"],
    ["demo", "--debug", "--optim.lrr=1"],
    ["train", "--debug", "--config", "missing.yaml"],
])
def test_debug_adds_the_traceback(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith(
        f"prefix-rft {argv[0]}")


def test_a_benchmark_refusing_its_arguments_exits_2(monkeypatch, capsys):
    import sys
    import types

    fake = types.ModuleType("benchmarks.fake")

    def main(argv):
        raise SystemExit("prefix-rft bench fake --gpu: no CUDA device")

    fake.main = main
    monkeypatch.setitem(sys.modules, "benchmarks.fake", fake)
    monkeypatch.setitem(cli.BENCHMARKS, "fake", "benchmarks.fake")
    assert cli.main(["bench", "fake", "--gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err
