"""impl="torch" (chunked plain torch) against an fp64 full-logits reference."""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import fused, grads_of, make_problem, reference, rel_rms
from prefix_rft.kernels import linear_logprob_entropy
from prefix_rft.kernels.linear_logprob_entropy_torch import torch_bwd, torch_fwd

FP32_TOL = 1e-5


def check_against_fp64(n, h, v, *, temperature=1.0, with_bias=False, ignore_frac=0.2,
                       grads=("lp", "ent"), impl="torch", seed=0, tol=FP32_TOL,
                       allow_fp32_torch_error=False):
    """Kernel vs fp64 truth. With ``allow_fp32_torch_error`` the bound is the house rule
    err(kernel) <= err(fp32 full-logits torch) + tol, for degenerate random cases (e.g. one
    row with a near-one-hot softmax, where fp32 log(sum) itself loses the tiny entropy)."""
    hidden, weight, labels, bias = make_problem(n, h, v, with_bias=with_bias,
                                                ignore_frac=ignore_frac, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    g_lp = torch.randn(n, generator=g) if "lp" in grads else None
    g_ent = torch.randn(n, generator=g) if "ent" in grads else None
    lp, ent, got = grads_of(fused(impl, labels, temperature), hidden, weight, bias, g_lp, g_ent)
    lp64, ent64, want = grads_of(reference(labels, temperature), hidden.double(),
                                 weight.double(), None if bias is None else bias.double(),
                                 g_lp, g_ent)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (n,)
    bounds = [tol] * 5
    if allow_fp32_torch_error:
        lp32, ent32, ref32 = grads_of(reference(labels, temperature, torch.float32), hidden,
                                      weight, bias, g_lp, g_ent)
        bounds = [tol + rel_rms(a, e) if e is not None else tol
                  for a, e in zip((lp32, ent32, *ref32), (lp64, ent64, *want))]
    assert rel_rms(lp, lp64) <= bounds[0], rel_rms(lp, lp64)
    assert rel_rms(ent, ent64) <= bounds[1], rel_rms(ent, ent64)
    for name, a, e, bound in zip(("dX", "dW", "db"), got, want, bounds[2:]):
        if e is not None:
            assert rel_rms(a, e) <= bound, (name, rel_rms(a, e))
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (got[0][ignored] == 0).all(), "ignored rows must receive no gradient"


@pytest.mark.parametrize("n,h,v", [(63, 123, 507), (1, 16, 1), (1, 8, 33), (17, 5, 3)])
def test_odd_shapes_match_fp64(n, h, v):
    check_against_fp64(n, h, v)


def test_many_tiles_not_multiple_of_tile():
    # V and N larger than one chunk and not a multiple of it: forces the online merge.
    hidden, weight, labels, bias = make_problem(37, 19, 301, with_bias=True)
    lp, ent, lse = torch_fwd(hidden, weight, bias, labels, 0.7, -100, token_chunk=8,
                             vocab_chunk=64)
    lp64, ent64 = reference(labels, 0.7)(hidden.double(), weight.double(), bias.double())
    assert rel_rms(lp, lp64) <= FP32_TOL and rel_rms(ent, ent64) <= FP32_TOL
    g_lp, g_ent = torch.randn(37), torch.randn(37)
    dx, dw, db = torch_bwd(hidden, weight, bias, labels, lse, ent, g_lp, g_ent, 0.7, -100,
                           token_chunk=8, vocab_chunk=64)
    _, _, want = grads_of(reference(labels, 0.7), hidden.double(), weight.double(),
                          bias.double(), g_lp, g_ent)
    for a, e in zip((dx, dw, db), want):
        assert rel_rms(a, e) <= FP32_TOL


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_temperature_and_bias(temperature):
    check_against_fp64(29, 33, 211, temperature=temperature, with_bias=True)


@pytest.mark.parametrize("grads", [("lp",), ("ent",)])
def test_gradient_of_one_output_only(grads):
    check_against_fp64(31, 24, 97, grads=grads, with_bias=True)


def test_peaked_distribution_entropy_is_accurate():
    # Large logits make the entropy tiny; the shifted weighted sum keeps it accurate.
    hidden, weight, labels, _ = make_problem(16, 32, 150, ignore_frac=0.0, scale=40.0, seed=3)
    lp, ent = linear_logprob_entropy(hidden, weight, labels, impl="torch")
    lp64, ent64 = reference(labels)(hidden.double(), weight.double(), None)
    assert rel_rms(ent, ent64) <= 1e-4 and rel_rms(lp, lp64) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_worse_than_torch_same_dtype(dtype):
    hidden, weight, labels, bias = make_problem(45, 40, 157, dtype=dtype, with_bias=True)
    g_lp, g_ent = torch.randn(45), torch.randn(45)
    ours = grads_of(fused("torch", labels), hidden, weight, bias, g_lp, g_ent)
    # torch in the same dtype: logits in `dtype`, softmax in fp32 as users typically do.
    def torch_same_dtype(h, w, b):
        z = (h @ w.T + b).float()
        lsm = z.log_softmax(-1)
        keep = labels != -100
        lp = lsm.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
        ent = -(lsm.exp() * lsm).sum(-1)
        return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)
    same = grads_of(torch_same_dtype, hidden, weight, bias, g_lp, g_ent)
    truth = grads_of(reference(labels), hidden.double(), weight.double(), bias.double(),
                     g_lp, g_ent)
    assert ours[0].dtype == torch.float32
    assert ours[2][0].dtype == dtype and ours[2][1].dtype == dtype
    pairs = [(ours[0], same[0], truth[0]), (ours[1], same[1], truth[1])]
    pairs += list(zip(ours[2], same[2], truth[2]))
    for mine, theirs, want in pairs:
        assert rel_rms(mine, want) <= rel_rms(theirs, want) + 1e-3


def test_empty_batch_returns_empty_and_zero_grads():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    lp, ent = linear_logprob_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert weight.grad is None or (weight.grad == 0).all()


def test_all_rows_ignored_gives_zeros_and_no_grad():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    lp, ent = linear_logprob_entropy(hidden, weight, torch.full((5,), -100))
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_nan_in_inputs_propagates():
    hidden, weight, labels, _ = make_problem(6, 8, 20, ignore_frac=0.0)
    hidden[2, 3] = float("nan")
    lp, ent = linear_logprob_entropy(hidden, weight, labels, impl="torch")
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    assert torch.isfinite(lp[[0, 1, 3, 4, 5]]).all()
    weight[7, 0] = float("nan")
    lp, ent = linear_logprob_entropy(hidden, weight, labels, impl="torch")
    assert torch.isnan(lp).all() and torch.isnan(ent).all()


def test_custom_ignore_index_and_int32_labels():
    hidden, weight, labels, _ = make_problem(12, 8, 30, ignore_frac=0.3)
    labels = torch.where(labels == -100, torch.tensor(-1), labels).to(torch.int32)
    lp, ent = linear_logprob_entropy(hidden, weight, labels, ignore_index=-1)
    lp64, ent64 = reference(labels.long().masked_fill(labels == -1, -100))(
        hidden.double(), weight.double(), None)
    assert rel_rms(lp, lp64) <= FP32_TOL and rel_rms(ent, ent64) <= FP32_TOL


def _bad(**overrides):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8),
                labels=torch.tensor([1, 2, -100, 9]))
    kwargs = {k: overrides.pop(k) for k in ("bias", "temperature", "impl") if k in overrides}
    args.update(overrides)
    return lambda: linear_logprob_entropy(args["hidden"], args["weight"], args["labels"], **kwargs)


@pytest.mark.parametrize("overrides,match", [
    (dict(hidden=torch.randn(2, 4, 8)), "hidden must be 2-D"),
    (dict(weight=torch.randn(10, 7)), "weight must be \\[V, H\\] with H"),
    (dict(labels=torch.tensor([1, 2, 3])), "labels must be 1-D \\[N\\]"),
    (dict(labels=torch.tensor([1, 2, 10, 0])), "labels must lie in \\[0, V\\)"),
    (dict(labels=torch.tensor([1, -5, 0, 0])), "labels must lie in"),
    (dict(labels=torch.tensor([1.0, 2.0, 0.0, 0.0])), "labels must be an int64"),
    (dict(hidden=torch.ones(4, 8, dtype=torch.long)), "hidden must be a floating"),
    (dict(weight=torch.ones(10, 8, dtype=torch.int32)), "weight must be a floating"),
    (dict(temperature=0.0), "temperature must be a number > 0"),
    (dict(temperature=-1.0), "temperature"),
    (dict(bias=torch.randn(9)), "bias must be \\[V\\]"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(weight=torch.randn(10, 8, device="meta")), "must be on one device"),
])
def test_bad_input_raises_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        _bad(**overrides)()
