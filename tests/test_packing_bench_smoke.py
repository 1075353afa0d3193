"""benchmarks/packing.py runs end to end at a tiny shape and writes its three files."""

import csv

from benchmarks.packing import main, sample_lengths


def test_length_spreads():
    wide, narrow = sample_lengths("wide", 400), sample_lengths("narrow", 400)
    assert all(32 <= r <= 2048 and 100 <= p <= 300 for p, r in wide)
    assert sum(r == 2048 for _, r in wide) >= 40  # the share truncated at the cap
    assert all(8 <= r <= 64 and 13 <= p <= 19 for p, r in narrow)


def test_packing_benchmark_smoke(tmp_path):
    out = tmp_path / "packing.csv"
    rows = main(["--smoke", "--out", str(out)])
    assert [(r["shape"].split()[1], r["impl"]) for r in rows] == [
        (s, layout) for s in ("wide", "narrow") for layout in ("padded", "packed")]
    written = list(csv.DictReader(out.open()))
    assert len(written) == 4 and all(float(r["ms_p50"]) > 0 for r in written)
    for r in written:
        extra = dict(kv.split("=") for kv in r["extra"].split(";"))
        assert float(extra["update_tokens_per_cpu_s"]) > 0
        assert (float(extra["padding_frac"]) == 0.0) == (r["impl"] == "packed")
    assert (tmp_path / "packing.md").read_text().count("| policy_update |") == 4
    assert (tmp_path / "packing.png").stat().st_size > 0
