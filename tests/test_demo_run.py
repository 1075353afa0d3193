"""``prefix-rft demo``: the quick smoke run end to end, asset reuse, argument errors, the table."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("transformers", reason="the demo needs transformers")

from prefix_rft.cli import main as cli_main  # noqa: E402
from prefix_rft.demo import run as demo_run  # noqa: E402
from prefix_rft.errors import UserError  # noqa: E402
from prefix_rft.metrics_log import read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``prefix-rft demo --quick`` through the CLI dispatcher, and a second one that reuses."""
    import contextlib
    import io

    workdir = tmp_path_factory.mktemp("demo")
    outputs = []
    for _ in range(2):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = cli_main(["demo", "--quick", "--workdir", str(workdir), "--threads", "1",
                             "--seed", "3"])
        outputs.append((code, buffer.getvalue()))
    return workdir, outputs


def test_quick_demo_writes_table_run_dir_and_plots(quick_run):
    workdir, [(code, out), _] = quick_run
    assert code == 0
    run_dir = workdir / "run"
    results = json.loads((run_dir / "demo_results.json").read_text())
    k = results["k"]
    assert results["steps"] == demo_run.QUICK_STEPS and results["seed"] == 3
    # The printed table carries exactly the saved numbers.
    for name, key in (("base", "before"), ("Prefix-RFT", "after")):
        r = results[key]
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert cells == [f"{100 * r[f'avg@{k}']:.1f}", f"{100 * r['pass@1']:.1f}",
                         f"{100 * r[f'pass@{k}']:.1f}", f"{r['mean_response_tokens']:.1f}"]
        assert 0.0 <= r[f"avg@{k}"] <= r[f"pass@{k}"] <= 1.0
        assert r["num_questions"] == results["eval_questions"]
    assert (run_dir / "demo_results.md").read_text().count("| Prefix-RFT |") == 1
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, demo_run.QUICK_STEPS + 1))
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "plots" / "before_after.png").stat().st_size > 0
    assert (run_dir / "plots" / "reward.png").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert "[demo] base:" in out and "train " in out  # progress lines along the way


def test_second_run_reuses_the_assets(quick_run):
    _, [(_, first), (code, second)] = quick_run
    assert code == 0
    assert "reusing the task" not in first and "base model saved" in first
    assert "reusing the task" in second and "base model saved" not in second


def test_config_points_at_the_workdir_and_overrides_win(tmp_path):
    args, overrides = demo_run.parse_args(["--workdir", str(tmp_path), "--seed", "5",
                                           "--steps", "7", "--optim.lr=2e-4",
                                           "--rollout.group_size", "6"])
    cfg = demo_run.demo_config(args, overrides, demo_run.asset_paths(str(tmp_path)))
    assert cfg.model.path == str(tmp_path / "assets" / "model")
    assert cfg.data.train_files == [str(tmp_path / "assets" / "train.jsonl")]
    assert cfg.eval.files == [str(tmp_path / "assets" / "test.jsonl")]
    assert cfg.train.run_dir == str(tmp_path / "run")
    got = (cfg.train.seed, cfg.train.steps, cfg.optim.lr, cfg.rollout.group_size)
    assert got == (5, 7, 2e-4, 6)
    assert cfg.train.device == "cpu" and cfg.loss.algo == "prefix_rft"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--eval-k", "0"], "--eval-k must be >= 1"),
    (["--engine", "onnx"], "invalid choice"),
    (["--demonstrator", "novice"], "invalid choice"),
    (["stray"], "unexpected argument 'stray'"),
    (["--config", "no/such.yaml"], "does not exist"),
])
def test_argument_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        demo_run.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("--optim.lrr=1e-4", "unknown config key 'optim.lrr' (did you mean: optim.lr"),
    ("--rollout.group_size=0", "rollout.group_size must be an int >= 1, got 0"),
])
def test_bad_overrides_fail_before_any_work(override, message, tmp_path):
    with pytest.raises(UserError) as err:
        demo_run.main(["--workdir", str(tmp_path), override])
    assert message in str(err.value)
    assert not (tmp_path / "assets").exists()  # nothing was built


def test_render_table_rows():
    before = {"avg@4": 0.0625, "pass@1": 0.0625, "pass@4": 0.25, "mean_response_tokens": 33.04}
    after = {"avg@4": 0.5, "pass@1": 0.5, "pass@4": 0.875, "mean_response_tokens": 30.96}
    lines = demo_run.render_table(before, after, 4).splitlines()
    assert lines[0] == "| model | avg@4 | pass@1 | pass@4 | mean response tokens |"
    assert lines[2] in ("| base | 6.2 | 6.2 | 25.0 | 33.0 |", "| base | 6.3 | 6.3 | 25.0 | 33.0 |")
    assert lines[3] == "| Prefix-RFT | 50.0 | 50.0 | 87.5 | 31.0 |"
    assert re.fullmatch(r"\|---\|(---:\|){4}", lines[1])


def test_stopped_training_exits_1_and_resumes(tmp_path, capsys):
    argv = ["--quick", "--workdir", str(tmp_path), "--threads", "1"]
    assert demo_run.main(argv + ["--train.max_steps_per_run=1"]) == 1
    assert "training stopped after 1 of 3 steps" in capsys.readouterr().out
    assert not (tmp_path / "run" / "demo_results.json").exists()
    assert demo_run.main(argv + ["--checkpoint.resume=auto"]) == 0
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "demo_results.json").read_text())["steps"] == 3
