"""benchmarks/paper_repro.py (the hard-regime comparison): the statistics with known answers,
the task's chain-disjoint splits and demonstrator variants, the sweep's extension until its
choice is interior, the full config's settings, and the --quick run end to end with resume and
a CI recomputed from the CSV."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from benchmarks import paper_repro as pr
from benchmarks.paper_report import read_csv_scores, recompute_ci
from benchmarks.paper_stats import holm, mean_std, paired_bootstrap, per_seed_differences
from benchmarks.paper_task import UNSEEN_TEMPLATE, TableTask, build_splits
from prefix_rft.data import read_rows
from prefix_rft.demo.task import is_held_out_problem, problem_chain
from prefix_rft.metrics_log import read_metrics

METHODS = ["base", "sft", "rft", "prefix_rft", "prefix_rft_official", "prefix_rft_all_tokens",
           "prefix_rft_uniform", "sft_rft", "luffy", "prefix_rft_on_failure",
           "prefix_rft_untrained_prefix", "prefix_rft_self"]


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


def test_holm_known_answer():
    # sorted p: 0.01*4=0.04, 0.02*3=0.06, 0.03*2=0.06 (running max), 0.5*1=0.5
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert holm([0.9, 0.9]) == [1.0, 1.0]


def test_seed_resampling_widens_the_ci_when_seeds_disagree():
    """The same per-question noise, plus a per-seed offset: the two-stage bootstrap's CI
    widens (a question-only bootstrap of the seed mean would not see the offsets at all)."""
    rng = np.random.default_rng(5)
    b = rng.uniform(size=(5, 200))
    noise = rng.normal(0, 0.2, size=(5, 200))
    offsets = np.array([-0.2, -0.1, 0.0, 0.1, 0.2])[:, None]
    calm = paired_bootstrap(b + noise, b, n_boot=1000)
    wild = paired_bootstrap(b + noise + offsets, b, n_boot=1000)
    assert wild["diff"] == pytest.approx(calm["diff"])
    assert (wild["hi"] - wild["lo"]) > 2 * (calm["hi"] - calm["lo"])
    assert 0 <= calm["p"] <= 1 and paired_bootstrap(b + 0.3, b, n_boot=200)["p"] == 0.0


# ---------------------------------------------------------------- task
@pytest.fixture(scope="module")
def splits():
    return build_splits(TableTask(num_train=400, num_base_hard=300, num_base_easy=300,
                                  num_validation=50, num_test=80, num_ood=30, num_phrasing=30),
                        seed=0)


def test_splits_are_disjoint_by_arithmetic_chain(splits):
    """No chain (operands + operators, wording dropped) is in two of train, base (the base
    model's SFT data), validation, test, OOD and phrasing."""
    chains = {name: [problem_chain(r["problem"]) for r in rows] for name, rows in splits.items()}
    names = list(chains)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(chains[a]) & set(chains[b]), (a, b)
    for held in ("validation", "test", "ood", "phrasing"):  # distinct questions
        assert len(set(chains[held])) == len(chains[held]), held
    assert all(r["num_steps"] > 4 for r in splits["ood"])  # more operations than training
    assert max(r["num_steps"] for r in splits["train"]) <= 4
    prefix = UNSEEN_TEMPLATE.split("{")[0]
    assert all(r["problem"].startswith(prefix) for r in splits["phrasing"])
    assert not any(r["problem"].startswith(prefix) for r in splits["train"] + splits["base"])


def test_chain_rule_catches_rewordings_the_old_text_rule_let_through(splits):
    """The old rule hashed the problem *text*: "Compute 3 * 5 + 2 - 8." could be in train and
    "What is 3 * 5 + 2 - 8?" in test. A rewording has the same chain (so the same side now),
    and under the old text hash some training chains reworded land on the held-out side."""
    import hashlib

    def old_rule(text):
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < 0.1

    leaks = 0
    for row in splits["train"]:
        expr = row["problem"].split(" ", 1)[1].rstrip(".?")
        if row["problem"].startswith("What is"):
            expr = row["problem"][len("What is "):].rstrip("?")
        for template in ("Compute {}.", "What is {}?", "Evaluate {}."):
            text = template.format(expr)
            assert problem_chain(text) == problem_chain(row["problem"])
            assert not is_held_out_problem(text)
            leaks += old_rule(text)
    assert leaks > 0


def test_off_style_demonstration_is_correct_and_unlike_the_base_format(splits):
    import math_verify

    from prefix_rft.demo.task import apply_demonstrator

    for row in apply_demonstrator(splits["train"][:50], "off_style"):
        assert "makes" in row["solution"] and "=" not in row["solution"]
        gold = math_verify.parse(f"${row['answer']}$")
        assert math_verify.verify(gold, math_verify.parse(row["solution"]))
    base_text = " ".join(r["solution"] for r in splits["base"])
    assert "makes" not in base_text


def test_base_slices_mark_zero_pass_as_unsolvable():
    class FakeRunner:
        table = {"slices": {"splits": ["test"], "k": 8, "temperature": 1.0, "top_p": 1.0,
                            "seed": 1000}}
        paths = {"model": "M"}

        def evaluate(self, model, split, setting, seed, k=None):
            assert (setting["temperature"], k, seed) == (1.0, 8, 1000)
            return {"correct": [0, 3, 0, 0, 1, 0]}

    out = pr.base_slices(FakeRunner())
    assert out["test"]["solvable"] == [False, True, False, False, True, False]
    assert out["test"]["unsolvable_share"] == pytest.approx(4 / 6)


class SweepRunner:
    """Validation score peaks at lr = 1e-6, far below the swept range."""

    def __init__(self, peak=1e-6, max_extensions=5):
        self.table = {"sweep": {"seed": 100, "factor": 3.0, "max_extensions": max_extensions,
                                "select": {"split": "validation", "temperature": 0.6,
                                           "top_p": 0.95, "k": 8},
                                "lrs": {"rft": [1e-5, 3e-5, 1e-4]}}}
        self.peak, self.trained = peak, []

    def train(self, variant, method, seed, lrs):
        self.trained.append(lrs[method])
        assert seed == 100
        return str(lrs[method]), []

    def evaluate(self, model, split, setting, seed, k=None):
        return {"avg": 1.0 - abs(np.log(float(model) / self.peak))}


def test_sweep_extends_until_the_choice_is_interior():
    runner = SweepRunner()
    lr, rows = pr.sweep_method(runner, "expert", "rft")
    assert lr == pytest.approx(1e-5 / 9)  # two steps down, then 1e-5/27 loses: interior
    assert runner.trained[:3] == [1e-5, 3e-5, 1e-4] and len(runner.trained) == 6
    assert all(r["bracketed"] for r in rows) and sum(r["selected"] for r in rows) == 1


def test_sweep_says_so_when_it_stops_at_an_end():
    lr, rows = pr.sweep_method(SweepRunner(max_extensions=1), "expert", "rft")
    assert lr == pytest.approx(1e-5 / 3)
    assert not any(r["bracketed"] for r in rows)


def test_full_config_exercises_the_method():
    table = pr.load_config(pr.DEFAULT_CONFIG)
    b = table["budget"]
    assert b["train.prompts_per_step"] // b["train.mini_batch_size"] >= 2  # >= 2 optimizer steps
    assert b["loss.clip_c"] == 3.0 and b["prefix.num_prefixed"] == 1
    assert b["rollout.group_size"] == 8  # one hybrid in 8
    # at least one epoch over the training split
    assert b["train.steps"] * b["train.prompts_per_step"] >= table["assets"]["task"]["num_train"]
    assert table["seeds"] == [0, 1, 2, 3, 4]
    assert table["variants"] == ["expert", "systematic", "off_style"]
    assert table["sweep"]["seed"] not in table["seeds"]
    assert all(len(v) >= 3 for v in table["sweep"]["lrs"].values())
    assert table["sweep"]["max_extensions"] >= 1
    assert table["sweep"]["select"]["split"] == "validation"
    assert "validation" not in table["eval"]["splits"]
    assert list(table["methods"]) == METHODS
    sets = {m: " ".join(o for st in stages for o in st["set"])
            for m, stages in table["methods"].items() if stages}
    assert "loss.baseline=group" in sets["prefix_rft"]
    assert "loss.baseline=official" in sets["prefix_rft_official"]
    # the prefix-guided family: one choice changed each, own sweep, the expert's table only
    for method, option in [("prefix_rft_on_failure", "prefix.when=on_failure"),
                           ("prefix_rft_untrained_prefix", "prefix.train_on_prefix=false"),
                           ("prefix_rft_self", "prefix.source=self")]:
        assert sets[method] == sets["prefix_rft"] + " " + option
        assert table["methods"][method][0]["lr_of"] == method
        assert method in pr.methods_of(table, "expert")
    assert table["slices"]["k"] == 8 and table["slices"]["temperature"] == 1.0
    assert "test" in table["slices"]["splits"] and "train_expert" in table["slices"]["splits"]


# ---------------------------------------------------------------- --quick end to end
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper_repro")
    argv = ["--quick", "--workdir", str(tmp / "work"), "--out", str(tmp / "out" / "t")]
    return tmp, argv, pr.main(argv)


def test_quick_writes_every_table(quick):
    tmp, _, code = quick
    assert code == 0
    table = pr.load_config(pr.DEFAULT_CONFIG, quick=True)
    md = (tmp / "out" / "t.md").read_text(encoding="utf-8")
    for variant in ("expert", "systematic", "off_style"):
        assert f"## Variant `{variant}`" in md
    for method in METHODS:
        assert f"| {method} |" in md
    assert "base-unsolvable share per split: train_expert" in md
    assert "the whole cache (all invocations and processes): " in md
    assert "test unsolvable" in md and "| test | unsolvable |" in md
    assert "**Prefix-RFT > RFT**" in md and "**Robustness to the demonstrator**" in md
    rows = read_csv_scores(tmp / "out" / "t.csv")
    expected = sum(len(pr.methods_of(table, v)) for v in table["variants"]) * 2 * 3
    assert len(rows) == expected  # methods x seeds x splits (one setting)
    assert {r["split"] for r in rows} == {"test", "ood", "phrasing"}
    for r in rows:
        assert len(r["correct"]) == len(r["base_solvable"]) and max(r["correct"]) <= r["k"]
        assert float(r["avg"]) == pytest.approx(sum(r["correct"]) / (r["k"] * len(r["correct"])))
    for suffix in (".png", "_curves.png"):
        assert (tmp / "out" / f"t{suffix}").read_bytes()[:4] == b"\x89PNG"


def test_a_ci_is_recomputed_from_the_csv(quick):
    """The paired table's first expert row, recomputed from the CSV alone."""
    tmp, _, _ = quick
    md = (tmp / "out" / "t.md").read_text(encoding="utf-8")
    line = next(x for x in md.splitlines() if x.startswith("| sft | test | all |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    r = recompute_ci(tmp / "out" / "t.csv", "expert", "sft", "prefix_rft", "test", "all",
                     n_boot=200)
    assert cells[3] == f"{100 * r['diff']:+.1f}"
    assert cells[4] == f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]"
    assert cells[6] == f"{r['seeds']} x {r['questions']}"


def test_quick_runs_use_the_budget_and_log_all_fail_groups(quick):
    tmp, _, _ = quick
    records = [json.loads(p.read_text()) for p in (tmp / "work" / "cache").glob("train_*.json")]
    assert records and all(r["status"] == "ok" for r in records)
    baselines = set()
    for r in records:
        run_dir = tmp / "work" / "runs" / r["model_dir"].split("/runs/")[1].split("/")[0]
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        assert saved["train"]["mini_batch_size"] < saved["train"]["prompts_per_step"]
        assert saved["loss"]["clip_c"] == 3.0
        if saved["loss"]["algo"] == "rft":  # reads no demonstration: shared by the variants
            assert saved["data"]["train_files"][0].endswith("train_expert.jsonl")
        if saved["loss"]["algo"] == "prefix_rft":
            baselines.add(saved["loss"]["baseline"])
        if saved["loss"]["algo"] != "sft":
            steps = read_metrics(run_dir / "metrics.jsonl")
            assert any(m["ratio_max"] > m["ratio_min"] for m in steps), run_dir
            for m in steps:
                assert m["on_policy_all_fail_frac"] == pytest.approx(1 - m["pass_rate"])
    assert baselines == {"group", "official"}
    assets = tmp / "work" / "assets"
    base = {problem_chain(r["problem"]) for r in read_rows(str(assets / "base.jsonl"))}
    train = {problem_chain(r["problem"]) for r in read_rows(str(assets / "train_expert.jsonl"))}
    assert not base & train


def test_quick_resumes_without_new_work(quick, capsys):
    tmp, argv, _ = quick
    capsys.readouterr()
    assert pr.main(argv) == 0
    assert "(new: 0 trainings, 0 evaluations)" in capsys.readouterr().out


def test_parallel_children_share_the_cache(quick, capfd):
    """--parallel 2 on a finished workdir: two child processes (expert | the others) find
    every run cached, and this process writes the report with no new work either."""
    tmp, argv, _ = quick
    capfd.readouterr()
    assert pr.main(argv + ["--parallel", "2"]) == 0
    out = capfd.readouterr().out
    assert "--parallel: 2 processes: [['expert'], ['systematic', 'off_style']]" in out
    assert out.count("(new: 0 trainings, 0 evaluations)") == 3  # two children + this one


def test_bad_table_config(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("seeds: [0]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing fields"):
        pr.load_config(bad)


def test_a_process_with_part_of_the_variants_never_writes_the_committed_results(tmp_path):
    table = pr.load_config(pr.DEFAULT_CONFIG)
    args = pr.build_parser().parse_args(["--variants", "expert"])
    assert pr.default_out(args, tmp_path, ["expert"], table) == tmp_path / "paper_repro_expert"
    args = pr.build_parser().parse_args([])
    out = pr.default_out(args, tmp_path, list(table["variants"]), table)
    assert out == pr.REPO_ROOT / "benchmarks" / "results" / "paper_table"


def test_verdicts_follow_the_ci_and_holm():
    from benchmarks.paper_analysis import analysis_text, verdict

    ahead = {"diff": 0.05, "lo": 0.02, "hi": 0.08, "p_holm": 0.01, "p": 0.01, "seeds": 5,
             "questions": 200}
    assert verdict(ahead, +1, 0.05) == "holds" and verdict(ahead, -1, 0.05) == "reversed"
    assert verdict({**ahead, "p_holm": 0.2}, +1, 0.05) == "not shown"
    assert verdict({**ahead, "lo": -0.01}, +1, 0.05) == "not shown"
    table = {"eval": {"k": 4, "bootstrap": {"alpha": 0.05}}}
    family = [{**ahead, "method": "rft", "split": "test", "slice": "unsolvable"}]
    text = analysis_text({"expert": family}, [], table)
    # rft - prefix_rft = +5: "Prefix-RFT > RFT" is reversed, shown as prefix_rft - rft = -5
    assert ("expert, unsolvable questions: reversed (prefix_rft - rft: -5.0 [-8.0, -2.0]"
            in text)


def test_a_run_locked_by_a_live_process_is_waited_for_not_trained(tmp_path, monkeypatch):
    """Two processes share one cache: while the other holds the lock, this one waits and then
    returns the other's record; a lock left by a dead process is taken over."""
    import os

    from benchmarks import paper_runner

    runner = paper_runner.Runner({"base_config": "configs/demo.yaml"}, tmp_path, [])
    record, lock = runner.cache / "train_k.json", runner.cache / "train_k.lock"
    lock.write_text(str(os.getppid()))  # a live process that is not this one
    polls = []

    def finish_elsewhere(_):
        polls.append(1)
        record.write_text(json.dumps({"status": "ok", "model_dir": "OTHER"}))

    monkeypatch.setattr(paper_runner.time, "sleep", finish_elsewhere)
    trained = []
    monkeypatch.setattr(runner, "_run_stage", lambda *a: trained.append(1) or {"model_dir": "X"})
    assert runner._train_stage("k", tmp_path / "run", "label", None)["model_dir"] == "OTHER"
    assert polls and not trained
    record.unlink()
    lock.write_text("999999999")  # no such process: stale
    monkeypatch.setattr(paper_runner.time, "sleep", lambda _: None)
    assert runner._train_stage("k", tmp_path / "run", "label", None)["model_dir"] == "X"
    assert trained == [1] and not lock.exists()


def test_self_table_shares_every_setting_but_its_rows_with_the_main_table():
    """benchmarks/paper_repro_self.yaml measures ``source: self`` over two passes on the main
    comparison's task, base model, sweep and budget (so they come from the same cache): every
    section but the rows must equal benchmarks/paper_repro.yaml's, and its two-pass rows must
    differ from each other only in the prefix source."""
    main = pr.load_config("benchmarks/paper_repro.yaml")
    two_pass = pr.load_config("benchmarks/paper_repro_self.yaml")
    for key in ("base_config", "workdir", "seeds", "assets", "slices", "budget", "common",
                "eval"):
        assert two_pass[key] == main[key], key
    for key in ("seed", "select", "factor", "max_extensions"):
        assert two_pass["sweep"][key] == main["sweep"][key], key
    assert two_pass["sweep"]["lrs"]["prefix_rft"] == main["sweep"]["lrs"]["prefix_rft"]
    assert two_pass["methods"]["prefix_rft"] == main["methods"]["prefix_rft"]
    ref, self_row = (two_pass["methods"][m][0]["set"] for m in ("prefix_rft_2pass",
                                                                "prefix_rft_self_2pass"))
    assert sorted(set(self_row) - set(ref)) == ["prefix.source=self"] and set(ref) <= set(self_row)
    assert "data.max_rows=300" in ref  # 150 steps x 4 questions = two passes over 300


def test_readme_comparison_figures_are_the_committed_report():
    """Every row of the README's results table (test all / solvable / unsolvable, expert) is a
    row of ``benchmarks/results/paper_table.md``'s expert accuracy table."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Results** (`benchmarks/results/paper_table"):
                     readme.index("**What holds here")]
    report = (root / "benchmarks" / "results" / "paper_table.md").read_text(encoding="utf-8")
    expert = report[report.index("## Variant `expert`"):report.index("## Variant `systematic`")]
    accuracy = expert[expert.index("### Accuracy"):expert.index("### Paired")]
    report_cells = {tuple(c.strip() for c in line.split("|")[2:5])
                    for line in accuracy.splitlines() if line.startswith("| ")}
    readme_rows = [tuple(c.strip() for c in line.split("|")[2:5])
                   for line in section.splitlines() if line.startswith("| ") and "±" in line]
    assert len(readme_rows) == 9
    for cells in readme_rows:
        assert cells in report_cells, cells


def test_extends_takes_the_parent_fields_and_refuses_two_levels(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text(open("benchmarks/paper_repro.yaml").read())
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {parent}\nseeds: [7]\n")
    table = pr.load_config(child)
    assert table["seeds"] == [7]
    assert table["budget"] == pr.load_config(parent)["budget"]
    assert pr.load_config(child, quick=True)["seeds"] == [7]  # the parent's quick is not taken
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text(f"extends: {child}\n")
    with pytest.raises(ValueError, match="one level only"):
        pr.load_config(grandchild)
