"""pytest-benchmark suite (CPU): torch impl vs naive full logits, fwd and fwd+bwd.

    python -m pytest benchmarks/test_bench_cpu_kernels.py --benchmark-only
    BENCH_N=2048 BENCH_V=151936 python -m pytest benchmarks/ --benchmark-only   # issue shape

Time comes from pytest-benchmark; peak memory from a fresh subprocess per case (see
benchmarks/cpu_kernels.py for how), attached to each result as ``extra_info``.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.cpu_kernels import _naive, measure_in_subprocess
from prefix_rft.kernels import linear_logprob_entropy

N = int(os.environ.get("BENCH_N", 512))
H = int(os.environ.get("BENCH_H", 256))
V = int(os.environ.get("BENCH_V", 32768))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_cpu_kernel(benchmark, impl, mode):
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    hidden = torch.randn(N, H).requires_grad_(grad)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_(grad)
    labels = torch.randint(0, V, (N,))

    def step():
        if impl == "naive":
            lp, ent = _naive(hidden, weight, labels)
        else:
            lp, ent = linear_logprob_entropy(hidden, weight, labels, impl="torch")
        if grad:
            hidden.grad = weight.grad = None
            (lp.sum() + ent.sum()).backward()
        return lp

    benchmark.group = f"{mode} N={N},H={H},V={V}"
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    mem = measure_in_subprocess(impl, mode, N, H, V, repeats=1)
    benchmark.extra_info["peak_extra_mb"] = round(mem["peak_extra_mb"], 1)
