"""OnlineConv against float64 references on fresh random inputs (relative error, never zeros).

Tolerances sit at about 3x the largest error observed on this machine: float64 decodes ~4e-16
(TOL64), float32 ~1.7e-7 at L = 256 and ~2.6e-7 at L = 16384. Low-precision inputs are held to the
rounding of the exact result into their dtype, which is all the error float32 accumulation leaves.
"""

import math

import pytest
import torch

import lcsm_compile
from lcsm_compile import DeviceError, DTypeError, LcsmError, MaxLenExceeded, OnlineConv, ShapeError


TOL64 = 1.5e-15


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(h, x, skip=None):
    """float64 causal convolution y_t = sum_{s<=t} h[t-s] x_s (+ D x_t), by an uncut FFT."""
    L = x.shape[-1]
    h = h.double()[:, :L]
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(x.double(), n=n) * torch.fft.rfft(h, n=n), n=n)[..., :L]
    return y if skip is None else y + skip.double()[:, None] * x.double()


def direct_reference(h, x):
    """float64 O(L^2) causal convolution by its definition: no FFT, and no product with a future input."""
    h, x = h.double(), x.double()
    cols = [(h[:, : t + 1].flip(-1) * x[..., : t + 1]).sum(-1) for t in range(x.shape[-1])]
    return torch.stack(cols, -1)


def decode(conv, x, prefill_len):
    """Prefill x[..., :P], then step through the rest; returns [..., C, L]."""
    outs = [conv.prefill(x[..., :prefill_len])] if prefill_len else []
    for t in range(prefill_len, x.shape[-1]):
        outs.append(conv.step(x[..., t]).unsqueeze(-1))
    return torch.cat(outs, -1)


def random_filters(C, L, dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    decay = torch.exp(-torch.arange(L) / (L / 4))
    return (torch.randn(C, L, generator=g) * decay / math.sqrt(L)).to(dtype)


def test_direct_reference_agrees_with_fft_reference():
    h, x = random_filters(3, 50, torch.float64), torch.randn(2, 3, 50, dtype=torch.float64)
    assert rel_err(direct_reference(h, x), reference(h, x)) < 1e-13


@pytest.mark.parametrize("crossover", [1, 2, 3, 8, 48, 64])
@pytest.mark.parametrize("prefill_len", [0, 1, 37, 299, 300])
def test_float64_exact(crossover, prefill_len):
    C, L = 5, 300
    h, x = random_filters(C, L, torch.float64), torch.randn(2, C, L, dtype=torch.float64)
    y = decode(OnlineConv(h, crossover=crossover), x, prefill_len)
    assert y.dtype == torch.float64
    assert rel_err(y, direct_reference(h, x)) < TOL64


@pytest.mark.parametrize("prefill_len", [0, 37])
def test_float64_exact_with_chunked_transforms(monkeypatch, prefill_len):
    """On CPU the FFT tiles and the prefill's convolution run channel chunk by channel chunk; with
    chunks of a few channels (one, at the largest tiles) the decode stays exact."""
    from lcsm_compile.kernels import reference as kernels

    monkeypatch.setattr(kernels, "FFT_CHUNK", 256)
    C, L = 7, 300
    assert len(kernels.channel_chunks(torch.zeros(2, C, 1), 128)) == C  # chunks of one channel at U = 64
    h, x = random_filters(C, L, torch.float64), torch.randn(2, C, L, dtype=torch.float64)
    y = decode(OnlineConv(h, crossover=2), x, prefill_len)
    assert rel_err(y, direct_reference(h, x)) < TOL64


def test_float32_long_sequence():
    C, L = 4, 16384
    h, x = random_filters(C, L), torch.randn(C, L)
    y = decode(OnlineConv(h), x, 0)
    assert rel_err(y, reference(h, x)) <= 1e-6


def accumulated_in(dtype, h, x):
    """The causal convolution with every partial sum rounded to `dtype` (what an engine that
    accumulated in the IO dtype would return): a negative control for the test below."""
    h, x = h.to(dtype), x.to(dtype)
    acc = torch.zeros_like(x)
    for lag in range(x.shape[-1]):
        acc[..., lag:] += h[:, lag : lag + 1] * x[..., : x.shape[-1] - lag]
    return acc


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    """bf16/fp16 inputs: the outputs carry only the rounding of the exact result into the IO dtype
    (observed 1.7e-3 and 2.1e-4, equal to that rounding to 4 digits); accumulating in the IO dtype
    would add far more."""
    C, L = 6, 2048
    h, x = random_filters(C, L), torch.randn(C, L).to(dtype)
    conv = OnlineConv(h)
    y = decode(conv, x, 100)
    assert y.dtype == dtype and conv.S.dtype == torch.float32
    ref = reference(h, x)
    rounding = rel_err(ref.to(dtype), ref)
    assert rel_err(y, ref) <= 1.05 * rounding + 1e-6
    assert rel_err(accumulated_in(dtype, h, x), ref) > 2 * rounding  # the check can fail


def test_batch_dims_share_filters():
    C, L = 3, 200
    h, x = random_filters(C, L, torch.float64), torch.randn(2, 4, C, L, dtype=torch.float64)
    conv = OnlineConv(h)
    single = OnlineConv(h)
    y = decode(conv, x, 17)
    assert y.shape == x.shape
    assert rel_err(y, reference(h, x)) < TOL64
    # filters and tile operators are shared: only the state and the block scale with the rows
    decode(single, x[0, 0], 17)
    per_row = (conv.memory_bytes() - single.memory_bytes()) / 7
    assert per_row == pytest.approx(single.memory_bytes() - _filter_bytes(single))


def _filter_bytes(conv):
    return sum(t.numel() * t.element_size() for t in [conv.h, conv.h0, *conv.toeplitz.values(), *conv.spectra.values()])


def test_skip_and_short_filter_with_longer_max_len():
    C, Lh, L = 4, 7, 120
    h, skip = random_filters(C, Lh, torch.float64), torch.randn(C, dtype=torch.float64)
    x = torch.randn(C, L, dtype=torch.float64)
    y = decode(OnlineConv(h, skip, max_len=L), x, 9)
    hp = torch.nn.functional.pad(h, (0, L - Lh))
    assert rel_err(y, reference(hp, x, skip)) < TOL64


def test_reset_and_reuse_without_reallocation():
    C, L = 3, 256
    h = random_filters(C, L)
    conv = OnlineConv(h)
    x1, x2 = torch.randn(C, L), torch.randn(C, L)
    decode(conv, x1, 10)
    ptrs = [t.data_ptr() for t in (conv.S, conv.Xb, conv.Ab)]
    size = conv.memory_bytes()
    conv.reset()
    assert conv.position == 0
    y = decode(conv, x2, 0)
    assert rel_err(y, reference(h, x2)) < 5e-7
    assert [t.data_ptr() for t in (conv.S, conv.Xb, conv.Ab)] == ptrs
    assert conv.memory_bytes() == size


def test_memory_bytes_counts_state():
    C, L = 8, 1000
    conv = OnlineConv(random_filters(C, L), crossover=4)
    before = conv.memory_bytes()
    conv.step(torch.randn(2, C))
    state = 2 * C * L * 4 + 2 * (conv.block * 2 * C * 4)  # one state buffer (inputs and accumulators), block in and out
    assert conv.memory_bytes() - before == state
    spectra = sum(C * (U + 1) * 8 for U in conv.spectra)
    assert spectra > 0 and before >= spectra + C * L * 4


def test_nan_propagates_like_reference():
    C, L = 2, 128
    h = random_filters(C, L, torch.float64)
    for prefill_len, bad_at in [(0, 40), (64, 10), (64, 90)]:
        x = torch.randn(C, L, dtype=torch.float64)
        x[1, bad_at] = float("nan")
        y = decode(OnlineConv(h, crossover=4), x, prefill_len)
        ref = direct_reference(h, x)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), (prefill_len, bad_at)
        assert not torch.isnan(y[1, :bad_at]).any() and torch.isnan(y[1, bad_at:]).all()
        assert rel_err(y[0], ref[0]) < TOL64 and rel_err(y[1, :bad_at], ref[1, :bad_at]) < TOL64


def test_step_past_max_len_names_the_limit():
    conv = OnlineConv(random_filters(2, 5))
    conv.prefill(torch.randn(2, 5))
    with pytest.raises(MaxLenExceeded, match="max_len = 5"):
        conv.step(torch.randn(2))
    with pytest.raises(MaxLenExceeded, match="max_len = 5"):
        OnlineConv(random_filters(2, 5)).prefill(torch.randn(2, 6))


def test_bad_inputs_raise_typed_errors():
    conv = OnlineConv(random_filters(3, 16))
    with pytest.raises(ShapeError, match="C = 3"):
        conv.step(torch.randn(4))
    with pytest.raises(DTypeError, match="floating"):
        conv.step(torch.ones(3, dtype=torch.int64))
    with pytest.raises(DeviceError, match="expected device cpu"):
        conv.step(torch.randn(3, device="meta"))
    conv.step(torch.randn(2, 3))
    with pytest.raises(ShapeError, match=r"batch dims \(2,\)"):
        conv.step(torch.randn(3))
    with pytest.raises(DTypeError, match="float32"):
        conv.step(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(LcsmError, match="reset"):
        conv.prefill(torch.randn(2, 3, 4))
    with pytest.raises(DTypeError, match="float64"):
        OnlineConv(random_filters(3, 16, torch.float64)).step(torch.randn(3))
    with pytest.raises(ShapeError, match=r"\[C, Lh\]"):
        OnlineConv(torch.randn(16))
    with pytest.raises(ShapeError, match=r"\(3,\)"):
        OnlineConv(random_filters(3, 16), skip=torch.randn(4))
    with pytest.raises(ValueError, match="kernels"):
        OnlineConv(random_filters(3, 16), kernels="cuda")


def test_public_errors_are_typed():
    """Every error the package raises on purpose is an LcsmError, and also the builtin a caller
    would catch for that kind of mistake."""
    for name, builtin in (("ShapeError", ValueError), ("DTypeError", TypeError), ("DeviceError", ValueError),
                          ("InputError", ValueError), ("MaxLenExceeded", IndexError), ("NotDecodable", Exception),
                          ("StaleDecoder", RuntimeError), ("SessionBroken", RuntimeError)):
        cls = getattr(lcsm_compile, name)
        assert name in lcsm_compile.__all__ and issubclass(cls, lcsm_compile.LcsmError) and issubclass(cls, builtin)
    assert set(lcsm_compile.__all__) <= set(dir(lcsm_compile))


def test_fork_shares_filters_and_keeps_its_own_state():
    """fork(): the tile operators are the same tensors (never copied); the state is fresh and
    independent, so a fork and its parent decode different inputs interleaved, both exactly."""
    C, L = 3, 200
    h = random_filters(C, L, torch.float64)
    parent = OnlineConv(h, crossover=4)
    x1, x2 = torch.randn(C, L, dtype=torch.float64), torch.randn(2, C, L, dtype=torch.float64)
    parent.prefill(x1[..., :7])
    child = parent.fork()
    assert child.position == 0 and child.S is None  # fresh: its batch dims come from its own first call
    assert child.h.data_ptr() == parent.h.data_ptr()
    assert all(child.spectra[U].data_ptr() == parent.spectra[U].data_ptr() for U in parent.spectra)
    assert all(child.toeplitz[U].data_ptr() == parent.toeplitz[U].data_ptr() for U in parent.toeplitz)
    y1, y2 = [], [child.prefill(x2[..., :30])]
    for t in range(7, L):
        y1.append(parent.step(x1[..., t]).unsqueeze(-1))
        if t >= 30:
            y2.append(child.step(x2[..., t]).unsqueeze(-1))
    assert rel_err(torch.cat(y1, -1), reference(h, x1)[..., 7:]) < TOL64
    assert rel_err(torch.cat(y2, -1), reference(h, x2)) < TOL64


def test_zero_length_prefill_then_steps():
    """prefill of an empty prompt returns an empty output, fixes the batch dims, and stepping
    starts at position 0."""
    C, L = 4, 100
    h, x = random_filters(C, L, torch.float64), torch.randn(2, C, L, dtype=torch.float64)
    conv = OnlineConv(h, crossover=2)
    out = conv.prefill(x[..., :0])
    assert out.shape == (2, C, 0) and conv.position == 0 and conv.batch_shape == (2,)
    with pytest.raises(ShapeError, match=r"batch dims \(2,\)"):
        conv.step(torch.randn(C, dtype=torch.float64))
    y = torch.stack([conv.step(x[..., t]) for t in range(L)], -1)
    assert rel_err(y, direct_reference(h, x)) < TOL64


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_bank_of_two_convolutions_with_one_tile_call_per_position(kernels):
    """Two convolutions share one bank: each gets its red cell on its channel slice (the second's
    input depends on the first's output, as in stacked layers), then one advance() tiles both.
    With kernels="triton" (the decoder's default on CUDA; the interpreter here) the red cells are
    the Triton kernel on channel slices of the shared state, and tiles up to the crossover too."""
    L, P = (300, 21) if kernels == "torch" else (120, 9)  # the interpreter is slow
    h1, h2 = random_filters(3, L, torch.float64), random_filters(2, L, torch.float64)
    bank = OnlineConv(torch.cat([h1, h2]), crossover=4, kernels=kernels)
    assert bank.use_triton == (kernels == "triton")
    first, second = slice(0, 3), slice(3, 5)
    x = torch.randn(4, 3, L, dtype=torch.float64)
    mix = torch.randn(2, 3, dtype=torch.float64)
    y1 = [bank.prefill(x[..., :P], channels=first)]
    y2 = [bank.prefill(torch.einsum("dc,ncl->ndl", mix, torch.tanh(y1[0])), channels=second)]
    for t in range(P, L):
        a = bank.red_cell(x[..., t], channels=first)
        b = bank.red_cell(torch.einsum("dc,nc->nd", mix, torch.tanh(a)), channels=second)
        bank.advance()
        y1.append(a[..., None])
        y2.append(b[..., None])
    ref1 = reference(h1, x)
    ref2 = reference(h2, torch.einsum("dc,ncl->ndl", mix, torch.tanh(ref1)))
    assert rel_err(torch.cat(y1, -1), ref1) < TOL64
    assert rel_err(torch.cat(y2, -1), ref2) < TOL64
    with pytest.raises(ShapeError, match="C = 2"):
        bank.reset() or bank.red_cell(torch.randn(4, 3, dtype=torch.float64), channels=second)
