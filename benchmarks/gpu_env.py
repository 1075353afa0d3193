"""The environment of a benchmarks/gpu_check.sh run, written first so every later row has it.

    python3 benchmarks/gpu_env.py OUT_DIR [--dry-run]     # -> OUT_DIR/env.txt

GPU name, SMs, memory, clocks (``nvidia-smi`` when present), torch / CUDA / cuBLAS / cuDNN /
triton versions, the TF32 flags, and which dX path the split backward takes on this torch:
``addmm(out_dtype=fp32)`` (one cuBLAS GEMM accumulating into the fp32 dX) or the bf16
fallback (the chunk's product rounded to bf16, plus a temporary, before the add).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys

if __package__ in (None, ""):  # run as a file: `benchmarks.*` from the source tree, appended
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _version(dist: str) -> str:
    """Installed version of distribution ``dist`` (not every package has ``__version__``)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _nvidia_smi() -> str:
    query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return f"nvidia-smi ({query}): {out.stdout.strip() or out.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi: unavailable ({type(err).__name__})"


def dx_path(device: str) -> str:
    """Run one tiny split-backward chunk GEMM and report the path ``_addmm_fp32`` took."""
    import torch

    from prefix_rft.kernels import linear_logprob_entropy_split as split

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    acc = torch.zeros(16, 16, device=device)
    a = torch.randn(16, 16, device=device).to(dtype)
    split._addmm_fp32(acc, a, a)
    if device != "cuda":
        return "cpu (interpreter run: fp32 addmm; the GPU path is decided on CUDA)"
    return ("addmm(out_dtype=fp32): one cuBLAS GEMM into the fp32 dX" if split._MIXED_ADDMM_OK
            else "bf16 fallback: product rounded to bf16 + a temporary per chunk, then added")


def env_lines(dry_run: bool) -> list[str]:
    import torch

    from benchmarks.results_io import device_name, git_commit

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"date: {now}", f"commit: {git_commit()}", f"device: {device_name()}",
             f"python: {platform.python_version()} ({sys.executable})",
             f"torch: {torch.__version__} (cuda {torch.version.cuda}, "
             f"cudnn {torch.backends.cudnn.version()})",
             f"triton: {_version('triton')}", f"transformers: {_version('transformers')}",
             f"liger_kernel: {_version('liger-kernel')}", f"hypothesis: {_version('hypothesis')}",
             f"tf32: matmul {torch.backends.cuda.matmul.allow_tf32}, "
             f"cudnn {torch.backends.cudnn.allow_tf32}, "
             f"float32_matmul_precision {torch.get_float32_matmul_precision()}",
             f"dry_run: {dry_run}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"sms: {props.multi_processor_count}, memory: {props.total_memory >> 20} "
                     f"MiB, capability: {props.major}.{props.minor}")
        blas = getattr(torch._C, "_cuda_getCompiledVersion", lambda: "?")()
        pref = getattr(torch.backends.cuda, "preferred_blas_library", lambda: "?")()
        wheels = ", ".join(f"{d} {_version(d)}" for d in ("nvidia-cublas", "nvidia-cublas-cu12")
                           if _version(d) != "absent") or "no cuBLAS wheel (system library)"
        lines.append(f"cublas: {wheels}; preferred {pref}; torch built for CUDA {blas}")
        lines.append(_nvidia_smi())
    try:
        lines.append("dX path: " + dx_path("cuda" if torch.cuda.is_available() else "cpu"))
    except Exception as err:  # noqa: BLE001 -- the env stage must not die on it
        lines.append(f"dX path: unknown ({type(err).__name__}: {err})")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    text = "\n".join(env_lines(args.dry_run)) + "\n"
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "env.txt"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
