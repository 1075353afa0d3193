"""Property tests (hypothesis) of both kernel paths, apart so that a machine without
hypothesis (e.g. a lent GPU) still collects every other kernel test: skipped here then."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_kernels_torch import check_against_fp64  # noqa: E402
from test_kernels_triton import (  # noqa: E402
    assert_close_to_fp64,
    make_problem,
    outputs_and_grads,
    ref64_fn,
    triton_fn,
)
from test_kernels_triton import (
    pytestmark as triton_marks,
)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), h=st.integers(1, 24), v=st.integers(1, 90),
       temperature=st.floats(0.3, 2.0), with_bias=st.booleans(), seed=st.integers(0, 1000))
def test_property_random_shapes(n, h, v, temperature, with_bias, seed):
    check_against_fp64(n, h, v, temperature=temperature, with_bias=with_bias, seed=seed,
                       allow_fp32_torch_error=True)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), h=st.integers(1, 70), v=st.integers(1, 300),
       temperature=st.sampled_from([0.5, 1.0, 1.7]), bias=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_property_triton_fp32_matches_fp64_over_shapes(n, h, v, temperature, bias, seed):
    prob = make_problem(n, h, v, bias=bias, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = outputs_and_grads(triton_fn, *prob, temperature)
    ref = outputs_and_grads(ref64_fn, *prob, temperature)
    assert_close_to_fp64(got, ref, 1e-5)


for _mark in triton_marks:  # the triton module's skip (no CUDA, no interpreter) applies too
    test_property_triton_fp32_matches_fp64_over_shapes = _mark(
        test_property_triton_fp32_matches_fp64_over_shapes)
