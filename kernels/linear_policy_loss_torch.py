"""The chunked plain-torch fused head-and-loss: ``impl="torch"`` of :mod:`.linear_policy_loss`.

Per chunk of ``C`` valid token rows (``C`` from a memory budget, :func:`chunk_rows`) it does
three GEMMs and no recompute (6NHV FLOPs in all, against 8NHV for the generic
log-prob/entropy autograd path, whose backward recomputes the logits)::

    z      = x_c @ W.T (+ b), / T                  # [C, V] fp32, GEMM 1 (2 C H V)
    logp   = log_softmax(z)                         # in place
    lp     = logp[y];  g_lp, g_H = d loss/d lp, d loss/d H   # :func:`policy_token_terms`
    per block of rows (cache-sized): p = exp(logp);  H = -sum(p * logp)
        dz = (g_lp (onehot_y - p) - g_H p (logp + H)) / T     # in logp's place
    dX_c   = dz @ W                                 # GEMM 2
    dW    += dz.T @ x_c;  db += dz.sum(0)           # GEMM 3

The PPO/NLL derivative ``g_lp`` needs ``lp`` only and ``g_H`` is the given entropy weight, so
both are known before ``H``. Working memory: one ``[C, V]`` fp32 buffer (``chunk_bytes``)
and a ``[rows, V]`` block of ``p`` (:data:`BLOCK_BYTES`), plus the fp32 ``dW`` (``[V, H]``)
the autograd.Function keeps until its backward. :func:`policy_token_terms` is the per-token
loss and its derivatives; the Triton pass (``linear_policy_loss_triton.py``) computes the same
quantities in its kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LOG_RATIO_CLAMP = 20.0  # verl clamps the log-ratio to +-20 before exp (as prefix_rft.loss does)
# the [C, V] fp32 logit buffer of one token chunk: CPU keeps it small (peak RSS; the W stream
# per chunk is cheap next to CPU GEMMs); a GPU needs C >~ 1k rows to keep the GEMMs compute-bound
DEFAULT_CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20}
BLOCK_BYTES = 4 * 2**20  # the [rows, V] softmax block of the elementwise pass (cache-sized)


class TokenInputs(NamedTuple):
    """Per-token inputs, each ``[N]`` fp32 (already expanded from scalars) or None."""

    advantages: torch.Tensor | None  # the advantage that counts (0 on masked prefix tokens)
    old_logprob: torch.Tensor | None  # None: on-policy (old = the detached log-prob, rho = 1)
    loss_weight: torch.Tensor  # multiplies the token's policy loss (normalizer, loss_scale)
    importance_weights: torch.Tensor | None  # multiplies it too (no gradient), None = 1
    entropy_weight: torch.Tensor | None  # loss -= entropy_weight * H, None = no bonus


class LossOptions(NamedTuple):
    clip_low: float
    clip_high: float
    clip_c: float | None
    temperature: float
    nll: bool  # True: token loss -lp (SFT), PPO options unused


def chunk_rows(vocab: int, chunk_bytes: int, *, buffers: int = 1, elem_bytes: int = 4,
               multiple: int = 1) -> int:
    """Token rows per chunk so ``buffers`` ``[C, vocab]`` tensors fit in ``chunk_bytes``
    (at least ``multiple``, rounded down to a multiple of it)."""
    rows = max(1, chunk_bytes // max(1, buffers * elem_bytes * vocab))
    return max(multiple, rows // multiple * multiple)


def _tie_split(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, other: torch.Tensor | float,
               a_wins: torch.Tensor) -> torch.Tensor:
    """Gradient through ``max``/``min(a, b)`` the way autograd splits it: ``g`` where ``a``
    wins, ``other`` where ``b`` wins, the mean of both on exact ties."""
    return torch.where(a == b, 0.5 * (g + other), torch.where(a_wins, g, other))


@torch.no_grad()
def policy_token_terms(lp: torch.Tensor, tok: TokenInputs, opts: LossOptions
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(contribution, g_lp, g_H)`` per token row, fp32 ``[C]``.

    ``contribution = loss_weight·iw·ℓ`` (the token's policy loss; the caller adds
    ``−entropy_weight·H``); ``g_lp``/``g_H`` the derivatives of the token's whole share
    w.r.t. ``lp``/``H`` (``g_H = −entropy_weight``), exactly as autograd differentiates
    :func:`prefix_rft.loss.prefix_rft_loss` (ties of max/min/clamp included). ``ℓ = −lp`` with
    ``opts.nll``; else ``ℓ = max(−Aρ, −A·clip(ρ))``, capped at ``−A·clip_c`` for ``A < 0``.
    """
    w = tok.loss_weight
    if opts.nll:
        token_loss, d_lp = -lp, torch.full_like(lp, -1.0)
    else:
        adv = tok.advantages
        log_ratio = lp - (lp if tok.old_logprob is None else tok.old_logprob)
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        lo, hi = 1.0 - opts.clip_low, 1.0 + opts.clip_high
        unclipped, clipped = -adv * ratio, -adv * ratio.clamp(lo, hi)
        token_loss = torch.maximum(unclipped, clipped)
        in_range = ((ratio >= lo) & (ratio <= hi)).float()
        # d token_loss / d ratio: the unclipped branch -A, the clipped one -A inside the range
        d_ratio = _tie_split(unclipped, clipped, -adv, -adv * in_range, unclipped > clipped)
        if opts.clip_c is not None:
            cap = -adv * opts.clip_c
            capped = torch.minimum(token_loss, cap)
            d_capped = _tie_split(token_loss, cap, d_ratio, 0.0, token_loss < cap)
            neg = adv < 0
            token_loss = torch.where(neg, capped, token_loss)
            d_ratio = torch.where(neg, d_capped, d_ratio)
        in_clamp = (log_ratio.abs() <= LOG_RATIO_CLAMP).float()
        d_lp = d_ratio * ratio * in_clamp
    if tok.importance_weights is not None:
        token_loss, d_lp = token_loss * tok.importance_weights, d_lp * tok.importance_weights
    g_h = None if tok.entropy_weight is None else -tok.entropy_weight
    return w * token_loss, w * d_lp, g_h


def take_rows(tok: TokenInputs, idx: torch.Tensor) -> TokenInputs:
    return TokenInputs(*(None if t is None else t[idx] for t in tok))


def _chunk_logsoftmax(x, w32, b_scaled, inv_t, buf):
    """``log_softmax((x @ W.T + b) / T)`` computed in ``buf``."""
    xs = x * inv_t if inv_t != 1.0 else x
    if b_scaled is None:
        torch.mm(xs, w32.T, out=buf)
    else:
        torch.addmm(b_scaled, xs, w32.T, out=buf)
    return torch.log_softmax(buf, 1, out=buf)


def _entropy_and_dz(logp, g_lp, g_h, labels, inv_t, block_rows, want_dz):
    """Per block of rows: ``p = exp(logp)``, ``H = -sum(p logp)``, then (``want_dz``) ``dz``
    written over ``logp``. Returns ``H [C]``; ``logp`` holds ``dz`` afterwards if wanted."""
    c = logp.shape[0]
    ent = torch.empty(c, dtype=logp.dtype, device=logp.device)
    g_lp_t = g_lp * inv_t
    g_h_t = None if g_h is None else g_h * inv_t
    for r0 in range(0, c, block_rows):
        r1 = min(r0 + block_rows, c)
        lb = logp[r0:r1]
        p = torch.exp(lb)
        ent[r0:r1] = h = -torch.linalg.vecdot(p, lb)
        if not want_dz:
            continue
        if g_h_t is None:  # dz = -g_lp p (+ g_lp at the label)
            torch.mul(p, -g_lp_t[r0:r1, None], out=lb)
        else:  # dz = p (-g_lp - g_H (logp + H))
            lb.add_(h[:, None]).mul_(-g_h_t[r0:r1, None]).sub_(g_lp_t[r0:r1, None]).mul_(p)
    if want_dz:
        logp[torch.arange(c, device=logp.device), labels] += g_lp_t
    return ent


@torch.no_grad()
def torch_policy_loss_fwd(hidden, weight, bias, labels, tok: TokenInputs, opts: LossOptions,
                          ignore_index: int, needs: tuple[bool, bool, bool],
                          chunk_bytes: int = DEFAULT_CHUNK_BYTES["cpu"]):
    """Loss, per-token ``lp``/``H`` and the gradients, in one chunked pass.

    Returns ``(loss fp32 scalar, logprob [N] fp32, entropy [N] fp32, dX, dW, db)``; the
    gradients (input dtypes) are None where ``needs`` (hidden, weight, bias) is False.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dev, f32 = hidden.device, torch.float32
    lp_out = torch.zeros(n, dtype=f32, device=dev)
    ent_out = torch.zeros(n, dtype=f32, device=dev)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    any_grad = any(needs)
    dx = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if needs[0] else None
    dw = torch.zeros(weight.shape, dtype=f32, device=dev) if needs[1] else None
    db = torch.zeros(vocab, dtype=f32, device=dev) if needs[2] and bias is not None else None
    inv_t = 1.0 / opts.temperature
    w32 = weight if weight.dtype == f32 else weight.float()
    b_scaled = None if bias is None else bias.float() * inv_t
    valid_idx = (labels != ignore_index).nonzero().squeeze(-1)
    rows, block_rows = chunk_rows(vocab, chunk_bytes), chunk_rows(vocab, BLOCK_BYTES)
    buf = torch.empty(min(rows, valid_idx.numel()), vocab, dtype=f32, device=dev)
    for c0 in range(0, valid_idx.numel(), rows):
        idx = valid_idx[c0:c0 + rows]
        c, x, y = idx.numel(), hidden[idx].float(), labels[idx]
        logp = _chunk_logsoftmax(x, w32, b_scaled, inv_t, buf[:c])
        lp = logp[torch.arange(c, device=dev), y]
        tok_c = take_rows(tok, idx)
        contribution, g_lp, g_h = policy_token_terms(lp, tok_c, opts)
        ent = _entropy_and_dz(logp, g_lp, g_h, y, inv_t, block_rows, any_grad)
        lp_out[idx], ent_out[idx] = lp, ent
        if tok_c.entropy_weight is not None:
            contribution = contribution - tok_c.entropy_weight * ent
        total += contribution.double().sum()
        if not any_grad:
            continue
        dz = logp
        if dx is not None:
            dx[idx] = (dz @ w32).to(hidden.dtype)
        if dw is not None:
            dw.addmm_(dz.T, x)
        if db is not None:
            db += dz.sum(0)
    return (total.float(), lp_out, ent_out, dx,
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))
