"""pytest-benchmark suite (CPU): torch impl vs naive full logits, fwd and fwd+bwd.

    python -m pytest benchmarks/test_bench_cpu_kernels.py --benchmark-only
    BENCH_N=2048 BENCH_V=151936 python -m pytest benchmarks/ --benchmark-only   # issue shape

Time comes from pytest-benchmark; peak memory from a fresh subprocess per case (see
benchmarks/cpu_kernels.py for how), attached to each result as ``extra_info``.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.cpu_kernels import build_case, measure_in_subprocess

N = int(os.environ.get("BENCH_N", 512))
H = int(os.environ.get("BENCH_H", 256))
V = int(os.environ.get("BENCH_V", 32768))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_cpu_kernel(benchmark, impl, mode):
    step = build_case(impl, mode, N, H, V)
    benchmark.group = f"{mode} N={N},H={H},V={V}"
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    mem = measure_in_subprocess(impl, mode, N, H, V, repeats=1)
    benchmark.extra_info["peak_extra_mb"] = round(mem["peak_extra_mb"], 1)
