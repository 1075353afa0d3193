"""The README's benchmark figures for the fused head and the TRL comparison are rows of the
committed results files (a rerun that changes them must change both)."""

from __future__ import annotations

import csv
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def readme_item(start: str) -> str:
    """The README bullet that begins with ``start``, up to the next bullet or heading."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    i = text.index(start)
    ends = [j for j in (text.find("\n- **", i + 1), text.find("\n#", i + 1)) if j > 0]
    return text[i:min(ends)]


def test_fused_head_ratios_quoted_are_rows_of_the_results():
    item = readme_item("- **Fused head-and-loss** (`cpu_fused_head.md`")
    quoted = set(re.findall(r"(\d\.\d{3})×", item))
    with open(os.path.join(RESULTS, "cpu_fused_head.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["impl"] != "gemm6_bare"]
    measured = set()
    for r in rows:
        fields = dict(kv.split("=", 1) for kv in r["extra"].split(";") if "=" in kv)
        measured.add(fields["vs_gemm6"])
        measured.update(fields.get("per_round_vs_gemm6", "").split("/"))
    assert quoted, "the README quotes no ratio to the bare GEMMs"
    assert quoted <= measured, f"README ratios not in cpu_fused_head.csv: {quoted - measured}"


def test_trl_ratio_quoted_is_in_its_run():
    item = readme_item("- **TRL GRPOTrainer** (`trl.md`")
    with open(os.path.join(RESULTS, "trl.md")) as f:
        report = f.read()
    claims = list(re.finditer(r"run `(\d{8}T\d{6})`[^*]*\*\*this trainer's update is "
                              r"(\d\.\d\d)× TRL \+ Liger's tokens/s at (\d\.\d\d)× its step "
                              r"peak\*\*", item))
    assert claims, "the README states no update-vs-TRL+Liger ratio with its run"
    for m in claims:
        run, speed, memory = m.groups()
        section = report.split(f"## Ratios of run {run}", 1)[1].split("\n## ", 1)[0]
        row = next(line for line in section.splitlines()
                   if line.startswith("| this trainer's update vs TRL + Liger"))
        assert f"| {speed}x | {memory}x |" in row, (run, row)
