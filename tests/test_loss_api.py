"""Public-API conveniences of prefix_rft_loss / PrefixRFTLoss used by other trainers (TRL):
on-policy ``old_logprob=None``, float 0/1 masks, per-token importance weights, and gradient
accumulation through ``num_sequences = B_micro x steps``. Each is compared with an
independent fp64 computation of the formula, not with the function itself."""

import pytest
import torch

from prefix_rft.loss import PrefixRFTLoss, prefix_rft_loss


def _batch(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logprob = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logprob + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    return logprob, old, adv, mask


def _reference(logprob, old, adv, mask, weights, denom, clip=0.2):
    """fp64 Dr. GRPO token loss (no prefix), written out independently."""
    ratio = torch.exp(logprob - old)
    a = adv[:, None]
    tok = torch.maximum(-ratio * a, -ratio.clamp(1 - clip, 1 + clip) * a) * weights
    return (tok * mask).sum() / denom


def test_on_policy_none_equals_detached_and_gradient():
    logprob, _, adv, mask = _batch()
    lp = logprob.clone().requires_grad_(True)
    loss, m = prefix_rft_loss(lp, None, adv, mask, torch.zeros_like(mask), None,
                              max_response_tokens=8, entropy_top_fraction=1.0)
    loss.backward()
    # rho = 1: loss = -sum(A m) / (B L), gradient -A m / (B L)
    expect = -(adv[:, None] * mask).sum() / (4 * 8)
    assert torch.allclose(loss.double(), expect, rtol=1e-6)
    assert torch.allclose(lp.grad, -(adv[:, None] * mask) / 32, rtol=1e-6)
    assert m["ratio_mean"] == pytest.approx(1.0)


def test_float_masks_equal_bool_masks_and_bad_values_rejected():
    logprob, old, adv, mask = _batch()
    args = dict(max_response_tokens=8, entropy_top_fraction=1.0)
    pre = torch.zeros_like(mask)
    pre[0, :2] = True
    a, _ = prefix_rft_loss(logprob, old, adv, mask, pre, None, **args)
    b, _ = prefix_rft_loss(logprob, old, adv, mask.double() * 1.0, pre.float(), None, **args)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="prefix_mask"):
        prefix_rft_loss(logprob, old, adv, mask, pre.float() * 0.5, None, **args)


@pytest.mark.parametrize("shape", ["token", "sequence"])
def test_importance_weights_scale_token_losses(shape):
    logprob, old, adv, mask = _batch(seed=1)
    g = torch.Generator().manual_seed(2)
    cols = 6 if shape == "token" else 1
    w = torch.rand(4, cols, generator=g, dtype=torch.float64) * 2
    w[0, 0] = 0.0  # a masked-out (token_mask mode) position
    lp = logprob.clone().requires_grad_(True)
    loss, _ = prefix_rft_loss(lp, old, adv, mask, torch.zeros_like(mask), None,
                              max_response_tokens=8, entropy_top_fraction=1.0,
                              importance_weights=w)
    ref_lp = logprob.clone().requires_grad_(True)
    ref = _reference(ref_lp, old, adv, mask, w.expand(4, 6), 4 * 8)
    ref.backward()
    loss.backward()
    assert torch.allclose(loss.double(), ref, rtol=1e-6)
    assert torch.allclose(lp.grad, ref_lp.grad, rtol=1e-5, atol=1e-9)


def test_accumulation_num_sequences_is_b_micro_times_steps():
    """Two micro-batches with num_sequences = 2 x 2 sum to the full batch's loss and gradient."""
    logprob, old, adv, mask = _batch(seed=3)
    kw = dict(max_response_tokens=8, entropy_top_fraction=1.0)
    full_lp = logprob.clone().requires_grad_(True)
    full, _ = prefix_rft_loss(full_lp, old, adv, mask, torch.zeros_like(mask), None, **kw)
    full.backward()
    lp = logprob.clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 2), slice(2, 4)):
        part, _ = prefix_rft_loss(lp[sl], old[sl], adv[sl], mask[sl], torch.zeros_like(mask[sl]),
                                  None, num_sequences=2 * 2, **kw)
        part.backward()
        total = total + part.detach()
    assert torch.allclose(total, full.detach(), rtol=1e-6)
    assert torch.allclose(lp.grad, full_lp.grad, rtol=1e-6)


def test_module_forward_accepts_none_and_weights():
    torch.manual_seed(0)
    B, T, H, V = 2, 5, 8, 37
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    loss_fn = PrefixRFTLoss(max_response_tokens=T, entropy_top_fraction=1.0, impl="torch")
    w = torch.full((B, 1), 0.5)
    loss, _ = loss_fn(hidden, weight, ids, None, torch.tensor([1.0, -1.0]), mask,
                      torch.zeros(B, T), importance_weights=w)
    loss.backward()
    # rho = 1 on-policy: loss = -sum(w A m) / (B T)
    expect = -(0.5 * torch.tensor([1.0, -1.0])[:, None] * mask).sum() / (B * T)
    assert torch.allclose(loss, expect, rtol=1e-6)
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert hidden.grad.abs().sum() > 0
