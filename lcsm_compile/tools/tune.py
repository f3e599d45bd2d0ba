"""`lcsm-compile tune`: measure this machine's calibration and cache it (lcsm_compile.tuning reads it).

The crossover: one direct and one FFT tile per size, the largest size up to which direct is no
slower. The costs: the rates of the strategies' primitives (measure_costs).
"""

import dataclasses
import json
import math
import os
import time

import torch

from lcsm_compile import tuning
from lcsm_compile.costs import Costs
from lcsm_compile.engine import OnlineConv
from lcsm_compile.errors import DeviceError
from lcsm_compile.kernels import reference as k
from lcsm_compile.recurrence import Recurrence


def _best_time(fn, repeats):
    fn()  # warm-up: first calls pay for allocation and plan caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def check_device(device) -> torch.device:
    """`device` as a torch.device that can run here: cpu, or cuda[:N] with CUDA available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise DeviceError(f"device {device!r}: expected a CUDA device, but {why} (torch {torch.__version__}); "
                              "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: expected an index below {torch.cuda.device_count()} (CUDA devices here)")
    return dev


def measure(device="cpu", channels=1024, max_size=256, repeats=20):
    """Time one direct and one FFT tile per size U on `device`; returns [(U, direct_s, fft_s)]."""
    device = check_device(device)
    rows = []
    U = 1
    while U <= max_size:
        h = torch.randn(channels, 4 * U, device=device)
        Xb, Ab = torch.randn(2 * U, 1, channels, device=device), torch.zeros(2 * U, 1, channels, device=device)
        Xc, Ac = torch.randn(1, channels, 4 * U, device=device), torch.zeros(1, channels, 4 * U, device=device)
        T, S = k.toeplitz(h, U).contiguous(), k.tile_spectrum(h, U)
        direct = _best_time(lambda: k.direct_tile_from_toeplitz(Xb, Ab, T, 0, U, 2 * U, U), repeats)
        fft = _best_time(lambda: k.fft_tile(Xc, Ac, S, 0, U, 2 * U, U), repeats)
        rows.append((U, direct, fft))
        U *= 2
    return rows


def measure_costs(device="cpu", channels=1024, block=512, repeats=10, crossover=None) -> Costs:
    """The rates of the strategies' primitives on `device`, timed on `channels` channels: a
    transform pair of size 2B, a complex multiply-add of B+1 bins, the direct lags' fused
    multiply-add (31 lags), a call on one element, a tiled convolution's red cell, the tile
    engine's bookkeeping per step (a 512-step decode of 16 channels, whose tiles are mostly calls,
    less what Costs.tiling prices them at with `crossover`, default this device's), and a modal
    filter's recurrent step (its fixed seconds, seconds per channel and per mode and channel, from
    steps of 16 channels and 4 modes, `channels` and 4, `channels` and 32)."""
    device = check_device(device)
    n = 2 * block
    x = torch.randn(1, channels, n, device=device)
    X = torch.fft.rfft(x)
    Y, H = torch.zeros_like(X), torch.randn_like(X)
    acc, taps, v = (torch.zeros(31, 1, channels, device=device), torch.randn(31, 1, channels, device=device),
                    torch.randn(1, channels, device=device))
    one = torch.zeros(1, device=device)
    pair = _best_time(lambda: torch.fft.irfft(torch.fft.rfft(x), n=n), repeats)
    mac = _best_time(lambda: Y.addcmul_(X, H), repeats)
    direct = _best_time(lambda: acc.addcmul_(taps, v), repeats)
    call = _best_time(lambda: one.add_(1.0), repeats)
    bank = OnlineConv(torch.randn(channels, 64, device=device))
    bank.prefill(torch.randn(1, channels, 3, device=device))
    red_cell = _best_time(lambda: bank.red_cell(v), 5 * repeats)  # the same position again: no advance
    small = OnlineConv(torch.randn(16, 1024, device=device), crossover=crossover)
    x16 = torch.randn(1, 16, device=device)

    def decode():
        small.reset()
        small.prefill(torch.randn(1, 16, 1, device=device))
        for _ in range(512):
            small.red_cell(x16)
            small.advance()

    engine = _best_time(decode, 3) / 512 - _best_time(lambda: small.red_cell(x16), 5 * repeats)
    step = {}  # the recurrent step at (width, modes): the model below passes through these three points
    for width, modes in ((16, 4), (channels, 4), (channels, 32)):
        poles = torch.polar(torch.full((width, modes), 0.9, dtype=torch.float64), torch.rand(width, modes, dtype=torch.float64))
        rec = Recurrence(poles, torch.ones_like(poles), torch.ones(width), device)
        state = torch.zeros(1, width, modes, dtype=torch.complex128, device=device)
        inputs = torch.ones(1, width, device=device)  # made here: the timed step allocates nothing of the caller's
        step[width, modes] = _best_time(lambda: rec.step(state, inputs), 5 * repeats)
    per_mode = max(step[channels, 32] - step[channels, 4], 0.0) / (28 * channels)
    fixed = max(step[16, 4] - 16 * 4 * per_mode, call)
    per_channel = max(step[channels, 4] - fixed - 4 * channels * per_mode, 0.0) / channels
    costs = Costs(fft_flops_s=5 * n * math.log2(n) * channels / pair, mac_flops_s=8 * (block + 1) * channels / mac,
                  direct_flops_s=2 * 31 * channels / direct, call_s=call, red_cell_s=red_cell, recurrent_s=fixed,
                  recurrent_channel_s=per_channel, mode_s=per_mode)
    advance = max(engine - costs.tiling(513, 16, small.crossover), 0.0)  # steps 1 .. 512 run tiles below 513
    return dataclasses.replace(costs, advance_s=advance)


def choose_crossover(rows) -> int:
    """Largest U such that the direct tile is no slower than the FFT tile at every size up to U."""
    crossover = 1
    for U, direct, fft in rows:
        if direct > fft:
            break
        crossover = U
    return crossover


def tune(device="cpu", channels=1024, max_size=256, save=True):
    """Measure, choose and (optionally) cache the crossover and the costs for `device`.
    Returns (crossover, rows, costs)."""
    rows = measure(device, channels, max_size)
    crossover = choose_crossover(rows)
    costs = measure_costs(device, channels, crossover=crossover)
    if save:
        cache = tuning.load()
        cache[tuning.device_key(device)] = {"crossover": crossover, "channels": channels, "rows": rows,
                                     "costs": dataclasses.asdict(costs)}
        os.makedirs(os.path.dirname(tuning.cache_path()), exist_ok=True)
        with open(tuning.cache_path(), "w") as f:
            json.dump(cache, f, indent=1)
    return crossover, rows, costs
