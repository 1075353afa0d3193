"""The vocab-split Triton backward (``bwd="split"``) against an fp64 full-logits reference.

Runs through the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1); as in
test_kernels_triton.py, 16-bit logic is tested with fp16 / bf16-rounded fp32 there, real bf16
only on CUDA. Chunk sizes are chosen so that they do not divide V and are not multiples of
the interpreter's BLOCK_V (64).
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_triton import (
    CUDA,
    IGNORE,
    NAMES,
    assert_close_to_fp64,
    make_problem,
    naive_same_dtype_fn,
    outputs_and_grads,
    pytestmark,  # noqa: F401 -- same skip / warning filters as the atomic tests
    ref64_fn,
    rel_rms,
)

from prefix_rft.kernels import linear_logprob_entropy


def split_fn(x, w, y, b, t):
    return linear_logprob_entropy(x, w, y, bias=b, temperature=t, impl="triton", bwd="split")


def _ops():
    from prefix_rft.kernels import linear_logprob_entropy_split as split
    from prefix_rft.kernels import linear_logprob_entropy_triton as ops

    return ops.triton_fwd, split.triton_bwd_split


def split_grads(x, w, b, y, g_lp, g_h, temperature, chunk_v, needs=(True, True, True), eps=0.0):
    fwd, bwd = _ops()
    _, ent, lse = fwd(x, w, b, y, temperature, IGNORE)
    return bwd(x, w, b, y, lse, ent, g_lp, g_h, temperature, IGNORE, needs, filter_eps=eps,
               chunk_v=chunk_v)


@pytest.mark.parametrize("n,h,v,bias,temperature,chunk_v", [
    (63, 123, 507, True, 0.7, 200),    # 3 chunks, the last one 107 wide
    (63, 123, 507, False, 1.0, 97),    # chunk narrower than a tile, prime
    (40, 70, 129, True, 2.0, 1000),    # one chunk wider than V
    (1, 40, 300, True, 1.3, 64),       # N=1
    (7, 33, 1, True, 0.5, 8),          # V=1: zero gradients
])
def test_split_backward_matches_fp64_reference(n, h, v, bias, temperature, chunk_v):
    x, w, b, y, g_lp, g_h = make_problem(n, h, v, bias=bias)
    got = split_grads(x, w, b, y, g_lp, g_h, temperature, chunk_v)
    ref = outputs_and_grads(ref64_fn, x, w, b, y, g_lp, g_h, temperature)[2:]
    assert_close_to_fp64(got, ref, 1e-5, NAMES[2:])


def test_split_is_the_default_and_matches_through_autograd():
    prob = make_problem(63, 123, 507)
    default = outputs_and_grads(
        lambda x, w, y, b, t: linear_logprob_entropy(x, w, y, bias=b, temperature=t,
                                                     impl="triton"), *prob, 0.7)
    split = outputs_and_grads(split_fn, *prob, 0.7)
    for name, d, s in zip(NAMES, default, split):
        assert torch.equal(d, s), f"{name}: default backward is not the split one"
    assert_close_to_fp64(split, outputs_and_grads(ref64_fn, *prob, 0.7), 1e-5)


@pytest.mark.parametrize("absent", ["g_lp None", "g_H None", "g_lp zero", "g_H zero"])
def test_split_with_one_upstream_gradient_absent_or_zero(absent):
    x, w, b, y, g_lp, g_h = make_problem(33, 50, 260)
    if absent == "g_lp None":
        g_lp = None
    elif absent == "g_H None":
        g_h = None
    elif absent == "g_lp zero":
        g_lp = torch.zeros_like(g_lp)
    else:
        g_h = torch.zeros_like(g_h)
    got = split_grads(x, w, b, y, g_lp, g_h, 0.9, 100)
    ref = outputs_and_grads(ref64_fn, x, w, b, y, g_lp, g_h, 0.9)[2:]
    assert_close_to_fp64(got, ref, 1e-5, NAMES[2:])


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, True)])
def test_split_only_requested_input_gradients(wanted):
    x, w, b, y, g_lp, g_h = make_problem(21, 30, 200)
    got = split_grads(x, w, b, y, g_lp, g_h, 1.0, 90, needs=wanted)
    ref = outputs_and_grads(ref64_fn, x, w, b, y, g_lp, g_h, 1.0)[2:]
    for name, want, g, r in zip(NAMES[2:], wanted, got, ref):
        assert (g is not None) == want, name
        if want:
            assert rel_rms(g, r) <= 1e-5, name


def test_split_ignored_rows_zero_no_nan_leak_and_all_ignored():
    x, w, b, y, g_lp, g_h = make_problem(20, 30, 200, ignore_frac=0.0)
    y[::3] = IGNORE
    x = x.clone()
    x[0, 5] = float("nan")  # row 0 is ignored: its NaN must not reach dW / db
    dx, dw, db = split_grads(x, w, b, y, g_lp, g_h, 1.0, 70)
    assert torch.all(dx[y == IGNORE] == 0)
    x_clean = torch.where((y == IGNORE)[:, None], 0.0, x)
    ref = outputs_and_grads(ref64_fn, x_clean, w, b, y, g_lp, g_h, 1.0)[2:]
    assert_close_to_fp64((dx, dw, db), ref, 1e-5, NAMES[2:])
    y[:] = IGNORE
    for t in split_grads(x_clean, w, b, y, g_lp, g_h, 1.0, 70):
        assert torch.all(t == 0)


def test_split_is_deterministic_and_agrees_with_atomic():
    x, w, b, y, g_lp, g_h = make_problem(50, 64, 333)
    first = split_grads(x, w, b, y, g_lp, g_h, 1.0, 128)
    second = split_grads(x, w, b, y, g_lp, g_h, 1.0, 128)
    assert all(torch.equal(f, s) for f, s in zip(first, second))
    from prefix_rft.kernels.linear_logprob_entropy_triton import triton_bwd, triton_fwd

    _, ent, lse = triton_fwd(x, w, b, y, 1.0, IGNORE)
    atomic = triton_bwd(x, w, b, y, lse, ent, g_lp, g_h, 1.0, IGNORE)
    for name, s, a in zip(NAMES[2:], first, atomic):
        assert rel_rms(s, a) <= 1e-6, name


def test_split_fp16_error_within_same_dtype_torch_error():
    prob = make_problem(63, 123, 507, dtype=torch.float16)
    ref = outputs_and_grads(ref64_fn, *prob, 0.7)
    got = outputs_and_grads(split_fn, *prob, 0.7)
    base = outputs_and_grads(naive_same_dtype_fn, *prob, 0.7)
    for name, g, r, t in zip(NAMES, got, ref, base):
        err, err_torch = rel_rms(g, r), rel_rms(t, r)
        assert err <= err_torch + 2e-3, f"{name}: kernel {err:.3g} vs torch fp16 {err_torch:.3g}"
    assert got[2].dtype == torch.float16 and got[3].dtype == torch.float16


def test_split_mixed_dtypes_write_each_gradient_in_its_input_dtype():
    """bf16 hidden + fp32 weight, and fp32 hidden + fp16 weight (dW cast on the way out)."""
    x, w, b, y, g_lp, g_h = make_problem(40, 48, 300)
    x16 = x.to(torch.bfloat16)
    dx, dw, db = split_grads(x16, w, b, y, g_lp, g_h, 0.7, 128)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    ref = outputs_and_grads(ref64_fn, x16.float(), w, b, y, g_lp, g_h, 0.7)[2:]
    assert_close_to_fp64((dw, db), ref[1:], 1e-5, NAMES[3:])
    assert rel_rms(dx, ref[0]) <= 2 ** -8  # one bf16 rounding of dX
    w16 = w.to(torch.float16)
    dx, dw, db = split_grads(x, w16, b, y, g_lp, g_h, 0.7, 128)
    assert dx.dtype == torch.float32 and dw.dtype == torch.float16
    ref = outputs_and_grads(ref64_fn, x, w16.float(), b, y, g_lp, g_h, 0.7)[2:]
    assert_close_to_fp64((dx, db), (ref[0], ref[2]), 1e-5, ("dX", "db"))
    assert rel_rms(dw, ref[1]) <= 2 ** -10  # one fp16 rounding of dW


def test_split_gradient_filtering_error_within_documented_bound():
    # Vocab rows past the first 100 get a bias of -30 (p ~ e^-30) and labels stay below 100:
    # with chunks of 100 columns every chunk but the first has all |dz| < eps and is skipped.
    x, w, b, y, g_lp, g_h = make_problem(40, 32, 600, ignore_frac=0.0)
    b = b.clone()
    b[100:] -= 30.0
    y = y % 100
    eps = 1e-4
    full = split_grads(x, w, b, y, g_lp, g_h, 1.0, 100)
    filt = split_grads(x, w, b, y, g_lp, g_h, 1.0, 100, eps=eps)
    assert torch.all(filt[1][100:] == 0), "the skipped chunks' dW rows must be exactly 0"
    assert not torch.equal(filt[1], full[1]), "nothing was filtered"
    bounds = (eps * w.abs().sum(0).expand_as(x), eps * x.abs().sum(0).expand_as(w),
              torch.zeros_like(b))  # db stays exact
    for name, f, g, bound in zip(("dX", "dW", "db"), filt, full, bounds):
        excess = (f - g).abs() - bound * (1 + 1e-4) - 1e-6
        assert excess.max() <= 0, f"{name} exceeds the filtering bound by {excess.max():.3g}"
    ref = outputs_and_grads(ref64_fn, x, w, b, y, g_lp, g_h, 1.0)[2:]
    assert_close_to_fp64(filt[:1], ref[:1], 1e-4, ("dX",))


def test_split_rejects_a_bad_chunk_size_and_a_bad_bwd_name():
    x, w, b, y, g_lp, g_h = make_problem(4, 16, 40)
    with pytest.raises(ValueError, match="chunk_v"):
        split_grads(x, w, b, y, g_lp, g_h, 1.0, 0)
    with pytest.raises(ValueError, match="bwd"):
        linear_logprob_entropy(x, w, y, impl="triton", bwd="fast")


@pytest.mark.skipif(not CUDA, reason="bf16 tl.dot is wrong in the CPU interpreter; CUDA only")
def test_split_bf16_on_cuda_within_same_dtype_torch_error():
    prob = make_problem(1000, 512, 5003, dtype=torch.bfloat16)
    ref = outputs_and_grads(ref64_fn, *prob, 0.7)
    got = outputs_and_grads(split_fn, *prob, 0.7)
    base = outputs_and_grads(naive_same_dtype_fn, *prob, 0.7)
    for name, g, r, t in zip(NAMES, got, ref, base):
        err, err_torch = rel_rms(g, r), rel_rms(t, r)
        assert err <= err_torch + 5e-3, f"{name}: kernel {err:.3g} vs torch bf16 {err_torch:.3g}"
