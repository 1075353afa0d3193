"""Checked-in launch configs of the linear -> log-prob/entropy Triton kernels, per GPU family.

Autotuning is off by default (house rule): every launch uses the table below, so runs are
reproducible and the first call is not slowed by a search. Set
``PREFIX_RFT_TRITON_AUTOTUNE=1`` to time the candidates of :data:`AUTOTUNE_CANDIDATES` once
per (kernel, dtype, H, V) on the first call and cache the fastest for the process.

Families: ``"sm90"`` (H100/H200), ``"sm80"`` (A100 and other Ampere/Ada), ``"default"``
(anything else), ``"interpreter"`` (``TRITON_INTERPRET=1`` on CPU: the interpreter runs
each program as numpy calls, so a few mid-size tiles beat many tiny ones; tl.dot needs
every dimension >= 16, and test shapes still span several tiles).

The sm90 16-bit entries were picked without a GPU, from ptxas resource usage of the
kernels compiled for sm_90 (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``): the
largest tiles that compile without register spills (fwd 128x128x64 spilled 152 B of stack,
bwd 128x128x64 spilled 672 B, 128x128x32 224 B; the chosen ones spill <= 32 B / 0 B).
fp32 inputs use ieee (FMA, no tensor cores) dots, which need much smaller tiles ("_fp32"
keys). sm80/default entries are unmeasured starting points. None of the timings behind
these choices exist yet: measure with ``python benchmarks/kernels.py`` and update.
"""

from __future__ import annotations

import os

import torch

AUTOTUNE_ENV = "PREFIX_RFT_TRITON_AUTOTUNE"

# BLOCK_N: token rows per program; BLOCK_V: vocab columns per tile; BLOCK_K: hidden step of
# the tl.dot loop; GROUP_N: row tiles that walk the vocab together (L2 reuse of W tiles).
CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "sm90": {
        "fwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3),
        "bwd": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3),
        "fwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=2),
        "bwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, GROUP_N=8, num_warps=4, num_stages=2),
    },
    "sm80": {
        "fwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3),
        "bwd": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, GROUP_N=8, num_warps=8, num_stages=2),
        "fwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=2),
        "bwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, GROUP_N=8, num_warps=4, num_stages=2),
    },
    "default": {
        "fwd": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2),
        "bwd": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, GROUP_N=4, num_warps=4, num_stages=2),
        "fwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=2),
        "bwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, GROUP_N=4, num_warps=4, num_stages=2),
    },
    "interpreter": {
        "fwd": dict(BLOCK_N=32, BLOCK_V=128, BLOCK_K=64, num_warps=1, num_stages=1),
        "bwd": dict(BLOCK_N=32, BLOCK_V=128, BLOCK_K=64, GROUP_N=2, num_warps=1, num_stages=1),
    },
}

AUTOTUNE_CANDIDATES: dict[str, list[dict[str, int]]] = {
    "fwd": [
        dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=w, num_stages=st)
        for bn, bv, bk, w, st in [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                                  (128, 256, 64, 8, 3), (64, 256, 32, 8, 3)]
    ],
    "bwd": [
        dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, GROUP_N=8, num_warps=w, num_stages=st)
        for bn, bv, bk, w, st in [(64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (128, 64, 64, 8, 3),
                                  (64, 128, 32, 4, 3), (128, 128, 64, 8, 2)]
    ],
}


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV) == "1" and not interpreter_mode()


def gpu_family(device: torch.device) -> str:
    """Key into :data:`CONFIGS` for tensors on ``device``."""
    if interpreter_mode() or device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    return "default"


def get_config(kernel: str, device: torch.device,
               dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Checked-in config of ``kernel`` ("fwd"/"bwd") for ``device``'s GPU family and dtype."""
    if kernel not in ("fwd", "bwd"):
        raise ValueError(f"kernel must be 'fwd' or 'bwd', got {kernel!r}")
    family = CONFIGS[gpu_family(device)]
    if dtype == torch.float32 and f"{kernel}_fp32" in family:
        return dict(family[f"{kernel}_fp32"])
    return dict(family[kernel])
