"""The fused head-and-loss (``linear_policy_loss``, 6NHV) against an fp64 full-logits reference
and same-dtype full-logits torch: loss, dX, dW (and db), every loss option, odd shapes."""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import make_problem, rel_rms
from prefix_rft.kernels import linear_policy_loss, linear_policy_loss_reference

TOL = 1e-5  # err(kernel) <= err(full-logits torch, same dtype) + TOL, relative RMS per tensor


def loss_inputs(n, labels, *, seed=1, old_lp=None, iw=False, keep=False):
    g = torch.Generator().manual_seed(seed)
    kw = dict(advantages=torch.randn(n, generator=g), loss_weight=0.5 + torch.rand(n, generator=g))
    if old_lp is not None:  # near the current policy, so some tokens are clipped, some not
        kw["old_logprob"] = old_lp.float() + 0.4 * torch.randn(n, generator=g)
    if iw:
        kw["importance_weights"] = torch.rand(n, generator=g) * 2
    if keep:
        kw["keep"] = torch.rand(n, generator=g) < 0.6
    return kw


def run(fn, hidden, weight, bias, labels, **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_()
              for t in (hidden, weight, bias)]
    loss, lp, ent = fn(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    loss.backward()
    return [loss.detach(), *(None if t is None else t.grad for t in leaves)], lp, ent


def check_three_way(hidden, weight, bias, labels, impl="torch", chunk_bytes=2**30, tol=TOL,
                    **kw):
    """fp64 truth vs full-logits torch (input dtype upcast to fp32) vs the fused path."""
    truth, lp64, ent64 = run(linear_policy_loss_reference, hidden.double(), weight.double(),
                             None if bias is None else bias.double(), labels, **kw)
    same, _, _ = run(linear_policy_loss_reference, hidden, weight, bias, labels,
                     dtype=torch.float32, **kw)
    got, lp, ent = run(linear_policy_loss, hidden, weight, bias, labels, impl=impl,
                       chunk_bytes=chunk_bytes, **kw)
    errs = []
    for name, g, s, t in zip(("loss", "dX", "dW", "db"), got, same, truth):
        if t is None:
            continue
        e_k, e_t = rel_rms(g, t), rel_rms(s, t)
        assert e_k <= e_t + tol, f"{name}: kernel {e_k:.2e} vs torch {e_t:.2e}"
        errs.append(e_k)
    assert rel_rms(lp, lp64) <= max(tol, 1e-5) and rel_rms(ent, ent64) <= max(tol, 1e-5)
    return max(errs)


OPTIONS = {
    "ppo_on_policy": dict(),
    "ppo_old_clip": dict(old=True),
    "dual_clip": dict(old=True, clip_c=3.0),
    "clip_higher": dict(old=True, clip_low=0.2, clip_high=0.28),
    "importance_weights": dict(old=True, iw=True, clip_c=3.0),
    "entropy_mask_keep": dict(old=True, keep=True),
    "entropy_bonus_per_token": dict(old=True, entropy="tensor"),
    "entropy_bonus_scalar": dict(entropy=0.01),
    "temperature": dict(old=True, temperature=0.7, entropy="tensor", clip_c=2.0),
    "nll": dict(loss_type="nll"),
}


def build_kwargs(opt, hidden, weight, labels):
    n = labels.numel()
    old_lp = None
    if opt.get("old"):
        old_lp, _ = linear_policy_loss_reference(
            hidden, weight, labels, advantages=0.0, temperature=opt.get("temperature", 1.0))[1:]
    kw = loss_inputs(n, labels, old_lp=old_lp, iw=opt.get("iw"), keep=opt.get("keep"))
    for key in ("clip_c", "clip_low", "clip_high", "temperature", "loss_type"):
        if key in opt:
            kw[key] = opt[key]
    ent = opt.get("entropy")
    if ent == "tensor":  # e.g. a bonus on continuation tokens only
        kw["entropy_weight"] = 0.02 * (torch.rand(n) < 0.7).float()
    elif ent is not None:
        kw["entropy_weight"] = ent
    if kw.get("loss_type") == "nll":
        kw.pop("advantages")
    return kw


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("chunk_bytes", [2**30, 7 * 507 * 4])  # one chunk / 7-row chunks
@pytest.mark.parametrize("row_passes", ["native", "torch"])
def test_torch_path_matches_fp64(option, chunk_bytes, row_passes, monkeypatch):
    import prefix_rft.kernels.linear_policy_loss_torch as torch_path

    if row_passes == "torch":  # the plain-torch passes (no compiler, or switched off)
        monkeypatch.setattr(torch_path, "_row_pass_lib", lambda device: None)
    elif torch_path._row_pass_lib(torch.device("cpu")) is None:
        pytest.skip("no native CPU row passes here (tests/test_cpu_softmax_rows.py says why)")
    monkeypatch.setattr(torch_path, "BLOCK_BYTES", 3 * 507 * 4)  # 3-row softmax blocks
    hidden, weight, labels, bias = make_problem(63, 123, 507, with_bias=option == "nll")
    kw = build_kwargs(OPTIONS[option], hidden, weight, labels)
    check_three_way(hidden, weight, bias, labels, chunk_bytes=chunk_bytes, **kw)


def test_bf16_inputs_upcast():
    """bf16 hidden/weight: the torch path computes in fp32 from the bf16 values."""
    hidden, weight, labels, _ = make_problem(37, 65, 301, dtype=torch.bfloat16)
    kw = build_kwargs(OPTIONS["dual_clip"], hidden.float(), weight.float(), labels)
    check_three_way(hidden, weight, None, labels, **kw)


def test_backward_scales_by_upstream_and_no_grad():
    hidden, weight, labels, _ = make_problem(20, 33, 97)
    adv = torch.randn(20)
    a, _, _ = run(linear_policy_loss, hidden, weight, None, labels, advantages=adv)
    h = hidden.clone().requires_grad_()
    loss, _, _ = linear_policy_loss(h, weight, labels, advantages=adv)
    (loss * 2.5).backward()
    torch.testing.assert_close(h.grad, a[1] * 2.5)
    with torch.no_grad():
        loss2, lp, ent = linear_policy_loss(h, weight, labels, advantages=adv)
    assert not loss2.requires_grad and torch.allclose(loss2, a[0])


def test_all_ignored_and_empty():
    hidden, weight, labels, _ = make_problem(9, 17, 50)
    labels[:] = -100
    out, lp, ent = run(linear_policy_loss, hidden, weight, None, labels, advantages=1.0)
    assert out[0].item() == 0 and out[1].abs().sum() == 0 and out[2].abs().sum() == 0
    h = torch.zeros(0, 17, requires_grad=True)
    loss, lp, _ = linear_policy_loss(h, weight, labels[:0], advantages=1.0)
    loss.backward()
    assert loss.item() == 0 and lp.shape == (0,) and h.grad.shape == (0, 17)


@pytest.mark.parametrize("kwargs, match", [
    (dict(advantages=None), "advantages"),
    (dict(advantages=torch.ones(3)), "advantages"),
    (dict(advantages=1.0, loss_weight=torch.ones(4, 1)), "loss_weight"),
    (dict(advantages=1.0, keep=torch.ones(5)), "keep"),
    (dict(advantages=1.0, clip_c=0.5), "clip_c"),
    (dict(advantages=1.0, loss_type="kl"), "loss_type"),
    (dict(advantages=1.0, chunk_bytes=0), "chunk_bytes"),
    (dict(advantages=1.0, impl="cuda"), "impl"),
])
def test_bad_input_names_argument(kwargs, match):
    hidden, weight, labels, _ = make_problem(5, 8, 11)
    with pytest.raises(ValueError, match=match):
        linear_policy_loss(hidden, weight, labels, **kwargs)


def test_qwen_vocab_with_default_budget():
    """V = 151,936 with the default chunk budget and softmax blocks (several blocks per chunk)."""
    hidden, weight, labels, _ = make_problem(19, 8, 151936, ignore_frac=0.2)
    kw = build_kwargs(OPTIONS["temperature"], hidden, weight, labels)
    check_three_way(hidden, weight, None, labels, chunk_bytes=None, **kw)
