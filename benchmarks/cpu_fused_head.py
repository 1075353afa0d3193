"""CPU benchmark of the lm_head + policy loss, forward + backward: the fused head-and-loss (6NHV)
vs the three bare GEMMs it is made of vs the generic log-prob/entropy autograd path (8NHV).

    python -m benchmarks.cpu_fused_head                  # N=12288 (8x8 rollouts of 64+192
                                                         # tokens: their response tokens, one
                                                         # micro-batch), H=256, V=151936, 1 thread
    python -m benchmarks.cpu_fused_head --n 96 --v 5003 --repeats 1 --out -   # smoke
    python -m benchmarks.cpu_fused_head --cases fused6_torch --repeats 5 --no-memory
                                                         # the <= 1.1x check alone (~8 min)

Cases, timed interleaved (case A, B, C, then again, ``repeats`` rounds; one warm-up round):

* ``gemm6_bare`` -- the floor: per token chunk of the fused path's size, ``z = x_c @ W.T``,
  ``dz @ W`` and ``dW += dz.T @ x_c`` on preallocated buffers, nothing else (6NHV FLOPs);
* ``fused6_torch`` -- :func:`prefix_rft.kernels.linear_policy_loss` (``impl="torch"``), PPO
  clip + dual clip, old log-probs, then ``loss.backward()`` (native CPU row passes where a C
  compiler is found, as in training);
* ``fused6_torch_rows`` -- the same with the plain-torch row passes (the fallback without a
  compiler, ``PREFIX_RFT_NATIVE_CPU=0``);
* ``autograd8_torch`` -- the trainer's ``head_path: autograd``:
  :func:`~prefix_rft.kernels.linear_logprob_entropy` + the same per-token loss in torch, then
  ``backward()`` (its backward recomputes the logits: 8NHV).

Peak memory: each case once more in its own subprocess, ``ru_maxrss`` minus the RSS after
building its inputs (the extra memory the computation needs). Rows go to
``benchmarks/results/cpu_fused_head.csv`` (results_io format) with the ratios to
``gemm6_bare`` of the same run, the thread count and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time

CASES = ("gemm6_bare", "fused6_torch", "fused6_torch_rows", "autograd8_torch")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@contextlib.contextmanager
def _row_passes(native: bool):
    """The fused path's row passes for one call: native (where built) or plain torch."""
    import torch

    import prefix_rft.kernels.linear_policy_loss_torch as fused_torch

    chosen = fused_torch._row_pass_lib
    if native and chosen(torch.device("cpu")) is None:
        raise SystemExit("the native CPU row passes did not build (see the logged reason)")
    if not native:
        fused_torch._row_pass_lib = lambda device: None
    try:
        yield
    finally:
        fused_torch._row_pass_lib = chosen


def build_case(case: str, n: int, h: int, v: int):
    """Inputs for one case and a ``step()`` that runs it once (forward + backward)."""
    import torch

    from prefix_rft.kernels import linear_logprob_entropy, linear_policy_loss
    from prefix_rft.kernels.linear_policy_loss_torch import DEFAULT_CHUNK_BYTES, chunk_rows

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    with torch.no_grad():
        old = linear_logprob_entropy(hidden, weight, labels, impl="torch")[0]
    old += 0.1 * torch.randn(n, generator=g)
    weight_t = 1.0 / n
    opts = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0)

    if case == "gemm6_bare":
        rows = chunk_rows(v, DEFAULT_CHUNK_BYTES["cpu"])
        buf = torch.empty(min(rows, n), v)
        dx, dw = torch.empty(n, h), torch.zeros(v, h)
        x_all, w = hidden.detach(), weight.detach()

        def step():
            for c0 in range(0, n, rows):
                x = x_all[c0:c0 + rows]
                z = torch.mm(x, w.T, out=buf[:x.shape[0]])
                torch.mm(z, w, out=dx[c0:c0 + rows])
                dw.addmm_(z.T, x)
        return step

    def step():
        hidden.grad = weight.grad = None
        if case.startswith("fused6_torch"):
            with _row_passes(native=case == "fused6_torch"):
                loss, _, _ = linear_policy_loss(hidden, weight, labels, advantages=adv,
                                                old_logprob=old, loss_weight=weight_t,
                                                impl="torch", **opts)
        else:
            lp, _ = linear_logprob_entropy(hidden, weight, labels, impl="torch")
            ratio = torch.exp((lp - old).clamp(-20, 20))
            tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
            tok = torch.where(adv < 0, torch.minimum(tok, -adv * 3.0), tok)
            loss = (tok * weight_t).sum()
        loss.backward()
    return step


def time_interleaved(n, h, v, repeats, cases=CASES) -> dict[str, list[float]]:
    steps = {case: build_case(case, n, h, v) for case in cases}
    times = {case: [] for case in cases}
    for r in range(repeats + 1):
        for case, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r:  # round 0 is the warm-up
                times[case].append((time.perf_counter() - t0) * 1e3)
            print(f"  round {r} {case:16s} {(time.perf_counter() - t0):8.2f} s", flush=True)
    return times


def peak_extra_mb(case, n, h, v) -> float:
    """The case once in a fresh subprocess: peak RSS minus RSS after building its inputs."""
    from benchmarks.results_io import run_case_in_subprocess

    return run_case_in_subprocess(
        "benchmarks.cpu_fused_head", ["--worker", case, "--n", str(n), "--h", str(h),
                                      "--v", str(v), "--threads", str(_threads())]
    )["peak_extra_mb"]


def _worker(case, n, h, v) -> dict:
    import psutil

    step = build_case(case, n, h, v)
    before = psutil.Process().memory_info().rss
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_extra_mb": max(peak - before, 0) / 2**20}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12288, help="response tokens in the head")
    parser.add_argument("--h", type=int, default=256, help="hidden size H")
    parser.add_argument("--v", type=int, default=151936, help="vocabulary V")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="cases to time (gemm6_bare, the reference of every ratio, is "
                             "always added)")
    parser.add_argument("--out", default=None, help="CSV (default results/cpu_fused_head.csv; "
                                                    "'-' writes nothing)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.n, args.h, args.v)))
        return []
    from benchmarks.results_io import make_row, write_results

    shape = f"N={args.n},H={args.h},V={args.v}"
    load = os.getloadavg()[0]
    print(f"CPU fused head-and-loss benchmark, {shape}, fp32, {args.threads} thread(s), "
          f"load {load:.2f}", flush=True)
    cases = [c for c in CASES if c in args.cases or c == "gemm6_bare"]
    times = time_interleaved(args.n, args.h, args.v, args.repeats, cases)
    mem = {c: None if args.no_memory else peak_extra_mb(c, args.n, args.h, args.v)
           for c in cases}
    p50 = {c: sorted(t)[len(t) // 2] for c, t in times.items()}
    load_after = os.getloadavg()[0]
    rows = []
    for case in cases:
        vs_autograd8 = (f"vs_autograd8={p50[case] / p50['autograd8_torch']:.3f};"
                        if "autograd8_torch" in p50 else "")
        per_round = "/".join(f"{t / b:.3f}" for t, b in zip(times[case], times["gemm6_bare"]))
        extra = (f"vs_gemm6={p50[case] / p50['gemm6_bare']:.3f};{vs_autograd8}"
                 f"per_round_vs_gemm6={per_round};"
                 f"threads={args.threads};load={load:.2f}-{load_after:.2f};"
                 f"interleaved_rounds={args.repeats}")
        rows.append(make_row("fused_head_loss", case, "fwd+bwd", shape, times[case], mem[case],
                             extra))
        print(f"  {case:16s} p50 {p50[case] / 1e3:8.2f} s  x{p50[case] / p50['gemm6_bare']:.3f}"
              f" of gemm6  peak +{mem[case] or 0:.0f} MB", flush=True)
    if args.out != "-":
        path = args.out or os.path.join(RESULTS, "cpu_fused_head.csv")
        write_results(rows, path, "CPU: fused head-and-loss vs bare GEMMs", png=False)
    return rows


if __name__ == "__main__":
    main()
