"""benchmarks/paper_table.py: the --smoke table end to end (into tmp_path), resume from the
per-run cache, a failing run recorded instead of crashing, and the mean/std helper."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics

import pytest
import yaml

from benchmarks import paper_table as pt

METHODS = ["base", "sft", "rft", "prefix_rft", "prefix_rft_all_tokens", "prefix_rft_uniform"]
CELL = re.compile(r"^(-?\d+(\.\d+)?) ± (\d+(\.\d+)?)$")


def _table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in METHODS:
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper_table")
    argv = ["--smoke", "--out", str(tmp / "out" / "table"), "--workdir", str(tmp / "work")]
    code = pt.main(argv)
    return tmp, argv, code


def test_smoke_writes_table_csv_png(smoke):
    tmp, argv, code = smoke
    assert code == 0
    md = (tmp / "out" / "table.md").read_text(encoding="utf-8")
    assert "python -m benchmarks.paper_table --smoke" in md and "wall time" in md
    rows = _table_rows(md)
    assert sorted(rows) == sorted(METHODS)
    for name, cells in rows.items():
        assert cells[1] == "1/1", name
        for cell in cells[2:]:  # avg@k, pass@k, length, trained tokens, train s: "mean ± std"
            match = CELL.match(cell)
            assert match, f"{name}: {cell!r} is not 'mean ± std'"
            assert math.isfinite(float(match.group(1)))
        assert 0.0 <= float(CELL.match(cells[2]).group(1)) <= 100.0
        assert 0.0 <= float(CELL.match(cells[3]).group(1)) <= 100.0
    png = (tmp / "out" / "table.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    with open(tmp / "out" / "table.csv", newline="", encoding="utf-8") as f:
        per_seed = list(csv.DictReader(f))
    assert sorted(r["method"] for r in per_seed) == sorted(METHODS)
    for r in per_seed:
        assert r["status"] == "ok" and r["seed"] == "0"
        assert float(r["pass_at_k"]) >= float(r["avg_at_k"]) - 1e-12  # any-correct >= mean-correct
        trained = int(r["trained_tokens"])
        assert (trained == 0) == (r["method"] == "base")


def test_same_budget_and_method_overrides_reach_the_runs(smoke):
    tmp, _, _ = smoke
    for method in METHODS[1:]:
        saved = yaml.safe_load((tmp / "work" / method / "seed0" / "config.yaml")
                               .read_text(encoding="utf-8"))
        assert saved["train"]["steps"] == 1 and saved["train"]["prompts_per_step"] == 2
        assert saved["rollout"]["group_size"] == 2
    cfg = {m: yaml.safe_load((tmp / "work" / m / "seed0" / "config.yaml")
                             .read_text(encoding="utf-8")) for m in METHODS[1:]}
    assert cfg["sft"]["loss"]["algo"] == "sft" and cfg["rft"]["prefix"]["num_prefixed"] == 0
    assert cfg["prefix_rft_all_tokens"]["loss"]["entropy_top_fraction"] == 1.0
    assert cfg["prefix_rft_uniform"]["prefix"]["schedule"] == "constant"
    assert cfg["prefix_rft"]["prefix"]["schedule"] == "cosine"


def test_resume_skips_cached_runs_and_appends_analysis(smoke, capsys):
    tmp, argv, _ = smoke
    before = (tmp / "out" / "table.csv").read_text(encoding="utf-8")
    notes = tmp / "notes.md"
    notes.write_text("Hand-written reading of the numbers.\n", encoding="utf-8")
    capsys.readouterr()
    assert pt.main(argv + ["--analysis", str(notes)]) == 0
    out = capsys.readouterr().out
    assert out.count(": cached (") == len(METHODS) and ": start (" not in out
    assert (tmp / "out" / "table.csv").read_text(encoding="utf-8") == before  # same per-seed rows
    md = (tmp / "out" / "table.md").read_text(encoding="utf-8")
    assert md.rstrip().endswith("## Analysis\n\nHand-written reading of the numbers.")


def test_failed_run_is_recorded_not_raised(smoke):
    tmp, _, _ = smoke
    out = tmp / "bad" / "table"
    code = pt.main(["--smoke", "--methods", "base", "sft", "--out", str(out), "--workdir",
                    str(tmp / "work"), "--no-resume", "--set", "data.problem_key=no_such_field"])
    assert code == 1
    md = out.with_suffix(".md").read_text(encoding="utf-8")
    rows = _table_rows(md)
    assert rows["sft"][1] == "0/1" and rows["base"][1] == "1/1"
    assert "Failed runs:" in md and "- sft: `" in md
    cached = json.loads((tmp / "work" / "results" / "sft_seed0.json").read_text(encoding="utf-8"))
    assert cached["status"] == "failed" and cached["error"]


@pytest.mark.parametrize("values", [[0.1], [0.1, 0.5, 0.2], [1.0, 1.0, 1.0, 0.0]])
def test_mean_std_matches_statistics(values):
    mean, std = pt.mean_std(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert std == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)


def test_mean_std_skips_nan_and_bad_table_config(tmp_path):
    assert pt.mean_std([float("nan"), 2.0]) == (2.0, 0.0)
    assert all(math.isnan(x) for x in pt.mean_std([]))
    bad = tmp_path / "t.yaml"
    bad.write_text("seeds: [0]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing fields"):
        pt.load_table_config(bad)
