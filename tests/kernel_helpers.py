"""Shared helpers for the kernel tests: random problems, fp64 ground truth, relative RMS error."""

from __future__ import annotations

import torch

from prefix_rft.kernels import linear_logprob_entropy, linear_logprob_entropy_reference


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in fp64; inf when `actual` has a NaN (NaN never passes)."""
    a, e = actual.double(), expected.double()
    if torch.isnan(a).any():
        return float("inf")
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def make_problem(n, h, v, *, dtype=torch.float32, ignore_frac=0.2, with_bias=False,
                 scale=1.0, seed=0):
    """hidden [n,h], weight [v,h], labels [n] with ~ignore_frac ignored, optional bias [v]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    if n and ignore_frac:
        labels[torch.rand(n, generator=g) < ignore_frac] = -100
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if with_bias else None
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(hidden), cast(weight), labels, cast(bias)


def grads_of(fn, hidden, weight, bias, g_lp, g_ent):
    """Run fn(hidden, weight, bias) -> (lp, ent); return outputs and grads for upstream g."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    lp, ent = fn(*leaves)
    loss = 0
    if g_lp is not None:
        loss = loss + (lp * g_lp.to(lp.dtype)).sum()
    if g_ent is not None:
        loss = loss + (ent * g_ent.to(ent.dtype)).sum()
    loss.backward()
    grads = [None if t is None else t.grad for t in leaves]
    return lp.detach(), ent.detach(), grads


def fused(impl, labels, temperature=1.0):
    return lambda h, w, b: linear_logprob_entropy(h, w, labels, bias=b, temperature=temperature,
                                                  impl=impl)


def reference(labels, temperature=1.0, dtype=torch.float64):
    return lambda h, w, b: linear_logprob_entropy_reference(h, w, labels, bias=b,
                                                            temperature=temperature, dtype=dtype)
