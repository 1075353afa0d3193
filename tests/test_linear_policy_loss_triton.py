"""The Triton elementwise pass of the fused head-and-loss (interpreter on CPU): loss, dX, dW, db
against the fp64 full-logits reference and same-dtype torch, every option, small odd shapes."""

from __future__ import annotations

import pytest
import torch
from test_linear_policy_loss import OPTIONS, build_kwargs, check_three_way

from kernel_helpers import make_problem

# 16-bit inputs: dz is stored in the input dtype (as the vocab-split backward stores it), so
# the gradients carry its rounding (2^-11 relative per element for fp16).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("option", ["ppo_old_clip", "dual_clip", "importance_weights",
                                    "entropy_mask_keep", "temperature", "nll", "ppo_on_policy"])
def test_triton_pass_matches_fp64(option):
    hidden, weight, labels, bias = make_problem(29, 37, 301, with_bias=option == "temperature")
    kw = build_kwargs(OPTIONS[option], hidden, weight, labels)
    # 11-row chunks: several chunks, the last one short
    check_three_way(hidden, weight, bias, labels, impl="triton", chunk_bytes=11 * 301 * 4, **kw)


def test_triton_pass_fp16_dz():
    """16-bit inputs: dz written in fp16 to its own buffer, gradients from the fp16 dz."""
    hidden, weight, labels, bias = make_problem(23, 33, 257, dtype=torch.float16, with_bias=True)
    kw = build_kwargs(OPTIONS["temperature"], hidden.float(), weight.float(), labels)
    check_three_way(hidden, weight, bias, labels, impl="triton", chunk_bytes=5 * 257 * 4,
                    tol=TOL[torch.float16], **kw)


def test_triton_pass_equals_torch_path_per_token():
    hidden, weight, labels, _ = make_problem(31, 19, 203)
    kw = build_kwargs(OPTIONS["importance_weights"], hidden, weight, labels)
    from prefix_rft.kernels import linear_policy_loss

    out = {impl: linear_policy_loss(hidden, weight, labels, impl=impl, entropy_weight=0.01, **kw)
           for impl in ("torch", "triton")}
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
