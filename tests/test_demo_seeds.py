"""benchmarks/demo_seeds.py: the README's demo figures (mean and range over seeds) from the
runs' own ``demo_results.json``; a run with overrides is not the default command."""

from __future__ import annotations

import json

import pytest

from benchmarks import demo_seeds


def _fake_run(root, seed, before, after, overrides=()):
    run = root / f"demo_seed{seed}" / "run"
    run.mkdir(parents=True)
    result = {"before": {"avg@8": before[0], "pass@8": before[1]},
              "after": {"avg@8": after[0], "pass@8": after[1]},
              "torch_threads": 1, "overrides": list(overrides),
              "timings_s": {"train": 300.0, "total": 500.0}}
    (run / "demo_results.json").write_text(json.dumps(result))


def test_mean_and_range_over_the_seeds(tmp_path):
    _fake_run(tmp_path, 0, (0.10, 0.40), (0.20, 0.50))
    _fake_run(tmp_path, 1, (0.05, 0.30), (0.11, 0.38))
    _fake_run(tmp_path, 2, (0.09, 0.44), (0.14, 0.47))
    out = tmp_path / "res" / "demo_seeds"
    assert demo_seeds.main(["--reuse", "--workdir", str(tmp_path), "--load", "0.5",
                            "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    # after avg@8: mean of 20, 11, 14 = 15.0, range 11.0-20.0
    assert "15.0 (11.0-20.0)" in md
    assert "8.0 (5.0-10.0)" in md  # base avg@8
    csv_text = out.with_suffix(".csv").read_text().splitlines()
    assert csv_text[0].startswith("seed,threads,base_avg8") and len(csv_text) == 4


def test_refuses_a_run_that_is_not_the_default_command(tmp_path):
    _fake_run(tmp_path, 0, (0.1, 0.4), (0.2, 0.5), overrides=["--optim.lr=1e-3"])
    with pytest.raises(SystemExit, match="overrides"):
        demo_seeds.main(["--reuse", "--seeds", "0", "--workdir", str(tmp_path),
                         "--out", str(tmp_path / "x")])


def test_reuse_without_a_finished_run_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no finished demo"):
        demo_seeds.main(["--reuse", "--seeds", "3", "--workdir", str(tmp_path),
                         "--out", str(tmp_path / "x")])


def test_readme_demo_figures_are_the_committed_results():
    """The README's demo table quotes ``benchmarks/results/demo_seeds.csv``."""
    import csv
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with open(root / "benchmarks" / "results" / "demo_seeds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in rows] == [0, 1, 2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    stats = demo_seeds.summary(rows)
    for before, after in (("base_avg8", "after_avg8"), ("base_pass8", "after_pass8")):
        for key in (before, after):
            mean, lo, hi = stats[key]
            assert f"{mean:.1f} ({lo:.1f}–{hi:.1f})" in readme, key
