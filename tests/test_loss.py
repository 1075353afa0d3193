"""Prefix-RFT policy loss, PrefixRFTLoss, micro-batching and SFT (prefix_rft/loss.py).

The reference below is written independently of the implementation: full fp64 logits, a
Python loop over tokens, the clip written case by case (A ≥ 0: −A·min(ρ, 1+ε_h); A < 0:
−A·max(ρ, 1−ε_l), capped at −A·c), the entropy mask by sorting a Python list with exact
fractions.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefix_rft.loss import (
    PrefixRFTLoss,
    compute_keep_prefix_mask,
    prefix_rft_loss,
    sft_loss,
    split_micro_batches,
)

B, T, H, V, L_MAX = 5, 7, 12, 37, 10


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _reference_keep(ent, cand, fraction):
    positions = [(b, t) for b in range(cand.shape[0]) for t in range(cand.shape[1]) if cand[b, t]]
    n = len(positions)
    n_keep = n - math.floor((1 - Fraction(str(fraction))) * n)
    ranked = sorted(positions, key=lambda bt: (-float(ent[bt]), bt))  # ties: earlier first
    return set(ranked[:n_keep])


def _reference_loss(hidden, weight, bias, ids, old, adv, rmask, pmask, opts, num_sequences=None):
    """fp64, full logits, token loop. Returns (loss, kept positions)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logp = (z / opts.get("temperature", 1.0)).log_softmax(-1)
    lp = logp.gather(-1, ids.clamp_min(0)[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    cand = pmask & rmask
    kept = _reference_keep(ent.detach(), cand, opts.get("entropy_top_fraction", 0.2))
    cl, ch, c = opts.get("clip_low", 0.2), opts.get("clip_high", 0.2), opts.get("clip_c")
    coef = opts.get("entropy_coef", 0.0)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if not rmask[b, t]:
                continue
            a = float(adv[b]) if (not pmask[b, t] or (b, t) in kept) else 0.0
            rho = torch.exp(lp[b, t] - old[b, t].double())
            if a >= 0:
                tok = -a * torch.minimum(rho, torch.tensor(1 + ch, dtype=torch.float64))
            else:
                tok = -a * torch.maximum(rho, torch.tensor(1 - cl, dtype=torch.float64))
                if c is not None:
                    tok = torch.minimum(tok, torch.tensor(-a * c, dtype=torch.float64))
            total = total + tok
            if coef and not pmask[b, t]:
                total = total - coef * ent[b, t]
    n_seq = num_sequences or ids.shape[0]
    return total / (n_seq * L_MAX), kept, lp.detach()


def _batch(seed=0, with_prefix=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g) * 1.5
    weight = torch.randn(V, H, generator=g) * 0.7
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 5, 6, 3, 7])
    rmask = torch.arange(T)[None, :] < lengths[:, None]
    ids = torch.where(rmask, ids, -1)  # padding ids must never reach the kernel
    pmask = torch.zeros(B, T, dtype=torch.bool)
    if with_prefix:
        pmask[0, :4] = True
        pmask[2, :5] = True
        pmask[4, :2] = True
    adv = torch.tensor([0.8, -0.6, -0.9, 0.4, 1.1])
    return hidden, weight, ids, rmask, pmask, adv


CASES = {
    "no_prefix": dict(with_prefix=False, opts=dict()),
    "prefix_top20": dict(with_prefix=True, opts=dict()),
    "prefix_all_tokens": dict(with_prefix=True, opts=dict(entropy_top_fraction=1.0)),
    "dual_clip_bonus_temp_bias": dict(
        with_prefix=True,
        bias=True,
        opts=dict(
            clip_c=1.3, entropy_coef=0.05, temperature=0.7, clip_high=0.28, entropy_top_fraction=0.4
        ),
    ),
}


@pytest.mark.parametrize(
    "case, impl",
    [(c, "torch") for c in CASES]
    + [("dual_clip_bonus_temp_bias", "triton")],  # triton: interpreter on CPU
)
def test_module_matches_fp64_reference(case, impl):
    spec = CASES[case]
    hidden, weight, ids, rmask, pmask, adv = _batch(1, spec["with_prefix"])
    bias = torch.randn(V) * 0.3 if spec.get("bias") else None
    opts = spec["opts"]
    # old log-probs: the current fp64 ones plus noise wide enough to hit both clip sides.
    with torch.no_grad():
        z = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0.0)
        lp0 = (
            (z / opts.get("temperature", 1.0))
            .log_softmax(-1)
            .gather(-1, ids.clamp_min(0)[..., None])
            .squeeze(-1)
        )
    old = (lp0 + (torch.rand(B, T, generator=torch.Generator().manual_seed(5)) - 0.5) * 1.2).float()

    h_ref, w_ref = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref, kept, _ = _reference_loss(h_ref, w_ref, bias, ids, old, adv, rmask, pmask, opts)
    ref.backward()

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_fn = PrefixRFTLoss(max_response_tokens=L_MAX, impl=impl, **opts)
    loss, metrics = loss_fn(h, w, ids, old, adv, rmask, pmask, bias)
    loss.backward()

    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    assert _rel_err(h.grad, h_ref.grad) < 1e-5
    assert _rel_err(w.grad, w_ref.grad) < 1e-5
    assert metrics["num_kept_prefix_tokens"] == len(kept)
    assert metrics["num_prefix_tokens"] == int((pmask & rmask).sum())
    assert metrics["num_tokens"] == int(rmask.sum())
    # The noise puts tokens past both clip edges (and past the dual-clip cap when enabled).
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0
    if opts.get("clip_c") is not None:
        assert metrics["clip_frac_dual"] > 0
    assert metrics["ratio_min"] < 0.8 < 1.2 < metrics["ratio_max"]


def test_clip_metrics_match_definitions():
    lp = torch.zeros(1, 6)
    old = -torch.log(torch.tensor([[0.5, 0.9, 1.5, 3.0, 1.5, 0.5]]))  # ratios
    rmask = torch.ones(1, 6, dtype=torch.bool)
    pmask = torch.zeros(1, 6, dtype=torch.bool)
    _, m_pos = prefix_rft_loss(
        lp,
        old,
        torch.tensor([1.0]),
        rmask,
        pmask,
        None,
        max_response_tokens=6,
        entropy_top_fraction=1.0,
        clip_c=2.0,
    )
    _, m_neg = prefix_rft_loss(
        lp,
        old,
        torch.tensor([-1.0]),
        rmask,
        pmask,
        None,
        max_response_tokens=6,
        entropy_top_fraction=1.0,
        clip_c=2.0,
    )
    assert m_pos["clip_frac_high"] == pytest.approx(3 / 6) and m_pos["clip_frac_low"] == 0
    assert m_neg["clip_frac_low"] == pytest.approx(2 / 6) and m_neg["clip_frac_high"] == 0
    assert m_neg["clip_frac_dual"] == pytest.approx(1 / 6) and m_pos["clip_frac_dual"] == 0
    assert m_pos["ratio_max"] == pytest.approx(3.0) and m_pos["ratio_min"] == pytest.approx(0.5)
    # A = -1, dual clip at 2: tokens lose max(ρ, 0.8) capped at 2 -> 0.8+0.9+1.5+2+1.5+0.8
    assert m_neg["pg_loss"] == pytest.approx((0.8 + 0.9 + 1.5 + 2.0 + 1.5 + 0.8) / 6, rel=1e-6)


def test_entropy_mask_keeps_exactly_expected_tokens():
    ent = torch.tensor([[0.1, 0.9, 0.5, 0.3, 2.0, 0.0], [0.7, 0.2, 0.8, 5.0, 0.0, 0.0]])
    rmask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    pmask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    # 6 prefix candidates (entropies .1 .9 .5 .3 | .7 .2), fraction 0.5 -> keep .9, .7, .5
    expected_kept = torch.zeros(2, 6, dtype=torch.bool)
    expected_kept[0, 1] = expected_kept[1, 0] = expected_kept[0, 2] = True
    continuation = rmask & ~pmask
    lp = torch.zeros(2, 6, requires_grad=True)
    loss, m = prefix_rft_loss(
        lp,
        lp.detach(),
        torch.tensor([1.0, 2.0]),
        rmask,
        pmask,
        ent,
        max_response_tokens=6,
        entropy_top_fraction=0.5,
    )
    loss.backward()
    assert torch.equal(lp.grad != 0, continuation | expected_kept)
    assert torch.equal(
        compute_keep_prefix_mask(ent, rmask, pmask, entropy_top_fraction=0.5), expected_kept
    )
    assert m["num_kept_prefix_tokens"] == 3 and m["kept_prefix_frac"] == 0.5
    assert m["entropy_prefix"] == pytest.approx((0.1 + 0.9 + 0.5 + 0.3 + 0.7 + 0.2) / 6)
    assert m["entropy_continuation"] == pytest.approx((2.0 + 0.8 + 5.0) / 3)
    # The dropped prefix tokens stay in the count: normalizer is B * L_max, not kept tokens.
    # Row 0: A=1 on 2 kept + 1 continuation; row 1: A=2 on 1 kept + 2 continuation; ρ = 1.
    assert loss.item() == pytest.approx(-(1.0 * (2 + 1) + 2.0 * (1 + 2)) / (2 * 6))
    # A precomputed keep mask overrides the entropy ranking.
    override = torch.zeros(2, 6, dtype=torch.bool)
    override[0, 0] = True
    lp.grad = None
    loss, _ = prefix_rft_loss(
        lp,
        lp.detach(),
        torch.tensor([1.0, 2.0]),
        rmask,
        pmask,
        None,
        max_response_tokens=6,
        keep_prefix_mask=override,
    )
    loss.backward()
    assert torch.equal(lp.grad != 0, continuation | override)


def test_padding_garbage_never_leaks():
    lp = torch.randn(2, 4)
    lp[1, 2:] = torch.nan
    lp.requires_grad_()
    old = torch.zeros(2, 4)
    old[0, 3] = torch.inf
    rmask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    ent = torch.rand(2, 4)
    ent[1, 3] = torch.nan
    loss, m = prefix_rft_loss(
        lp,
        old,
        torch.tensor([1.0, -1.0]),
        rmask,
        torch.zeros_like(rmask),
        ent,
        max_response_tokens=4,
        entropy_coef=0.1,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert (lp.grad[~rmask] == 0).all()
    assert all(math.isfinite(v) for v in m.values())


def _micro_batch_grads(scope, fraction, max_tokens):
    hidden, weight, ids, rmask, pmask, adv = _batch(3)
    old = torch.randn(B, T) * 0.3 - 3.0
    lengths = rmask.sum(1)
    opts = dict(
        max_response_tokens=L_MAX,
        impl="torch",
        entropy_top_fraction=fraction,
        clip_c=2.0,
        entropy_coef=0.01,
    )
    full_fn = PrefixRFTLoss(**opts)
    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    full_loss, _ = full_fn(h_full, w_full, ids, old, adv, rmask, pmask)
    full_loss.backward()

    mb_fn = PrefixRFTLoss(entropy_mask_scope=scope, **opts)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    parts = split_micro_batches(lengths, max_tokens=max_tokens)
    assert len(parts) > 1
    slices = []
    for idx in parts:
        width = int(lengths[idx].max())  # each micro-batch padded to its own width
        slices.append((idx, width))
    keeps = [None] * len(parts)
    if scope == "mini_batch" and fraction < 1:
        with torch.no_grad():  # the mini_batch mask pass: entropies only, no graph
            ents = [
                mb_fn.token_logprob_entropy(hidden[idx, :wd], weight, ids[idx, :wd],
                                            rmask[idx, :wd])[1]
                for idx, wd in slices
            ]
        keeps = compute_keep_prefix_mask(
            ents,
            [rmask[i, :wd] for i, wd in slices],
            [pmask[i, :wd] for i, wd in slices],
            entropy_top_fraction=fraction,
        )
    total = 0.0
    for (idx, wd), keep in zip(slices, keeps):
        loss, _ = mb_fn(
            h[idx, :wd],
            w,
            ids[idx, :wd],
            old[idx, :wd],
            adv[idx],
            rmask[idx, :wd],
            pmask[idx, :wd],
            num_sequences=B,
            keep_prefix_mask=keep,
        )
        loss.backward()
        total += loss.item()
    return (full_loss.item(), h_full.grad, w_full.grad), (total, h.grad, w.grad)


@pytest.mark.parametrize(
    "scope, fraction", [("mini_batch", 0.2), ("mini_batch", 0.5), ("micro_batch", 1.0)]
)
def test_micro_batch_accumulation_equals_full_batch(scope, fraction):
    (l_full, gh_full, gw_full), (l_acc, gh, gw) = _micro_batch_grads(scope, fraction, max_tokens=14)
    assert l_acc == pytest.approx(l_full, rel=1e-5, abs=1e-7)
    assert _rel_err(gh, gh_full) < 1e-5
    assert _rel_err(gw, gw_full) < 1e-5


def test_unified_view_policy_gradient_equals_sft_gradient():
    hidden, weight, ids, rmask, pmask, _ = _batch(4)
    fn = PrefixRFTLoss(max_response_tokens=L_MAX, impl="torch", entropy_top_fraction=1.0)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    old, _ = fn.token_logprob_entropy(hidden, weight, ids, rmask)
    loss, m = fn(h1, w1, ids, old.detach(), torch.ones(B), rmask, pmask)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, _ = fn.token_logprob_entropy(h2, w2, ids, rmask)
    nll, _ = sft_loss(lp, rmask, max_response_tokens=L_MAX, normalizer="max_tokens")
    nll.backward()
    assert m["ratio_max"] == pytest.approx(1.0) and m["kept_prefix_frac"] == 1.0
    assert _rel_err(h1.grad, h2.grad) < 1e-6 and _rel_err(w1.grad, w2.grad) < 1e-6
    assert h1.grad.abs().sum() > 0


def test_sft_loss_normalizers():
    lp = -torch.rand(3, 4) - 0.1
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    nll = -(lp * mask).sum().item()
    cases = [
        (dict(max_response_tokens=6), nll / (3 * 6)),
        (dict(max_response_tokens=6, num_sequences=5), nll / (5 * 6)),
        (dict(normalizer="tokens"), nll / 7),
        (dict(normalizer="tokens", num_tokens=20), nll / 20),
        (dict(normalizer="sequences"), nll / 3),
        (dict(normalizer="sequences", loss_scale=0.5), nll / 6),
    ]
    for kwargs, expected in cases:
        loss, m = sft_loss(lp, mask, **kwargs)
        assert loss.item() == pytest.approx(expected, rel=1e-6), kwargs
        assert m["nll_per_token"] == pytest.approx(nll / 7, rel=1e-6) and m["num_tokens"] == 7


@given(
    counts=st.lists(st.integers(0, 30), max_size=25),
    budget=st.integers(1, 60),
    count=st.sampled_from(["padded", "tokens"]),
)
@settings(max_examples=200, deadline=None)
def test_split_micro_batches_property(counts, budget, count):
    parts = split_micro_batches(counts, max_tokens=budget, count=count)
    assert [i for p in parts for i in p] == list(range(len(counts)))
    for p in parts:
        assert p
        cost = (
            len(p) * max(counts[i] for i in p) if count == "padded" else sum(counts[i] for i in p)
        )
        assert cost <= budget or len(p) == 1
    for a, b in zip(parts, parts[1:]):  # greedy: the next sequence did not fit
        joined = a + [b[0]]
        cost = (
            len(joined) * max(counts[i] for i in joined)
            if count == "padded"
            else sum(counts[i] for i in joined)
        )
        assert cost > budget


def test_hf_alignment_of_documented_slice():
    transformers = pytest.importorskip("transformers", reason="alignment check needs transformers")
    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    prompt, response = torch.randint(0, 64, (2, 4)), torch.randint(0, 64, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    P, Tr = prompt.shape[1], response.shape[1]
    with torch.no_grad():
        ids = torch.cat([prompt, response], 1)
        hidden = model.model(input_ids=ids).last_hidden_state[:, P - 1 : P - 1 + Tr]
        logits = model(input_ids=ids).logits[:, P - 1 : P - 1 + Tr].double()
    fn = PrefixRFTLoss(max_response_tokens=8, impl="torch", temperature=0.9)
    lp, ent = fn.token_logprob_entropy(hidden, model.lm_head.weight, response, mask)
    ref = (logits / 0.9).log_softmax(-1)
    torch.testing.assert_close(
        lp.double(), ref.gather(-1, response[..., None]).squeeze(-1), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=1e-5)


def _good_args():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    return dict(
        logprob=lp,
        old_logprob=lp,
        advantages=torch.ones(2),
        response_mask=m,
        prefix_mask=~m,
        entropy=lp,
        max_response_tokens=4,
    )


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(logprob=torch.zeros(6)), "logprob"),
        (dict(old_logprob=torch.zeros(2, 4)), "old_logprob"),
        (dict(advantages=torch.ones(3)), "advantages"),
        (dict(advantages=torch.ones(2, dtype=torch.long)), "advantages"),
        (dict(response_mask=torch.full((2, 3), 0.5)), "response_mask"),
        (dict(importance_weights=torch.ones(2, 2)), "importance_weights"),
        (dict(prefix_mask=torch.ones(3, 2, dtype=torch.bool)), "prefix_mask"),
        (dict(entropy=torch.zeros(2)), "entropy"),
        (dict(entropy=None), "entropy"),
        (dict(max_response_tokens=0), "max_response_tokens"),
        (dict(clip_low=1.0), "clip_low"),
        (dict(clip_high=-0.1), "clip_high"),
        (dict(clip_c=0.5), "clip_c"),
        (dict(entropy_top_fraction=0.0), "entropy_top_fraction"),
        (dict(entropy_coef=float("nan")), "entropy_coef"),
        (dict(num_sequences=1), "num_sequences"),
        (dict(keep_prefix_mask=torch.ones(2, 2, dtype=torch.bool)), "keep_prefix_mask"),
    ],
)
def test_policy_loss_bad_inputs(change, name):
    kwargs = {**_good_args(), **change}
    args = [
        kwargs.pop(k)
        for k in ("logprob", "old_logprob", "advantages", "response_mask", "prefix_mask", "entropy")
    ]
    with pytest.raises(ValueError, match=name):
        prefix_rft_loss(*args, **kwargs)


def test_module_and_helpers_bad_inputs():
    with pytest.raises(ValueError, match="entropy_mask_scope"):
        PrefixRFTLoss(max_response_tokens=4, entropy_mask_scope="batch")
    with pytest.raises(ValueError, match="temperature"):
        PrefixRFTLoss(max_response_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="impl"):
        PrefixRFTLoss(max_response_tokens=4, impl="cuda")
    with pytest.raises(ValueError, match="max_response_tokens"):
        PrefixRFTLoss(max_response_tokens=None)
    fn = PrefixRFTLoss(max_response_tokens=4, impl="torch")
    h, w, ids = torch.randn(2, 3, 8), torch.randn(11, 8), torch.zeros(2, 3, dtype=torch.long)
    m, z = torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="hidden"):
        fn(h[0, 0], w, ids, z, torch.ones(2), m, ~m)
    with pytest.raises(ValueError, match="response_ids"):  # [R, H] hidden is the packed layout
        fn(h[0], w, ids, z, torch.ones(2), m, ~m)
    with pytest.raises(ValueError, match="lm_head_weight"):
        fn(h, w[:, :5], ids, z, torch.ones(2), m, ~m)
    with pytest.raises(ValueError, match="response_ids"):
        fn(h, w, ids.float(), z, torch.ones(2), m, ~m)
    with pytest.raises(ValueError, match="keep_prefix_mask"):
        fn(h, w, ids, z, torch.ones(2), m, ~m, keep_prefix_mask=m)
    with pytest.raises(ValueError, match="keep_prefix_mask"):
        PrefixRFTLoss(max_response_tokens=4, entropy_mask_scope="mini_batch")(
            h, w, ids, z, torch.ones(2), m, ~m
        )
    with pytest.raises(ValueError, match="max_tokens"):
        split_micro_batches([1, 2], max_tokens=0)
    with pytest.raises(ValueError, match="token_counts"):
        split_micro_batches([1, -2], max_tokens=4)
    with pytest.raises(ValueError, match="count"):
        split_micro_batches([1, 2], max_tokens=4, count="rows")
    with pytest.raises(ValueError, match="normalizer"):
        sft_loss(z, m, normalizer="mean")
    with pytest.raises(ValueError, match="max_response_tokens"):
        sft_loss(z, m)
    with pytest.raises(ValueError, match="response_mask"):
        sft_loss(z, m[:, :2], max_response_tokens=4)
    with pytest.raises(ValueError, match="entropy_top_fraction"):
        compute_keep_prefix_mask(z, m, m, entropy_top_fraction=2.0)


def test_docstring_examples_run():
    import doctest
    import inspect
    import textwrap

    import prefix_rft.loss as loss_module

    result = doctest.testmod(
        loss_module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0
    pytest.importorskip("transformers", reason="the PrefixRFTLoss example builds a tiny HF model")
    doc = inspect.getdoc(PrefixRFTLoss)
    example = textwrap.dedent(doc.split("stands in for yours)::", 1)[1])
    scope: dict = {}
    exec(compile(example, "PrefixRFTLoss docstring", "exec"), scope)  # the pasteable example
    assert torch.isfinite(scope["loss"]) and scope["model"].lm_head.weight.grad is not None
