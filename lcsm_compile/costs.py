"""The per-machine cost model: what the decoding strategies' primitives cost on one device.

`lcsm-compile tune` measures a Costs record (lcsm_compile.tuning.costs_for reads it back); the
partitioned schedule plans its levels by it (lcsm_compile.partition.plan), and the choice between
a modal filter's recurrence and the tiling compares the seconds per step it predicts for each
(lcsm_compile.recurrence.choose).
"""

import math
from dataclasses import dataclass

from lcsm_compile.schedule import tile_sizes


@dataclass(frozen=True)
class Costs:
    """Rates of the primitives, per channel, and fixed seconds per call (these defaults are of the
    order a 2-core CPU shows)."""
    fft_flops_s: float = 25e9  # a forward plus inverse real transform of size n counts 5 n log2 n flops
    mac_flops_s: float = 16e9  # a complex multiply-add counts 8 flops
    direct_flops_s: float = 4e9  # a fused multiply-add (direct lags, direct tiles), 2 flops
    call_s: float = 10e-6  # one torch call, whatever its size
    red_cell_s: float = 12e-6  # a tiled convolution's own part of a step (its red cell), whatever its width
    advance_s: float = 30e-6  # the tile engine's bookkeeping per step besides its tiles, shared by every tiled convolution
    recurrent_s: float = 30e-6  # a modal filter's recurrent step: fixed seconds, whatever its size (its calls)
    recurrent_channel_s: float = 1e-8  # the same step: seconds per channel
    mode_s: float = 1.5e-9  # the same step: seconds per complex128 mode and channel

    # -- the partitioned schedule (lcsm_compile.partition) ---------------------------------------

    def level(self, block: int, segments: int, channels: int) -> float:
        """Seconds per step of a level: one transform pair and m multiply-adds every B steps."""
        pair = 5 * nlogn(2 * block) * channels / self.fft_flops_s + 4 * self.call_s
        macs = segments * (8 * (block + 1) * channels / self.mac_flops_s + self.call_s)
        return (pair + macs) / block

    def pieces(self, block: int, segments: int, channels: int, budget: float) -> tuple:
        """A spread level's pieces of about `budget` seconds each: (forward channel slices, product
        pieces, inverse channel slices), at most one slice per channel and one product piece per
        segment and channel."""
        half = 2.5 * nlogn(2 * block) * channels / self.fft_flops_s  # one direction's transforms, every channel
        macs = segments * 8 * (block + 1) * channels / self.mac_flops_s
        cut = lambda work, most: max(1, min(most, math.ceil(work / budget)))  # noqa: E731
        return cut(half, channels), cut(macs, segments * channels), cut(half, channels)

    def direct(self, lags: int, channels: int) -> float:
        """Seconds per step of the direct lags 1 .. lags-1 (one fused multiply-add)."""
        return 0.0 if lags <= 1 else 2 * (lags - 1) * channels / self.direct_flops_s + self.call_s

    def partitioned(self, part, channels: int) -> float:
        """Seconds per step of a partition.Partition."""
        return self.direct(part.direct, channels) + sum(self.level(lv.block, lv.segments, channels) for lv in part.levels)

    # -- the relaxed tiling against a modal filter's recurrence (lcsm_compile.recurrence) ----------

    def tile(self, size: int, channels: int, crossover: int) -> float:
        """Seconds of one tile of `size` U: direct (U <= crossover), U x U multiply-adds in one call,
        else by FFT, a transform pair of size 2U, the product with the precomputed spectrum and the
        accumulate (three calls)."""
        if size <= crossover:
            return 2 * size * size * channels / self.direct_flops_s + self.call_s
        return (5 * nlogn(2 * size) * channels / self.fft_flops_s + 8 * (size + 1) * channels / self.mac_flops_s
                + 3 * self.call_s)

    def tiling(self, max_len: int, channels: int, crossover: int) -> float:
        """Seconds per step of the tiles a decode to max_len runs, amortised: the tile of size U
        runs every 2U steps, for each size a decode from position 0 runs (schedule.tile_sizes)."""
        return sum(self.tile(size, channels, crossover) / (2 * size) for size in tile_sizes(0, max_len))

    def tiled(self, max_len: int, width: int, channels: int, crossover: int) -> float:
        """Seconds per step of one tiled convolution of `width` channels: its red cell and its share
        (width / channels) of the engine's step and tiles that serve the `channels` channels of
        every long convolution."""
        return self.red_cell_s + (self.advance_s + self.tiling(max_len, channels, crossover)) * width / channels

    def recurrent(self, modes: int, channels: int) -> float:
        """Seconds per step of a modal filter's recurrence: N complex128 states per channel."""
        return self.recurrent_s + channels * (self.recurrent_channel_s + modes * self.mode_s)


def nlogn(n):
    return n * math.log2(n)
