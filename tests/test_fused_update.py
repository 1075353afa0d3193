"""The fused head-and-loss adapter (prefix_rft/loss/fused.py) against the current path
(:class:`PrefixRFTLoss`: per-token log-probs/entropies + autograd) and an fp64 full-logits
reference: loss, dX, dW, the entropy mask and the metrics, padded and packed, every option."""

from __future__ import annotations

import pytest
import torch

from prefix_rft.kernels import linear_logprob_entropy, linear_logprob_entropy_reference
from prefix_rft.loss import PrefixRFTLoss, prefix_rft_loss, sft_loss
from prefix_rft.loss.entropy_mask import compute_keep_prefix_mask
from prefix_rft.loss.fused import _kept_prefix, fused_prefix_rft_loss, fused_sft_loss

B, T, H, V, L_MAX = 5, 13, 37, 251, 16
TOL = 1e-5  # err(fused) <= err(current path) + TOL, relative RMS vs fp64


def rel(a, b):
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5 * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([13, 9, 11, 4, 12])
    rmask = torch.arange(T)[None, :] < lengths[:, None]
    pmask = torch.zeros(B, T, dtype=torch.bool)
    pmask[0, :6], pmask[2, :8], pmask[4, :3] = True, True, True
    adv = torch.tensor([0.8, -0.6, -0.9, 0.4, 1.1])
    with torch.no_grad():
        lp, _ = linear_logprob_entropy(hidden[rmask], weight, ids[rmask])
    old = torch.zeros(B, T)
    old[rmask] = lp + 0.5 * torch.randn(lp.shape, generator=g)  # some tokens clipped
    return dict(hidden=hidden, weight=weight, ids=ids, rmask=rmask, pmask=pmask, adv=adv,
                old=old, iw=torch.rand(B, T, generator=g) * 2,
                adv_tok=torch.where(pmask, adv[:, None] - 0.3, adv[:, None]),
                bias=torch.randn(V, generator=g) * 0.3)


CASES = {
    "micro_scope_top20": dict(),
    "on_policy": dict(on_policy=True),
    "dual_clip_is_weights": dict(opts=dict(clip_c=3.0), iw=True),
    "clip_higher_temperature_bias": dict(opts=dict(clip_high=0.28, temperature=0.7), bias=True),
    "bonus_dr_grpo": dict(opts=dict(entropy_coef=0.01)),
    "bonus_token_mean": dict(opts=dict(entropy_coef=0.01, entropy_norm="token_mean")),
    "bonus_token_mean_global": dict(opts=dict(entropy_coef=0.01, entropy_norm="token_mean"),
                                    num_entropy_tokens=97),
    "official_per_token_adv": dict(per_token=True, opts=dict(clip_c=3.0, entropy_coef=0.001,
                                                             entropy_norm="token_mean")),
    "mini_batch_scope": dict(opts=dict(entropy_mask_scope="mini_batch"), keep=True),
    "all_prefix_tokens": dict(opts=dict(entropy_top_fraction=1.0)),
}


def to_packed(d, case):
    """The same tokens as one packed row: ``[R]`` per-token tensors and ``seq_index``."""
    m = d["rmask"]
    seq = torch.arange(B)[:, None].expand(B, T)[m]
    out = dict(hidden=d["hidden"][m], ids=d["ids"][m], rmask=torch.ones(int(m.sum()), dtype=bool),
               pmask=d["pmask"][m], old=d["old"][m], iw=d["iw"][m], seq_index=seq,
               adv=d["adv_tok"][m] if case.get("per_token") else d["adv"])
    return out


def call_args(d, case, packed, keep):
    p = to_packed(d, case) if packed else dict(d, seq_index=None,
                                               adv=d["adv_tok"] if case.get("per_token")
                                               else d["adv"])
    old = None if case.get("on_policy") else p["old"]
    kw = dict(num_sequences=B, loss_scale=0.5, seq_index=p["seq_index"],
              importance_weights=p["iw"] if case.get("iw") else None,
              num_entropy_tokens=case.get("num_entropy_tokens"),
              keep_prefix_mask=(keep[d["rmask"]] if packed else keep) if keep is not None
              else None)
    return p, old, kw


def run_path(path, d, case, packed, keep=None, dtype=torch.float32):
    loss_fn = PrefixRFTLoss(max_response_tokens=L_MAX, impl="torch", **case.get("opts", {}))
    p, old, kw = call_args(d, case, packed, keep)
    h = p["hidden"].to(dtype).clone().requires_grad_()
    w = d["weight"].to(dtype).clone().requires_grad_()
    b = d["bias"].to(dtype).clone().requires_grad_() if case.get("bias") else None
    if path == "fused":
        loss, metrics, _ = fused_prefix_rft_loss(loss_fn, h, w, p["ids"], old, p["adv"],
                                                 p["rmask"], p["pmask"], b, chunk_bytes=7 * V * 4,
                                                 **kw)
    elif path == "current":
        loss, metrics = loss_fn(h, w, p["ids"], old, p["adv"], p["rmask"], p["pmask"], b, **kw)
    else:  # fp64 full logits, the policy loss of prefix_rft_loss on them
        valid = p["rmask"]
        lp_v, ent_v = linear_logprob_entropy_reference(
            h[valid], w, p["ids"][valid], b, loss_fn.settings.temperature, dtype=torch.float64)
        lp = torch.zeros(valid.shape, dtype=torch.float64).index_put((valid,), lp_v)
        ent = torch.zeros(valid.shape, dtype=torch.float64).index_put((valid,), ent_v)
        opts = {k: v for k, v in case.get("opts", {}).items()
                if k not in ("temperature", "entropy_mask_scope")}
        loss, metrics = prefix_rft_loss(lp, old, p["adv"], valid, p["pmask"], ent,
                                        max_response_tokens=L_MAX, **opts, **kw)
    loss.backward()
    return [loss.detach(), h.grad, w.grad] + ([b.grad] if b is not None else []), metrics


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_current_and_fp64(name, packed):
    case, d = CASES[name], make_batch()
    keep = None
    if case.get("keep"):  # mini_batch scope: ranked before the pass, e.g. from old entropies
        with torch.no_grad():
            _, ent = linear_logprob_entropy(d["hidden"][d["rmask"]], d["weight"],
                                            d["ids"][d["rmask"]])
        full = torch.zeros(B, T).index_put((d["rmask"],), ent)
        keep = compute_keep_prefix_mask(full, d["rmask"], d["pmask"], entropy_top_fraction=0.2)
    truth, m64 = run_path("fp64", d, case, packed, keep)
    current, m_cur = run_path("current", d, case, packed, keep)
    fused, m_fused = run_path("fused", d, case, packed, keep)
    for name_t, f, c, t in zip(("loss", "dX", "dW", "db"), fused, current, truth):
        e_f, e_c = rel(f, t), rel(c, t)
        assert e_f <= e_c + TOL, f"{name_t}: fused {e_f:.2e} current {e_c:.2e}"
        assert rel(f, c) <= 2 * TOL, name_t
    for key in ("num_kept_prefix_tokens", "num_prefix_tokens", "num_tokens", "clip_frac_low",
                "clip_frac_high", "clip_frac_dual", "num_continuation_tokens"):
        assert m_fused[key] == m_cur[key] == m64[key], key
    for key in ("loss", "pg_loss", "entropy_bonus", "ratio_mean", "entropy_prefix",
                "entropy_continuation"):
        assert m_fused[key] == pytest.approx(m_cur[key], rel=1e-5, abs=1e-7), key


def test_entropy_mask_from_prefix_only_pass_equals_current_rule():
    """The prefix-only no-grad pass ranks the same tokens as the loss's own full forward."""
    d = make_batch(seed=5)
    loss_fn = PrefixRFTLoss(max_response_tokens=L_MAX, impl="torch", entropy_top_fraction=0.3)
    m = d["rmask"]
    _, ent = loss_fn.token_logprob_entropy(d["hidden"], d["weight"], d["ids"], m)
    expected = loss_fn.settings.entropy_mask.keep(d["pmask"] & m, ent.detach())[m]
    got = _kept_prefix(loss_fn.settings, d["hidden"][m], d["weight"], None, d["ids"][m],
                       d["pmask"][m], None)
    assert torch.equal(got, expected) and 0 < int(got.sum()) < int(d["pmask"][m].sum())


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fused_sft_equals_sft_loss(packed):
    d = make_batch(seed=2)
    loss_fn = PrefixRFTLoss(max_response_tokens=L_MAX, impl="torch")
    m = d["rmask"]
    hidden, ids, mask = (d["hidden"][m], d["ids"][m], m[m]) if packed else \
        (d["hidden"], d["ids"], m)
    outs = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), d["weight"].clone().requires_grad_()
        if fused:
            loss, metrics = fused_sft_loss(loss_fn, h, w, ids, mask, max_response_tokens=L_MAX,
                                           num_sequences=B, loss_scale=0.5)
        else:
            lp, _ = loss_fn.token_logprob_entropy(h, w, ids, mask)
            lp, mk = (lp[None], mask[None]) if packed else (lp, mask)
            loss, metrics = sft_loss(lp, mk, max_response_tokens=L_MAX, num_sequences=B,
                                     loss_scale=0.5)
        loss.backward()
        outs.append((loss.detach(), h.grad, w.grad, metrics))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        assert rel(a, b) < 1e-5
    assert outs[0][3]["num_tokens"] == outs[1][3]["num_tokens"]


def test_mini_batch_scope_needs_keep():
    d = make_batch()
    loss_fn = PrefixRFTLoss(max_response_tokens=L_MAX, impl="torch",
                            entropy_mask_scope="mini_batch")
    with pytest.raises(ValueError, match="keep_prefix_mask"):
        fused_prefix_rft_loss(loss_fn, d["hidden"], d["weight"], d["ids"], d["old"], d["adv"],
                              d["rmask"], d["pmask"])


# ------------------------------------------------------------------ through the trainer's update
@pytest.mark.parametrize("algo,packing,scope,fraction,epochs,coef", [
    ("prefix_rft", True, "micro_batch", 0.2, 1, 0.0),   # exactly on-policy update
    ("prefix_rft", False, "micro_batch", 0.2, 2, 0.01),  # old log-probs, padded, bonus
    ("prefix_rft", True, "mini_batch", 0.2, 2, 0.0),    # mini-batch ranking, moving policy
    ("sft", True, "micro_batch", 0.2, 1, 0.0),
])
def test_trainer_update_fused_equals_autograd(tmp_path, algo, packing, scope, fraction, epochs,
                                              coef):
    from test_packing_update import _assert_same, _run, _update

    runs, metrics = [], []
    for head_path in ("fused_loss", "autograd"):
        run = _run(tmp_path, packing=packing, budget=60, scope=scope, fraction=fraction,
                   epochs=epochs, lr=0.05, algo=algo, coef=coef)
        run.cfg.train.head_path = head_path
        runs.append(run)
        metrics.append(_update(run, algo)[1])
    _assert_same(runs[0], runs[1], metrics[0], metrics[1])
    assert metrics[0]["head_path_fused"] == 1.0 and metrics[1]["head_path_fused"] == 0.0
    if algo != "sft":
        assert metrics[0]["kept_prefix_frac"] == metrics[1]["kept_prefix_frac"] > 0


def test_fused_adapter_triton_pass_equals_current_path():
    """``impl="triton"`` (interpreter on CPU): the adapter's Triton pass, packed, per-token
    advantages, dual clip, entropy bonus, micro-batch entropy mask."""
    case, d = CASES["official_per_token_adv"], make_batch(seed=3)
    outs = []
    for impl in ("triton", "torch"):
        loss_fn = PrefixRFTLoss(max_response_tokens=L_MAX, impl=impl, **case["opts"])
        p, old, kw = call_args(d, case, True, None)
        h = p["hidden"].clone().requires_grad_()
        w = d["weight"].clone().requires_grad_()
        if impl == "triton":
            loss, m, _ = fused_prefix_rft_loss(loss_fn, h, w, p["ids"], old, p["adv"],
                                               p["rmask"], p["pmask"], **kw)
        else:
            loss, m = loss_fn(h, w, p["ids"], old, p["adv"], p["rmask"], p["pmask"], **kw)
        loss.backward()
        outs.append((loss.detach(), h.grad, w.grad, m))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        assert rel(a, b) < 2e-5
    assert outs[0][3]["num_kept_prefix_tokens"] == outs[1][3]["num_kept_prefix_tokens"]
