"""The fused head at the anchor shape against its floor: is the kernel at the floor or not?

    python3 benchmarks/gpu_floor.py --out-dir OUT            # CUDA: N=8192, H=4096, V=151936
    python3 benchmarks/gpu_floor.py --out-dir OUT --dry-run  # CPU interpreter, tiny fp32

bf16 inputs made on the GPU; each row is the median (and p20/p80) of >= 10 CUDA-event timings
after warm-up, appended to ``OUT/kernels.csv`` (benchmarks/results_io columns) the moment it
is measured, so a timeout loses at most the row in flight. Rows (``impl``, ``mode``):

* ``gemm_fwd`` fwd: ``x @ W.T`` alone -- the cuBLAS rate every Triton part is held to;
* ``gemm`` fwd+bwd: the bare GEMMs (``x @ W.T``, ``G @ W``, ``G.T @ x``; 6NHV FLOPs);
* ``floor8`` fwd+bwd: 4 x ``gemm_fwd`` (8NHV at the cuBLAS rate: what a fused head that
  recomputes the logits once in the backward cannot beat; derived, marked so);
* ``triton-split`` fwd, bwd, fwd+bwd and the backward's parts ``split-dz`` (the dz kernel over
  every vocab chunk), ``split-dX`` / ``split-dW`` (the chunks' library GEMMs), ``split-rest``
  (bwd minus the three: allocation, zeroing, casts, launches);
* ``triton-atomic`` fwd+bwd; ``liger`` (FLCE, log-prob only) and ``naive`` (full fp32
  logits) fwd+bwd; an absent or failing peer is a row saying so.

``extra`` holds ``tflops`` (the row's own FLOPs over its time), ``x_bare`` / ``x_floor8``
(time over the bare GEMMs / floor8) and, for fwd+bwd, ``peak_no_out_mb`` (peak minus the
dX and dW outputs). benchmarks/gpu_summary.py turns these rows into the verdict.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: `benchmarks.*` from the source tree, appended
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.results_io import append_rows, make_row, require_kernels  # noqa: E402

OP = "linear_logprob_entropy"
SHAPE = (8192, 4096, 151936)
DRY_SHAPE = (40, 32, 700)
IGNORE, TEMPERATURE = -100, 0.7


def timings(fn, device, warmup: int, reps: int) -> list[float]:
    """Milliseconds of ``reps`` calls of ``fn`` after ``warmup``: CUDA events or perf_counter."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(True), torch.cuda.Event(True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def peak_mb(fn, device) -> float | None:
    """Peak allocated MiB above what was allocated before one call of ``fn``."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


class Bench:
    """Measures rows and appends each to the CSV at once; keeps the reference times."""

    def __init__(self, csv_path, shape, device, dtype, warmup, reps):
        self.csv, self.shape, self.device, self.dtype = csv_path, shape, device, dtype
        self.warmup, self.reps = warmup, reps
        n, h, v = shape
        self.nhv2 = 2.0 * n * h * v
        self.shape_s = f"N={n},H={h},V={v}"
        self.ref: dict[str, float] = {}  # "gemm_fwd", "gemm", "floor8" -> ms
        self.out_mb = (n * h + v * h) * torch.finfo(dtype).bits / 8 / 2**20  # dX + dW

    def row(self, impl, mode, samples, flops_units, peak=None, note=""):
        ms = sorted(samples)[len(samples) // 2] if samples else float("nan")
        extra = [f"dtype={str(self.dtype).replace('torch.', '')}"]
        if samples:
            extra.append(f"tflops={flops_units * self.nhv2 / ms / 1e9:.1f}")
            for key, label in (("gemm", "x_bare"), ("floor8", "x_floor8")):
                if self.ref.get(key):
                    extra.append(f"{label}={ms / self.ref[key]:.3f}")
        if peak is not None and mode == "fwd+bwd" and impl != "gemm":
            extra.append(f"peak_no_out_mb={peak - self.out_mb:.1f}")
        if note:
            extra.append(note)
        r = make_row(OP, impl, mode, self.shape_s, samples, peak, ";".join(extra))
        append_rows(self.csv, [r])
        print(f"{impl:14s} {mode:8s} p50 {r['ms_p50']:>9s} ms  {';'.join(extra)}", flush=True)
        return ms

    def measure(self, impl, mode, fn, flops_units, with_peak=True, note=""):
        try:
            samples = timings(fn, self.device, self.warmup, self.reps)
            peak = peak_mb(fn, self.device) if with_peak else None
        except Exception as err:  # noqa: BLE001 -- record it, go on with the next row
            self.row(impl, mode, None, flops_units, note=f"failed: {_reason(err)}")
            return None
        return self.row(impl, mode, samples, flops_units, peak, note)


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text.replace("|", "/").replace(";", ",")[:160]


def make_inputs(shape, dtype, device, seed=0):
    n, h, v = shape
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, h, generator=g, device=device).to(dtype)
    w = (torch.randn(v, h, generator=g, device=device) / h ** 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    y[torch.rand(n, generator=g, device=device) < 0.1] = IGNORE
    g_lp, g_h = torch.randn(n, generator=g, device=device), torch.randn(n, generator=g,
                                                                         device=device)
    return x, w, y, g_lp, g_h


def bench_gemms(b: Bench, x, w):
    g = torch.randn(x.shape[0], w.shape[0], device=x.device).to(x.dtype)
    b.ref["gemm_fwd"] = b.measure("gemm_fwd", "fwd", lambda: x @ w.T, 1, with_peak=False)

    def bare():
        x @ w.T
        g @ w
        g.T @ x

    b.ref["gemm"] = b.measure("gemm", "fwd+bwd", bare, 3, with_peak=False,
                              note="[N,V] grad G is a given input")
    if b.ref.get("gemm_fwd"):
        b.ref["floor8"] = b.row("floor8", "fwd+bwd", [4 * b.ref["gemm_fwd"]], 4,
                                note="derived=4x gemm_fwd")


def fwd_bwd(fn, x, w, y, g_lp, g_h):
    """``fn(x, w, y) -> (lp, ent|None)``; one forward + backward with fresh leaf grads."""
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()

    def run():
        xs.grad = ws.grad = None
        lp, ent = fn(xs, ws, y)
        loss = (lp * g_lp).sum() + (0 if ent is None else (ent * g_h).sum())
        loss.backward()
    return run


def bench_split_parts(b: Bench, x, w, y, g_lp, g_h):
    """Split forward, backward and the backward's parts (dz / dX / dW / rest)."""
    from prefix_rft.kernels import linear_logprob_entropy_split as split
    from prefix_rft.kernels import linear_logprob_entropy_triton as ops

    args5 = (x, w, None, y, TEMPERATURE, IGNORE)
    b.measure("triton-split", "fwd", lambda: ops.triton_fwd(*args5), 1, with_peak=False)
    _, ent, lse = ops.triton_fwd(*args5)
    bwd_ms = b.measure("triton-split", "bwd", lambda: split.triton_bwd_split(
        x, w, None, y, lse, ent, g_lp, g_h, TEMPERATURE, IGNORE), 3, with_peak=False)
    cfg = ops._launch_config("dz", x, w)
    n, h = x.shape
    v = w.shape[0]
    chunk = min(cfg["CHUNK_V"], v)
    dz = torch.empty((n, chunk), dtype=x.dtype, device=x.device)
    dx = torch.zeros((n, h), dtype=torch.float32, device=x.device)
    dw = torch.empty_like(w)
    args = (x, w, None, y, lse, ent, g_lp, g_h, 1.0 / TEMPERATURE, IGNORE, 0.0)
    spans = [(v0, min(chunk, v - v0)) for v0 in range(0, v, chunk)]

    def dz_all():
        for v0, length in spans:
            split._launch_dz(cfg, args, dz, lse, lse, v0, length, False, x.dtype)

    def dx_all():
        for v0, length in spans:
            split._addmm_fp32(dx, dz[:, :length], w[v0:v0 + length])

    def dw_all():
        for v0, length in spans:
            torch.mm(dz[:, :length].T, x, out=dw[v0:v0 + length])

    cfg_s = ",".join(f"{k}={cfg[k]}" for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K", "CHUNK_V"))
    parts = [b.measure("split-dz", "bwd", dz_all, 1, with_peak=False, note=f"cfg={cfg_s}"),
             b.measure("split-dX", "bwd", dx_all, 1, with_peak=False,
                       note=f"addmm_out_dtype={split._MIXED_ADDMM_OK}"),
             b.measure("split-dW", "bwd", dw_all, 1, with_peak=False)]
    if bwd_ms and all(parts):
        b.row("split-rest", "bwd", [bwd_ms - sum(parts)], 0, note="derived=bwd-dz-dX-dW")


def bench_fused(b: Bench, x, w, y, g_lp, g_h, dry_run: bool):
    kernels = require_kernels()
    for bwd in ("split", "atomic"):
        fn = fwd_bwd(lambda a, c, d, bwd=bwd: kernels.linear_logprob_entropy(
            a, c, d, temperature=TEMPERATURE, impl="triton", bwd=bwd), x, w, y, g_lp, g_h)
        b.measure(f"triton-{bwd}", "fwd+bwd", fn, 4)
    from benchmarks.kernels import build_impl

    for impl, units in (("liger", 3), ("naive", 3)):
        try:
            fn = build_impl(impl)
        except Exception as err:  # noqa: BLE001 -- an absent peer is a row, not a failure
            b.row(impl, "fwd+bwd", None, units, note=f"skipped: {_reason(err)}")
            continue
        b.measure(impl, "fwd+bwd", fwd_bwd(fn, x, w, y, g_lp, g_h), units)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--shape", default=None, help="N,H,V (default 8192,4096,151936)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny fp32 shape")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, shape, warmup, reps = torch.device("cpu"), torch.float32, DRY_SHAPE, 0, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_floor.py: needs CUDA (or --dry-run)")
        device, dtype, shape, warmup, reps = torch.device("cuda"), torch.bfloat16, SHAPE, 3, \
            max(10, args.reps)
    if args.shape:
        shape = tuple(int(s) for s in args.shape.split(","))
    require_kernels()
    os.makedirs(args.out_dir, exist_ok=True)
    b = Bench(os.path.join(args.out_dir, "kernels.csv"), shape, device, dtype, warmup, reps)
    x, w, y, g_lp, g_h = make_inputs(shape, dtype, device)
    bench_gemms(b, x, w)
    bench_split_parts(b, x, w, y, g_lp, g_h)
    bench_fused(b, x, w, y, g_lp, g_h, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
