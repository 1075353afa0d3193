"""The chunked plain-torch fused head-and-loss: ``impl="torch"`` of :mod:`.linear_policy_loss`.

Per chunk of ``C`` valid token rows (``C`` from a memory budget, :func:`chunk_rows`) it does
three GEMMs and no recompute (6NHV FLOPs in all, against 8NHV for the generic
log-prob/entropy autograd path, whose backward recomputes the logits)::

    z      = x_c @ W.T (+ b), / T                  # [C, V] fp32, GEMM 1 (2 C H V)
    logp   = log_softmax(z);  p = exp(logp)
    lp     = logp[y];  H = -sum(p * logp)
    g_lp, g_H = d loss / d lp, d loss / d H         # per row, :func:`policy_token_terms`
    dz     = (g_lp (onehot_y - p) - g_H p (logp + H)) / T
    dX_c   = dz @ W                                 # GEMM 2
    dW    += dz.T @ x_c;  db += dz.sum(0)           # GEMM 3

Working memory: two ``[C, V]`` fp32 buffers (``logp`` and ``p``, ``dz`` built in ``p``'s),
plus the fp32 ``dW`` (``[V, H]``) the autograd.Function keeps until its backward.
:func:`policy_token_terms` is the per-token loss and its derivatives; the Triton pass
(``linear_policy_loss_triton.py``) computes the same quantities in its kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LOG_RATIO_CLAMP = 20.0  # verl clamps the log-ratio to +-20 before exp (as prefix_rft.loss does)
DEFAULT_CHUNK_BYTES = 256 * 2**20  # all [C, V] working buffers of one chunk together


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


def chunk_rows(vocab: int, chunk_bytes: int, *, buffers: int = 2, elem_bytes: int = 4,
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
def policy_token_terms(lp: torch.Tensor, ent: torch.Tensor, tok: TokenInputs, opts: LossOptions
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(contribution, g_lp, g_H)`` per token row, fp32 ``[C]``.

    ``contribution = loss_weight·iw·ℓ − entropy_weight·H`` (the token's share of the loss);
    ``g_lp``/``g_H`` its derivatives w.r.t. ``lp``/``H``, exactly as autograd differentiates
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
    contribution, g_lp, g_h = w * token_loss, w * d_lp, None
    if tok.entropy_weight is not None:
        contribution = contribution - tok.entropy_weight * ent
        g_h = -tok.entropy_weight
    return contribution, g_lp, g_h


def take_rows(tok: TokenInputs, idx: torch.Tensor) -> TokenInputs:
    return TokenInputs(*(None if t is None else t[idx] for t in tok))


def _chunk_logsoftmax(x, w32, b_scaled, inv_t, logp, p):
    """``logp = log_softmax((x @ W.T + b) / T)`` into ``logp``, ``p = exp(logp)`` into ``p``."""
    xs = x * inv_t if inv_t != 1.0 else x
    if b_scaled is None:
        torch.mm(xs, w32.T, out=p)
    else:
        torch.addmm(b_scaled, xs, w32.T, out=p)
    torch.log_softmax(p, 1, out=logp)
    torch.exp(logp, out=p)


def _chunk_dz(logp, p, ent, g_lp, g_h, labels, inv_t):
    """``dz`` of the chunk, built in ``p``'s buffer (``logp`` is overwritten when g_H is set)."""
    g_lp = g_lp * inv_t
    if g_h is None:
        dz = p.mul_(-g_lp[:, None])
    else:
        t = logp.add_(ent[:, None]).mul_(-(g_h * inv_t)[:, None]).sub_(g_lp[:, None])
        dz = p.mul_(t)
    rows = torch.arange(labels.numel(), device=labels.device)
    dz[rows, labels] += g_lp
    return dz


@torch.no_grad()
def torch_policy_loss_fwd(hidden, weight, bias, labels, tok: TokenInputs, opts: LossOptions,
                          ignore_index: int, needs: tuple[bool, bool, bool],
                          chunk_bytes: int = DEFAULT_CHUNK_BYTES):
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
    rows = chunk_rows(vocab, chunk_bytes)
    logp_buf = torch.empty(min(rows, valid_idx.numel()), vocab, dtype=f32, device=dev)
    p_buf = torch.empty_like(logp_buf)
    for c0 in range(0, valid_idx.numel(), rows):
        idx = valid_idx[c0:c0 + rows]
        c, x, y = idx.numel(), hidden[idx].float(), labels[idx]
        logp, p = logp_buf[:c], p_buf[:c]
        _chunk_logsoftmax(x, w32, b_scaled, inv_t, logp, p)
        ent = -torch.linalg.vecdot(p, logp)
        lp = logp[torch.arange(c, device=dev), y]
        contribution, g_lp, g_h = policy_token_terms(lp, ent, take_rows(tok, idx), opts)
        lp_out[idx], ent_out[idx] = lp, ent
        total += contribution.double().sum()
        if not any_grad:
            continue
        dz = _chunk_dz(logp, p, ent, g_lp, g_h, y, inv_t)
        if dx is not None:
            dx[idx] = (dz @ w32).to(hidden.dtype)
        if dw is not None:
            dw.addmm_(dz.T, x)
        if db is not None:
            db += dz.sum(0)
    return (total.float(), lp_out, ent_out, dx,
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))
