"""The relaxed tiling schedule: which tile runs after each position, as pure integer arithmetic.

After a prefill of P positions, the step at absolute position t is the i-th step with
i = t - P + 1. Once x_t is known, the step runs the gray tile of size U = i & -i (the largest
power of two dividing i): inputs [t-U+1, t] -> outputs [t+1, t+U] (cut at max_len), with lags
1 .. 2U-1. Every pair P <= s < t' < max_len is covered by exactly one tile (tested by brute force),
so steps plus the prefill's one FFT convolution compute every output exactly once.
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    size: int  # U, a power of two
    in_start: int  # first input position; inputs are [in_start, in_start + size)
    out_start: int  # first output position, always in_start + size
    out_stop: int  # one past the last output position (<= out_start + size, cut at max_len)

    @property
    def in_stop(self) -> int:
        return self.in_start + self.size


def tile_size(i: int) -> int:
    """Largest power of two dividing i (i >= 1)."""
    return i & -i


def tile_after(t: int, prefill_len: int, max_len: int) -> Tile | None:
    """The tile to run once position t (absolute, 0-indexed) has its input; None when it has no outputs."""
    i = t - prefill_len + 1
    if i < 1:
        raise ValueError(f"position {t} lies inside the prefill of {prefill_len} positions")
    U = tile_size(i)
    out_start = t + 1
    if out_start >= max_len:
        return None
    return Tile(U, t - U + 1, out_start, min(out_start + U, max_len))


def transform_work(max_len: int, crossover: int, prefill_len: int = 0) -> dict:
    """The FFT work of a decode from prefill_len to max_len, per channel, in units of n log2 n per
    transform of size n: each FFT tile (size U > crossover) runs two transforms of size 2U (its
    inputs forward, the product back; the filter's spectrum is precomputed); the offline
    convolution of the whole sequence runs three of size 2 max_len (input, filter, product).
    -> {"tiles", "offline", "ratio"}: the figure a schedule that reuses transforms must lower."""
    def cost(n):
        return n * math.log2(n)

    tiles = 0.0
    for U in tile_sizes(prefill_len, max_len):
        if U > crossover:
            runs = (max_len - 1 - prefill_len + U) // (2 * U)  # steps i = U, 3U, 5U, ... with an output
            tiles += runs * 2 * cost(2 * U)
    offline = 3 * cost(2 * max_len)
    return {"tiles": tiles, "offline": offline, "ratio": tiles / offline}


def tile_sizes(prefill_len: int, max_len: int) -> list[int]:
    """Every tile size a decode from prefill_len to max_len can run (what spectra to precompute)."""
    steps = max_len - 1 - prefill_len  # steps whose tile has at least one output
    sizes, U = [], 1
    while U <= steps:
        sizes.append(U)
        U *= 2
    return sizes
