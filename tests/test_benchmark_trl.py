"""benchmarks/trl.py: its cases run (tiny model, fresh processes); its rows and ratios come from
one interleaved run, with tokens/s and ms_p50 from the same statistic."""

import pytest

pytest.importorskip("trl")


def test_prompt_text_encodes_to_the_requested_length():
    from benchmarks.trl_e2e import benchmark_tokenizer, prompt_text

    tok = benchmark_tokenizer()
    for n in (1, 8, 9, 64):
        assert len(tok(prompt_text(tok, n), add_special_tokens=False)["input_ids"]) == n


def _extra(row):
    from benchmarks.trl_report import extra_fields

    return extra_fields(row)


def test_smoke_every_kind_of_case():
    from benchmarks import trl

    cases = ["trl", "prefix_rft_trainer", "trl_e2e", "prefix_rft_e2e", "gen_trl",
             "gen_hf_engine"]
    rows = trl.main(["--smoke", "--repeats", "1", "--cases", *cases])
    assert [r["impl"] for r in rows] == cases
    ops = {r["impl"]: r["op"] for r in rows}
    assert ops["trl"] == ops["prefix_rft_trainer"] == "grpo_update"
    assert ops["trl_e2e"] == ops["prefix_rft_e2e"] == "grpo_step"
    assert ops["gen_trl"] == ops["gen_hf_engine"] == "generate"
    for r in rows:
        assert float(_extra(r)["tokens_per_s"]) > 0 and _extra(r)["repeats"] == "1"
    assert len({_extra(r)["run"] for r in rows}) == 1


def _fake_measure(calls):
    """benchmarks.trl.measure without processes: a step of a case takes its base time plus the
    number of times the case has run, in ms, so medians and ratios are known."""
    counts = {}

    def measure(case, shape, sequences, prompt, completion, micro, steps):
        calls.append(case)
        counts[case] = counts.get(case, 0) + 1
        base = {"trl": 300.0, "trl_prefix_rft": 100.0, "prefix_rft_trainer": 200.0}[case]
        return {"case": case, "times_ms": [base + counts[case]] * steps, "tokens": 1000,
                "peak_mb": {"trl": 2000.0}.get(case, 1000.0), "rss_peak_mb": 3000.0,
                "versions": "trl=x", "update_path": ""}
    return measure


def test_cases_are_interleaved_and_ratios_come_from_the_run(monkeypatch):
    from benchmarks import trl
    from benchmarks.trl_report import render_ratios, run_ratios

    calls = []
    monkeypatch.setattr(trl, "measure", _fake_measure(calls))
    cases = ["trl", "trl_prefix_rft", "prefix_rft_trainer"]
    rows = trl.main(["--smoke", "--repeats", "3", "--cases", *cases])
    # every round runs every case once, the order rotated by one per round
    assert calls == ["trl", "trl_prefix_rft", "prefix_rft_trainer",
                     "trl_prefix_rft", "prefix_rft_trainer", "trl",
                     "prefix_rft_trainer", "trl", "trl_prefix_rft"]
    by_case = {r["impl"]: r for r in rows}
    for case, base in (("trl", 300.0), ("trl_prefix_rft", 100.0)):
        row = by_case[case]
        assert float(row["ms_p50"]) == pytest.approx(base + 2)  # median of base + 1, 2, 3
        assert float(_extra(row)["tokens_per_s"]) == pytest.approx(1000 / ((base + 2) / 1e3),
                                                                   rel=1e-3)
    ratios = {(r["num"], r["den"]): r for r in run_ratios(rows)}
    drop_in = ratios[("trl_prefix_rft", "trl")]
    assert drop_in["speed"] == pytest.approx(302 / 102, rel=1e-3)
    assert drop_in["memory"] == pytest.approx(0.5) and drop_in["repeats"] == 3
    assert "2.96x" in render_ratios(rows)


def test_no_ratio_across_runs_or_below_three_repeats(monkeypatch):
    from benchmarks import trl
    from benchmarks.trl_report import latest_run, run_ratios

    monkeypatch.setattr(trl, "measure", _fake_measure([]))
    two = trl.main(["--smoke", "--repeats", "2", "--cases", "trl", "trl_prefix_rft"])
    assert run_ratios(two) == []
    monkeypatch.setattr(trl.time, "strftime", lambda fmt: "later-run")
    three = trl.main(["--smoke", "--repeats", "3", "--cases", "trl", "trl_prefix_rft"])
    with pytest.raises(ValueError, match="exactly one run"):
        run_ratios([two[0], three[1]])
    assert latest_run(two + three) == three


def test_every_run_with_a_ratio_gets_its_own_section(monkeypatch):
    """Two runs (e.g. the update cases, then the generation cases): each run's ratios are
    stated under its own heading, newest first; a run below three repeats states none."""
    from benchmarks import trl
    from benchmarks.trl_report import render_ratios

    monkeypatch.setattr(trl, "measure", _fake_measure([]))
    monkeypatch.setattr(trl.time, "strftime", lambda fmt: "run-a")
    first = trl.main(["--smoke", "--repeats", "3", "--cases", "trl", "trl_prefix_rft"])
    monkeypatch.setattr(trl.time, "strftime", lambda fmt: "run-b")
    short = trl.main(["--smoke", "--repeats", "2", "--cases", "trl", "trl_prefix_rft"])
    monkeypatch.setattr(trl.time, "strftime", lambda fmt: "run-c")
    second = trl.main(["--smoke", "--repeats", "3", "--cases", "trl", "prefix_rft_trainer"])
    text = render_ratios(first + short + second)
    assert text.index("Ratios of run run-c") < text.index("Ratios of run run-a")
    assert "run-b" not in text
    assert text.count("| drop-in vs TRL's own head") == 1
    assert text.count("| this trainer's update vs TRL's") == 1
