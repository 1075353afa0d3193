"""The CPU kernel benchmark (README main-job fallback) runs end to end at a tiny shape."""

import csv

from benchmarks.cpu_kernels import main


def test_cpu_kernel_benchmark_writes_rows_with_ratios(tmp_path, capsys):
    out = tmp_path / "cpu.csv"
    rows = main(["--n", "16", "--h", "8", "--v", "300", "--repeats", "1", "--out", str(out)])
    assert {(r["impl"], r["mode"]) for r in rows} == {
        (i, m) for i in ("naive", "torch") for m in ("fwd", "fwd+bwd")}
    written = list(csv.DictReader(out.open()))
    assert len(written) == 4 and all(float(r["ms_p50"]) > 0 for r in written)
    assert all("time_vs_naive=" in r["extra"] and "mem_vs_naive=" in r["extra"] for r in written)
    assert (tmp_path / "cpu.md").read_text().count("| linear_logprob_entropy |") == 4
    assert "ours / naive" in capsys.readouterr().out


def test_fused_head_benchmark_times_every_case_against_the_bare_gemms(tmp_path):
    from benchmarks.cpu_fused_head import CASES
    from benchmarks.cpu_fused_head import main as fused_main

    out = tmp_path / "fused.csv"
    rows = fused_main(["--n", "23", "--h", "8", "--v", "301", "--repeats", "2", "--no-memory",
                       "--out", str(out)])
    assert [r["impl"] for r in rows] == list(CASES)
    for r in rows:
        ratios = dict(kv.split("=", 1) for kv in r["extra"].split(";"))
        per_round = [float(x) for x in ratios["per_round_vs_gemm6"].split("/")]
        assert len(per_round) == 2 and all(x > 0 for x in per_round)
        assert float(ratios["vs_gemm6"]) > 0
    assert len(list(csv.DictReader(out.open()))) == len(CASES)
