"""entropy_topk_mask: exact counts, ties, all-equal entropies, empty candidates, any shape."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefix_rft.kernels import entropy_topk_mask


def brute_force_mask(entropy, candidates, fraction):
    """Independent reference: python sort over (−entropy, flat position)."""
    flat_e, flat_c = entropy.reshape(-1).tolist(), candidates.reshape(-1).tolist()
    cands = [i for i, c in enumerate(flat_c) if c]
    n_drop = math.floor((1 - fraction) * len(cands) + 1e-9)
    ranked = sorted(cands, key=lambda i: (-flat_e[i], i))
    keep = set(ranked[: len(cands) - n_drop])
    return torch.tensor([i in keep for i in range(len(flat_c))]).reshape(candidates.shape)


def test_example_from_docstring():
    ent = torch.tensor([[0.1, 2.0, 0.5], [1.0, 0.3, 9.9]])
    cand = torch.tensor([[True, True, True], [True, True, False]])
    got = entropy_topk_mask(ent, cand, fraction=0.4)
    assert got.tolist() == [[False, True, False], [True, False, False]]


@pytest.mark.parametrize("n,fraction,kept", [(10, 0.2, 2), (5, 0.2, 1), (7, 0.2, 2),
                                             (3, 0.2, 1), (1, 0.2, 1), (10, 1.0, 10),
                                             (9, 0.5, 5), (100, 0.2, 20), (4, 0.01, 1)])
def test_exact_counts(n, fraction, kept):
    ent = torch.rand(n)
    mask = entropy_topk_mask(ent, torch.ones(n, dtype=torch.bool), fraction)
    assert int(mask.sum()) == kept == n - math.floor((1 - fraction) * n + 1e-9)
    # the kept ones are the highest entropies
    assert ent[mask].min() >= ent[~mask].max() if (~mask).any() else True


def test_non_candidates_never_kept_and_never_compete():
    ent = torch.tensor([9.0, 1.0, 2.0, 3.0, 8.0])
    cand = torch.tensor([False, True, True, True, False])
    mask = entropy_topk_mask(ent, cand, fraction=0.34)  # 3 candidates, drop floor(1.98)=1
    assert mask.tolist() == [False, False, True, True, False]


def test_ties_prefer_earlier_position_deterministically():
    ent = torch.tensor([[1.0, 5.0, 5.0], [5.0, 5.0, 0.0]])
    cand = torch.ones(2, 3, dtype=torch.bool)
    mask = entropy_topk_mask(ent, cand, fraction=0.5)  # 6 cands, keep 3 of the four 5.0s
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    assert torch.equal(mask, entropy_topk_mask(ent, cand, fraction=0.5))


def test_all_equal_entropies_keep_first_positions():
    mask = entropy_topk_mask(torch.zeros(10), torch.ones(10, dtype=torch.bool), 0.3)
    assert mask.tolist() == [True] * 3 + [False] * 7


def test_empty_candidates_and_empty_tensor():
    assert not entropy_topk_mask(torch.rand(3, 4), torch.zeros(3, 4, dtype=torch.bool)).any()
    assert entropy_topk_mask(torch.rand(0), torch.zeros(0, dtype=torch.bool)).shape == (0,)


def test_no_gradient_through_selection():
    ent = torch.rand(6, requires_grad=True)
    mask = entropy_topk_mask(ent, torch.ones(6, dtype=torch.bool), 0.5)
    assert not mask.requires_grad and mask.dtype == torch.bool


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 7), min_size=1, max_size=3),
       fraction=st.floats(0.01, 1.0), seed=st.integers(0, 10_000), levels=st.integers(1, 5))
def test_property_matches_brute_force(shape, fraction, seed, levels):
    g = torch.Generator().manual_seed(seed)
    # few distinct levels -> many ties
    ent = torch.randint(0, levels, shape, generator=g).float()
    cand = torch.rand(shape, generator=g) < 0.6
    assert torch.equal(entropy_topk_mask(ent, cand, fraction),
                       brute_force_mask(ent, cand, fraction))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), "0.2"])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction must be in \\(0, 1\\]"):
        entropy_topk_mask(torch.rand(3), torch.ones(3, dtype=torch.bool), fraction)


def test_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="candidates must have the shape"):
        entropy_topk_mask(torch.rand(3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="candidates must be a bool"):
        entropy_topk_mask(torch.rand(3), torch.ones(3))
    with pytest.raises(ValueError, match="entropy must be a floating"):
        entropy_topk_mask(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
