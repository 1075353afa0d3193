"""The policy loss with per-token ``[B, T]`` advantages and the entropy-bonus normalizer
(``entropy_norm``), against an independent fp64 per-token reference."""

from __future__ import annotations

import pytest
import torch

from prefix_rft.advantage import token_advantages
from prefix_rft.loss import PrefixRFTLoss, prefix_rft_loss

B, T, L_MAX = 3, 7, 10


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(B, T, generator=g)
    ent = (torch.rand(B, T, generator=g) * 2).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 3:] = False
    pre = torch.zeros(B, T, dtype=torch.bool)
    pre[0, :3] = True
    pre[2, :2] = True
    return lp, old, ent, mask, pre


def _reference(lp, old, ent, adv_bt, mask, pre, *, clip=0.2, clip_c=None, coef=0.0,
               ent_denom=None):
    """Per-token Prefix-RFT loss in fp64, written out (fraction 1: every prefix token kept)."""
    total = 0.0
    cont_ent = 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            a = float(adv_bt[b, t])
            ratio = torch.exp(lp[b, t].double() - old[b, t].double())
            loss_t = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
            if clip_c is not None and a < 0:
                loss_t = torch.minimum(loss_t, torch.tensor(-a * clip_c, dtype=torch.float64))
            total = total + loss_t
            if not pre[b, t]:
                cont_ent = cont_ent + ent[b, t].double()
    denom = B * L_MAX
    return total / denom - coef * cont_ent / (ent_denom if ent_denom is not None else denom)


def test_per_token_advantages_match_the_written_out_loss():
    lp, old, ent, mask, pre = _batch()
    adv = token_advantages(torch.tensor([1.0, -0.5, 0.25]), torch.tensor([0.4, -0.5, -1.0]), pre)
    loss, _ = prefix_rft_loss(lp, old, adv, mask, pre, ent, max_response_tokens=L_MAX,
                              entropy_top_fraction=1.0, clip_c=3.0)
    ref = _reference(lp, old, ent, adv, mask, pre, clip_c=3.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-9)
    (g,) = torch.autograd.grad(loss, lp)
    (g_ref,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-5, atol=1e-8)


def test_rowwise_constant_token_advantages_equal_the_per_rollout_form():
    lp, old, ent, mask, pre = _batch(1)
    adv = torch.tensor([0.5, -1.0, 0.0])
    kwargs = dict(max_response_tokens=L_MAX, entropy_top_fraction=0.5, entropy_coef=0.01)
    a, _ = prefix_rft_loss(lp, old, adv, mask, pre, ent, **kwargs)
    b, _ = prefix_rft_loss(lp, old, adv[:, None].expand(B, T).contiguous(), mask, pre, ent,
                           **kwargs)
    assert a.item() == b.item()


def test_fused_module_takes_per_token_advantages():
    torch.manual_seed(0)
    H, V = 8, 11
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    _, _, _, mask, pre = _batch()
    fn = PrefixRFTLoss(max_response_tokens=L_MAX, entropy_top_fraction=1.0, impl="torch")
    with torch.no_grad():
        old, _ = fn.token_logprob_entropy(hidden, weight, ids, mask)
    adv = token_advantages(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([-0.5, 0.0, 2.0]), pre)
    loss, metrics = fn(hidden, weight, ids, old, adv, mask, pre)
    loss.backward()
    assert hidden.grad.abs().sum() > 0 and metrics["num_tokens"] == int(mask.sum())
    with pytest.raises(ValueError, match=r"advantages must have shape \(3,\) or \(3, 7\)"):
        fn(hidden, weight, ids, old, adv[:, :4], mask, pre)


def test_token_mean_entropy_bonus_is_the_continuation_token_mean():
    lp, old, ent, mask, pre = _batch(2)
    adv = torch.zeros(B)
    cont = mask & ~pre
    kwargs = dict(max_response_tokens=L_MAX, entropy_top_fraction=1.0, entropy_coef=0.5)
    loss, m = prefix_rft_loss(lp, old, adv, mask, pre, ent, entropy_norm="token_mean", **kwargs)
    want = ent.detach()[cont].mean().item()
    assert m["entropy_bonus"] == pytest.approx(want, rel=1e-6)
    assert loss.item() == pytest.approx(-0.5 * want, rel=1e-6)
    dr, m_dr = prefix_rft_loss(lp, old, adv, mask, pre, ent, **kwargs)  # dr_grpo: / (B * L_max)
    assert m_dr["entropy_bonus"] == pytest.approx(ent.detach()[cont].sum().item() / (B * L_MAX))


def test_token_mean_micro_batches_sum_to_the_full_batch_gradient():
    lp, old, ent, mask, pre = _batch(3)
    adv = torch.tensor([1.0, -1.0, 0.5])
    kwargs = dict(max_response_tokens=L_MAX, entropy_top_fraction=1.0, entropy_coef=0.1,
                  entropy_norm="token_mean")
    full, _ = prefix_rft_loss(lp, old, adv, mask, pre, ent, **kwargs)
    g_full = torch.autograd.grad(full, (lp, ent))
    n_cont = int((mask & ~pre).sum())
    parts = [prefix_rft_loss(lp[s], old[s], adv[s], mask[s], pre[s], ent[s], num_sequences=B,
                             num_entropy_tokens=n_cont, **kwargs)[0]
             for s in (slice(0, 1), slice(1, 3))]
    g_parts = torch.autograd.grad(sum(parts), (lp, ent))
    for a, b in zip(g_full, g_parts):
        torch.testing.assert_close(a, b)


def test_entropy_norm_is_checked():
    lp, old, ent, mask, pre = _batch()
    with pytest.raises(ValueError, match="entropy_norm"):
        prefix_rft_loss(lp, old, torch.zeros(B), mask, pre, ent, max_response_tokens=L_MAX,
                        entropy_norm="sum")
    with pytest.raises(ValueError, match="entropy_norm"):
        PrefixRFTLoss(max_response_tokens=L_MAX, entropy_norm="mean")
