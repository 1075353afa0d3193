"""benchmarks/paper_repro.py (the fair table): the statistics with known answers, the task's
splits and demonstrator variant, the full config's settings, and the --quick run end to end
with resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from benchmarks import paper_repro as pr
from benchmarks.paper_stats import mean_std, paired_bootstrap, per_seed_differences
from benchmarks.paper_task import UNSEEN_TEMPLATE, TableTask, build_splits
from prefix_rft.data import read_rows
from prefix_rft.metrics_log import read_metrics

METHODS = ["base", "sft", "rft", "prefix_rft", "prefix_rft_all_tokens", "prefix_rft_uniform",
           "sft_rft"]


# ---------------------------------------------------------------- statistics
def test_identical_runs_give_a_zero_width_ci_at_zero():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=(5, 40))
    r = paired_bootstrap(a, a.copy(), n_boot=500)
    assert r["diff"] == 0.0 and r["lo"] == 0.0 and r["hi"] == 0.0
    assert r["per_seed"] == [0.0] * 5 and r["questions"] == 40 and r["seeds"] == 5


def test_a_shifted_run_gives_the_shift():
    rng = np.random.default_rng(2)
    b = rng.uniform(size=(3, 30))
    r = paired_bootstrap(b + 0.25, b, n_boot=500)
    assert r["diff"] == pytest.approx(0.25)
    assert r["lo"] == pytest.approx(0.25) and r["hi"] == pytest.approx(0.25)
    assert r["per_seed"] == pytest.approx([0.25] * 3)


def test_ci_covers_the_true_difference_and_shrinks_with_questions():
    rng = np.random.default_rng(3)
    widths = []
    for q in (50, 800):
        b = rng.uniform(size=(2, q))
        a = b + 0.1 + rng.normal(0, 0.3, size=(2, q))  # true mean difference 0.1
        r = paired_bootstrap(a, b, n_boot=1000, seed=4)
        assert r["lo"] <= 0.1 <= r["hi"]
        assert r["lo"] <= r["diff"] <= r["hi"]
        widths.append(r["hi"] - r["lo"])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(questions)
    assert per_seed_differences([[1.0, 0.0], [0.5, 0.5]], [[0.0, 0.0], [1.0, 1.0]]) == [0.5, -0.5]


def test_mean_std_is_the_sample_std_and_skips_missing():
    mean, std = mean_std([0.1, 0.3, float("nan"), None, 0.5])
    assert mean == pytest.approx(0.3) and std == pytest.approx(np.std([0.1, 0.3, 0.5], ddof=1))
    assert mean_std([0.2]) == (0.2, 0.0)
    assert all(np.isnan(v) for v in mean_std([]))


def test_overrides_are_yaml_values():
    assert pr.as_overrides({"train.steps": 150, "loss.clip_c": 3.0, "log.tensorboard": "false",
                            "eval.files": [], "log.plots": False}) == [
        "--train.steps=150", "--loss.clip_c=3.0", "--log.tensorboard=false", "--eval.files=[]",
        "--log.plots=false"]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="a:"):
        paired_bootstrap(np.zeros((0, 3)), np.zeros((0, 3)))


# ---------------------------------------------------------------- task
@pytest.fixture(scope="module")
def splits():
    return build_splits(TableTask(num_train=400, num_base_hard=100, num_base_easy=100,
                                  num_validation=50, num_test=80, num_ood=30, num_phrasing=30),
                        seed=0)


def test_splits_are_disjoint_and_base_never_sees_train(splits):
    text = {name: {r["problem"] for r in rows} for name, rows in splits.items()}
    assert not text["base"] & text["train"]
    assert not text["validation"] & text["test"]
    for held in ("validation", "test", "ood", "phrasing"):
        assert not text[held] & (text["train"] | text["base"]), held
    assert all(r["num_steps"] > 4 for r in splits["ood"])  # more operations than training
    assert max(r["num_steps"] for r in splits["train"]) <= 4
    prefix = UNSEEN_TEMPLATE.split("{")[0]
    assert all(r["problem"].startswith(prefix) for r in splits["phrasing"])
    assert not any(r["problem"].startswith(prefix) for r in splits["train"] + splits["base"])


def test_full_config_exercises_the_method():
    table = pr.load_config(pr.DEFAULT_CONFIG)
    b = table["budget"]
    assert b["train.prompts_per_step"] // b["train.mini_batch_size"] >= 2  # >= 2 optimizer steps
    assert b["loss.clip_c"] == 3.0 and b["prefix.num_prefixed"] == 1
    assert b["rollout.group_size"] == 8  # one hybrid in 8
    assert table["seeds"] == [0, 1, 2, 3, 4] and table["variants"] == ["expert", "systematic"]
    assert all(len(v) >= 3 for v in table["sweep"]["lrs"].values())
    assert table["sweep"]["select"]["split"] == "validation"
    assert "validation" not in table["eval"]["splits"]
    assert list(table["methods"]) == METHODS
    temps = [(s["temperature"], s["top_p"]) for s in table["eval"]["settings"]]
    assert temps == [(0.6, 0.95), (1.0, 1.0)]


# ---------------------------------------------------------------- --quick end to end
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper_repro")
    argv = ["--quick", "--workdir", str(tmp / "work"), "--out", str(tmp / "out" / "t")]
    return tmp, argv, pr.main(argv)


def test_quick_writes_every_table(quick):
    tmp, _, code = quick
    assert code == 0
    md = (tmp / "out" / "t.md").read_text(encoding="utf-8")
    for variant in ("expert", "systematic"):
        assert f"## Variant `{variant}`" in md
    assert md.count("| yes |") == 6  # one selected lr per swept method and variant
    for method in METHODS:
        assert f"| {method} |" in md
    with open(tmp / "out" / "t.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(METHODS) * 3 * 2  # variants x methods x splits x settings
    assert {r["split"] for r in rows} == {"test", "ood", "phrasing"}
    assert {r["temperature"] for r in rows} == {"0.6", "1.0"}
    assert all(r["status"] == "ok" and 0 <= float(r["avg"]) <= float(r["pass"]) <= 1 for r in rows)
    assert (tmp / "out" / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_runs_use_the_budget_and_base_is_disjoint(quick):
    tmp, _, _ = quick
    records = [json.loads(p.read_text()) for p in (tmp / "work" / "cache").glob("train_*.json")]
    assert records and all(r["status"] == "ok" for r in records)
    for r in records:
        run_dir = tmp / "work" / "runs" / r["model_dir"].split("/runs/")[1].split("/")[0]
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        assert saved["train"]["mini_batch_size"] < saved["train"]["prompts_per_step"]
        assert saved["loss"]["clip_c"] == 3.0
        if saved["loss"]["algo"] != "sft":  # no longer identically 1 (2 optimizer steps)
            steps = read_metrics(run_dir / "metrics.jsonl")
            assert any(m["ratio_max"] > m["ratio_min"] for m in steps), run_dir
    assets = tmp / "work" / "assets"
    base = {r["problem"] for r in read_rows(str(assets / "base.jsonl"))}
    train = {r["problem"] for r in read_rows(str(assets / "train_expert.jsonl"))}
    assert not base & train


def test_quick_resumes_without_new_work(quick, capsys):
    tmp, argv, _ = quick
    capsys.readouterr()
    assert pr.main(argv) == 0
    assert "(new: 0 trainings, 0 evaluations)" in capsys.readouterr().out


def test_bad_table_config(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("seeds: [0]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing fields"):
        pr.load_config(bad)
