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
