"""CPU benchmark: chunked torch linear->logprob/entropy vs the naive full-logits path.

    python -m benchmarks.cpu_kernels                 # N=2048, H=256, V=151936 (issue target)
    python -m benchmarks.cpu_kernels --n 512 --v 32768 --repeats 2
    prefix-rft bench                                 # same as the first line

How memory is measured: every (impl, mode) case runs in a fresh subprocess, so allocator
caches and earlier cases cannot hide or inflate anything. The worker builds the inputs,
records its current RSS (psutil), runs the case ``repeats`` times, and reports
``peak RSS (getrusage ru_maxrss) - RSS before the case``: the extra memory the computation
needed on top of its inputs. This is conservative for the smaller case (a transient peak
from `import torch` above the post-import RSS would be counted against it).
Time is wall clock per call, after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

IMPLS = ("naive", "torch")
MODES = ("fwd", "fwd+bwd")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _naive(hidden, weight, labels):
    import torch

    logits = hidden.float() @ weight.float().T
    log_probs = torch.log_softmax(logits, dim=-1)
    logprob = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprob, entropy


def build_case(impl: str, mode: str, n: int, h: int, v: int):
    """Inputs for one case and a ``step()`` that runs it once (fwd, or fwd + bwd)."""
    import torch

    from prefix_rft.kernels import linear_logprob_entropy

    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    hidden = torch.randn(n, h).requires_grad_(grad)
    weight = (torch.randn(v, h) / h**0.5).requires_grad_(grad)
    labels = torch.randint(0, v, (n,))
    g_lp, g_ent = torch.randn(n), torch.randn(n)

    def step():
        if impl == "naive":
            lp, ent = _naive(hidden, weight, labels)
        else:
            lp, ent = linear_logprob_entropy(hidden, weight, labels, impl="torch")
        if grad:
            hidden.grad = weight.grad = None
            ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return lp

    return step


def run_case(impl: str, mode: str, n: int, h: int, v: int, repeats: int) -> dict:
    """Run one case in this process; return times (ms) and extra peak RSS (MB)."""
    import psutil

    step = build_case(impl, mode, n, h, v)
    rss_before = psutil.Process().memory_info().rss
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        if i:  # the first call is a warm-up
            times.append((time.perf_counter() - t0) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    import torch

    return {"impl": impl, "mode": mode, "times_ms": times, "threads": torch.get_num_threads(),
            "peak_extra_mb": max(peak - rss_before, 0) / 2**20}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="prefix-rft bench",
                                     description="CPU benchmark of the fused kernel (torch impl) "
                                                 "vs naive full logits; time and peak memory.")
    parser.add_argument("--n", type=int, default=2048, help="tokens N")
    parser.add_argument("--h", type=int, default=256, help="hidden size H")
    parser.add_argument("--v", type=int, default=151936, help="vocabulary V (Qwen2.5: 151936)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case")
    parser.add_argument("--out", default=None,
                        help="CSV to append to (default: benchmarks/results/cpu_kernels.csv; "
                             "'-' writes nothing)")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(*args.worker, args.n, args.h, args.v, args.repeats)))
        return []

    from benchmarks.results_io import make_row, run_case_in_subprocess, write_results

    shape = f"N={args.n},H={args.h},V={args.v}"
    print(f"CPU kernel benchmark, {shape}, fp32, {args.repeats} timed calls per case "
          f"(each case in its own subprocess)", flush=True)
    results = {}
    for mode in MODES:
        for impl in IMPLS:
            r = run_case_in_subprocess(
                "benchmarks.cpu_kernels",
                ["--worker", impl, mode, "--n", str(args.n), "--h", str(args.h),
                 "--v", str(args.v), "--repeats", str(args.repeats)])
            results[(impl, mode)] = r
            p50 = sorted(r["times_ms"])[len(r["times_ms"]) // 2]
            print(f"  {mode:8s} {impl:6s} p50 {p50:9.1f} ms   peak +{r['peak_extra_mb']:8.1f} MB",
                  flush=True)
    rows = []
    for (impl, mode), r in results.items():
        base = results[("naive", mode)]
        ratio_t = _p50(r) / _p50(base)
        ratio_m = r["peak_extra_mb"] / max(base["peak_extra_mb"], 1e-9)
        extra = f"time_vs_naive={ratio_t:.2f};mem_vs_naive={ratio_m:.3f};threads={r['threads']}"
        rows.append(make_row("linear_logprob_entropy", impl, mode, shape, r["times_ms"],
                             r["peak_extra_mb"], extra))
    print("\nours / naive:")
    for mode in MODES:
        t = _p50(results[("torch", mode)]) / _p50(results[("naive", mode)])
        m = results[("torch", mode)]["peak_extra_mb"] / results[("naive", mode)]["peak_extra_mb"]
        print(f"  {mode:8s} time {t:5.2f}x (target <= 1.5x)   peak memory {m:6.1%} (target <= 10%)")
    if args.out != "-":
        csv_path = args.out or os.path.join(RESULTS, "cpu_kernels.csv")
        write_results(rows, csv_path, "CPU kernel benchmark (torch impl vs naive)",
                      png_title="CPU: linear->logprob+entropy, torch impl vs naive")
    return rows


def _p50(result: dict) -> float:
    times = sorted(result["times_ms"])
    return times[len(times) // 2]


if __name__ == "__main__":
    main()
