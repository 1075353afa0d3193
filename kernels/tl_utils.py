"""Shared ``tl`` helpers of the Triton kernels (house rule: one file, CCE style).

Every helper is a ``@triton.jit`` function inlined into its caller kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tl_max_nan(a, b):
    """Elementwise max that returns NaN when either side is NaN (``tl.maximum``'s default
    drops it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def tl_row_max(z):
    """``z.max(dim=1)`` of a 2-D fp32 tile, NaN-propagating (``tl.max`` would drop NaN)."""
    return tl.reduce(z, 1, tl_max_nan)


@triton.jit
def tl_logit_tile(
    x_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H,
    stride_xn, stride_xk, stride_wv, stride_wk, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 ``(x[rows] @ w[cols].T + b[cols]) * inv_temp`` as a ``[BLOCK_N, BLOCK_V]`` tile.

    Rows outside ``row_mask`` read x as 0 (so NaN in ignored rows cannot leak into shared
    gradients), columns outside ``col_mask`` read w and b as 0; the caller masks them.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    # int64 row offsets: V * H passes 2^31 for vocabularies of 256k at H = 8192.
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < H
        x = tl.load(x_rows + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :] * stride_wk,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]
    return acc * inv_temp


@triton.jit
def tl_atomic_add_tile_product(
    a, b_ptr, b_rows, b_row_mask, stride_br, stride_bk,
    out_ptr, out_rows, out_row_mask, H, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``out[out_rows, :] += a @ b[b_rows, :]`` in BLOCK_K column steps, fp32 atomics.

    ``a`` is a ``[R, C]`` register tile (input dtype), ``b`` a strided ``[*, H]`` matrix
    whose rows ``b_rows`` (C of them) are read, ``out`` a contiguous fp32 ``[*, H]``.
    Relaxed atomics: only the sum matters, not the order of the adds.
    """
    offs_k = tl.arange(0, BLOCK_K)
    b_base = b_ptr + b_rows.to(tl.int64)[:, None] * stride_br  # int64: V * H may pass 2^31
    out_base = out_ptr + out_rows.to(tl.int64)[:, None] * H
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + offs_k
        k_in = ks < H
        b = tl.load(b_base + ks[None, :] * stride_bk, mask=b_row_mask[:, None] & k_in[None, :],
                    other=0.0)
        part = tl.dot(a, b, input_precision=DOT_PRECISION)
        tl.atomic_add(out_base + ks[None, :], part, mask=out_row_mask[:, None] & k_in[None, :],
                      sem="relaxed")


@triton.jit
def tl_grad_logit_tile(
    z, rows, valid, cols, col_in, labels, lse_ptr, ent_ptr, glp_ptr, gh_ptr, inv_temp,
    HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """fp32 ``dz = d(g_lp . logprob + g_H . entropy) / dz`` of a ``[BLOCK_N, BLOCK_V]`` tile.

    ``dz_j = [g_lp (onehot_j - p_j) - g_H p_j (z_j - (lse - H))] / T`` with ``p = e^{z - lse}``
    from the forward's saved per-row ``lse`` / entropy; 0 outside ``valid`` rows and
    ``col_in`` columns (``labels`` are int32 column ids, compared against ``cols``).
    """
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    p = tl.where(col_in[None, :], tl.exp(z - lse[:, None]), 0.0)
    dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_GH:
        g_h = tl.load(gh_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        ent = tl.load(ent_ptr + rows, mask=valid, other=0.0)
        dz -= g_h[:, None] * p * (z - (lse - ent)[:, None])
    if HAS_GLP:
        g_lp = tl.load(glp_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        onehot = (cols[None, :] == labels[:, None]).to(tl.float32)
        dz += g_lp[:, None] * (onehot - p)
    return tl.where(valid[:, None] & col_in[None, :], dz * inv_temp, 0.0)


@triton.jit
def tl_any_at_least(dz, eps):
    """True when some ``|dz| >= eps`` (NaN compares false, so it counts as kept)."""
    big = tl.where(tl.abs(dz) < eps, 0, 1)
    return tl.sum(tl.sum(big, axis=1), axis=0) > 0


@triton.jit
def tl_grouped_tile(pid, n_row_tiles, n_vocab_tiles, GROUP_N: tl.constexpr):
    """``(pid_n, pid_v)`` of program ``pid`` in grouped order: ``GROUP_N`` row tiles sweep the
    vocabulary tiles together, so each W tile is read from HBM once per group (L2 reuse)."""
    per_group = GROUP_N * n_vocab_tiles
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_row_tiles - first_n, GROUP_N)
    return first_n + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def tl_row_labels(labels_ptr, pid_n, N, ignore_index, BLOCK_N: tl.constexpr):
    """Rows of tile ``pid_n``, their labels (int32) and which rows count (in range and not
    ``ignore_index``)."""
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_in, other=ignore_index)
    valid = row_in & (labels != ignore_index)
    labels = labels.to(tl.int32)  # 32-bit compares against whole tiles of column ids (V < 2^31)
    return rows, labels, valid
