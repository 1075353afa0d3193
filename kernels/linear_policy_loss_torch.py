"""The chunked plain-torch fused head-and-loss: ``impl="torch"`` of :mod:`.linear_policy_loss`.

Per chunk of ``C`` valid token rows (``C`` from a memory budget, :func:`chunk_rows`) it does
three GEMMs and no recompute (6NHV FLOPs in all, against 8NHV for the generic
log-prob/entropy autograd path, whose backward recomputes the logits)::

    z      = x_c @ W.T (+ b), / T                  # [C, V] fp32, GEMM 1 (2 C H V)
    per block of rows (cache-sized), everything in place of z's rows:
        z -= max(z);  e = exp(z);  s = sum(e)      # the block's only exp
        lp = z[y] - log s;  H = log s - sum(e z) / s
        g_lp, g_H = d loss/d lp, d loss/d H        # :func:`policy_token_terms`
        dz = (g_lp (onehot_y - p) - g_H p (logp + H)) / T,  p = e / s,  logp = z - log s
    dX_c   = dz @ W                                 # GEMM 2
    dW    += dz.T @ x_c;  db += dz.sum(0)           # GEMM 3

The PPO/NLL derivative ``g_lp`` needs ``lp`` only and ``g_H`` is the given entropy weight, so
both are known inside the block, and the softmax's ``exp`` is computed once per logit (a
``log_softmax`` over the chunk followed by ``p = exp(logp)`` computed it twice). ``H`` uses the
max-shifted logits, so its two terms are both O(log V) and do not cancel.

Row passes. On CPU the per-row work runs in native code where a C compiler is found
(``cpu_softmax_rows.c``, built on first use, :func:`_native_terms_and_dz`): one read of the
chunk for the row maxima, one for ``exp``, the sums and (no entropy bonus) ``e`` stored over
``z``. Without an entropy bonus ``dz = (-g_lp / s) e + g_lp onehot_y``, so the per-row scale is
applied to the small ``[C, H]`` operands of GEMMs 2 and 3 and the label term is a gather and a
scatter-add of ``C`` rows (:func:`_add_chunk_grads`): no pass writes ``dz``. With the bonus a
second native pass writes ``dz`` (it needs the logits, so ``exp`` runs twice there). The
plain-torch block loop (:func:`_softmax_terms_and_dz`) is the fallback (no compiler, CUDA
tensors, ``PREFIX_RFT_NATIVE_CPU=0``) and computes the same quantities: on one CPU thread its six
``[C, V]`` passes cost about 12% of the chunk's GEMMs, the native ones 5-7%.

Working memory: one ``[C, V]`` fp32 buffer (``chunk_bytes``), with the torch passes also a
``[rows, V]`` block of ``e`` (:data:`BLOCK_BYTES`), plus the fp32 ``dW`` (``[V, H]``) the
autograd.Function keeps until its backward. :func:`policy_token_terms` is the per-token loss and
its derivatives; the Triton pass (``linear_policy_loss_triton.py``) computes the same quantities
in its kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import cpu_softmax_rows as native_rows

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


def take_rows(tok: TokenInputs, idx: torch.Tensor | slice) -> TokenInputs:
    return TokenInputs(*(None if t is None else t[idx] for t in tok))


def _chunk_logits(x, w32, b_scaled, inv_t, buf):
    """``(x @ W.T + b) / T`` computed in ``buf`` (the input is scaled, not the ``[C, V]``
    result)."""
    xs = x * inv_t if inv_t != 1.0 else x
    if b_scaled is None:
        return torch.mm(xs, w32.T, out=buf)
    return torch.addmm(b_scaled, xs, w32.T, out=buf)


def _rows_loss_and_dz_coeffs(lp, h, s, log_s, tok: TokenInputs, opts: LossOptions,
                             inv_t: float):
    """The rows' loss and the coefficients of their logit gradient, from the row statistics.

    With ``t = z - max`` and ``e = exp(t)`` per row (``s = sum e``, ``log_s = log s``)::

        dz = e (a t + b) + label_grad onehot_y      # a is None (no entropy bonus): dz = b e + ...

    because ``dz = (g_lp (onehot - p) - g_H p (logp + H)) / T`` with ``p = e / s`` and
    ``logp = t - log s``. Returns ``(loss fp64 scalar, a [C] or None, b [C], label_grad [C])``;
    the loss is the rows' policy loss minus their entropy bonus."""
    contribution, g_lp, g_h = policy_token_terms(lp, tok, opts)
    if tok.entropy_weight is not None:
        contribution = contribution - tok.entropy_weight * h
    label_grad = g_lp * inv_t
    if g_h is None:
        a, b = None, -label_grad / s
    else:
        a = -g_h * inv_t / s
        b = (-label_grad - g_h * inv_t * (h - log_s)) / s
    return contribution.double().sum(), a, b, label_grad


def _softmax_terms_and_dz(z, labels, tok: TokenInputs, opts: LossOptions, inv_t: float,
                          block_rows: int, e_buf, want_dz: bool):
    """Per block of rows of the chunk's logits ``z [C, V]``: the softmax statistics, ``lp``,
    ``H``, the token terms and (``want_dz``) ``dz`` written over ``z``.

    Returns ``(lp [C], H [C], loss fp64 scalar)``; ``loss`` is the chunk's policy loss minus
    its entropy bonus. ``e_buf`` is a ``[block_rows, V]`` scratch buffer."""
    c = z.shape[0]
    lp_out = torch.empty(c, dtype=z.dtype, device=z.device)
    ent_out = torch.empty(c, dtype=z.dtype, device=z.device)
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    for r0 in range(0, c, block_rows):
        r1 = min(r0 + block_rows, c)
        rows = torch.arange(r1 - r0, device=z.device)
        zb, e, y = z[r0:r1], e_buf[:r1 - r0], labels[r0:r1]
        zb.sub_(zb.amax(1, keepdim=True))
        torch.exp(zb, out=e)
        s = e.sum(1)
        log_s = s.log()
        h = log_s - torch.linalg.vecdot(e, zb) / s
        lp = zb[rows, y] - log_s
        lp_out[r0:r1], ent_out[r0:r1] = lp, h
        loss_b, a, b, label_grad = _rows_loss_and_dz_coeffs(
            lp, h, s, log_s, take_rows(tok, slice(r0, r1)), opts, inv_t)
        total += loss_b
        if not want_dz:
            continue
        if a is None:
            torch.mul(e, b[:, None], out=zb)
        else:
            zb.mul_(a[:, None]).add_(b[:, None]).mul_(e)
        zb[rows, y] += label_grad
    return lp_out, ent_out, total


def _native_terms_and_dz(lib, z, labels, tok: TokenInputs, opts: LossOptions, inv_t: float,
                         want_dz: bool):
    """:func:`_softmax_terms_and_dz` with the native row passes (``cpu_softmax_rows.c``).

    Returns ``(lp [C], H [C], loss fp64 scalar, folded)``. Without an entropy bonus ``dz`` is
    ``coeff[:, None] * e`` plus ``label_grad`` at each row's label (``e = exp(z - max)``, left
    in ``z``), so ``folded = (coeff, label_grad)`` and the caller folds the per-row scale and the
    label term into its GEMMs (no pass writes ``dz``). With the bonus ``dz`` needs the logits
    too: a second native pass writes it over ``z`` and ``folded`` is None."""
    rows = torch.arange(z.shape[0], device=z.device)
    z_label = z[rows, labels]  # before z is overwritten
    bonus = tok.entropy_weight is not None
    fold = want_dz and not bonus
    m, s, d = native_rows.row_stats(lib, z, store_exp=fold)
    log_s = s.log()
    h = log_s - d / s
    lp = z_label - m - log_s
    total, a, b, label_grad = _rows_loss_and_dz_coeffs(lp, h, s, log_s, tok, opts, inv_t)
    if not want_dz:
        return lp, h, total, None
    if fold:  # a is None: dz = b e + label_grad onehot
        return lp, h, total, (b, label_grad)
    native_rows.row_dz(lib, z, m, a, b)
    z[rows, labels] += label_grad
    return lp, h, total, None


def _row_pass_lib(device: torch.device):
    """The native row passes' library where they apply (CPU), else None (torch passes)."""
    return native_rows.load() if device.type == "cpu" else None


def _add_chunk_grads(z, folded, x, y, idx, w32, dx, dw, db) -> None:
    """GEMMs 2 and 3 of one chunk: ``dX[idx] = dz @ W``, ``dW += dz.T @ x``, ``db += dz.sum(0)``.

    ``folded`` None: ``z`` holds ``dz``. Else ``z`` holds ``e`` and ``dz = coeff * e`` plus
    ``label_grad`` at each row's label: the scale rides on the small ``[C, H]`` operands and
    the label term is a gather / scatter-add of ``C`` rows (no ``[C, V]`` pass)."""
    if folded is None:
        if dx is not None:
            dx[idx] = (z @ w32).to(dx.dtype)
        if dw is not None:
            dw.addmm_(z.T, x)
        if db is not None:
            db += z.sum(0)
        return
    coeff, label_grad = folded
    if dx is not None:
        dx_c = (z @ w32).mul_(coeff[:, None]).add_(w32[y] * label_grad[:, None])
        dx[idx] = dx_c.to(dx.dtype)
    if dw is not None:
        dw.addmm_(z.T, x * coeff[:, None])
        dw.index_add_(0, y, x * label_grad[:, None])
    if db is not None:
        db.addmv_(z.T, coeff)
        db.index_add_(0, y, label_grad)


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
    lib = _row_pass_lib(dev)
    buf = torch.empty(min(rows, valid_idx.numel()), vocab, dtype=f32, device=dev)
    e_buf = None if lib is not None else torch.empty(min(block_rows, buf.shape[0]), vocab,
                                                     dtype=f32, device=dev)
    for c0 in range(0, valid_idx.numel(), rows):
        idx = valid_idx[c0:c0 + rows]
        c, x, y = idx.numel(), hidden[idx].float(), labels[idx]
        z = _chunk_logits(x, w32, b_scaled, inv_t, buf[:c])
        if lib is not None:
            lp, ent, chunk_loss, folded = _native_terms_and_dz(
                lib, z, y, take_rows(tok, idx), opts, inv_t, any_grad)
        else:
            lp, ent, chunk_loss = _softmax_terms_and_dz(z, y, take_rows(tok, idx), opts, inv_t,
                                                        block_rows, e_buf, any_grad)
            folded = None
        lp_out[idx], ent_out[idx] = lp, ent
        total += chunk_loss
        if any_grad:
            _add_chunk_grads(z, folded, x, y, idx, w32, dx, dw, db)
    return (total.float(), lp_out, ent_out, dx,
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))
