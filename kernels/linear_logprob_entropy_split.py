"""Vocab-split backward of the fused linear -> (log-prob, entropy): dz kernel + library GEMMs.

Shape of this module (house rule): ``_linear_logprob_entropy_dz_kernel`` (jit) -> launcher
:func:`triton_bwd_split`; the autograd.Function and the public entry (``bwd="split"``) are
in ``linear_logprob_entropy.py``, the atomic backward it stands beside in
``linear_logprob_entropy_triton.py`` (same arguments, same results).

Per vocabulary chunk ``c`` of ``CHUNK_V`` columns (the last one may be shorter):

1. the Triton kernel recomputes the logit tiles ``z[:, c]`` (one GEMM, 2 N H |c| FLOPs)
   and writes ``dz[:, c]`` once, in the input dtype, to an ``[N, CHUNK_V]`` buffer;
2. library GEMMs (cuBLAS on GPU) add ``dX += dz_c @ W[c]`` into an fp32 dX and write
   ``dW[c] = dz_c.T @ X`` straight into the output dtype; ``db[c]`` sums fp32 per-row-tile
   column partials the kernel wrote.

Torch equivalent of one chunk (with ``z`` the [N, |c|] logits of the chunk)::

    p = (z - lse[:, None]).exp()
    dz = (g_lp[:, None] * (onehot(y)[:, c] - p) - g_H[:, None] * p * (z - (lse - H)[:, None])) / T
    dX += dz @ W[c];  dW[c] = dz.T @ X;  db[c] = dz.sum(0)

Same 8NHV FLOPs as the atomic backward, but no atomics, no fp32 ``[V, H]`` dW buffer and a
fixed summation order: the result is deterministic. Extra memory: the ``[N, CHUNK_V]`` dz
buffer and the fp32 dX.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import linear_logprob_entropy_triton as _atomic
from .linear_logprob_entropy_torch import torch_bwd
from .linear_logprob_entropy_triton import _compute_dtype, _dot_precision
from .tl_utils import (
    tl_any_at_least,
    tl_grad_logit_tile,
    tl_grouped_tile,
    tl_logit_tile,
    tl_row_labels,
)


@triton.jit
def _linear_logprob_entropy_dz_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr,
    dz_ptr, db_part_ptr, keep_ptr,
    N, H, v_start, chunk_len,
    stride_xn, stride_xk, stride_wv, stride_wk, stride_dzn,
    inv_temp, ignore_index, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr,
    NEED_DB: tl.constexpr, FILTER: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (row tile, vocab tile of the chunk): recompute z, write dz in the input dtype.

    ``dz`` is ``[N, >= chunk_len]`` with row stride ``stride_dzn``, column 0 = vocab id
    ``v_start``; every in-range element is written (0 for ignored rows). With ``NEED_DB``,
    ``db_part[pid_n, j]`` (fp32, row stride ``chunk_len``) gets the tile's column sums; with
    ``FILTER``, ``keep[pid_n, pid_v]`` (int32) says whether some |dz| >= ``filter_eps``.
    """
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(N, BLOCK_N)
    n_vocab_tiles = tl.cdiv(chunk_len, BLOCK_V)
    # Grouped order: GROUP_N row tiles sweep the chunk together, so W tiles stay in L2.
    pid_n, pid_v = tl_grouped_tile(pid, n_row_tiles, n_vocab_tiles, GROUP_N)
    rows, labels, valid = tl_row_labels(labels_ptr, pid_n, N, ignore_index, BLOCK_N)
    row_in = rows < N
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_in = local < chunk_len
    cols = v_start + local
    dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if tl.sum(valid.to(tl.int32), axis=0) > 0:  # all-ignored row tiles do no GEMM work
        z = tl_logit_tile(x_ptr, w_ptr, b_ptr, rows, valid, cols, col_in, H,
                          stride_xn, stride_xk, stride_wv, stride_wk, inv_temp,
                          HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        dz = tl_grad_logit_tile(z, rows, valid, cols, col_in, labels, lse_ptr, ent_ptr, glp_ptr,
                                gh_ptr, inv_temp, HAS_GLP, HAS_GH, BLOCK_N, BLOCK_V)
    out = dz_ptr + rows.to(tl.int64)[:, None] * stride_dzn + local[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])
    if NEED_DB:
        tl.store(db_part_ptr + pid_n * chunk_len + local, tl.sum(dz, axis=0), mask=col_in)
    if FILTER:
        tl.store(keep_ptr + pid_n * n_vocab_tiles + pid_v,
                 tl_any_at_least(dz, filter_eps).to(tl.int32))


# ------------------------------------------------------------------------------ launcher


_MIXED_ADDMM_OK: bool | None = None  # does this torch have addmm(..., out_dtype=) on CUDA?


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 ``acc`` and 16-bit ``a``, ``b`` accumulated in fp32.

    CUDA: one cuBLAS GEMM with beta = 1 (``addmm(..., out_dtype=float32)``); a torch
    without it adds the 16-bit product instead (one rounding per chunk). CPU (the
    interpreter tests): the product upcast to fp32.
    """
    global _MIXED_ADDMM_OK
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif not acc.is_cuda:
        acc.addmm_(a.float(), b.float())
    else:
        if _MIXED_ADDMM_OK is not False:
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                _MIXED_ADDMM_OK = True
                return
            except (TypeError, RuntimeError, NotImplementedError):
                _MIXED_ADDMM_OK = False
        acc.add_(a @ b)


def _packed(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The leading ``rows * cols`` elements of ``buf`` as a ``[rows, cols]`` matrix."""
    return buf.view(-1)[: rows * cols].view(rows, cols)


def _kept_box(keep: torch.Tensor, block_n: int, block_v: int, n_rows: int, chunk_len: int):
    """Row and column ranges covering every kept (row tile, vocab tile); None if none is."""
    if not bool(keep.any()):
        return None
    rows = keep.any(1).nonzero().flatten()
    cols = keep.any(0).nonzero().flatten()
    r0, r1 = int(rows[0]) * block_n, min((int(rows[-1]) + 1) * block_n, n_rows)
    c0, c1 = int(cols[0]) * block_v, min((int(cols[-1]) + 1) * block_v, chunk_len)
    return r0, r1, c0, c1


def triton_bwd_split(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    filter_eps: float = 0.0,
    chunk_v: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Vocab-split backward. Returns ``(dX [N,H], dW [V,H], db [V])`` or Nones.

    Same contract as ``triton_bwd`` (the atomic backward) and the torch path's ``torch_bwd``: dX
    accumulates in fp32, dW / db come out in the weight / bias dtype, ignored rows get
    exactly 0. ``chunk_v`` overrides the checked-in ``CHUNK_V`` (vocab columns per chunk).
    ``filter_eps > 0``: the kernel flags (row tile, vocab tile) pairs with some
    |dz| >= filter_eps and the chunk's GEMMs cover only the box around flagged tiles (a
    chunk with none is skipped; one host sync per chunk); dropped dz are all below
    filter_eps, so each element of dX / dW is off by at most ``filter_eps * sum_v |W[v, k]|``
    / ``filter_eps * sum_n |X[n, k]|`` (db stays exact).
    """
    out_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    dtype = _compute_dtype(hidden, weight)
    if dtype == torch.float64:
        return torch_bwd(hidden, weight, bias, labels, lse, entropy, grad_logprob,
                         grad_entropy, temperature, ignore_index, needs_grad)
    if chunk_v is not None and chunk_v < 1:
        raise ValueError(f"chunk_v must be >= 1, got {chunk_v}")
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    labels, lse, entropy = labels.contiguous(), lse.contiguous(), entropy.contiguous()
    grad_logprob = None if grad_logprob is None else grad_logprob.contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.contiguous()
    n_rows, h_dim = hidden.shape
    vocab = weight.shape[0]
    dev, f32 = hidden.device, torch.float32
    need_dx, need_dw = needs_grad[0], needs_grad[1]
    need_db = needs_grad[2] and bias is not None
    dx = torch.zeros((n_rows, h_dim), dtype=f32, device=dev) if need_dx else None
    has_grad = grad_logprob is not None or grad_entropy is not None
    work = has_grad and (need_dx or need_dw or need_db) and n_rows > 0
    # Without filtering every chunk writes all of its dW rows: no memset needed.
    alloc_dw = torch.empty if work and filter_eps <= 0 else torch.zeros
    dw = alloc_dw((vocab, h_dim), dtype=out_dtypes[1], device=dev) if need_dw else None
    db = torch.zeros(vocab, dtype=f32, device=dev) if need_db else None
    if work:
        cfg = _atomic._launch_config("dz", hidden, weight)  # looked up per call: overridable
        chunk = min(chunk_v or cfg["CHUNK_V"], vocab)
        dz = torch.empty((n_rows, chunk), dtype=dtype, device=dev)
        n_row_tiles = triton.cdiv(n_rows, cfg["BLOCK_N"])
        db_part = torch.empty((n_row_tiles, chunk), dtype=f32, device=dev) if need_db else lse
        keep = (torch.empty((n_row_tiles, triton.cdiv(chunk, cfg["BLOCK_V"])), dtype=torch.int32,
                            device=dev) if filter_eps > 0 else lse)
        args = (hidden, weight, bias, labels, lse, entropy, grad_logprob, grad_entropy,
                1.0 / float(temperature), int(ignore_index), float(filter_eps))
        if need_dw:  # ignored rows have dz = 0, but 0 * NaN/inf in their X would still leak
            hidden = hidden.masked_fill((labels == ignore_index)[:, None], 0)
        for v0 in range(0, vocab, chunk):
            length = min(chunk, vocab - v0)
            _launch_dz(cfg, args, dz, db_part, keep, v0, length, need_db, dtype)
            dz_c = dz[:, :length]
            if need_db:  # the kernel's partials are [n_row_tiles, length], packed
                db[v0:v0 + length] = _packed(db_part, n_row_tiles, length).sum(0)
            box = (0, n_rows, 0, length)
            if filter_eps > 0:
                flags = _packed(keep, n_row_tiles, triton.cdiv(length, cfg["BLOCK_V"]))
                box = _kept_box(flags, cfg["BLOCK_N"], cfg["BLOCK_V"], n_rows, length)
                if box is None:
                    continue  # dW[chunk] stays 0, dX gets nothing
            _chunk_gemms(dz_c, box, v0, hidden, weight, dx, dw)
    return (
        None if dx is None else dx.to(out_dtypes[0]),
        dw,
        None if db is None else db.to(out_dtypes[2]),
    )


def _chunk_gemms(dz_c, box, v0, hidden, weight, dx, dw):
    """``dX[r0:r1] += a @ W[v0+c0 : v0+c1]`` and ``dW[v0+c0 : v0+c1] = a.T @ X[r0:r1]`` for
    ``a = dz_c[r0:r1, c0:c1]`` (``box = (r0, r1, c0, c1)``); dW straight into its dtype."""
    r0, r1, c0, c1 = box
    a = dz_c[r0:r1, c0:c1]
    if dx is not None:
        _addmm_fp32(dx[r0:r1], a, weight[v0 + c0:v0 + c1])
    if dw is not None:
        if dw.dtype == a.dtype:
            torch.mm(a.T, hidden[r0:r1], out=dw[v0 + c0:v0 + c1])
        else:
            dw[v0 + c0:v0 + c1] = (a.T @ hidden[r0:r1]).to(dw.dtype)


def _launch_dz(cfg, args, dz, db_part, keep, v_start, length, need_db, dtype):
    """One dz kernel launch over vocab columns ``[v_start, v_start + length)``; returns what
    the launch returns (on a GPU the compiled kernel: ``n_regs``, ``n_spills``, metadata)."""
    (hidden, weight, bias, labels, lse, entropy, g_lp, g_h, inv_temp, ignore_index,
     filter_eps) = args
    n_rows, h_dim = hidden.shape
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    grid = (triton.cdiv(n_rows, block_n) * triton.cdiv(length, block_v),)
    dummy = lse  # stands in for absent pointers; never read (constexpr flags)
    return _linear_logprob_entropy_dz_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, labels, lse, entropy,
        g_lp if g_lp is not None else dummy, g_h if g_h is not None else dummy,
        dz, db_part, keep,
        n_rows, h_dim, v_start, length,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
        inv_temp, ignore_index, filter_eps,
        HAS_BIAS=bias is not None, HAS_GLP=g_lp is not None, HAS_GH=g_h is not None,
        NEED_DB=need_db, FILTER=filter_eps > 0, BLOCK_N=block_n, BLOCK_V=block_v,
        BLOCK_K=cfg["BLOCK_K"], GROUP_N=cfg["GROUP_N"], DOT_PRECISION=_dot_precision(dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


_atomic.AUTOTUNE_BACKWARDS["dz"] = triton_bwd_split  # PREFIX_RFT_TRITON_AUTOTUNE=1 times it
