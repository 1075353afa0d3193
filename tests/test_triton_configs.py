"""Launch-shape choices of the Triton kernels that need no GPU and no interpreter."""

from __future__ import annotations

import pytest

from prefix_rft.kernels.triton_configs import choose_num_splits


def _finish(n_row_tiles, n_vocab_tiles, slots, splits):
    """Tile steps until the last program ends, for a grid of n_row_tiles x splits."""
    per = -(-n_vocab_tiles // splits)
    return -(-(n_row_tiles * splits) // slots) * per


@pytest.mark.parametrize("slots", [132, 108])  # H100/H200, A100
@pytest.mark.parametrize("n_row_tiles", [1, 8, 16, 32, 100, 128, 256, 1000])
def test_split_count_is_the_fewest_within_one_percent_of_optimal(slots, n_row_tiles):
    n_vocab_tiles = 1187  # V = 151936 in 128-column tiles
    s = choose_num_splits(n_row_tiles, n_vocab_tiles, slots)
    per = -(-n_vocab_tiles // s)
    assert -(-n_vocab_tiles // per) == s, "every split must hold at least one tile"
    finish = [_finish(n_row_tiles, n_vocab_tiles, slots, c) for c in range(1, n_vocab_tiles + 1)]
    assert _finish(n_row_tiles, n_vocab_tiles, slots, s) <= 1.01 * min(finish)
    assert all(f > 1.01 * min(finish) for f in finish[: s - 1]), "a smaller count would do"


def test_split_count_fills_whole_waves():
    # 128 row tiles (N=16384): one split leaves 4 of 132 SMs idle for the whole kernel;
    # 33 splits make 4224 programs = exactly 32 waves.
    s = choose_num_splits(128, 1187, 132)
    assert (128 * s) % 132 == 0
    assert _finish(128, 1187, 132, s) < _finish(128, 1187, 132, 1)
    # A single row tile (N <= 128) spreads its vocabulary over every SM of an A100.
    assert choose_num_splits(1, 1187, 108) == 108
    # Enough row tiles for many full waves: no split needed when waves already divide evenly.
    assert choose_num_splits(132 * 8, 1187, 132) == 1


def test_split_count_edge_cases():
    assert choose_num_splits(1, 1, 132) == 1  # a single tile cannot be split
    assert choose_num_splits(3, 2, 4) in (1, 2)
    with pytest.raises(ValueError, match="slots"):
        choose_num_splits(1, 10, 0)
