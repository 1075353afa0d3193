"""Compile the fused head-and-loss's Triton pass for sm_90 / sm_80 as a real launch would.

The launcher (``kernels/linear_policy_loss_triton.py``) runs on meta tensors of a chunk of the
GPU benchmark's problem (C=1760 rows = the 1 GiB CUDA chunk budget, V=151936) with the kernel
swapped for a recorder; the recorded launch goes through the same specialization and
``triton.compile`` (ptxas from the triton wheel) as ``benchmarks/compile_check.py``. Reported
per variant (bf16 / fp32 inputs; with / without entropy bonus, dual clip, bias): registers,
spilled bytes, shared memory. No GPU needed.

    python benchmarks/compile_check_policy_loss.py            # Markdown table, exit 1 on spills
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.compile_check import ARCHS, SMEM_LIMIT, _Recorder, compile_recorded  # noqa: E402

CHUNK, VOCAB = 1760, 151936
VARIANTS = {  # name: (bias, entropy bonus, dual clip, importance weights, nll)
    "ppo": (False, False, False, False, False),
    "ppo+bonus+dual+iw": (False, True, True, True, False),
    "ppo+bias+bonus": (True, True, False, False, False),
    "nll": (False, False, False, False, True),
}


def record_launch(dtype_name: str, variant: str):
    import torch

    from prefix_rft.kernels import linear_policy_loss_triton as ops
    from prefix_rft.kernels.linear_policy_loss_torch import LossOptions, TokenInputs

    bias, bonus, dual, iw, nll = VARIANTS[variant]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    meta = dict(device="meta")
    z = torch.empty(CHUNK, VOCAB, dtype=torch.float32, **meta)
    vec = torch.empty(CHUNK, dtype=torch.float32, **meta)
    tok = TokenInputs(None if nll else vec, vec, vec, vec if iw else None, vec if bonus else None)
    opts = LossOptions(0.2, 0.28, 3.0 if dual else None, 1.0, nll)
    jit = ops._linear_policy_loss_fwd_kernel
    rec = _Recorder(jit)
    saved_env = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ops._linear_policy_loss_fwd_kernel = rec
        ops._launch(z, z if dtype == torch.float32 else torch.empty(z.shape, dtype=dtype, **meta),
                    torch.empty(VOCAB, dtype=dtype, **meta) if bias else None,
                    torch.empty(CHUNK, dtype=torch.int64, **meta), tok, opts, True)
    finally:
        ops._linear_policy_loss_fwd_kernel = jit
        if saved_env is not None:
            os.environ["TRITON_INTERPRET"] = saved_env
    args, kwargs = rec.calls[0]
    args = tuple(torch.empty(16, dtype=a.dtype) if isinstance(a, torch.Tensor) else a
                 for a in args)
    return jit, args, kwargs


def compile_one(family: str, dtype_name: str, variant: str) -> dict:
    jit, args, kwargs = record_launch(dtype_name, variant)
    res = compile_recorded(family, jit, args, kwargs)
    return {"family": family, "dtype": dtype_name, "variant": variant,
            "config": f"BLOCK_V={kwargs['BLOCK_V']},num_warps={kwargs['num_warps']}",
            "regs": res["regs"], "spill": res["spill"], "smem": res["smem"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=list(ARCHS), action="append")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; silences a warning
    # A fresh cache: a cache hit would skip ptxas and with it the resource log.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_check_policy_loss_")
    rows = [compile_one(f, d, v) for f in (args.family or list(ARCHS)) for d in ("bf16", "fp32")
            for v in VARIANTS]
    print("| family | dtype | variant | config | regs | spill B | smem KiB | check |")
    print("|" + "---|" * 8)
    bad = 0
    for r in rows:
        ok = r["spill"] == 0 and r["smem"] <= SMEM_LIMIT[r["family"]]
        bad += not ok
        print(f"| {r['family']} | {r['dtype']} | {r['variant']} | {r['config']} | {r['regs']} "
              f"| {r['spill']} | {r['smem'] / 1024:.1f} | {'ok' if ok else 'FAIL'} |")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
