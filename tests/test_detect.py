"""Recognisers: every spelling of a causal convolution is found, and the extracted causal filter
and skip match float64 references computed from the module's own parameters."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lcsm_compile
from lcsm_compile import Verdict
from lcsm_compile.passes.detect import unregister_mixer

C, L, LMAX = 4, 24, 40


def rel(a, b):
    return float((a - b).norm() / b.norm())


def decay_filter(c, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, n, generator=g) * torch.exp(-torch.arange(n) / 8.0)


def accepted(report, kind=None):
    return [c for c in report.candidates if c.verdict is Verdict.ACCEPTED and (kind is None or c.kind == kind)]


class FFTConv(nn.Module):
    """y = irfft(rfft(u, n) * rfft(k, n) [scaled]) [:L] + u * D, in the spelling given by `style`."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.k = nn.Parameter(decay_filter(C, LMAX, 0))
        self.D = nn.Parameter(torch.randn(C))

    def forward(self, x):  # x [B, L, C]
        u = x.transpose(1, 2)
        seqlen = u.shape[-1]
        k = self.k[:, :seqlen]
        if self.style == "safari":  # rfft(k)/n with irfft norm="forward"
            n = 2 * seqlen
            y = torch.fft.irfft(torch.fft.rfft(u, n=n) * (torch.fft.rfft(k, n=n) / n), n=n, norm="forward")
        elif self.style == "default_norm":
            n = 2 * seqlen
            y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)
        elif self.style == "lk_plus_l":  # n = Lk + L with the full-length filter
            n = self.k.shape[-1] + seqlen
            y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.k, n=n), n=n)
        elif self.style == "complex":  # complex fft of the input sliced to n//2+1 bins
            n = 2 * seqlen
            kf = torch.fft.rfft(k, n=n) / n
            uf = torch.fft.fft(u, n=n)[..., : kf.shape[-1]]
            y = torch.fft.irfft(uf * kf, n=n, norm="forward")
        y = y[..., :seqlen] + u * self.D.unsqueeze(-1)
        return y.transpose(1, 2)

    def reference(self, length):
        return self.k.detach().double()[:, :length], self.D.detach().double()


@pytest.mark.parametrize("style", ["safari", "default_norm", "lk_plus_l", "complex"])
@pytest.mark.parametrize("capture", ["export", "dynamo"])
def test_fft_conv_spellings(style, capture):
    model = FFTConv(style)
    report = lcsm_compile.analyze(model, (torch.randn(2, L, C),), max_len=LMAX, capture=capture)
    assert report.decodable, report.table()
    (cand,) = accepted(report)
    assert cand.kind == "long" and cand.channels == C
    assert cand.spelling == ("complex_fft_conv" if style == "complex" else "fft_conv")
    h_ref, d_ref = model.reference(LMAX)
    assert rel(cand.conv.h, h_ref) < 1e-6
    assert rel(cand.conv.skip, d_ref) < 1e-6
    assert cand.conv.h.shape == (C, LMAX)


class EinsumConv(nn.Module):
    """S4-style multi-output filter: y[b, c, h] = k[c, h] * u[b, h], then (c h) channels."""

    def __init__(self, H=3, Cout=2):
        super().__init__()
        self.k = nn.Parameter(decay_filter(Cout * H, LMAX, 1).reshape(Cout, H, LMAX))
        self.D = nn.Parameter(torch.randn(Cout, H))

    def forward(self, x):
        u = x.transpose(-1, -2)
        Lx = u.shape[-1]
        k_f = torch.fft.rfft(self.k[..., :Lx], n=2 * Lx)
        u_f = torch.fft.rfft(u, n=2 * Lx)
        y = torch.fft.irfft(torch.einsum("bhl,chl->bchl", u_f, k_f), n=2 * Lx)[..., :Lx]
        y = y + torch.einsum("bhl,ch->bchl", u, self.D)
        return y.flatten(1, 2).transpose(1, 2)


def test_einsum_multi_output_filter():
    model = EinsumConv()
    report = lcsm_compile.analyze(model, (torch.randn(2, L, 3),), max_len=LMAX)
    (cand,) = accepted(report)
    assert cand.spelling == "einsum_fft_conv" and cand.conv.input_map == "bhl->bchl"
    assert cand.conv.channel_shape == (2, 3)
    assert rel(cand.conv.h, model.k.detach().double().reshape(6, LMAX)) < 1e-6
    assert rel(cand.conv.skip, model.D.detach().double().reshape(6)) < 1e-6


class ShortConv(nn.Module):
    """Hyena's depthwise short conv: nn.Conv1d(padding=K-1)[..., :L], or F.pad + F.conv1d."""

    def __init__(self, K, explicit_pad=False):
        super().__init__()
        self.explicit_pad = explicit_pad
        self.conv = nn.Conv1d(C, C, K, groups=C, padding=0 if explicit_pad else K - 1)

    def forward(self, x):
        u = x.transpose(1, 2)
        if self.explicit_pad:
            return self.conv(F.pad(u, (self.conv.kernel_size[0] - 1, 0))).transpose(1, 2)
        return self.conv(u)[..., : u.shape[-1]].transpose(1, 2)


@pytest.mark.parametrize("K,explicit_pad", [(3, False), (4, False), (7, True)])
def test_short_conv1d(K, explicit_pad):
    model = ShortConv(K, explicit_pad)
    report = lcsm_compile.analyze(model, (torch.randn(2, L, C),), max_len=LMAX)
    assert report.decodable, report.table()
    (cand,) = accepted(report)
    assert cand.kind == "short" and cand.spelling == "conv1d"
    h_ref = model.conv.weight.detach().double()[:, 0].flip(-1)  # cross-correlation: causal filter is w flipped
    assert cand.conv.h.shape == (C, K)
    assert rel(cand.conv.h, h_ref) < 1e-6
    assert rel(cand.conv.bias, model.conv.bias.detach().double()) < 1e-6


class LongConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(decay_filter(C, LMAX, 2).flip(-1)[:, None])

    def forward(self, x):
        u = x.transpose(1, 2)
        y = F.conv1d(u, self.weight, padding=self.weight.shape[-1] - 1, groups=C)[..., : u.shape[-1]]
        return y.transpose(1, 2)


@pytest.mark.parametrize("capture", ["export", "dynamo"])
def test_long_conv1d(capture):
    model = LongConv1d()
    report = lcsm_compile.analyze(model, (torch.randn(2, L, C),), max_len=LMAX, capture=capture)
    (cand,) = accepted(report)
    assert cand.kind == "long"
    assert rel(cand.conv.h, model.weight.detach().double()[:, 0].flip(-1)) < 1e-6


class OuterProductHeads(nn.Module):
    """Multi-head Hyena: conv of k (x) v per head along L, contracted with q afterwards."""

    def __init__(self, H=2, d=2):
        super().__init__()
        self.H, self.d = H, d
        self.proj = nn.Linear(H * d, 3 * H * d)
        self.h = nn.Parameter(decay_filter(H, LMAX, 3))
        self.D = nn.Parameter(torch.randn(H))

    def forward(self, x):
        Lx = x.shape[1]
        q, k, v = [t.transpose(1, 2).unflatten(1, (self.H, self.d)) for t in self.proj(x).chunk(3, -1)]
        kv = torch.einsum("bhkl,bhvl->bhkvl", k, v)
        n = 2 * Lx
        y = torch.fft.irfft(torch.fft.rfft(kv, n=n) * torch.fft.rfft(self.h[:, :Lx], n=n)[None, :, None, None],
                            n=n)[..., :Lx]
        y = y + kv * self.D[None, :, None, None, None]
        return torch.einsum("bhkvl,bhkl->bhvl", y, q).flatten(1, 2).transpose(1, 2)


def test_outer_product_multi_head():
    model = OuterProductHeads()
    report = lcsm_compile.analyze(model, (torch.randn(2, L, 4),), max_len=LMAX)
    assert report.decodable, report.table()
    (cand,) = accepted(report)
    assert cand.conv.channel_shape == (2, 2, 2)
    h_ref = model.h.detach().double().repeat_interleave(4, dim=0)  # shared over the head dims
    assert rel(cand.conv.h, h_ref) < 1e-6
    assert rel(cand.conv.skip, model.D.detach().double().repeat_interleave(4)) < 1e-6


# ---- registered opaque mixers -------------------------------------------------------------------

@torch.library.custom_op("lcsm_test::opaque_conv", mutates_args=())
def opaque_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """An 'opaque' FFT conv kernel: u [B, C, L], k [C, Lk]."""
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k[:, : u.shape[-1]], n=n), n=n)[..., : u.shape[-1]]


@opaque_conv.register_fake
def _(u, k):
    return torch.empty_like(u)


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(decay_filter(C, LMAX, 4))

    def forward(self, x):
        return opaque_conv(x.transpose(1, 2), self.k).transpose(1, 2)


@torch.library.custom_op("lcsm_test::opaque_conv_kfirst", mutates_args=())
def opaque_conv_kfirst(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The same convolution with the input second and the filter stored reversed (w = h.flip(-1))."""
    return opaque_conv(u, w.flip(-1))


@opaque_conv_kfirst.register_fake
def _(w, u):
    return torch.empty_like(u)


@torch.library.custom_op("lcsm_test::opaque_short", mutates_args=())
def opaque_short(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A depthwise causal short conv as an opaque kernel: u [B, C, L], w [C, K] (cross-correlation)."""
    K = w.shape[-1]
    return F.conv1d(F.pad(u, (K - 1, 0)), w[:, None], groups=w.shape[0])


@opaque_short.register_fake
def _(u, w):
    return torch.empty_like(u)


class OpaqueNet(nn.Module):
    """proj -> opaque short conv -> gate -> opaque long conv (input second, reversed filter) -> proj:
    what a model built on custom CUDA kernels looks like to the analysis."""

    def __init__(self):
        super().__init__()
        self.max_len = LMAX
        self.proj_in, self.proj_out = nn.Linear(C, 2 * C), nn.Linear(C, C)
        self.w_short = nn.Parameter(torch.randn(C, 3) / 2)
        self.w_long = nn.Parameter(decay_filter(C, LMAX, 7).flip(-1).contiguous())

    def forward(self, x):
        a, b = self.proj_in(x).transpose(1, 2).chunk(2, dim=1)
        u = opaque_short(a, self.w_short) * torch.sigmoid(b)
        return self.proj_out(opaque_conv_kfirst(self.w_long, u).transpose(1, 2))


@pytest.fixture
def registry():
    """register_mixer for one test: every registration made through it is undone afterwards."""
    ops = []

    def register(op, filter_fn, **kw):
        ops.append(op)
        return lcsm_compile.register_mixer(op, filter_fn, **kw)

    yield register
    for op in ops:
        unregister_mixer(op)


def test_registered_mixer_is_accepted_with_its_filter(registry):
    model = Opaque()
    x = (torch.randn(2, L, C),)
    before = lcsm_compile.analyze(model, x, max_len=LMAX)
    assert not before.decodable
    assert {c.reason.name for c in before.rejected} >= {"TIME_MIXING_OP"}
    registry(opaque_conv, lambda k: k)
    report = lcsm_compile.analyze(model, x, max_len=LMAX)
    assert report.decodable, report.table()
    (cand,) = accepted(report)
    assert cand.spelling == "registered:lcsm_test.opaque_conv"
    assert rel(cand.conv.h, model.k.detach().double()) < 1e-6


@pytest.mark.parametrize("wrong", [lambda k: 2 * k, lambda k: k.roll(1, -1), lambda k: k[:, : L // 2]],
                         ids=["scaled", "shifted", "half the lags"])
def test_registered_mixer_with_a_wrong_filter_fn_is_rejected(wrong, registry):
    """filter_fn is checked against the op itself: a filter that does not reproduce it is declined."""
    registry(opaque_conv, wrong)
    report = lcsm_compile.analyze(Opaque(), (torch.randn(2, L, C),), max_len=LMAX)
    assert not report.decodable and not report.accepted
    assert [c.reason.name for c in report.rejected] == ["NUMERIC_MISMATCH"], report.table()


def test_registered_mixers_decode_end_to_end_with_input_arg_name_and_kind(registry):
    """A long opaque conv whose input is its second argument (input_arg=1) under a chosen name, and a
    short one (kind="short"): both accepted with the filters of the module's parameters, and the
    model decodes teacher-forced to its own outputs."""
    model = OpaqueNet().eval()
    registry(opaque_conv_kfirst, lambda w: w.flip(-1), input_arg=1, name="my_long_conv")
    registry(opaque_short, lambda w: w.flip(-1), kind="short")
    x = torch.randn(2, L, C)
    decoder = lcsm_compile.optimize(model, (x,), max_len=LMAX)
    by_spelling = {c.spelling: c for c in accepted(decoder.report)}
    assert set(by_spelling) == {"registered:my_long_conv", "registered:lcsm_test.opaque_short"}
    long, short = by_spelling["registered:my_long_conv"], by_spelling["registered:lcsm_test.opaque_short"]
    assert long.kind == "long" and short.kind == "short"
    assert rel(long.conv.h, model.w_long.detach().double().flip(-1)) < 1e-6
    assert rel(short.conv.h, model.w_short.detach().double().flip(-1)) < 1e-6
    xs = torch.randn(2, LMAX, C)
    with torch.no_grad():
        session = decoder.session()
        ys = [session.prefill(xs[:, :5])] + [session.step(xs[:, t : t + 1]) for t in range(5, LMAX)]
        full = model(xs)
    assert rel(torch.cat(ys, 1), full) < 1e-5


def test_register_mixer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="custom op"):
        lcsm_compile.register_mixer(lambda u: u, lambda k: k)
    with pytest.raises(TypeError, match="callable"):
        lcsm_compile.register_mixer(opaque_conv, "not a function")
    with pytest.raises(ValueError, match="kind"):
        lcsm_compile.register_mixer(opaque_conv, lambda k: k, kind="medium")


def test_no_candidate_for_pointwise_conv():
    """A kernel-size-1 Conv1d is a channel projection, not a convolution over time."""

    class Pointwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(C, C, 1)

        def forward(self, x):
            return self.conv(x.transpose(1, 2)).transpose(1, 2)

    report = lcsm_compile.analyze(Pointwise(), (torch.randn(2, L, C),), max_len=LMAX)
    assert report.candidates == []
    assert not report.decodable


@pytest.mark.parametrize("model,spelling", [(FFTConv("safari"), "fft_conv"), (FFTConv("complex"), "complex_fft_conv"),
                                            (ShortConv(3), "conv1d"), (ShortConv(4, explicit_pad=True), "conv1d")])
def test_core_aten_spellings(model, spelling):
    """The decomposed ATen graph (constant_pad_nd + _fft_r2c / _fft_c2r / _fft_c2c, convolution)
    canonicalizes to the same ops and yields the same filter."""
    from lcsm_compile import pipeline
    from lcsm_compile.passes import capture

    x = (torch.randn(2, L, C),)
    cap = capture.capture_export(model, x, LMAX, decompose=True)
    targets = {str(n.target) for n in cap.gm.graph.nodes}
    assert any("_fft_r2c" in t or "convolution" in t for t in targets)
    report = pipeline.run(pipeline.Context(cap, x, LMAX), stages=("analysis",)).report
    assert report.decodable, report.table()
    (cand,) = accepted(report)
    assert cand.spelling == spelling
    if isinstance(model, FFTConv):
        h_ref, d_ref = model.reference(LMAX)
        assert rel(cand.conv.h, h_ref) < 1e-6 and rel(cand.conv.skip, d_ref) < 1e-6
    else:
        assert rel(cand.conv.h, model.conv.weight.detach().double()[:, 0].flip(-1)) < 1e-6


class TimeOnDim1(nn.Module):
    """The FFT taken along dim 1 of [B, L, C] directly (no transposes)."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(decay_filter(LMAX, C, 5).t().contiguous().t())  # [LMAX, C]

    def forward(self, x):
        n = 2 * x.shape[1]
        kf = torch.fft.rfft(self.k[: x.shape[1]], n=n, dim=0)
        return torch.fft.irfft(torch.fft.rfft(x, n=n, dim=1) * kf, n=n, dim=1)[:, : x.shape[1]]


def test_fft_conv_along_a_middle_axis():
    model = TimeOnDim1()
    report = lcsm_compile.analyze(model, (torch.randn(2, L, C),), max_len=LMAX)
    assert report.decodable, report.table()
    (cand,) = accepted(report)
    assert cand.conv.time_axis == 1
    assert rel(cand.conv.h, model.k.detach().double().t()) < 1e-6


_FWD = {"backward": lambda n: 1.0, "forward": lambda n: 1.0 / n, "ortho": lambda n: n ** -0.5}
_INV = {"backward": lambda n: 1.0 / n, "forward": lambda n: 1.0, "ortho": lambda n: n ** -0.5}


class AnyNorms(nn.Module):
    def __init__(self, nu, nk, ninv, extra):
        super().__init__()
        self.nu, self.nk, self.ninv, self.extra = nu, nk, ninv, extra
        self.k = nn.Parameter(decay_filter(C, LMAX, 6))

    def forward(self, x):
        u = x.transpose(1, 2)
        n = 2 * u.shape[-1] + self.extra
        kf = torch.fft.rfft(self.k[:, : u.shape[-1]], n=n, norm=self.nk)
        y = torch.fft.irfft(torch.fft.rfft(u, n=n, norm=self.nu) * kf, n=n, norm=self.ninv)
        return y[..., : u.shape[-1]].transpose(1, 2)


# Every combination of the three norms (27; 6 of them independent of n, hence accepted), each with an
# FFT size n = 2L + extra, extra cycling through 0..5: deterministic, so a failure reproduces, and
# every norm and every extra is covered. extra only enters through n, which is why the 27 x 6
# product is not run (162 analyses).
NORM_CASES = [(nu, nk, ninv, i % 6) for i, (nu, nk, ninv) in
              enumerate((a, b, c) for a in sorted(_FWD) for b in sorted(_FWD) for c in sorted(_INV))]


@pytest.mark.parametrize("nu,nk,ninv,extra", NORM_CASES)
def test_any_scaling_convention_and_fft_size(nu, nk, ninv, extra):
    """The filter is the impulse response whatever the norms; a scale that depends on n (hence on L)
    makes the filter length-dependent, which the analysis must see."""
    model = AnyNorms(nu, nk, ninv, extra)
    report = lcsm_compile.analyze(model, (torch.randn(2, L, C),), max_len=LMAX)
    scale = lambda n: _FWD[nu](n) * _FWD[nk](n) * _INV[ninv](n) * n  # noqa: E731
    if abs(scale(2 * L + extra) - scale(2 * (L // 2) + extra)) < 1e-12:
        (cand,) = accepted(report)
        assert rel(cand.conv.h, model.k.detach().double() * scale(2)) < 1e-6
    else:
        assert not report.decodable and not report.accepted
        assert lcsm_compile.Reason.FILTER_DEPENDS_ON_LENGTH in {c.reason for c in report.rejected}
