"""The split backward's dz kernel over its tile candidates: ms and the real JIT's resources.

    python3 benchmarks/gpu_dz_sweep.py --out-dir OUT            # CUDA, N=8192, H=4096, V=151936
    python3 benchmarks/gpu_dz_sweep.py --out-dir OUT --dry-run  # CPU interpreter, tiny fp32

For each ``AUTOTUNE_CANDIDATES["dz"]`` config (kernels/triton_configs.py) the dz kernel runs
over every vocab chunk (what ``split-dz`` in gpu_floor.py times with the shipped config); the
row (impl ``dz-sweep``, appended to ``OUT/kernels.csv`` at once) carries the config, TFLOP/s,
the ratio to ``x @ W.T`` when gpu_floor.py has measured it, and the registers, spills and
shared memory of the kernel the GPU's JIT actually built (the compile check predicts them
without a GPU; this row says whether the prediction held).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: `benchmarks.*` from the source tree, appended
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.gpu_floor import (  # noqa: E402
    DRY_SHAPE,
    IGNORE,
    SHAPE,
    TEMPERATURE,
    make_inputs,
    timings,
)
from benchmarks.results_io import append_rows, make_row, read_rows, require_kernels  # noqa: E402


def cublas_ms(csv_path: str, shape_s: str) -> float | None:
    """``x @ W.T``'s p50 from gpu_floor.py's rows, when it ran."""
    if not os.path.exists(csv_path):
        return None
    for r in read_rows(csv_path):
        if r["impl"] == "gemm_fwd" and r["shape"] == shape_s and r["ms_p50"] not in ("", "nan"):
            return float(r["ms_p50"])
    return None


def sweep_one(cfg, x, w, y, lse, ent, g_lp, g_h, warmup, reps):
    """(ms samples, compiled kernel or None) of the dz kernel over all chunks with ``cfg``."""
    from prefix_rft.kernels import linear_logprob_entropy_split as split

    n, v = x.shape[0], w.shape[0]
    chunk = min(cfg["CHUNK_V"], v)
    dz = torch.empty((n, chunk), dtype=x.dtype, device=x.device)
    args = (x, w, None, y, lse, ent, g_lp, g_h, 1.0 / TEMPERATURE, IGNORE, 0.0)
    spans = [(v0, min(chunk, v - v0)) for v0 in range(0, v, chunk)]
    compiled = []

    def run():
        for v0, length in spans:
            compiled.append(split._launch_dz(cfg, args, dz, lse, lse, v0, length, False,
                                             x.dtype))
    samples = timings(run, x.device, warmup, reps)
    return samples, next((c for c in compiled if c is not None), None)


def resources(compiled) -> str:
    if compiled is None:
        return "jit=n/a (interpreter)"
    shared = getattr(getattr(compiled, "metadata", None), "shared", "?")
    return (f"regs={getattr(compiled, 'n_regs', '?')};spills={getattr(compiled, 'n_spills', '?')}"
            f";smem_kib={shared / 1024 if isinstance(shared, int) else shared}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny fp32 shape")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, shape, warmup, reps = "cpu", torch.float32, DRY_SHAPE, 0, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_dz_sweep.py: needs CUDA (or --dry-run)")
        device, dtype, shape, warmup, reps = "cuda", torch.bfloat16, SHAPE, 2, 10
    require_kernels()
    from prefix_rft.kernels import linear_logprob_entropy_triton as ops
    from prefix_rft.kernels.triton_configs import AUTOTUNE_CANDIDATES, get_config

    n, h, v = shape
    shape_s, csv_path = f"N={n},H={h},V={v}", os.path.join(args.out_dir, "kernels.csv")
    x, w, y, g_lp, g_h = make_inputs(shape, dtype, torch.device(device))
    _, ent, lse = ops.triton_fwd(x, w, None, y, TEMPERATURE, IGNORE)
    cands = AUTOTUNE_CANDIDATES["dz"]
    if args.dry_run:  # the interpreter: the interpreter's own tile, chunked like the others
        cands = [get_config("dz", torch.device(device))]
    ref = cublas_ms(csv_path, shape_s)
    for cfg in cands:
        cfg_s = "/".join(str(cfg[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K", "num_warps",
                                                "num_stages"))
        try:
            samples, compiled = sweep_one(cfg, x, w, y, lse, ent, g_lp, g_h, warmup, reps)
        except Exception as err:  # noqa: BLE001 -- one failing tile must not end the sweep
            reason = f"{type(err).__name__}: {err}".splitlines()[0].replace(";", ",")[:160]
            append_rows(csv_path, [make_row("dz", "dz-sweep", "bwd", shape_s, None, None,
                                            f"cfg={cfg_s};failed: {reason}")])
            print(f"dz {cfg_s}: failed: {reason}", flush=True)
            continue
        ms = sorted(samples)[len(samples) // 2]
        extra = [f"cfg={cfg_s}", f"tflops={2.0 * n * h * v / ms / 1e9:.1f}", resources(compiled)]
        if ref:
            extra.append(f"x_cublas={ms / ref:.3f}")
        append_rows(csv_path, [make_row("dz", "dz-sweep", "bwd", shape_s, samples, None,
                                        ";".join(extra))])
        print(f"dz {cfg_s}: {ms:.3f} ms {';'.join(extra)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
