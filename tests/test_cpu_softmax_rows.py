"""The native CPU row passes (``kernels/cpu_softmax_rows.c``) against an fp64 torch reference:
row max / sum of exp / exp-weighted sum, the stored exp, the entropy-bonus dz; odd widths,
-inf and NaN logits, rows split across threads; the build and its fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

import prefix_rft.kernels.cpu_softmax_rows as native


@pytest.fixture(scope="module")
def lib():
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the fused path uses its torch passes")
    built = native.load()
    assert built is not None, "a C compiler is here but the native row passes did not build"
    return built


def reference(z: torch.Tensor, a=None, b=None):
    """fp64 truth of the module docstring's torch equivalent."""
    zd = z.double()
    m = zd.amax(1)
    t = zd - m[:, None]
    e = t.exp()
    s, d = e.sum(1), torch.where(e == 0, 0, e * t).sum(1)
    dz = None if a is None else torch.where(
        e == 0, 0, e * (a.double()[:, None] * t + b.double()[:, None]))
    return m, s, d, e, dz


def logits(rows, v, seed=0, scale=4.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, v, generator=g) * scale + offset


@pytest.mark.parametrize("rows, v", [(1, 1), (3, 7), (5, 511), (4, 513), (9, 5003)])
@pytest.mark.parametrize("store_exp", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_stats_match_fp64(lib, rows, v, store_exp, threads):
    z = logits(rows, v, seed=v, offset=300.0)  # large logits: the shift must happen first
    if v > 7:
        z[0, 3] = -float("inf")  # a masked logit adds nothing
        z[-1, :v // 2] -= 200.0  # exp underflows to 0 on half the row
    m_ref, s_ref, d_ref, e_ref, _ = reference(z)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        work = z.clone()
        m, s, d = native.row_stats(lib, work, store_exp=store_exp)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(m.double(), m_ref)
    torch.testing.assert_close(s.double(), s_ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(d.double(), d_ref, rtol=2e-6, atol=2e-6)
    if store_exp:  # exp of the fp32 shifted logit: a few ulp (the shift rounds, too)
        torch.testing.assert_close(work.double(), e_ref, rtol=2e-6, atol=1e-30)
    else:
        assert torch.equal(work, z)


def test_nan_logit_propagates(lib):
    z = logits(3, 101)
    z[1, 50] = float("nan")
    m, s, d = native.row_stats(lib, z.clone(), store_exp=False)
    assert torch.isnan(s[1]) and torch.isnan(d[1])
    assert torch.isfinite(s[[0, 2]]).all() and torch.isfinite(d[[0, 2]]).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_row_dz_matches_fp64(lib, threads):
    z = logits(7, 1031, seed=3)
    z[2, 10] = -float("inf")
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(7, generator=g), torch.randn(7, generator=g)
    m = z.amax(1)
    *_, dz_ref = reference(z, a, b)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        work = z.clone()
        native.row_dz(lib, work, m, a, b)
    finally:
        torch.set_num_threads(before)
    assert torch.isfinite(work).all()
    err = (work.double() - dz_ref).abs().max() / dz_ref.abs().max()
    assert err < 5e-6, err


@pytest.mark.parametrize("bad", ["fp64", "columns", "1d"])
def test_bad_tensor_is_refused(lib, bad):
    z = {"fp64": torch.zeros(3, 5, dtype=torch.float64), "columns": torch.zeros(5, 3).T,
         "1d": torch.zeros(5)}[bad]
    with pytest.raises(ValueError, match="fp32 CPU tensor with contiguous rows"):
        native.row_stats(lib, z, store_exp=False)


def test_switched_off_and_no_compiler_fall_back(monkeypatch, tmp_path, caplog):
    native.load.cache_clear()
    try:
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        assert native.load() is None
        native.load.cache_clear()
        monkeypatch.delenv(native.ENV_SWITCH)
        monkeypatch.setenv("PREFIX_RFT_CACHE", str(tmp_path))  # nothing built there yet
        monkeypatch.setattr(native, "_compiler", lambda: None)
        with caplog.at_level(logging.WARNING, logger="prefix_rft.kernels"):
            assert native.load() is None
        assert "no C compiler found" in caplog.text and "torch passes" in caplog.text
    finally:
        native.load.cache_clear()


def test_build_goes_to_the_cache_folder(monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    native.load.cache_clear()
    try:
        monkeypatch.setenv("PREFIX_RFT_CACHE", str(tmp_path))
        assert native.load() is not None
        built = list((tmp_path / "native").iterdir())
        assert len(built) == 1 and built[0].name.startswith("cpu_softmax_rows-")
    finally:
        native.load.cache_clear()
