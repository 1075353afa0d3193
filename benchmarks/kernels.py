"""GPU benchmark of linear -> (log-prob, entropy): our Triton and torch impls against baselines.

Impls: ``naive`` (fp32 logits, log_softmax, entropy), ``compile`` (torch.compile of naive,
not in the defaults: it compiles for minutes), ``torch`` (our chunked torch path),
``triton-split`` / ``triton-atomic`` (our kernels with either backward), ``liger``
(Liger-Kernel ``LigerFusedLinearCrossEntropyLoss(reduction="none")``) and ``cce`` (Cut
Cross-Entropy ``linear_cross_entropy(reduction="none")``) -- the last two give the log-prob
only, no entropy, which the table says -- and ``gemm``: the bare lm_head GEMMs (x @ W.T
forward; dX = G @ W and dW = G.T @ x backward), the physical floor.

Modes: ``fwd``, ``bwd`` (the backward alone, after an untimed forward) and ``fwd+bwd``;
milliseconds from CUDA events (p20/p50/p80 of ``--reps`` runs after ``--warmup``), peak MB =
``torch.cuda.max_memory_allocated()`` during the mode minus what the inputs hold. An OOM is
caught and recorded as a row with ``extra=OOM``.

Rows append to ``benchmarks/results/kernels.csv`` (benchmarks/results_io.py) and the whole
CSV renders to ``kernels.md`` + ``kernels.png``; the ratios against the goals (fused fwd+bwd
within 1.3-1.8x the bare GEMMs, peak memory <= 1/20 of naive) go to ``kernels_summary.md``.
Our own impls must import (else exit 1: see ``results_io.require_kernels``); a peer package
(Liger, CCE) that is missing or raises anything is recorded as a skipped / failed row with
the reason, and the run goes on. Defaults take a few minutes on one H100.

    python benchmarks/kernels.py                      # default shapes and impls, bf16, CUDA
    python benchmarks/kernels.py --impls triton-split gemm --shapes 16384,4096,151936
    python benchmarks/kernels.py --smoke              # tiny fp32 shapes on CPU (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

if __package__ in (None, ""):  # run as a file: `benchmarks.*` from the source tree, appended
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # so an
    # installed prefix_rft still wins over the source checkout (whose prefix_rft/ lacks kernels)
from benchmarks.results_io import (  # noqa: E402
    RESULTS_DIR,
    append_rows,
    make_row,
    read_rows,
    render_markdown,
    render_png,
    require_kernels,
)

OP = "linear_logprob_entropy"
DEFAULT_SHAPES = [(4096, 1536, 151936), (16384, 4096, 151936)]
SMOKE_SHAPES = [(33, 17, 515)]
ALL_IMPLS = ["gemm", "naive", "compile", "torch", "triton-split", "triton-atomic", "liger", "cce"]
OWN_IMPLS = {"torch", "triton-split", "triton-atomic"}  # must import: failing is a bug
MODES = ["fwd", "bwd", "fwd+bwd"]
LOGPROB_ONLY = {"liger", "cce"}
# Said in the table: what differs in the work each impl does.
IMPL_NOTES = {
    "liger": ";grads computed inside fwd (bwd only rescales)",
    "cce": ";filter_eps=auto (CCE default gradient filtering)",
    "gemm": ";[N,V] grad G is a given input",
}
IGNORE = -100


# ------------------------------------------------------------------------------ the impls


def naive_logprob_entropy(x, w, y):
    """Full-logits baseline: ``[N, V]`` fp32 logits, log_softmax, gather, entropy."""
    z = (x @ w.T).float()
    logp = z.log_softmax(-1)
    valid = y != IGNORE
    lp = logp.gather(-1, torch.where(valid, y, 0)[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def build_impl(name: str):
    """``fn(x, w, y) -> (logprob, entropy|None)``, or raise ImportError / RuntimeError."""
    if name == "naive":
        return naive_logprob_entropy
    if name == "compile":
        return torch.compile(naive_logprob_entropy, dynamic=False)
    if name == "torch":
        fn = require_kernels().linear_logprob_entropy
        return lambda x, w, y: fn(x, w, y, impl="torch")
    if name in ("triton-split", "triton-atomic"):
        fn, bwd = require_kernels().linear_logprob_entropy, name.split("-")[1]
        return lambda x, w, y: fn(x, w, y, impl="triton", bwd=bwd)
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=IGNORE)
        return lambda x, w, y: (-loss_fn(w, x, y), None)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda x, w, y: (-linear_cross_entropy(x, w, y, ignore_index=IGNORE,
                                                      reduction="none"), None)
    if name == "gemm":
        return None  # handled by GemmFloor
    raise ValueError(f"impl must be one of {ALL_IMPLS}, got {name!r}")


class GemmFloor:
    """The bare lm_head GEMMs: forward ``x @ W.T``, backward ``G @ W`` and ``G.T @ x``."""

    def __init__(self, x, w):
        self.x, self.w = x, w
        self.g = torch.randn(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

    def fwd(self):
        return self.x @ self.w.T

    def bwd(self):
        return self.g @ self.w, self.g.T @ self.x


# ------------------------------------------------------------------------------ timing


class Timer:
    """CUDA events on GPU, perf_counter on CPU; ``with timer: ...`` appends ms to samples."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.samples: list[float] = []

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(True), torch.cuda.Event(True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if exc[0] is not None:
            return
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.samples.append(self.start.elapsed_time(self.end))
        else:
            self.samples.append((time.perf_counter() - self.t0) * 1e3)


def _mem_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _mem_peak_mb(device, base):
    if device.type != "cuda":
        return None  # CPU peak RSS is measured by benchmarks/cpu_kernels.py, not here
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def run_mode(fn, mode, x, w, y, g_lp, g_h, warmup, reps):
    """Time one (impl, mode); returns (samples_ms, peak_mb)."""
    device = x.device
    timer = Timer(device)

    def loss_of(outs):
        lp, ent = outs
        loss = (lp * g_lp).sum()
        return loss if ent is None else loss + (ent * g_h).sum()

    base = _mem_reset(device)
    for i in range(warmup + reps):
        x.grad = w.grad = None
        timed = i >= warmup
        if mode == "fwd":
            with (timer if timed else _Null()):
                outs = fn(x, w, y)
        elif mode == "bwd":
            loss = loss_of(fn(x, w, y))
            with (timer if timed else _Null()):
                loss.backward()
        else:
            with (timer if timed else _Null()):
                loss_of(fn(x, w, y)).backward()
        outs = loss = None  # noqa: F841 -- free before the next iteration
    x.grad = w.grad = None
    return timer.samples, _mem_peak_mb(device, base)


def run_gemm(mode, x, w, warmup, reps):
    floor = GemmFloor(x.detach(), w.detach())
    timer = Timer(x.device)
    base = _mem_reset(x.device)
    steps = {"fwd": [floor.fwd], "bwd": [floor.bwd], "fwd+bwd": [floor.fwd, floor.bwd]}[mode]
    for i in range(warmup + reps):
        with (timer if i >= warmup else _Null()):
            for step in steps:
                step()
    # The [N, V] gradient G is an input of the floor, not working memory: not counted.
    return timer.samples, _mem_peak_mb(x.device, base)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -------------------------------------------------------------------------------- driver


def make_inputs(n, h, v, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(n, h, generator=gen)).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen) / h ** 0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen)
    y[torch.rand(n, generator=gen) < 0.1] = IGNORE
    g_lp = torch.randn(n, generator=gen).to(device)
    g_h = torch.randn(n, generator=gen).to(device)
    return x, w, y.to(device), g_lp, g_h


def bench_shape(shape, impls, modes, dtype, device, warmup, reps):
    n, h, v = shape
    shape_s = f"N={n},H={h},V={v}"
    x, w, y, g_lp, g_h = make_inputs(n, h, v, dtype, device)
    rows = []
    for impl in impls:
        label = impl + (" (logprob only)" if impl in LOGPROB_ONLY else "")
        broken = None
        try:
            fn = build_impl(impl)
        except Exception as err:  # noqa: BLE001 -- a broken peer package must not stop the run
            if impl in OWN_IMPLS:
                raise
            kind = "skipped" if isinstance(err, ImportError) else "failed"
            broken = f";{kind}: {_reason(err)}"
            print(f"{kind} {impl}: {_reason(err)}", flush=True)
        for mode in modes:
            extra = f"dtype={str(dtype).replace('torch.', '')}" + IMPL_NOTES.get(impl, "")
            samples = peak = None
            if broken:
                extra += broken
            else:
                try:
                    if impl == "gemm":
                        samples, peak = run_gemm(mode, x, w, warmup, reps)
                    else:
                        samples, peak = run_mode(fn, mode, x, w, y, g_lp, g_h, warmup, reps)
                except torch.cuda.OutOfMemoryError:
                    extra += ";OOM"
                except Exception as err:  # noqa: BLE001 -- record it, go on with the next
                    if impl in OWN_IMPLS and device.type == "cuda":
                        print(f"ERROR {impl} {mode}: {_reason(err)}", flush=True)
                    extra += f";failed: {_reason(err)}"
                x.grad = w.grad = None
                _mem_reset(device)
            row = make_row(OP, label, mode, shape_s, samples, peak, extra)
            print(f"{shape_s:28s} {label:24s} {mode:8s} p50={row['ms_p50']:>10s} ms "
                  f"peak={row['peak_mb'] or '-':>10s} MB {extra}", flush=True)
            rows.append(row)
    del x, w
    return rows


def _reason(err: BaseException) -> str:
    """One short line: exception type and message, without characters that break CSV/MD."""
    text = f"{type(err).__name__}: {err}".splitlines()[0] if str(err) else type(err).__name__
    return text.replace("|", "/").replace(";", ",")[:160]


def _p50(rows, impl_prefix, mode, shape):
    for r in rows:
        if r["impl"].split(" ")[0] == impl_prefix and r["mode"] == mode and r["shape"] == shape:
            try:
                return float(r["ms_p50"]), (float(r["peak_mb"]) if r["peak_mb"] else None)
            except ValueError:
                return None, None
    return None, None


def ratio_lines(rows) -> list[str]:
    """Markdown bullets: each fused impl's fwd+bwd time against the bare GEMMs (goal 1.3-1.8x)
    and its peak memory against naive (goal <= 1/20), per shape."""
    lines = []
    for shape in sorted({r["shape"] for r in rows}):
        gemm, _ = _p50(rows, "gemm", "fwd+bwd", shape)
        _, naive_mb = _p50(rows, "naive", "fwd+bwd", shape)
        for impl in ("triton-split", "triton-atomic", "torch", "liger", "cce"):
            ms, mb = _p50(rows, impl, "fwd+bwd", shape)
            if ms is None or ms != ms:  # absent or NaN (failed / OOM)
                continue
            parts = [f"- {shape} {impl}: fwd+bwd {ms:.2f} ms"]
            if gemm:
                ok = "meets" if ms / gemm <= 1.8 else "misses"
                parts.append(f"{ms / gemm:.2f}x the bare GEMMs (goal 1.3-1.8x: {ok})")
            if mb is not None and naive_mb:
                ok = "meets" if mb / naive_mb <= 0.05 else "misses"
                parts.append(f"peak {mb / naive_mb:.3f} of naive (goal <= 0.05: {ok})")
            lines.append("; ".join(parts))
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None,
                   help="N,H,V triples (default: the four issue shapes; --smoke: tiny ones)")
    p.add_argument("--impls", nargs="+", default=None, choices=ALL_IMPLS,
                   help="impls to run (default: all but compile on CUDA; with --smoke the "
                        "ones that run on CPU, triton through the interpreter, plus liger)")
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="input dtype (default bf16 on CUDA, fp32 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs (default 3; smoke 1)")
    p.add_argument("--reps", type=int, default=None, help="timed runs (default 10; smoke 2)")
    p.add_argument("--csv", default=None,
                   help="CSV to append to (default benchmarks/results/kernels.csv; with "
                        "--smoke a temporary file, so CI never touches the committed results)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU with the impls that work there (for CI)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("benchmarks/kernels.py needs a CUDA GPU; use --smoke for the CPU check")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if args.smoke else "bf16")]
    shapes = ([tuple(int(s) for s in t.split(",")) for t in args.shapes] if args.shapes
              else SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)
    if args.impls:
        impls = args.impls
    elif device.type == "cuda":
        impls = [i for i in ALL_IMPLS if i != "compile"]
    else:  # Triton runs on CPU only through its interpreter; liger shows a failing peer
        impls = ["gemm", "naive", "torch", "liger"] + (
            ["triton-split", "triton-atomic"] if os.environ.get("TRITON_INTERPRET") == "1"
            else [])
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    reps = args.reps if args.reps is not None else (2 if args.smoke else 10)
    if args.csv:
        csv_path = args.csv
    elif args.smoke:
        csv_path = os.path.join(tempfile.mkdtemp(prefix="kernels_smoke_"), "kernels.csv")
    else:
        csv_path = os.path.join(RESULTS_DIR, "kernels.csv")

    rows = []
    for shape in shapes:
        rows += bench_shape(shape, impls, args.modes, dtype, device, warmup, reps)
    append_rows(csv_path, rows)
    all_rows = [r for r in read_rows(csv_path) if r["op"] == OP]
    title = "linear -> log-prob + entropy (liger/cce: log-prob only, no entropy)"
    md_path = os.path.splitext(csv_path)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(render_markdown(all_rows, title))
    render_png(all_rows, os.path.splitext(csv_path)[0] + ".png", title)
    summary = os.path.splitext(csv_path)[0] + "_summary.md"
    with open(summary, "w") as f:
        f.write("# Fused linear -> log-prob + entropy against the goals\n\n"
                + "\n".join(ratio_lines(all_rows) or ["(no fwd+bwd timings)"]) + "\n")
    print(f"wrote {csv_path}, {md_path}, {summary} and the .png")
    print(open(summary).read())
    return rows


def own_failures(rows) -> list[dict]:
    return [r for r in rows if r["impl"] in OWN_IMPLS and "failed:" in r["extra"]]


if __name__ == "__main__":
    sys.exit(1 if own_failures(main()) else 0)
