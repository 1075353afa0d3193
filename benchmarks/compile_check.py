"""Compile every shipped Triton config for sm_90 and sm_80 as a real launch would; no GPU needed.

For each GPU family in ``kernels/triton_configs.py`` (``sm90`` -> sm_90a, ``sm80`` -> sm_80),
each kernel (forward, atomic backward, the split backward's dz kernel; with and without
gradient filtering) and each dtype (bf16, fp32), the launcher runs on meta tensors of a
realistic problem (N=16384, H=4096, V=151936, contiguous) with the kernel swapped for a
recorder. The recorded arguments then go through Triton's own launch-time specialization
(``create_function_from_signature`` + ``JITFunction._pack_args``: constexprs, int args equal
to 1 folded, 16-divisible ints and 16-byte aligned pointers marked ``tt.divisibility=16``,
num_warps / num_stages), and ``triton.compile`` builds the cubin with the ptxas bundled in
the triton wheel. Reported per compile: registers, spill stores/loads (ptxas -v), shared
memory (Triton's dynamic allocation), and whether the PTX uses wgmma.

Checks: no spills, shared memory within the per-block opt-in limit (227 KiB on sm_90, 163 KiB
on sm_80), wgmma in every 16-bit sm_90 kernel.

    python benchmarks/compile_check.py                    # everything, a Markdown table
    python benchmarks/compile_check.py --family sm90 --dtype bf16 --jobs 2
    python benchmarks/compile_check.py --config 'sm90/dz=BLOCK_N=128,BLOCK_V=256' # try a tile
    python benchmarks/compile_check.py --candidates        # every sm90 autotune candidate

Exit status 1 when a check fails (tests/test_compile_check.py runs it in CI).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ARCHS = {"sm90": 90, "sm80": 80}
SMEM_LIMIT = {"sm90": 227 * 1024, "sm80": 163 * 1024}  # per block, opt-in (bytes)
SHAPE = (16384, 4096, 151936)  # N, H, V of the launches whose specialization is compiled
KERNELS = ("fwd", "bwd", "bwd+filter", "dz", "dz+filter")
DTYPES = ("bf16", "fp32")


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


class _Recorder:
    """Stands in for a jit kernel: ``rec[grid](*args, **kwargs)`` only records the call."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def record_launch(family: str, kernel: str, dtype: str, overrides: dict | None = None):
    """(jit kernel, args, kwargs) of the launch the launcher makes for ``family``'s config."""
    import torch

    from prefix_rft.kernels import linear_logprob_entropy_split as split
    from prefix_rft.kernels import linear_logprob_entropy_triton as ops
    from prefix_rft.kernels import triton_configs

    n, h, v = SHAPE
    meta = dict(device="meta")
    dt = _torch_dtype(dtype)
    x, w = torch.empty(n, h, dtype=dt, **meta), torch.empty(v, h, dtype=dt, **meta)
    y = torch.empty(n, dtype=torch.int64, **meta)
    vec = torch.empty(n, dtype=torch.float32, **meta)
    base = kernel.split("+")[0]
    module, name = ((ops, "_linear_logprob_entropy_fwd_kernel") if base == "fwd" else
                    (ops, "_linear_logprob_entropy_bwd_kernel") if base == "bwd" else
                    (split, "_linear_logprob_entropy_dz_kernel"))
    jit = getattr(module, name)
    rec = _Recorder(jit)
    saved_family = triton_configs.gpu_family
    try:
        triton_configs.gpu_family = lambda device: family
        setattr(module, name, rec)
        if overrides:
            real = ops._launch_config
            ops._launch_config = lambda k, *a: {**real(k, *a), **overrides}
        if base == "fwd":
            ops.triton_fwd(x, w, None, y, 1.0, -100)
        elif base == "bwd":
            ops.triton_bwd(x, w, None, y, vec, vec, vec, vec, 1.0, -100)
        else:
            split.triton_bwd_split(x, w, None, y, vec, vec, vec, vec, 1.0, -100)
    finally:
        triton_configs.gpu_family = saved_family
        setattr(module, name, jit)
        if overrides:
            ops._launch_config = real
    args, kwargs = rec.calls[0]
    if kernel.endswith("+filter"):
        kwargs = {**kwargs, "FILTER": True}  # (float args are not specialized on value)
    # Pointers: aligned CPU stand-ins of the same dtype (specialization reads dtype + alignment).
    args = tuple(torch.empty(16, dtype=a.dtype) if isinstance(a, torch.Tensor) else a
                 for a in args)
    return jit, args, kwargs


def compile_recorded(family: str, jit, args, kwargs) -> dict:
    """Compile a recorded launch (``jit`` with its ``args``/``kwargs``) for ``family``'s arch
    through the real Triton JIT; returns ``{"regs", "spill", "smem", "compiled"}`` (regs -1
    when ptxas did not report them)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", ARCHS[family], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound,
                                                           specialization, options)
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {"regs": int(regs.group(1)) if regs else -1,
            "spill": (int(stores.group(1)) if stores else -1) + (int(loads.group(1)) if loads
                                                                 else 0),
            "smem": int(compiled.metadata.shared), "compiled": compiled}


def compile_one(family: str, kernel: str, dtype: str, overrides: dict | None = None) -> dict:
    """Compile one launch for ``family``'s arch; returns its resource usage."""
    jit, args, kwargs = record_launch(family, kernel, dtype, overrides)
    res = compile_recorded(family, jit, args, kwargs)
    cfg = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK", "GROUP", "num_"))}
    return {
        "family": family, "kernel": kernel, "dtype": dtype,
        "config": ",".join(f"{k}={v}" for k, v in cfg.items()),
        "regs": res["regs"], "spill": res["spill"], "smem": res["smem"],
        "wgmma": "wgmma" in res["compiled"].asm["ptx"],
    }


def problems(row: dict) -> list[str]:
    """Why ``row`` fails the checks (empty when it passes)."""
    out = []
    if row["spill"] != 0:
        out.append(f"spills {row['spill']} B" if row["spill"] > 0 else "no ptxas log")
    if row["smem"] > SMEM_LIMIT[row["family"]]:
        out.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[row['family']]} B")
    if row["family"] == "sm90" and row["dtype"] != "fp32" and not row["wgmma"]:
        out.append("no wgmma on sm_90")
    return out


def markdown(rows: list[dict]) -> str:
    head = "| family | kernel | dtype | config | regs | spill B | smem KiB | wgmma | check |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        bad = problems(r)
        lines.append(f"| {r['family']} | {r['kernel']} | {r['dtype']} | {r['config']} | "
                     f"{r['regs']} | {r['spill']} | {r['smem'] / 1024:.1f} | "
                     f"{'yes' if r['wgmma'] else 'no'} | {'; '.join(bad) or 'ok'} |")
    return "\n".join(lines) + "\n"


def _job(spec):
    return compile_one(*spec)


def _parse_override(text: str):
    """'sm90/dz=BLOCK_N=128,BLOCK_V=256' -> ('sm90', 'dz', {'BLOCK_N': 128, 'BLOCK_V': 256})."""
    head, _, body = text.partition("=")
    family, _, kernel = head.partition("/")
    if family not in ARCHS or kernel not in ("fwd", "bwd", "dz"):
        raise SystemExit(f"--config must look like 'sm90/dz=BLOCK_N=128,...', got {text!r}")
    pairs = dict(kv.split("=") for kv in body.split(",") if kv)
    return family, kernel, {k: int(v) for k, v in pairs.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--config", default=None, help="try one config instead of the shipped ones")
    p.add_argument("--candidates", action="store_true",
                   help="compile every AUTOTUNE_CANDIDATES entry (sm90, bf16) instead")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the jit kernels")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; silences a warning
    # A fresh cache: a cache hit would skip ptxas and with it the resource log.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_check_")
    if args.candidates:
        from prefix_rft.kernels.triton_configs import AUTOTUNE_CANDIDATES

        specs = [("sm90", k, "bf16", cand) for k, cands in AUTOTUNE_CANDIDATES.items()
                 if k in args.kernel for cand in cands]
    elif args.config:
        family, kernel, over = _parse_override(args.config)
        specs = [(family, k, d, over) for k in args.kernel if k.split("+")[0] == kernel
                 for d in args.dtype]
    else:
        specs = [(f, k, d) for f in args.family for k in args.kernel for d in args.dtype]
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(_job, specs))
    table = markdown(rows)
    print(f"shape N,H,V = {SHAPE}; triton {__import__('triton').__version__}\n")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    failed = [r for r in rows if problems(r)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
