"""Models people write: each class of failure seen on third-party and generated models, as a test.
(The zoo entries for these styles are checked teacher-forced in test_decoder / test_zoo; the
fuzzer draws them at random.)"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lcsm_compile
from helpers import rel_err, teacher_forced
from lcsm_compile import NotDecodable, Reason
from lcsm_compile.passes import capture as capture_pass
from lcsm_compile.models import demo_lm

C = 6


class ShortOnly(nn.Module):
    """Only short causal convolutions (zoology's BaseConv without a long filter): ring buffers alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(C, C, 4, groups=C, padding=3)
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        return self.proj(self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))


def test_a_model_with_only_short_convolutions_decodes():
    model = ShortOnly()
    decoder = lcsm_compile.optimize(model, (torch.randn(2, 16, C),), max_len=80)
    assert decoder.bank is None and [s.kind for s in decoder.sites] == ["short"]
    x = torch.randn(2, 80, C)
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 3), model(x)) < 1e-5
    assert decoder.session().memory_breakdown()["rings"] == 0  # nothing held before a prefill


def test_a_single_example_tensor_is_the_only_input():
    decoder = lcsm_compile.optimize(ShortOnly(), torch.randn(2, 16, C), max_len=32)
    assert decoder.max_len == 32
    with pytest.raises(TypeError, match="a tensor or a non-empty tuple"):
        lcsm_compile.optimize(ShortOnly(), [1, 2], max_len=32)


class Scaled(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        L = x.shape[1]
        if self.how == "divide":
            return self.proj(x) / L
        ramp = torch.linspace(0, 1, L)[None, :, None]  # a position code rebuilt at every length
        return self.proj(x) + ramp


@pytest.mark.parametrize("how", ["divide", "linspace"])
def test_values_that_change_with_the_length_are_declined_by_name(how):
    report = lcsm_compile.analyze(Scaled(how), (torch.randn(2, 16, C),), max_len=64)
    assert not report.decodable
    assert Reason.LENGTH_DEPENDENT in {c.reason for c in report.rejected}, report.table()
    (cand,) = [c for c in report.rejected if c.reason is Reason.LENGTH_DEPENDENT]
    assert "test_generality.py" in cand.source


def test_float64_model_matches_to_1e12():
    model = demo_lm(n_layer=1, d_model=16, vocab=32, max_len=96).double()
    decoder = lcsm_compile.optimize(model, (torch.randint(0, 32, (2, 16)),))
    x = torch.randint(0, 32, (2, 96))
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 7), model(x)) < 1e-12


def test_optimize_is_quiet():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lcsm_compile.optimize(ShortOnly(), (torch.randn(2, 16, C),), max_len=32)
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], [str(w.message) for w in seen]


class FixedFFT(nn.Module):
    """The FFT size is fixed at construction: exact up to L = 65 (n = 2 * 64 >= L + 64 - 1)."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.randn(C, 64) * torch.exp(-torch.arange(64) / 8.0))

    def forward(self, x):
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=128) * torch.fft.rfft(self.k, n=128), n=128)[..., : x.shape[1]]
        return y.transpose(1, 2)


def test_wrap_around_names_how_far_the_filters_reach():
    model = FixedFFT()
    with pytest.raises(NotDecodable) as err:
        lcsm_compile.optimize(model, (torch.randn(2, 16, C),), max_len=100)
    (cand,) = err.value.report.rejected
    assert cand.reason is Reason.WRAP_AROUND and "use max_len <= 65" in cand.explanation
    decoder = lcsm_compile.optimize(model, (torch.randn(2, 16, C),), max_len=65)  # what the hint says works
    x = torch.randn(2, 65, C)
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 1), model(x)) < 1e-5


# ---- issue 19: third-party code as it is written ---------------------------------------------------


class Dilated(nn.Module):
    """Two taps, dilation 64, left padding 64: its lags reach 64 though the kernel has 2 taps."""

    def __init__(self, dilation=64, k=2):
        super().__init__()
        self.dilation, self.k = dilation, k
        self.w = nn.Parameter(torch.randn(C, 1, k))

    def forward(self, x):
        u = x.transpose(1, 2)
        y = nn.functional.conv1d(nn.functional.pad(u, ((self.k - 1) * self.dilation, 0)), self.w, groups=C,
                                 dilation=self.dilation)
        return torch.tanh(y).transpose(1, 2)


@pytest.mark.parametrize("dilation, kind", [(8, "short"), (64, "long")])
def test_dilated_convolutions_reach_what_the_op_says_without_the_safety_net(dilation, kind):
    """The filter's reach is read from kernel size, dilation and padding, not sampled at a short
    length: accepted means exact with validate=False (64 lags: past the check lengths, decoded long)."""
    model = Dilated(dilation)
    decoder = lcsm_compile.optimize(model, (torch.randn(2, 16, C),), max_len=160, validate=False)
    (site,) = decoder.sites
    assert site.kind == kind and decoder.report.accepted[0].filter_length == ("9" if kind == "short" else "65")
    x = torch.randn(2, 160, C)
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 5), model(x)) < 1e-5


@pytest.mark.parametrize("name", ["wavenet_dilated", "hyena_table_example_at_max_len", "hyena_min_cut_heads"])
def test_third_party_styles_decode_without_the_safety_net(name):
    """A dilation tree, an example as long as max_len over a sliced table, a Min(l_max, L) cut with
    heads split on it: each accepted by the analysis alone and exact."""
    from examples.models import get

    entry = get(name)
    model, example = entry.build()
    decoder = lcsm_compile.optimize(model, example, max_len=model.max_len, validate=False)
    kinds = [s.kind for s in decoder.sites]
    assert (kinds.count("long"), kinds.count("short")) == (entry.n_long, entry.n_short)
    x = torch.randint(0, 64, (2, 200))
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 9), model(x)) < 1e-5


class BoundedByACache(nn.Module):
    """Adds a cache of 48 positions while L fits in it: export bounds L to [2, 48]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(C, C)
        self.register_buffer("cache", torch.randn(48, C))

    def forward(self, x):
        L = x.shape[1]
        if L <= self.cache.shape[0]:
            x = x + self.cache[:L]
        return self.proj(x.cumsum(1))


def test_max_len_is_served_or_refused_at_once_naming_the_limit():
    with pytest.raises(NotDecodable) as err:
        lcsm_compile.optimize(BoundedByACache(), (torch.randn(2, 16, C),), max_len=100)
    (cand,) = [c for c in err.value.report.rejected if c.reason is Reason.CAPTURE_FAILED]
    assert "max_len=100 cannot be served" in cand.explanation and "max_len <= 48" in cand.explanation
    decoder = lcsm_compile.optimize(BoundedByACache(), (torch.randn(2, 16, C),), max_len=48)
    assert decoder.max_len == 48


class RunningMean(nn.Module):
    """A running-mean normaliser: cumsum over positions divided by t + 1."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        t = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        centred = x - x.cumsum(1) / t
        return self.proj(centred * torch.rsqrt(torch.cumsum(centred * centred, dim=1) / t + 1e-3))


def test_cumsum_over_positions_is_the_all_ones_convolution():
    model = RunningMean().double()
    decoder = lcsm_compile.optimize(model, (torch.randn(2, 16, C, dtype=torch.float64),), max_len=96, validate=False)
    assert [c.spelling for c in decoder.report.accepted] == ["cumsum", "cumsum"]
    assert torch.equal(decoder.report.accepted[0].conv.h, torch.ones(C, 96, dtype=torch.float64))
    x = torch.randn(2, 96, C, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 3), model(x)) < 1e-12


class CachedKernel(nn.Module):
    """S4-style: the kernel is computed at l_max on the first eval forward and kept in the module."""

    def __init__(self, l_max=128):
        super().__init__()
        self.l_max = l_max
        self.log_dt = nn.Parameter(-3 * torch.rand(C))
        self.A = nn.Parameter(-torch.rand(C, 4))
        self.B = nn.Parameter(torch.randn(C, 4))
        self._kernel = None

    def kernel(self):
        t = torch.arange(self.l_max, dtype=torch.float32)
        return (self.B[:, :, None] * torch.exp(self.A[:, :, None] * self.log_dt.exp()[:, None, None] * t)).sum(1)

    def forward(self, x):
        if self.training or self._kernel is None:
            k = self.kernel()
            if not self.training:
                self._kernel = k
        else:
            k = self._kernel
        L, u = x.shape[1], x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k[:, :L], n=2 * L), n=2 * L)[..., :L]
        return torch.tanh(y.transpose(1, 2) + x)


class FirstUseFlag(nn.Module):
    """A buffer set on first use (a data-dependent init, as in any loaded checkpoint): export cannot
    branch on its value, so it is frozen to the value it has now."""

    def __init__(self):
        super().__init__()
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("scale", torch.ones(C))
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        if not self.initialized:
            self.scale.copy_(1.0 / x.detach().std(dim=(0, 1)).clamp_min(1e-3))
            self.initialized.fill_(True)
        return self.proj(torch.cumsum(x * self.scale, dim=1))


def test_the_verdict_does_not_depend_on_what_the_model_did_before():
    """A model run before optimize (its kernel cached in the module) gets the verdict and max_len
    of a fresh copy, and decodes exactly without the safety net."""
    fresh, used = CachedKernel().eval(), CachedKernel().eval()
    used.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        used(torch.randn(2, 40, C))
    example = (torch.randn(2, 16, C),)
    first = lcsm_compile.optimize(fresh, example, max_len=96, validate=False)
    second = lcsm_compile.optimize(used, example, max_len=96, validate=False)
    assert first.max_len == second.max_len == 96
    assert [c.spelling for c in first.report.accepted] == [c.spelling for c in second.report.accepted] == ["fft_conv"]
    x = torch.randn(2, 96, C)
    with torch.no_grad():
        assert rel_err(teacher_forced(second, x, 4), used(x)) < 1e-5


def test_a_branch_on_a_buffer_set_on_first_use_is_taken_as_it_stands():
    model = FirstUseFlag().eval()
    with torch.no_grad():
        model(torch.randn(2, 40, C))  # initialized, as a loaded checkpoint is
    decoder = lcsm_compile.optimize(model, (torch.randn(2, 16, C),), max_len=96, validate=False)
    assert "FirstUseFlag.initialized = True taken as they stand now" in decoder.report.capture.note
    x = torch.randn(2, 96, C)
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 4), model(x)) < 1e-5
    assert bool(model.initialized) and model.scale.ne(1).any()  # the capture left the model as it was


class ToeplitzMatrix(nn.Module):
    """A parameter filter as a [L, L] matrix over positions, applied by einsum or matmul: causal
    (lower-triangular), two-sided (a look-alike), or scaled by position vectors on both sides."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.h = nn.Parameter(torch.randn(128) * torch.exp(-torch.arange(128) / 16.0))
        self.a = nn.Parameter(torch.rand(128) + 0.5)

    def forward(self, x):
        L = x.shape[1]
        lags = torch.arange(L)[:, None] - torch.arange(L)[None, :]
        T = self.h[lags.abs()] if self.how == "two_sided" else torch.tril(self.h[lags.clamp(min=0)])
        if self.how == "matmul":
            return T @ x
        if self.how == "scaled":
            T = T * self.a[:L, None]  # diag(a) T: not shift-invariant
        return torch.einsum("ts,bsc->btc", T, x)


@pytest.mark.parametrize("how", ["einsum", "matmul"])
def test_a_lower_triangular_toeplitz_matrix_is_a_convolution(how):
    model = ToeplitzMatrix(how).double()
    decoder = lcsm_compile.optimize(model, (torch.randn(2, 16, C, dtype=torch.float64),), max_len=128, validate=False)
    (cand,) = decoder.report.accepted
    assert cand.spelling == "position_matrix" and rel_err(cand.conv.h[0], model.h.detach()) < 1e-12
    x = torch.randn(2, 128, C, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 3), model(x)) < 1e-12


@pytest.mark.parametrize("how", ["two_sided", "scaled"])
def test_a_matrix_over_positions_that_is_not_causal_toeplitz_is_declined(how):
    report = lcsm_compile.analyze(ToeplitzMatrix(how), (torch.randn(2, 16, C),), max_len=128)
    assert not report.decodable
    (cand,) = [c for c in report.rejected if c.spelling == "position_matrix"]
    assert cand.reason is Reason.NUMERIC_MISMATCH and "not lower-triangular Toeplitz" in cand.explanation


@pytest.mark.parametrize("name", ["hyena_planned_lengths", "hyena_cached_kernel", "hyena_init_once"])
def test_a_model_that_plans_on_the_length_in_python_decodes_from_two_captures(name):
    """next_fast_len FFT sizes, `if N < L` kernel cuts, a contraction planned on the shapes, a cached
    kernel, a first-use flag: export specializes L, so the model is captured at max_len and at a
    shorter length, and the programs are generalized from the two. Two captures are evidence, not a
    proof, so the translation validation runs even when validate=False asks otherwise."""
    from examples.models import get

    entry = get(name)
    model, example = entry.build()
    decoder = lcsm_compile.optimize(model, example, max_len=model.max_len, validate=False)
    capture = decoder.report.capture
    second = capture_pass.second_length(model.max_len)
    assert model.max_len // 2 < second < model.max_len and (model.max_len - second) % 16 == 0  # max_len's side of branches
    assert not capture.symbolic and f"captured at concrete L={model.max_len} and L={second}" in capture.note
    assert any("validate=False was overridden" in n for n in decoder.report.notes)
    kinds = [s.kind for s in decoder.sites]
    assert (kinds.count("long"), kinds.count("short")) == (entry.n_long, entry.n_short)
    x = torch.randint(0, 64, (2, model.max_len))
    with torch.no_grad():
        y = model(x)
        for prompt in (1, 37, model.max_len - 3):
            assert rel_err(teacher_forced(decoder, x, prompt), y) < 1e-5, f"prompt {prompt}"
        assert rel_err(teacher_forced(decoder, x[:1, :100], 50), model(x[:1, :100])) < 1e-5  # shorter, batch 1 of 2


class GlueByLength(nn.Module):
    """An FFT size planned in Python, and glue whose ops change past L = `switch` and on odd L though
    its values do not (prefix-stable, legal)."""

    def __init__(self, switch):
        super().__init__()
        self.switch = switch
        self.h = nn.Parameter(torch.randn(C, 200) * torch.exp(-torch.arange(200) / 20.0))
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        L = x.shape[1]
        n = 1 << (2 * L - 1).bit_length()
        u = x.clone() if L % 2 else x
        u = u.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.h[:, :L], n=n), n=n)[..., :L].transpose(1, 2)
        if L > self.switch:
            y = torch.relu(y) - torch.relu(-y)  # y, spelled another way
        return self.proj(y)


def test_glue_that_changes_with_the_length_decodes_with_the_glue_of_max_len():
    """Both captures sit near max_len on its side of the branches (a threshold, parity), so the
    decoder runs max_len's glue at every length: prefix stability makes it the model's own."""
    model = GlueByLength(switch=100)
    decoder = lcsm_compile.optimize(model, (torch.randn(2, 16, C),), max_len=200, validate=False)
    x = torch.randn(2, 200, C)
    with torch.no_grad():
        for prompt in (1, 7, 99, 150):
            assert rel_err(teacher_forced(decoder, x, prompt), model(x)) < 1e-5, f"prompt {prompt}"


def test_glue_that_changes_between_the_two_captures_is_refused_naming_the_op():
    model = GlueByLength(switch=190)  # the second capture (L=168) and max_len (200) disagree on the glue
    with pytest.raises(NotDecodable) as err:
        lcsm_compile.optimize(model, (torch.randn(2, 16, C),), max_len=200)
    (cand,) = [c for c in err.value.report.rejected if c.reason is Reason.LENGTH_DEPENDENT]
    assert "relu" in cand.explanation and "has no counterpart" in cand.explanation
    decoder = lcsm_compile.optimize(model, (torch.randn(2, 16, C),), max_len=180)  # one side of it: served
    x = torch.randn(2, 180, C)
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 7), model(x)) < 1e-5


class CrossCorrelation(nn.Module):
    """A modal kernel stored time-reversed (powers over arange(L-1, ..., 0)), its spectrum
    conjugated, the result rolled by -1 and the last L positions taken by index_select: a
    cross-correlation whose net filter h[j] = sum_m B_m lam_m^j is causal and independent of L.
    Look-alikes: the conjugated spectrum read from the front (anti-causal), and a plain convolution
    rolled by -1 (it reads one position ahead)."""

    def __init__(self, how="xcorr", fft_size="3L"):
        super().__init__()
        self.how, self.fft_size = how, fft_size
        self.a = nn.Parameter(torch.randn(C, 4))
        self.B = nn.Parameter(torch.randn(C, 4))
        self.D = nn.Parameter(torch.randn(C))

    def filter(self, powers):
        return (self.B[..., None] * torch.sigmoid(self.a)[..., None] ** powers).sum(1)

    def forward(self, x):
        L, u = x.shape[1], x.transpose(1, 2)
        n = 3 * L if self.fft_size == "3L" else 1 << (2 * L - 1).bit_length()  # planned in Python
        if self.how == "rolled_ahead":
            k_f = torch.fft.rfft(self.filter(torch.arange(L, dtype=x.dtype)), n=n)
        else:
            k_f = torch.fft.rfft(self.filter(torch.arange(L - 1, -1, -1, dtype=x.dtype)), n=n).conj()
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * k_f, n=n)
        if self.how == "front":
            y = y[..., :L]
        elif self.how == "rolled_ahead":
            y = torch.roll(y, -1, dims=-1)[..., :L]
        else:
            y = torch.roll(y, -1, dims=-1).index_select(-1, torch.arange(n - L, n))
        return torch.tanh((y + u * self.D[:, None]).transpose(1, 2))


@pytest.mark.parametrize("fft_size", ["3L", "planned"])
def test_a_cross_correlation_with_a_reversed_kernel_is_a_causal_convolution(fft_size):
    """A conjugated spectrum is a time reversal and a roll plus a window of the tail is a shift: the
    filter's lags, moved by the window, are proved causal and wrap-free for every served L."""
    model = CrossCorrelation("xcorr", fft_size).double()
    decoder = lcsm_compile.optimize(model, (torch.randn(2, 16, C, dtype=torch.float64),), max_len=128, validate=False)
    (cand,) = decoder.report.accepted
    assert cand.spelling == "fft_conv" and "lags shifted by c = " in cand.explanation
    t = torch.arange(128, dtype=torch.float64)
    assert rel_err(cand.conv.h, model.filter(t).detach()) < 1e-12  # the net filter, forward in time
    x = torch.randn(2, 128, C, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 5), model(x)) < 1e-12


@pytest.mark.parametrize("how, reason", [("front", Reason.BIDIRECTIONAL_FILTER), ("rolled_ahead", Reason.NOT_CAUSAL_SLICE)])
def test_a_window_that_leaves_the_filter_reading_ahead_is_declined(how, reason):
    report = lcsm_compile.analyze(CrossCorrelation(how), (torch.randn(2, 16, C),), max_len=128)
    assert not report.decodable
    assert reason in {c.reason for c in report.rejected if c.spelling == "fft_conv"}


class TypedTokenShift(nn.Module):
    """llama's cast-up, `silu(x.double()).type_as(x)`, then RWKV's token shift by nn.ZeroPad2d: type_as
    reads only x's dtype (kept in the graph when the dtypes already agree), so the delay's region
    needs no other activation's values."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 0, 1, -1))
        self.mix = nn.Parameter(torch.rand(C))
        self.h = nn.Parameter(torch.randn(C, 64) * torch.exp(-torch.arange(64) / 8.0))

    def forward(self, x):
        u = F.silu(x.to(torch.float64)).type_as(x)
        u = u * self.mix + self.pad(u) * (1 - self.mix)
        L, n = x.shape[1], 2 * x.shape[1]
        y = torch.fft.irfft(torch.fft.rfft(u.transpose(1, 2), n=n) * torch.fft.rfft(self.h[:, :L], n=n), n=n)[..., :L]
        return y.transpose(1, 2)


def test_a_dtype_read_by_type_as_is_not_a_dependency_on_values():
    model = TypedTokenShift().double()
    decoder = lcsm_compile.optimize(model, (torch.randn(1, 21, C, dtype=torch.float64),), max_len=64, validate=False)
    x = torch.randn(2, 64, C, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(teacher_forced(decoder, x, 9), model(x)) < 1e-12


class CodeThenFFTConv(nn.Module):
    """A sinusoidal code built in forward added right before an FFT convolution that reads the sum
    directly (no cast between): the sum is the convolution's input, not part of it."""

    def __init__(self):
        super().__init__()
        self.h = nn.Parameter(torch.randn(C, 96) / 10)
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        L = x.shape[1]
        position = torch.arange(L, dtype=x.dtype)[:, None]
        code = torch.zeros(L, C, dtype=x.dtype)
        code[:, 0::2] = torch.sin(position * torch.exp(-torch.arange(0, C, 2, dtype=x.dtype)))
        spectrum = torch.fft.rfft(x + code, n=2 * L, dim=1) * torch.fft.rfft(self.h[:, :L].t(), n=2 * L, dim=0)
        return self.proj(torch.fft.irfft(spectrum, n=2 * L, dim=1)[:, :L])  # channels last, as the fuzzer's


def test_a_position_code_added_right_before_an_fft_convolution_is_read_from_its_table():
    """The add of the code used to be claimed by the convolution (the FFT's argument is its input),
    so no position constant was found and every step saw position 0's code: found by the fuzzer
    (seed 11 index 31), a silent error with validate=False."""
    model = CodeThenFFTConv().double()
    decoder = lcsm_compile.optimize(model, (torch.randn(2, 16, C, dtype=torch.float64),), max_len=96, validate=False)
    assert len(decoder.report.position_constants) == 1
    x = torch.randn(2, 96, C, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    for P in (1, 40):
        assert rel_err(teacher_forced(decoder, x, P), want) < 1e-12, P
