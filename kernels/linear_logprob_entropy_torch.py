"""The chunked plain-torch linear -> (log-prob, entropy): ``impl="torch"`` (CPU, fallback).

:func:`torch_fwd` / :func:`torch_bwd` have the same arguments and results as the Triton
launchers ``triton_fwd`` / ``triton_bwd``. They tile tokens x vocab, keep an online
(max, sum, weighted-sum) per row, and recompute logit tiles in the backward, so the working
set is bounded by ``token_chunk x vocab_chunk`` and never ``[N, V]``.

Shapes: ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``labels [N]``; forward
returns fp32 ``logprob [N]``, ``entropy [N]``, ``lse [N]``; backward returns ``dX [N, H]``,
``dW [V, H]``, ``db [V]`` in the input dtypes. Torch equivalent (allocating ``[N, V]``)::

    z = (hidden.float() @ weight.float().T + bias) / temperature
    logprob = z.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    lse = z.logsumexp(-1)

Math (per row, z = (x @ W.T + b) / T):
    m = max z,  s = sum e^{z-m},  w = sum e^{z-m} (z - m)
    lse = m + log s,  entropy = log s - w / s,  logprob = z_y - lse
    d/dz_j = g_lp (δ_jy - p_j) - g_H p_j (z_j - (lse - H)),   then divided by T.
``w`` is kept relative to the running max (not the raw ``sum p z``) so the entropy does
not come from the difference of two large numbers when the distribution is peaked.
"""

from __future__ import annotations

import torch

# Tile sizes of the chunked torch path: a [1024, 8192] fp32 tile is 32 MiB; forward and
# backward each keep two or three such temporaries alive.
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 8192


def merge_softmax_stats(
    m1: torch.Tensor, s1: torch.Tensor, w1: torch.Tensor,
    m2: torch.Tensor, s2: torch.Tensor, w2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine two partial (max, sum, shifted weighted-sum) triples over disjoint vocab parts.

    Each triple is ``m = max z``, ``s = sum e^{z-m}``, ``w = sum e^{z-m} (z-m)`` over its part.
    Both must be finite-max (every part holds at least one logit). NaN propagates.
    """
    m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    s = a1 * s1 + a2 * s2
    w = a1 * (w1 + s1 * (m1 - m)) + a2 * (w2 + s2 * (m2 - m))
    return m, s, w


def _logit_tile(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                v0: int, v1: int, temperature: float) -> torch.Tensor:
    """fp32 logits of token rows ``x`` (already fp32) against vocab rows ``[v0, v1)``."""
    z = x @ weight[v0:v1].float().T
    if bias is not None:
        z += bias[v0:v1].float()
    if temperature != 1.0:
        z /= temperature
    return z


def _label_hits(labels: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose label falls in ``[v0, v1)`` and that label's column inside the tile."""
    rows = ((labels >= v0) & (labels < v1)).nonzero().squeeze(-1)
    return rows, labels[rows] - v0


@torch.no_grad()
def torch_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked forward. Returns fp32 ``(logprob [N], entropy [N], lse [N])``; ignored rows 0.

    Only the valid rows are computed (ignored ones are compacted away first).
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    out = [torch.zeros(n_rows, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    valid_idx = (labels != ignore_index).nonzero().squeeze(-1)
    for c0 in range(0, valid_idx.numel(), token_chunk):
        idx = valid_idx[c0:c0 + token_chunk]
        x, y = hidden[idx].float(), labels[idx]
        stats, z_label = None, torch.zeros(idx.numel(), dtype=torch.float32, device=x.device)
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            z = _logit_tile(x, weight, bias, v0, v1, temperature)
            rows, cols = _label_hits(y, v0, v1)
            z_label[rows] = z[rows, cols]
            m = z.amax(dim=1)
            z -= m[:, None]  # in place: z - m is all that is needed from here on
            e = torch.exp(z)
            tile_stats = (m, e.sum(1), torch.linalg.vecdot(e, z))
            stats = tile_stats if stats is None else merge_softmax_stats(*stats, *tile_stats)
        m, s, w = stats
        lse = m + torch.log(s)
        out[0][idx], out[1][idx], out[2][idx] = z_label - lse, torch.log(s) - w / s, lse
    return out[0], out[1], out[2]


@torch.no_grad()
def torch_bwd(
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
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Chunked backward with logit recompute; fp32 accumulation of dX, dW, db.

    ``grad_logprob`` / ``grad_entropy`` ([N] or None for "no gradient flows in") are the
    upstream gradients. Returns ``(dX [N,H], dW [V,H], db [V])`` in the input dtypes, each
    None where ``needs_grad`` says so. Ignored rows get exactly zero gradient.
    """
    vocab = weight.shape[0]
    dev, f32 = hidden.device, torch.float32
    dx = torch.zeros(hidden.shape, dtype=f32, device=dev) if needs_grad[0] else None
    dw = torch.zeros(weight.shape, dtype=f32, device=dev) if needs_grad[1] else None
    db = torch.zeros(vocab, dtype=f32, device=dev) if (needs_grad[2] and bias is not None) else None
    valid_idx = (labels != ignore_index).nonzero().squeeze(-1)
    for c0 in range(0, valid_idx.numel(), token_chunk):
        idx = valid_idx[c0:c0 + token_chunk]
        x, y, row_lse = hidden[idx].float(), labels[idx], lse[idx][:, None]
        g_lp = None if grad_logprob is None else grad_logprob[idx].float()
        g_h = None if grad_entropy is None else grad_entropy[idx].float()
        dx_rows = torch.zeros_like(x) if dx is not None else None
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            z = _logit_tile(x, weight, bias, v0, v1, temperature)
            p = torch.exp(z - row_lse)
            # dz = p * (-g_H (z - (lse - H)) - g_lp) + g_lp onehot, built in place in z's
            # buffer so a tile costs two [rows, cols] temporaries, not five.
            if g_h is not None:
                dz = z.sub_(row_lse - entropy[idx][:, None]).mul_(-g_h[:, None])
                if g_lp is not None:
                    dz.sub_(g_lp[:, None])
                dz.mul_(p)
            else:
                dz = p.mul_(-g_lp[:, None])
            if g_lp is not None:
                rows, cols = _label_hits(y, v0, v1)
                dz[rows, cols] += g_lp[rows]
            if temperature != 1.0:
                dz /= temperature
            if dx_rows is not None:
                dx_rows += dz @ weight[v0:v1].float()
            if dw is not None:
                dw[v0:v1] += dz.T @ x
            if db is not None:
                db[v0:v1] += dz.sum(0)
        if dx is not None:
            dx[idx] = dx_rows
    return (
        None if dx is None else dx.to(hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )
