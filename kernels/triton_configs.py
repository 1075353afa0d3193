"""Checked-in launch configs of the linear -> log-prob/entropy Triton kernels, per GPU family.

Autotuning is off by default (house rule): every launch uses the table below, so runs are
reproducible and the first call is not slowed by a search. Set
``PREFIX_RFT_TRITON_AUTOTUNE=1`` to time the candidates of :data:`AUTOTUNE_CANDIDATES` once
per (kernel, dtype, H, V) on the first call and cache the fastest for the process.

Families: ``"sm90"`` (H100/H200), ``"sm80"`` (A100 and other Ampere/Ada), ``"default"``
(anything else), ``"interpreter"`` (``TRITON_INTERPRET=1`` on CPU: the interpreter runs
each program as numpy calls, so a few mid-size tiles beat many tiny ones; tl.dot needs
every dimension >= 16, and test shapes still span several tiles).

No GPU has timed these yet. The sm90/sm80 entries are tiles that compile without register
spills, as ``python benchmarks/compile_check.py`` (triton 3.9, ptxas from
the wheel) builds them for sm_90a / sm_80: specialized as a launch at N=16384, H=4096,
V=151936 specializes them. Its output for the entries below (regs / spilled bytes / shared
KiB / wgmma; "+f" = with gradient filtering):

    sm90 fwd   bf16 128x128x32 w8 s3   179 / 0 /  48 / yes   fp32 32x32x32 w4 s2  88 / 0 / 8
    sm90 bwd   bf16 128x128x64 w8 s3   254 / 0 / 112 / yes   fp32 32x32x32 w4 s2  80 / 0 / 8
    sm90 bwd+f bf16                    254 / 0 / 112 / yes   fp32                 80 / 0 / 8
    sm90 dz    bf16 128x128x64 w8 s3   223 / 0 /  96 / yes   fp32 32x64x32 w4 s2 116 / 0 / 12
    sm90 dz+f  bf16                    224 / 0 /  96 / yes   fp32                116 / 0 / 12
    sm80 fwd   bf16 128x128x32 w8 s3   255 / 0 /  32         fp32 32x32x32 w4 s2  80 / 0 / 8
    sm80 bwd   bf16 128x128x32 w8 s3   250 / 0 /  64         fp32 32x32x32 w4 s2 110 / 0 / 12
    sm80 bwd+f bf16                    244 / 0 /  64         fp32                110 / 0 / 12
    sm80 dz    bf16 128x128x32 w8 s3   227 / 0 /  32         fp32 32x32x32 w4 s2  80 / 0 / 8
    sm80 dz+f  bf16                    230 / 0 /  32         fp32                 80 / 0 / 8

Rejected by the same check: sm90 fwd 128x256x64 (256 B spilled), sm90 dz fp32 32x32x32
(24 B); sm90 fwd 128x128x64 compiles at 255 registers (no headroom), so 128x128x32 stays.
128x128 atomic-backward tiles, which an unspecialized compile shows spilling, do not spill
as launched (strides of 1 folded, 16-divisible sizes). fp32 inputs use ieee (FMA, no tensor
core) dots, hence the small "_fp32" tiles. ``"default"`` entries (other GPUs) are
unchecked starting points. ``CHUNK_V`` (the split backward's vocab chunk) is 8192: its
``[N, CHUNK_V]`` dz buffer is 256 MiB in bf16 at N=16384, and each chunk's GEMMs stay large.
Measure with ``bash benchmarks/gpu_check.sh`` and update.
"""

from __future__ import annotations

import functools
import os

import torch

AUTOTUNE_ENV = "PREFIX_RFT_TRITON_AUTOTUNE"

# BLOCK_N: token rows per program; BLOCK_V: vocab columns per tile; BLOCK_K: hidden step of
# the tl.dot loop; GROUP_N: row tiles that walk the vocab together (L2 reuse of W tiles).
CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "sm90": {
        "fwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3),
        "bwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3),
        "fwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=2),
        "bwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, GROUP_N=8, num_warps=4, num_stages=2),
        "dz": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP_N=8, CHUNK_V=8192, num_warps=8,
                   num_stages=3),
        "dz_fp32": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32, GROUP_N=8, CHUNK_V=8192, num_warps=4,
                        num_stages=2),
    },
    "sm80": {
        "fwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3),
        "bwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, GROUP_N=8, num_warps=8, num_stages=3),
        "fwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=2),
        "bwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, GROUP_N=8, num_warps=4, num_stages=2),
        "dz": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, GROUP_N=8, CHUNK_V=8192, num_warps=8,
                   num_stages=3),
        "dz_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, GROUP_N=8, CHUNK_V=8192, num_warps=4,
                        num_stages=2),
    },
    "default": {
        "fwd": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2),
        "bwd": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, GROUP_N=4, num_warps=4, num_stages=2),
        "fwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=2),
        "bwd_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, GROUP_N=4, num_warps=4, num_stages=2),
        "dz": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, GROUP_N=4, CHUNK_V=8192, num_warps=4,
                   num_stages=2),
        "dz_fp32": dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=32, GROUP_N=4, CHUNK_V=8192, num_warps=4,
                        num_stages=2),
    },
    "interpreter": {
        "fwd": dict(BLOCK_N=32, BLOCK_V=128, BLOCK_K=64, num_warps=1, num_stages=1),
        "bwd": dict(BLOCK_N=32, BLOCK_V=128, BLOCK_K=64, GROUP_N=2, num_warps=1, num_stages=1),
        "dz": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=64, GROUP_N=2, CHUNK_V=256, num_warps=1,
                   num_stages=1),
    },
}

# Candidates for PREFIX_RFT_TRITON_AUTOTUNE=1 (bf16/fp16; fp32 inputs keep their "_fp32"
# entry). Each one compiles for sm_90a without spills (`python benchmarks/compile_check.py
# --candidates`, tests/test_compile_check.py): regs / shared KiB as launched at N=16384,
# H=4096, V=151936 are in the comments. Rejected for spilling: fwd 128x256x64 w8 s3 (256 B);
# dz 128x256x64 w8 s3 (1584 B), 256x128x64 w8 s3 (680 B), 128x128x32 w4 s4 (724 B),
# 128x256x32 w8 s4 (1584 B), 64x256x32 w4 s4 (1332 B).
AUTOTUNE_CANDIDATES: dict[str, list[dict[str, int]]] = {
    "fwd": [
        dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=w, num_stages=st)
        for bn, bv, bk, w, st in [(128, 128, 32, 8, 3),   # 179 / 48 (shipped)
                                  (128, 128, 64, 8, 3),   # 255 / 96
                                  (64, 128, 64, 4, 4),    # 255 / 96
                                  (64, 256, 32, 8, 3)]    # 191 / 60
    ],
    "bwd": [
        dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, GROUP_N=8, num_warps=w, num_stages=st)
        for bn, bv, bk, w, st in [(64, 128, 64, 8, 3),    # 166 / 80
                                  (128, 128, 32, 8, 3),   # 250 / 72
                                  (128, 64, 64, 8, 3),    # 191 / 80
                                  (64, 128, 32, 4, 3),    # 255 / 44
                                  (128, 128, 64, 8, 2)]   # 252 / 96
    ],
    "dz": [
        dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, GROUP_N=8, CHUNK_V=8192, num_warps=w,
             num_stages=st)
        for bn, bv, bk, w, st in [(128, 128, 64, 8, 3),   # 223 / 96 (shipped)
                                  (128, 128, 64, 8, 4),   # 223 / 128
                                  (64, 256, 64, 8, 3),    # 228 / 120
                                  (64, 128, 64, 4, 4),    # 221 / 96
                                  (128, 128, 32, 8, 4)]   # 220 / 64
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


KERNELS = ("fwd", "bwd", "dz")


def get_config(kernel: str, device: torch.device,
               dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Checked-in config of ``kernel`` for ``device``'s GPU family and dtype.

    ``"fwd"``: forward; ``"bwd"``: the atomic backward; ``"dz"``: the dz kernel of the
    vocab-split backward (``CHUNK_V``: vocab columns per chunk).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    family = CONFIGS[gpu_family(device)]
    if dtype == torch.float32 and f"{kernel}_fp32" in family:
        return dict(family[f"{kernel}_fp32"])
    return dict(family[kernel])


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 stands in for the CPU interpreter)."""
    if interpreter_mode() or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1024)
def choose_num_splits(n_row_tiles: int, n_vocab_tiles: int, slots: int,
                      tolerance: float = 0.01) -> int:
    """Vocab splits per row tile so that the forward grid fills whole waves of ``slots``.

    The forward grid is ``n_row_tiles x splits`` programs, each walking
    ``cdiv(n_vocab_tiles, splits)`` vocab tiles; with ``slots`` programs running at once
    (one per SM: 132 on H100/H200, 108 on A100) the last program ends after
    ``finish(s) = cdiv(n_row_tiles * s, slots) * cdiv(n_vocab_tiles, s)`` tile steps. Among
    the counts that leave no split empty, returns the fewest splits whose finish is within
    ``tolerance`` of the best (each split adds a partial (m, s, w, z_y) row to merge, so a
    0.1% gain is not worth 30x more programs).

        >>> choose_num_splits(128, 1187, 132)   # N=16384 in 128-row tiles, V=151936
        33
    """
    if min(n_row_tiles, n_vocab_tiles, slots) < 1:
        raise ValueError("n_row_tiles, n_vocab_tiles and slots must be >= 1, got "
                         f"{n_row_tiles}, {n_vocab_tiles}, {slots}")
    finish = {}
    for s in range(1, n_vocab_tiles + 1):
        per = -(-n_vocab_tiles // s)
        if -(-n_vocab_tiles // per) == s:  # otherwise realised as fewer splits
            finish[s] = -(-(n_row_tiles * s) // slots) * per
    best = min(finish.values())
    return min(s for s, f in finish.items() if f <= best * (1 + tolerance))
