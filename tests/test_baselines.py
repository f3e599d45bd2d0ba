"""lcsm_compile.baselines: every bank decodes what it claims through the interface the mixer
benchmark and optimize(conv=...) drive (prefill, red_cell per channel slice, advance, step, fork,
reset), checked on fresh random inputs against a float64 reference computed independently (a direct
sum over lags, no FFT)."""

import pytest
import torch

from lcsm_compile import baselines
from helpers import rel_err

EXACT = [baselines.LazyConv, baselines.EagerConv, baselines.NaiveConv]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def direct_conv(h, skip, x):
    """y[..., c, t] = skip[c] x[..., c, t] + sum_{s <= t} h[c, t - s] x[..., c, s], in float64."""
    h, x = h.double(), x.double()
    L = x.shape[-1]
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]  # [t, s] = t - s
    T = torch.where(lag >= 0, h[:, lag.clamp(0, h.shape[1] - 1)], torch.zeros(())) * (lag < h.shape[1])
    return torch.einsum("cts,...cs->...ct", T, x) + skip.double()[:, None] * x


def problem(C=6, Lh=40, L=53, rows=(2,), dtype=torch.float64, seed=0):
    """Filters shorter than the decode (zero-padded to max_len = L), a skip term, inputs [*rows, C, L]."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(C, Lh, generator=g, dtype=torch.float64).to(dtype)
    skip = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(*rows, C, L, generator=g, dtype=torch.float64).to(dtype)
    return h, skip, x, direct_conv(h, skip, x)


@pytest.fixture(autouse=True)
def small_lazy_blocks(monkeypatch):
    # blocks of 8 positions: several per step, and a partial last one
    monkeypatch.setattr(baselines.LazyConv, "BLOCK_BYTES", {"cpu": 1})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("P", [0, 1, 17])
@pytest.mark.parametrize("cls", EXACT, ids=lambda c: c.__name__)
def test_prefill_then_steps_is_the_causal_convolution(cls, P, dtype):
    h, skip, x, ref = problem(dtype=dtype, seed=P)
    bank = cls(h, skip, max_len=x.shape[-1])
    y = [bank.prefill(x[..., :P])] + [bank.step(x[..., t])[..., None] for t in range(P, x.shape[-1])]
    y = torch.cat(y, -1)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("cls", EXACT, ids=lambda c: c.__name__)
def test_a_bank_shared_by_two_sites_decodes_each_slice(cls):
    """optimize(conv=...) puts every long convolution in one bank: per position each site's red cell
    on its channel slice, then one advance()."""
    h, skip, x, ref = problem(C=7, rows=(3,), seed=5)
    a, b = slice(0, 3), slice(3, 7)
    bank = cls(h, skip, max_len=x.shape[-1])
    P = 9
    ya, yb = [bank.prefill(x[:, a, :P], channels=a)], [bank.prefill(x[:, b, :P], channels=b)]
    for t in range(P, x.shape[-1]):
        ya.append(bank.red_cell(x[:, a, t], channels=a)[..., None])
        yb.append(bank.red_cell(x[:, b, t], channels=b)[..., None])
        bank.advance()
    assert rel_err(torch.cat(ya, -1), ref[:, a]) < 1e-12
    assert rel_err(torch.cat(yb, -1), ref[:, b]) < 1e-12


@pytest.mark.parametrize("cls", EXACT, ids=lambda c: c.__name__)
def test_fork_has_its_own_state_and_reset_starts_over(cls):
    h, skip, x, ref = problem(seed=7)
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=x.dtype)
    ref2 = direct_conv(h, skip, x2)
    bank = cls(h, skip, max_len=x.shape[-1])
    other = bank.fork()
    ys, ys2 = [], []
    for t in range(x.shape[-1]):  # interleaved: the fork must not see the bank's inputs
        ys.append(bank.step(x[..., t]))
        ys2.append(other.step(x2[..., t]))
    assert rel_err(torch.stack(ys, -1), ref) < 1e-12 and rel_err(torch.stack(ys2, -1), ref2) < 1e-12
    bank.reset()
    again = torch.cat([bank.prefill(x2[..., :4])] + [bank.step(x2[..., t])[..., None] for t in range(4, x2.shape[-1])], -1)
    assert rel_err(again, ref2) < 1e-12
    assert bank.memory_bytes() > 0 and set(bank.memory_breakdown()) >= {"filters"}


def test_floor_keeps_only_the_lag0_term():
    h, skip, x, ref = problem(seed=3)
    floor = baselines.FloorConv(h, skip, max_len=x.shape[-1])
    y = torch.cat([floor.prefill(x[..., :5])] + [floor.step(x[..., t])[..., None] for t in range(5, x.shape[-1])], -1)
    lag0 = (h[:, 0] + skip)[:, None] * x
    assert rel_err(y, lag0) < 1e-12
    assert rel_err(y, ref) > 0.1  # not the convolution: a timing floor


@pytest.mark.parametrize("length", [None, 70])
def test_fft_conv_is_the_causal_convolution(length):
    """The offline lower bound (length None: the finished sequence) and a prompt's contributions to
    later outputs (length past the input: what EagerConv's prefill keeps)."""
    h, _, x, _ = problem(Lh=80, L=45, seed=11)
    y = baselines.fft_conv(h, x, length)
    n = length or x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, n - x.shape[-1]))
    assert y.shape[-1] == n
    assert rel_err(y, direct_conv(h[:, :n], torch.zeros(h.shape[0]), padded)) < 1e-12


def test_fast_sizes_are_five_smooth_and_reach_the_limit():
    sizes = baselines.fast_sizes(1000)
    assert sizes == sorted(sizes) and sizes[-1] >= 1000 and 1024 in sizes and 1000 in sizes
    for n in sizes:
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        assert n == 1
