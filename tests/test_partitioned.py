"""The partitioned schedule (lcsm_compile.partition) and its bank (lcsm_compile.partitioned): plans
that cover every lag once, decodes exact against a float64 FFT convolution, errors, the decoder."""

import math

import pytest
import torch

import lcsm_compile
from examples.models import get
from helpers import random_inputs, rel_err
from lcsm_compile.errors import LcsmError, MaxLenExceeded, ShapeError
from lcsm_compile.kernels.reference import fft_conv
from lcsm_compile.costs import Costs
from lcsm_compile.partition import partition, plan
from lcsm_compile.partitioned import PartitionedConv
from lcsm_compile.schedule import transform_work


def _covered(part):
    """lag -> how many parts of the plan add it (the red cell lag 0, the direct lags, each segment)."""
    count = [0] * part.max_len
    count[0] += 1
    for lag in range(1, min(part.direct, part.max_len)):
        count[lag] += 1
    for lv in part.levels:
        for lag in range(lv.lags[0], min(lv.lags[1], part.max_len)):
            count[lag] += 1
    return count


@pytest.mark.parametrize("max_len", [1, 2, 3, 17, 64, 100, 1000, 4097])
@pytest.mark.parametrize("channels", [1, 64, 4096])
def test_every_plan_covers_each_lag_exactly_once(max_len, channels):
    assert _covered(plan(max_len, channels)) == [1] * max_len


@pytest.mark.parametrize("max_len", [2, 100, 1000, 4097])
@pytest.mark.parametrize("channels", [1, 64, 4096])
def test_every_latency_plan_covers_each_lag_exactly_once(max_len, channels):
    part = plan(max_len, channels, latency=True)
    assert _covered(part) == [1] * max_len
    for lv in part.levels:
        forward, products, inverse = lv.pieces
        assert lv.delay == 1 and lv.pieces == (1, 1, 1) or lv.delay == 2 and products <= lv.segments * channels and max(forward, inverse) <= channels


@pytest.mark.parametrize("blocks", [[], [2], [4, 16], [2, 8, 32, 128], [64, 4096]])
@pytest.mark.parametrize("spread_from", [None, 2, 16, 64])
def test_every_partition_covers_each_lag_exactly_once(blocks, spread_from):
    part = partition(300, blocks, spread_from)
    assert _covered(part) == [1] * 300
    assert all(lv.delay == (2 if spread_from is not None and lv.block >= spread_from else 1) for lv in part.levels)


def test_the_latency_plan_spreads_the_large_levels_and_caps_the_blocks():
    """At C = 256, L = 128K: the throughput plan's largest level fires one transform pair of many
    mean steps at once; the latency plan delays and spreads every level that would, in pieces."""
    costs = Costs(fft_flops_s=17e9, mac_flops_s=14e9, direct_flops_s=6.5e9, call_s=11e-6)
    fast, bounded = plan(1 << 17, 256, costs), plan(1 << 17, 256, costs, latency=True)
    assert max(lv.block for lv in bounded.levels) < max(lv.block for lv in fast.levels)
    assert bounded.levels[-1].delay == 2 and min(bounded.levels[-1].pieces) > 1
    assert all(lv.delay == 1 for lv in fast.levels)


def test_partition_refuses_blocks_that_are_not_increasing_powers_of_two():
    for bad in ([3], [8, 4], [4, 4], [0]):
        with pytest.raises(ValueError, match="powers of two"):
            partition(100, bad)
    with pytest.raises(ValueError, match="max_len"):
        partition(0, [])


def test_the_plan_follows_its_costs():
    """Dear transforms buy multiply-adds (more segments per level); dear calls buy direct lags."""
    cheap_fft = plan(1 << 15, 2048, Costs(fft_flops_s=1e12, mac_flops_s=1e9))
    dear_fft = plan(1 << 15, 2048, Costs(fft_flops_s=1e9, mac_flops_s=1e12))
    assert len(dear_fft.levels) < len(cheap_fft.levels)
    assert dear_fft.transform_work()["ratio"] < cheap_fft.transform_work()["ratio"]
    assert plan(4096, 1, Costs(call_s=1.0)).levels == ()  # every call dearer than any flop: direct lags only


def test_transform_work_counts_the_transforms_a_decode_runs():
    """Count the firings of a real decode (every rfft the bank calls) against transform_work."""
    L, C = 300, 2
    part = partition(L, [4, 16, 64])
    bank = PartitionedConv(torch.randn(C, L, dtype=torch.float64), max_len=L, partition=part)
    bank.prefill(torch.randn(1, C, 7, dtype=torch.float64))
    sizes = []
    real = torch.fft.rfft
    torch.fft.rfft = lambda x, *a, **k: sizes.append(x.shape[-1]) or real(x, *a, **k)
    try:
        for _ in range(7, L):
            bank.step(torch.randn(1, C, dtype=torch.float64))
    finally:
        torch.fft.rfft = real
    counted = sum(2 * n * math.log2(n) for n in sizes)  # each forward transform has its inverse
    assert counted == pytest.approx(part.transform_work(prefill_len=7)["transforms"])


def test_fewer_transforms_than_the_tiling_at_16k_and_32k():
    """The figure of issue 22 item 1: the plans' transform counts against the offline convolution."""
    for L in (1 << 14, 1 << 15):
        part = plan(L, 2048)
        assert part.transform_work()["ratio"] <= 1.45 < transform_work(L, 16)["ratio"]


def _decode(bank, x, P):
    """A prefill of P positions, then steps: outputs [rows, C, L]."""
    ys = [bank.prefill(x[..., :P])]
    ys += [bank.step(x[..., t])[..., None] for t in range(P, x.shape[-1])]
    return torch.cat(ys, -1)


@pytest.mark.parametrize("blocks,P,rows", [(None, 0, 1), (None, 37, 2), ([2, 8, 32], 5, 1), ([4], 0, 3),
                                           ([], 10, 1), ([16, 64], 299, 1), ([2, 4, 8, 16, 32, 64, 128], 1, 2)])
def test_exact_against_a_float64_fft_convolution(blocks, P, rows):
    L, C = 300, 5
    g = torch.Generator().manual_seed(P + rows)
    h = torch.randn(C, L, generator=g, dtype=torch.float64)
    skip = torch.randn(C, generator=g, dtype=torch.float64)
    x = torch.randn(rows, C, L, generator=g, dtype=torch.float64)
    part = plan(L, C) if blocks is None else partition(L, blocks)
    y = _decode(PartitionedConv(h, skip, max_len=L, partition=part), x, P)
    assert rel_err(y, fft_conv(h, x) + skip[:, None] * x) < 1e-13


@pytest.mark.parametrize("blocks,spread,pieces,P,rows", [([4, 16, 64], 16, None, 0, 1), ([4, 16, 64], 4, None, 7, 2),
                                                        ([2, 8], 2, {2: (1, 1, 1), 8: (3, 2, 5)}, 1, 1),
                                                        ([8, 32], 8, {8: (2, 6, 1), 32: (5, 1, 3)}, 100, 1),
                                                        ([32], 32, None, 0, 3), ([16, 64], 16, {16: (16, 6, 16), 64: (2, 2, 2)}, 299, 1),
                                                        ([8, 32], 8, {8: (5, 13, 5), 32: (1, 40, 2)}, 3, 2)])
def test_spread_levels_are_exact(blocks, spread, pieces, P, rows):
    """Delayed levels, their firings done a channel piece per step over the next block."""
    L, C = 300, 5
    g = torch.Generator().manual_seed(P + rows + len(blocks))
    h = torch.randn(C, L, generator=g, dtype=torch.float64)
    x = torch.randn(rows, C, L, generator=g, dtype=torch.float64)
    y = _decode(PartitionedConv(h, max_len=L, partition=partition(L, blocks, spread, pieces)), x, P)
    assert rel_err(y, fft_conv(h, x)) < 1e-13


def test_a_spread_level_does_one_piece_per_step():
    """Latency mode's point, counted rather than timed: a spread level's firing is cut into its
    pieces (forward transforms by channels, products by segments, inverse transforms by channels),
    no step runs more than one piece of a level, and the level that is not spread fires whole."""
    L, C = 512, 8
    part = partition(L, [4, 32, 128], spread_from=32, pieces={32: (2, 3, 2), 128: (8, 2, 4)})
    bank = PartitionedConv(torch.randn(C, L, dtype=torch.float64), max_len=L, partition=part)
    bank.prefill(torch.randn(1, C, 3, dtype=torch.float64))
    calls, per_step = [], []
    piece, fire = bank._piece, bank._fire
    bank._piece = lambda j, i, t, stage, part: calls.append((j, stage, part)) or piece(j, i, t, stage, part)
    bank._fire = lambda j, i, t: calls.append((j, "whole", None)) or fire(j, i, t)
    for _ in range(3, L):
        calls.clear()
        bank.step(torch.randn(1, C, dtype=torch.float64))
        per_step.append(list(calls))
    for step in per_step:
        levels = [j for j, _, _ in step]
        assert all(levels.count(j) <= 1 for j in (1, 2))
        assert all(stage == "whole" for j, stage, _ in step if j == 0)
    top = [(stage, part) for step in per_step for j, stage, part in step if j == 2]
    firings = (L - 3 - 128 - 1) // 128  # steps i = 128k whose outputs [t+1+B, t+2B] start inside max_len
    assert part.levels[2].segments == 2 and firings == 2
    assert top == firings * ([("forward", slice(c, c + 1)) for c in range(8)] + [("products", (slice(k, k + 1), slice(0, 8))) for k in range(2)]
                             + [("inverse", slice(c, c + 2)) for c in range(0, 8, 2)])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_inputs_accumulate_in_float32(dtype, tol):
    L, C = 513, 16
    g = torch.Generator().manual_seed(3)
    h = torch.randn(C, L, generator=g) * torch.exp(-torch.arange(L) / 100.0)
    x = torch.randn(2, C, L, generator=g).to(dtype)
    y = _decode(PartitionedConv(h, max_len=L, partition=partition(L, [8, 64])), x, 3)
    assert y.dtype == dtype
    assert rel_err(y.double(), fft_conv(h.double(), x.double())) < tol


def test_channel_slices_step_like_the_whole_bank():
    """A bank shared by several convolutions: a prefill and red cells per channel slice, one advance."""
    L, C = 200, 6
    h, x = torch.randn(C, L, dtype=torch.float64), torch.randn(1, C, L, dtype=torch.float64)
    bank = PartitionedConv(h, max_len=L, partition=partition(L, [4, 32]))
    a, b = slice(0, 2), slice(2, 6)
    ys = [torch.cat([bank.prefill(x[:, a, :9], channels=a), bank.prefill(x[:, b, :9], channels=b)], 1)]
    for t in range(9, L):
        ys.append(torch.cat([bank.red_cell(x[:, a, t], channels=a), bank.red_cell(x[:, b, t], channels=b)], 1)[..., None])
        bank.advance()
    assert rel_err(torch.cat(ys, -1), fft_conv(h, x)) < 1e-13


def test_reset_and_fork_start_over_exactly():
    L, C = 150, 3
    h, x = torch.randn(C, L, dtype=torch.float64), torch.randn(1, C, L, dtype=torch.float64)
    bank = PartitionedConv(h, max_len=L, partition=partition(L, [4, 16]))
    first = _decode(bank, x, 4)
    bank.reset()
    assert torch.equal(_decode(bank, x, 4), first)
    assert torch.equal(_decode(bank.fork(), x, 4), first)


def test_errors_are_typed():
    L, C = 40, 3
    bank = PartitionedConv(torch.randn(C, L), max_len=L)
    with pytest.raises(ValueError, match="partition"):
        PartitionedConv(torch.randn(C, L), max_len=L, partition=partition(L + 1, []))
    with pytest.raises(ShapeError):
        PartitionedConv(torch.randn(C, L, 2))
    with pytest.raises(ShapeError, match="C = 3"):
        bank.step(torch.randn(1, 4))
    with pytest.raises(MaxLenExceeded):
        bank.prefill(torch.randn(1, C, L + 1))
    bank.prefill(torch.randn(1, C, L - 1))
    with pytest.raises(LcsmError, match="fresh state"):
        bank.prefill(torch.randn(1, C, 2))
    with pytest.raises(ShapeError, match="batch dims"):
        bank.step(torch.randn(2, C))
    bank.step(torch.randn(1, C))
    with pytest.raises(MaxLenExceeded):
        bank.step(torch.randn(1, C))


def test_memory_breakdown_names_the_delay_lines():
    L, C = 256, 4
    bank = PartitionedConv(torch.randn(C, L), max_len=L, partition=partition(L, [8, 64]))
    assert bank.memory_breakdown()["state"] == 0
    bank.prefill(torch.randn(2, C, 3))
    parts = bank.memory_breakdown()
    # delay lines: m (B+1) complex64 bins per level per row and channel; the state one float per position
    assert parts["delay_lines"] == 2 * C * 8 * (7 * 9 + 3 * 65)
    assert parts["state"] == 2 * C * L * 4 and bank.memory_bytes() == sum(parts.values())


@pytest.mark.parametrize("latency", [False, True])
def test_decoder_on_the_partitioned_bank_equals_the_model(latency):
    """optimize(conv="partitioned"): the same step program on the partitioned bank (its plan chosen
    by the layer schedule, which prints it), teacher-forced against the model; it steps one shared
    position at a time, so rows and extend are not offered."""
    model, inputs = get("hyena_order2").build()
    decoder = lcsm_compile.optimize(model, inputs, conv="partitioned", latency=latency, compile=False)
    assert not decoder.can("extend") and not decoder.can("rows")
    assert decoder.bank.partition is decoder.schedule.partition
    assert any(lv.delay == 2 for lv in decoder.bank.partition.levels) == latency
    assert "partitioned schedule of the bank" in decoder.schedule.table()
    x = random_inputs(inputs[0], decoder.max_len)
    with torch.no_grad():
        session = decoder.session()
        y = torch.cat([session.prefill(x[:, :5])] + [session.step(x[:, t : t + 1]) for t in range(5, x.shape[1])], 1)
        assert rel_err(y, model(x)) < 1e-5


def test_latency_needs_the_partitioned_bank():
    model, inputs = get("hyena_order2").build()
    with pytest.raises(ValueError, match="conv='partitioned'"):
        lcsm_compile.optimize(model, inputs, latency=True)
    with pytest.raises(TypeError, match=r"latency: expected one of \[True, False\]"):
        lcsm_compile.optimize(model, inputs, conv="partitioned", latency="yes")
