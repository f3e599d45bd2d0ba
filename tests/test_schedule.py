"""The relaxed tiling covers every (input, output) pair after the prefill exactly once."""

import random

import numpy as np
import pytest

from lcsm_compile.schedule import Tile, tile_after, tile_size, tile_sizes


def coverage(prefill_len, max_len):
    cov = np.zeros((max_len, max_len), dtype=np.int32)  # cov[s, t]: times input s reached output t
    for t in range(prefill_len, max_len):
        tile = tile_after(t, prefill_len, max_len)
        if tile is None:
            assert t == max_len - 1, "only the last position has no tile"
            continue
        assert tile.out_start == tile.in_stop == t + 1
        assert tile.in_start >= prefill_len
        assert tile.size in tile_sizes(prefill_len, max_len)
        cov[tile.in_start : tile.in_stop, tile.out_start : tile.out_stop] += 1
    return cov


def expected(prefill_len, max_len):
    s, t = np.meshgrid(np.arange(max_len), np.arange(max_len), indexing="ij")
    return ((s >= prefill_len) & (s < t)).astype(np.int32)


@pytest.mark.parametrize("max_len", [1, 2, 3, 7, 64, 100, 1000, 1023, 1024, 1025, 4096])
def test_every_pair_covered_once_from_scratch(max_len):
    np.testing.assert_array_equal(coverage(0, max_len), expected(0, max_len))


@pytest.mark.parametrize("max_len", [2, 5, 333, 2048, 3001, 4096])
def test_every_pair_covered_once_after_random_prefill(max_len):
    rng = random.Random(max_len)
    for prefill_len in {1, max_len - 1, max_len, rng.randrange(max_len + 1), rng.randrange(max_len + 1)}:
        np.testing.assert_array_equal(coverage(prefill_len, max_len), expected(prefill_len, max_len))


def test_tile_sizes_and_lags():
    assert [tile_size(i) for i in range(1, 13)] == [1, 2, 1, 4, 1, 2, 1, 8, 1, 2, 1, 4]
    assert tile_after(7, 0, 100) == Tile(size=8, in_start=0, out_start=8, out_stop=16)
    assert tile_after(7, 0, 10) == Tile(size=8, in_start=0, out_start=8, out_stop=10)  # cut at max_len
    assert tile_after(9, 0, 10) is None
    # lags used by a tile lie in [1, 2U - 1]
    tile = tile_after(11, 4, 100)
    lags = {o - s for s in range(tile.in_start, tile.in_stop) for o in range(tile.out_start, tile.out_stop)}
    assert min(lags) == 1 and max(lags) == 2 * tile.size - 1
    assert tile_sizes(0, 1) == [] and tile_sizes(0, 9) == [1, 2, 4, 8]


def test_position_inside_prefill_is_an_error():
    with pytest.raises(ValueError, match="inside the prefill"):
        tile_after(3, 5, 10)


@pytest.mark.parametrize("max_len, crossover, prefill_len", [(300, 4, 0), (1000, 16, 37), (4096, 1, 5)])
def test_transform_work_counts_the_fft_tiles_a_decode_runs(max_len, crossover, prefill_len):
    """Two transforms of size 2U per FFT tile (U > crossover) the decode runs, by brute force over
    tile_after; three of size 2 max_len for the offline convolution."""
    import math

    from lcsm_compile.schedule import tile_after, transform_work

    work = 0.0
    for t in range(prefill_len, max_len):
        tile = tile_after(t, prefill_len, max_len)
        if tile is not None and tile.size > crossover:
            work += 2 * 2 * tile.size * math.log2(2 * tile.size)
    got = transform_work(max_len, crossover, prefill_len)
    assert got["tiles"] == pytest.approx(work) and got["offline"] == pytest.approx(3 * 2 * max_len * math.log2(2 * max_len))


def test_transform_work_of_the_paper_tiling_at_16k_and_32k():
    """The figures the frequency-domain schedule issue starts from: 2.0x and 2.2x the offline FFT."""
    from lcsm_compile.schedule import transform_work

    assert transform_work(16384, 16)["ratio"] == pytest.approx(2.0)
    assert transform_work(32768, 16)["ratio"] == pytest.approx(2.1875)
