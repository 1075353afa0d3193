"""Native CPU row passes of the fused head-and-loss (``cpu_softmax_rows.c``), built on first use.

The C source is compiled once per machine with the system C compiler (``$CC``, else ``cc`` or
``gcc``; well under a second) into a cache folder and loaded with :mod:`ctypes`. Where that
fails -- no compiler, a read-only cache, a non-x86/ARM toolchain quirk -- :func:`load` returns
None, logs one line saying why, and the fused path runs its plain-torch passes (same math,
about 2x the elementwise time). ``PREFIX_RFT_NATIVE_CPU=0`` turns the native passes off.

Shapes: ``z [C, V]`` fp32, CPU, rows contiguous (stride(1) == 1); per-row results ``[C]`` fp32.
Torch equivalent of :func:`row_stats` / :func:`row_dz` (the reference the tests use)::

    m = z.amax(1); t = z - m[:, None]; e = t.exp()
    s = e.sum(1); d = torch.where(e == 0, 0, e * t).sum(1)
    if store_exp: z.copy_(e)
    # row_dz: z.copy_(torch.where(e == 0, 0, e * (a[:, None] * t + b[:, None])))

Threads: the C code is single-threaded; with ``torch.get_num_threads() > 1`` the rows are split
across a thread pool (ctypes releases the GIL during the call).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger("prefix_rft.kernels")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_softmax_rows.c")
# -fno-trapping-math lets the compiler turn the selects into vector blends; -fopenmp-simd
# honours the reduction pragmas without the OpenMP runtime; no -ffast-math (NaN and -inf keep
# their meaning)
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
          "-fPIC", "-shared")
ENV_SWITCH = "PREFIX_RFT_NATIVE_CPU"
_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


def cache_dir() -> str:
    """``$PREFIX_RFT_CACHE/native``, else ``${XDG_CACHE_HOME:-~/.cache}/prefix_rft/native``."""
    root = os.environ.get("PREFIX_RFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prefix_rft")
    return os.path.join(root, "native")


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU's flags (Linux) or its model string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str, out_path: str) -> None:
    """Compile into a temporary file next to ``out_path``, then rename (atomic: ranks that
    build at the same time each write their own file and one of them wins)."""
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out_path))
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, "-o", tmp, SOURCE], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled library (building it the first time on this machine), or None (logged)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("native CPU row passes off (%s=0): the fused head-and-loss uses its torch "
                 "passes", ENV_SWITCH)
        return None
    try:
        with open(SOURCE, "rb") as f:
            key = hashlib.sha256(f.read() + repr(CFLAGS).encode()
                                 + _cpu_fingerprint().encode()).hexdigest()[:16]
        path = os.path.join(cache_dir(), f"cpu_softmax_rows-{key}.so")
        if not os.path.exists(path):
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set CC, or install gcc)")
            _build(cc, path)
        lib = ctypes.CDLL(path)
        lib.softmax_row_stats.argtypes = [_P, _I64, _I64, _I64, _I64, _I32, _P, _P, _P]
        lib.softmax_row_stats.restype = None
        lib.softmax_row_dz.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _P, _P]
        lib.softmax_row_dz.restype = None
        return lib
    except Exception as exc:  # any failure means: use the torch passes
        log.warning("native CPU row passes unavailable (%s); the fused head-and-loss uses its "
                    "torch passes (same results, slower on CPU)", exc)
        return None


def usable(z: torch.Tensor) -> bool:
    """Whether ``z`` is a tensor these passes take: CPU, fp32, 2-D, rows contiguous."""
    return (z.device.type == "cpu" and z.dtype == torch.float32 and z.dim() == 2
            and z.stride(1) == 1 and not z.requires_grad)


def _checked_shape(z: torch.Tensor, name: str) -> tuple[int, int]:
    """``(C, V)`` of a tensor the passes take (:func:`usable`), else a ValueError."""
    if not usable(z):
        raise ValueError(f"{name}: z must be a 2-D fp32 CPU tensor with contiguous rows")
    return z.shape


def _split_rows(fn, n_rows: int) -> None:
    """``fn(r0, r1)`` over ``[0, n_rows)``, split across ``torch.get_num_threads()`` threads."""
    threads = min(torch.get_num_threads(), n_rows)
    if threads <= 1:
        fn(0, n_rows)
        return
    bounds = [n_rows * i // threads for i in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, bounds[:-1], bounds[1:]))


def row_stats(lib: ctypes.CDLL, z: torch.Tensor, store_exp: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, s, d)`` per row of ``z [C, V]``, each ``[C]`` fp32 (module docstring);
    ``store_exp``: ``z`` is overwritten with ``exp(z - m)``."""
    c, v = _checked_shape(z, "row_stats")
    m, s, d = (torch.empty(c, dtype=torch.float32) for _ in range(3))
    ptrs = (z.data_ptr(), m.data_ptr(), s.data_ptr(), d.data_ptr())
    _split_rows(lambda r0, r1: lib.softmax_row_stats(ptrs[0], r0, r1, v, z.stride(0),
                                                     int(store_exp), *ptrs[1:]), c)
    return m, s, d


def row_dz(lib: ctypes.CDLL, z: torch.Tensor, m: torch.Tensor, a: torch.Tensor,
           b: torch.Tensor) -> None:
    """``z <- exp(t) (a t + b)`` in place, ``t = z - m`` per row; ``m, a, b`` ``[C]`` fp32."""
    c, v = _checked_shape(z, "row_dz")
    m, a, b = (t.contiguous().float() for t in (m, a, b))
    if not all(t.shape == (c,) for t in (m, a, b)):
        raise ValueError(f"row_dz: m, a, b must be [C] = [{c}]")
    ptrs = (m.data_ptr(), a.data_ptr(), b.data_ptr())
    _split_rows(lambda r0, r1: lib.softmax_row_dz(z.data_ptr(), r0, r1, v, z.stride(0), *ptrs),
                c)
