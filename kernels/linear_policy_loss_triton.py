"""The GPU fused head-and-loss: per token chunk, one Triton elementwise pass between GEMMs.

Shape of this module (house rule): ``_linear_policy_loss_fwd_kernel`` (jit) -> launcher
:func:`triton_policy_loss_fwd`; the autograd.Function and the public entry are in
``linear_policy_loss.py``, the torch path it stands beside in ``linear_policy_loss_torch.py``
(same arguments, same results).

Per chunk of ``C`` valid token rows::

    z     = x_c @ W.T                      # library GEMM (cuBLAS), input dtype, fp32 out
    kernel, one program per row:           # reads z twice, writes dz once (input dtype)
        pass 1: online max / sum / shifted weighted sum over V -> lse, H, lp = z_y - lse
        ℓ, g_lp = the token's loss and d loss / d lp (as policy_token_terms), g_H = -w_H
        pass 2: dz = (g_lp (onehot_y - p) - g_H p (z - lse + H)) / T   over the row's z
    dX_c  = dz @ W;  dW += dz.T @ x_c      # two library GEMMs (fp32 dW accumulation)

6NHV FLOPs in all (the three bare lm_head GEMMs); the elementwise pass reads ``C·V`` fp32
twice and writes ``C·V`` input-dtype values. Working memory: the ``[C, V]`` fp32 logit buffer
and, for 16-bit inputs, a ``[C, V]`` 16-bit dz buffer; fp32 inputs write dz over the logits
(each block is read, then a CTA barrier, then written: the same addresses, never a later
block's). Writing 16-bit dz into the fp32 rows' own bytes would save that buffer, but the warps
of one program are not in lockstep, so a warp's store could land on logits another warp has
not read yet.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from .linear_policy_loss_torch import TokenInputs, chunk_rows, take_rows
from .tl_utils import tl_max_nan

# Launch configs (autotune off). "interpreter": TRITON_INTERPRET=1 on CPU (tests).
# Candidates for the checked-in table in triton_configs.py once a GPU has timed them.
CONFIGS = {
    "default": dict(BLOCK_V=2048, num_warps=8),
    "interpreter": dict(BLOCK_V=128, num_warps=1),
}
LOG_RATIO_CLAMP = 20.0


@triton.jit
def _token_terms(lp, adv, old, w, iw, clip_lo, clip_hi, clip_c, HAS_OLD: tl.constexpr,
                 HAS_IW: tl.constexpr, HAS_CLIP_C: tl.constexpr, NLL: tl.constexpr):
    """``(w·iw·ℓ, d(w·iw·ℓ)/d lp)`` of one token, autograd's tie rules (policy_token_terms)."""
    if NLL:
        tok = -lp
        d = -1.0 + 0.0 * lp
    else:
        if HAS_OLD:
            lr = lp - old
        else:
            lr = lp - lp
        ratio = tl.exp(tl.minimum(tl.maximum(lr, -20.0), 20.0))
        unc = -adv * ratio
        clp = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
        tok = tl.maximum(unc, clp)
        d_b = tl.where((ratio >= clip_lo) & (ratio <= clip_hi), -adv, 0.0)
        d = tl.where(unc == clp, 0.5 * (d_b - adv), tl.where(unc > clp, -adv, d_b))
        if HAS_CLIP_C:
            cap = -adv * clip_c
            d_c = tl.where(tok == cap, 0.5 * d, tl.where(tok < cap, d, 0.0))
            neg = adv < 0
            tok = tl.where(neg, tl.minimum(tok, cap), tok)
            d = tl.where(neg, d_c, d)
        d = d * ratio * tl.where(tl.abs(lr) <= 20.0, 1.0, 0.0)
    if HAS_IW:
        tok = tok * iw
        d = d * iw
    return w * tok, w * d


@triton.jit
def _load_logits(z_row, b_ptr, cols, mask, inv_temp, HAS_BIAS: tl.constexpr):
    z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return z * inv_temp


@triton.jit
def _linear_policy_loss_fwd_kernel(
    z_ptr, dz_ptr, b_ptr, labels_ptr, adv_ptr, old_ptr, w_ptr, iw_ptr, ew_ptr,
    lp_ptr, ent_ptr, contrib_ptr,
    V, stride_z, stride_dz, inv_temp, clip_lo, clip_hi, clip_c,
    HAS_BIAS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_IW: tl.constexpr, HAS_EW: tl.constexpr,
    HAS_CLIP_C: tl.constexpr, NLL: tl.constexpr, WANT_DZ: tl.constexpr, IN_PLACE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Program = one token row of the chunk: statistics, lp, H, the loss terms, then dz."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    # finite start: exp(m - m_new) = 0 and s * (m - m_new) = 0, no inf - inf
    m = tl.full([], -1e30, tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        z = tl.where(mask, _load_logits(z_row, b_ptr, cols, mask, inv_temp, HAS_BIAS),
                     float("-inf"))
        m_new = tl_max_nan(m, tl.reduce(z, 0, tl_max_nan))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 on masked columns
        w = alpha * (w + s * (m - m_new)) + tl.sum(e * tl.where(mask, z - m_new, 0.0), 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    lse = m + tl.log(s)
    ent = tl.log(s) - w / s
    label = tl.load(labels_ptr + row).to(tl.int32)
    z_y = _load_logits(z_row, b_ptr, label, label >= 0, inv_temp, HAS_BIAS)
    lp = z_y - lse
    adv = 0.0
    old = 0.0
    iw = 1.0
    if not NLL:
        adv = tl.load(adv_ptr + row)
    if HAS_OLD:
        old = tl.load(old_ptr + row)
    if HAS_IW:
        iw = tl.load(iw_ptr + row)
    contrib, g_lp = _token_terms(lp, adv, old, tl.load(w_ptr + row), iw, clip_lo, clip_hi,
                                 clip_c, HAS_OLD, HAS_IW, HAS_CLIP_C, NLL)
    g_h = 0.0
    if HAS_EW:
        ew = tl.load(ew_ptr + row)
        contrib -= ew * ent
        g_h = -ew
    tl.store(lp_ptr + row, lp)
    tl.store(ent_ptr + row, ent)
    tl.store(contrib_ptr + row, contrib)
    if WANT_DZ:
        dz_row = dz_ptr + row * stride_dz
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = cols < V
            z = _load_logits(z_row, b_ptr, cols, mask, inv_temp, HAS_BIAS)
            if IN_PLACE:  # dz over z: every warp has read this block before any writes it
                tl.debug_barrier()
            p = tl.exp(z - lse)
            dz = -p * (g_lp + g_h * (z - lse + ent))
            dz += tl.where(cols == label, g_lp, 0.0)
            tl.store(dz_row + cols, (dz * inv_temp).to(dz_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ launcher


def _config() -> dict:
    return CONFIGS["interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "default"]


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` with fp32 output when ``out`` is fp32: one cuBLAS GEMM in the input dtype on
    CUDA (``out_dtype``), the fp32 upcast on CPU (the interpreter tests)."""
    if out is None or out.dtype == a.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=out.dtype, out=out)
        except (TypeError, RuntimeError, NotImplementedError):
            warnings.warn("torch.mm(..., out_dtype=float32) is unavailable: the fused head's "
                          "logit GEMM falls back to an fp32 upcast (slow)", stacklevel=2)
            return out.copy_(torch.mm(a.float(), b.float()))
    return torch.mm(a.float(), b.float(), out=out)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b``, fp32 ``acc``, 16-bit ``a``/``b`` accumulated in fp32 where possible."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif not acc.is_cuda:
        acc.addmm_(a.float(), b.float())
    else:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (TypeError, RuntimeError, NotImplementedError):
            acc.add_(a @ b)


def dz_buffer(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where the chunk's dz goes: fp32 ``buf`` itself (in place) or a ``dtype`` buffer."""
    return buf if dtype == buf.dtype else torch.empty(buf.shape, dtype=dtype, device=buf.device)


def _launch(z, dz, bias, labels, tok: TokenInputs, opts, want_dz):
    c, vocab = z.shape
    dev = z.device
    lp, ent, contrib = (torch.empty(c, dtype=torch.float32, device=dev) for _ in range(3))
    dummy = lp  # pointer for absent optional inputs (never read)
    cfg = _config()
    _linear_policy_loss_fwd_kernel[(c,)](
        z, dz, bias if bias is not None else dummy, labels,
        tok.advantages if tok.advantages is not None else dummy,
        tok.old_logprob if tok.old_logprob is not None else dummy, tok.loss_weight,
        tok.importance_weights if tok.importance_weights is not None else dummy,
        tok.entropy_weight if tok.entropy_weight is not None else dummy,
        lp, ent, contrib, vocab, z.stride(0), dz.stride(0), 1.0 / opts.temperature,
        1.0 - opts.clip_low, 1.0 + opts.clip_high,
        opts.clip_c if opts.clip_c is not None else 0.0,
        HAS_BIAS=bias is not None, HAS_OLD=tok.old_logprob is not None,
        HAS_IW=tok.importance_weights is not None, HAS_EW=tok.entropy_weight is not None,
        HAS_CLIP_C=opts.clip_c is not None, NLL=opts.nll, WANT_DZ=want_dz,
        IN_PLACE=dz.dtype == z.dtype,  # fp32: dz_buffer hands back the logit buffer itself
        BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"])
    return lp, ent, contrib


@torch.no_grad()
def triton_policy_loss_fwd(hidden, weight, bias, labels, tok: TokenInputs, opts, ignore_index,
                           needs, chunk_bytes):
    """Same arguments and results as ``torch_policy_loss_fwd``: ``(loss, lp, H, dX, dW, db)``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dev, f32 = hidden.device, torch.float32
    lp_out, ent_out = (torch.zeros(n, dtype=f32, device=dev) for _ in range(2))
    total = torch.zeros((), dtype=torch.float64, device=dev)
    want = any(needs)
    dx = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if needs[0] else None
    dw = torch.zeros(weight.shape, dtype=f32, device=dev) if needs[1] else None
    db = torch.zeros(vocab, dtype=f32, device=dev) if needs[2] and bias is not None else None
    valid_idx = (labels != ignore_index).nonzero().squeeze(-1)
    rows = chunk_rows(vocab, chunk_bytes, multiple=16 if valid_idx.numel() >= 16 else 1)
    buf = torch.empty(min(rows, valid_idx.numel()), vocab, dtype=f32, device=dev)
    dz_buf = dz_buffer(buf, hidden.dtype)
    for c0 in range(0, valid_idx.numel(), rows):
        idx = valid_idx[c0:c0 + rows]
        x = hidden[idx]
        z = _mm(x, weight.T, out=buf[:idx.numel()])
        dz = dz_buf[:idx.numel()]
        lp, ent, contrib = _launch(z, dz, bias, labels[idx], take_rows(tok, idx), opts, want)
        lp_out[idx], ent_out[idx] = lp, ent
        total += contrib.double().sum()
        if dx is not None:  # CPU (interpreter tests): in fp32 from the stored dz
            dx[idx] = (torch.mm(dz, weight) if dz.is_cuda and dz.dtype == weight.dtype
                       else dz.float() @ weight.float()).to(hidden.dtype)
        if dw is not None:
            _addmm_fp32(dw, dz.T, x)
        if db is not None:
            db += dz.float().sum(0)
    return (total.float(), lp_out, ent_out, dx,
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))
