"""The partitioned schedule: the lag axis cut into bands, each band decoded by a frequency-domain
delay line (uniformly partitioned overlap-save, as real-time audio convolvers do), as integer
arithmetic and a cost model.

After a prefill of P positions, let i = t - P + 1 count the steps. Lag 0 is the red cell; lags
1 .. D-1 are added directly, x_t * h[1:D] into the next D-1 accumulators. Level (B, m) covers lags
[B, (m+1) B) in m segments of B lags: whenever B divides i, the spectrum of the last 2B inputs
(one forward transform of size 2B) joins its delay line, the products of the last m spectra with
the m segment spectra are summed in the frequency domain, and one inverse transform gives the
level's contribution to the next B outputs [t+1, t+B]. Each input block's spectrum thus serves
all m segments, and each output block costs one inverse transform: the two reuses the paper's
tiling lacks. Bands tile [1, max_len): the next level's block is (m+1) B, and the top level's
segments reach max_len.

The price is m complex multiply-adds per channel per step per level, which the transform count
ignores; `plan` weighs both with per-machine costs (lcsm_compile.costs.Costs).

Bounded step latency (plan(..., latency=True)): a level whose one firing would cost several mean
steps is delayed by one block, covering lags [2B, (m+2)B): its outputs are then due B steps after
its inputs are complete, so the bank spreads its work over those B steps in pieces: the forward
transforms a channel slice at a time, the products a slice of segments and channels at a time,
the inverse transforms a channel slice at a time. Blocks are capped so that one channel's transform stays a
few mean steps.
"""

from dataclasses import dataclass

from lcsm_compile.costs import Costs, nlogn


@dataclass(frozen=True)
class Level:
    block: int  # B, a power of two: the transform size is 2B
    segments: int  # m >= 1: lags [dB, (d+m) B)
    delay: int = 1  # d: 1 fires when its inputs are complete; 2 has B steps of slack (spread)
    pieces: tuple = (1, 1, 1)  # a spread level's firing in pieces: (forward channel slices, product pieces, inverse channel slices)

    @property
    def lags(self) -> tuple[int, int]:
        return self.delay * self.block, (self.delay + self.segments) * self.block


@dataclass(frozen=True)
class Partition:
    max_len: int
    direct: int  # D: lags 1 .. D-1 added directly each step
    levels: tuple[Level, ...]

    def transform_work(self, prefill_len: int = 0) -> dict:
        """FFT work of a decode from prefill_len to max_len per channel, in the units of
        schedule.transform_work (n log2 n per transform of size n): each firing of a level runs one
        forward and one inverse transform of size 2B. -> {"transforms", "offline", "ratio"}."""
        steps = self.max_len - 1 - prefill_len  # steps whose outputs land inside max_len
        work = sum((steps // lv.block) * 2 * nlogn(2 * lv.block) for lv in self.levels)
        offline = 3 * nlogn(2 * self.max_len)
        return {"transforms": work, "offline": offline, "ratio": work / offline}

    def to_json(self) -> dict:
        return {"direct": self.direct, "levels": [[lv.block, lv.segments, lv.delay, list(lv.pieces)] for lv in self.levels],
                "transforms": self.transform_work()}

    def multiply_adds(self) -> int:
        """Complex multiply-adds per channel per step, amortised (m (B+1) per firing every B steps), rounded."""
        return round(sum(lv.segments * (lv.block + 1) / lv.block for lv in self.levels))

    def table(self) -> str:
        rows = [f"  direct lags 1 .. {self.direct - 1}"]
        for lv in self.levels:
            lo, hi = lv.lags
            rows.append(f"  block {lv.block:>6}  segments {lv.segments:>3}  lags [{lo}, {min(hi, self.max_len)})"
                        f"  transforms of size {2 * lv.block} every {lv.block} steps"
                        + (f", spread over the {lv.block} steps after" if lv.delay == 2 else ""))
        return "\n".join(rows)


def partition(max_len: int, blocks, spread_from: int | None = None, pieces=None) -> Partition:
    """The partition with these level blocks (increasing powers of two); direct lags below the first.
    Levels of block >= spread_from are delayed by one block and spread, in pieces[block] = (forward
    channel slices, product pieces, inverse channel slices) (default: (B, m, B); a bank cuts at
    most one slice per channel; product pieces up to m are segment ranges, more cut each segment
    into channel slices); blocks whose first lag is at or past max_len are dropped (no lag reaches
    them)."""
    max_len = int(max_len)
    if max_len < 1:
        raise ValueError(f"max_len: expected >= 1, got {max_len}")
    blocks = [int(b) for b in blocks]
    if any(b < 1 or b & (b - 1) for b in blocks) or blocks != sorted(set(blocks)):
        raise ValueError(f"blocks: expected increasing powers of two, got {blocks}")
    delay = _delays(spread_from)
    blocks = [b for b in blocks if delay(b) * b < max_len]
    if not blocks:
        return Partition(max_len, max_len, ())
    def level(b, segments):
        spread = delay(b) == 2
        return Level(b, segments, delay(b), tuple((pieces or {}).get(b, (b, segments, b))) if spread else (1, 1, 1))

    levels = [level(b, delay(nxt) * nxt // b - delay(b)) for b, nxt in zip(blocks, blocks[1:])]
    last = blocks[-1]
    levels.append(level(last, -(-max_len // last) - delay(last)))
    return Partition(max_len, delay(blocks[0]) * blocks[0], tuple(levels))


def _delays(spread_from):
    return lambda block: 2 if spread_from is not None and block >= spread_from else 1


def plan(max_len: int, channels: int, costs: Costs | None = None, latency: bool = False) -> Partition:
    """The cheapest partition of [1, max_len) by `costs` (default Costs()): a shortest path over
    power-of-two blocks, each edge a level (B -> the next level's block) or the top level.

    latency=True: bounded step latency. From the throughput plan's mean step cost, every level whose
    one firing costs over SPIKE mean steps is spread (delayed by one block), and blocks are capped
    where one channel's share of a firing would cost over SPIKE mean steps; then the shortest path
    again under those rules."""
    costs = Costs() if costs is None else costs
    best = _shortest(int(max_len), channels, costs, None, None)
    if not latency or not best.levels:
        return best
    mean = costs.partitioned(best, channels)
    sizes = [1 << k for k in range(1, int(max_len).bit_length())]
    fire = {B: costs.level(B, 3, channels) * B for B in sizes}  # one firing of a level of 3 segments
    spread_from = min((B for B in sizes if fire[B] > SPIKE * mean), default=None)
    max_block = max((B for B in sizes if fire[B] / channels <= SPIKE * mean), default=2)
    spread = _shortest(int(max_len), channels, costs, spread_from, max_block)
    pieces = {lv.block: costs.pieces(lv.block, lv.segments, channels, SPIKE * mean) for lv in spread.levels}
    return partition(int(max_len), [lv.block for lv in spread.levels], spread_from, pieces)


SPIKE = 2.0  # latency mode: no unspread firing, and no spread piece, costs more than this many mean steps


def _shortest(max_len, channels, costs, spread_from, max_block):
    delay = _delays(spread_from)
    blocks = [1 << k for k in range(1, max(1, max_len - 1).bit_length() + 1)
              if delay(1 << k) * (1 << k) < max_len and (max_block is None or 1 << k <= max_block)]
    best = {}  # block B -> (seconds per step of the levels from B on, their blocks)
    for B in reversed(blocks):
        options = [(costs.level(B, -(-max_len // B) - delay(B), channels), [B])]  # the top level
        for nxt in blocks:
            if nxt >= 2 * B:
                cost, rest = best[nxt]
                options.append((costs.level(B, delay(nxt) * nxt // B - delay(B), channels) + cost, [B] + rest))
        best[B] = min(options, key=lambda o: o[0])
    choices = [(costs.direct(max_len, channels), [])]  # direct lags only
    choices += [(costs.direct(delay(B) * B, channels) + best[B][0], best[B][1]) for B in blocks]
    return partition(max_len, min(choices, key=lambda o: o[0])[1], spread_from)

