"""`lcsm-compile demo`: decode a bank of Hyena-style filters one position at a time, check it
against a float64 reference, and time it against the lazy per-step convolution."""

import time

import torch
from tqdm import tqdm

from lcsm_compile.engine import OnlineConv


def hyena_filters(channels, length, seed=0):
    """Hyena-like filters: sinusoids of random frequency under an exponential decay window."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, length)
    freq = torch.rand(channels, 1, generator=g) * 20
    decay = torch.rand(channels, 1, generator=g) * 8 + 0.5
    return torch.sin(freq * t + torch.rand(channels, 1, generator=g)) * torch.exp(-decay * t) / length**0.5


def lazy_step(history, h_rev, t):
    """Baseline: the output at t as one batched dot product of the history with the reversed filter."""
    return (history[:, : t + 1] * h_rev[:, -(t + 1) :]).sum(-1)


def add_arguments(parser):
    """The demo's options, for `lcsm-compile demo`."""
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=128)


def main(args):
    C, L, P = args.channels, args.length, args.prompt
    h = hyena_filters(C, L)
    x = torch.randn(C, L)
    print(f"lcsm-compile demo: {C} channels, {L} positions, prompt {P}, {torch.get_num_threads()} threads")

    start = time.perf_counter()
    conv = OnlineConv(h)
    ys = [conv.prefill(x[:, :P])]
    for t in tqdm(range(P, L), desc="flash", unit="pos", leave=False):
        ys.append(conv.step(x[:, t])[:, None])
    flash_s = time.perf_counter() - start
    y = torch.cat(ys, -1)

    n = 2 * L
    ref = torch.fft.irfft(torch.fft.rfft(x.double(), n=n) * torch.fft.rfft(h.double(), n=n), n=n)[:, :L]
    err = ((y.double() - ref).norm() / ref.norm()).item()

    h_rev, history = h.flip(-1), torch.zeros(C, L)
    start = time.perf_counter()
    history[:, :P] = x[:, :P]
    for t in tqdm(range(P, L), desc="lazy", unit="pos", leave=False):
        history[:, t] = x[:, t]
        lazy_step(history, h_rev, t)
    lazy_s = time.perf_counter() - start

    print(f"relative error vs float64 reference: {err:.2e} ({'OK' if err < 1e-5 else 'TOO LARGE'})")
    print(f"state held: {conv.memory_bytes() / 2**20:.1f} MiB")
    print(f"{'method':<8} {'seconds':>9} {'us/pos':>8}")
    for name, s in [("lazy", lazy_s), ("flash", flash_s)]:
        print(f"{name:<8} {s:>9.3f} {s / (L - P) * 1e6:>8.1f}")
    print(f"speedup flash vs lazy: {lazy_s / flash_s:.1f}x")
    if err >= 1e-5:
        raise SystemExit(1)
