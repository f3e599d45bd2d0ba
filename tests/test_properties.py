"""Property checks: each look-alike is declined with its typed reason; the causality proof and the
whole-model safety net."""

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

import lcsm_compile
from lcsm_compile import Reason, Verdict
from lcsm_compile.passes.capture import Captured
from lcsm_compile.passes.properties import causal_conv, prove_no_wrap

C, L, LMAX = 4, 24, 40


def decay_filter(c, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, n, generator=g) * torch.exp(-torch.arange(n) / 8.0)


def reasons(report):
    return {c.reason for c in report.candidates if c.verdict is Verdict.REJECTED}


def analyze(model, capture="export", d_in=C):
    return lcsm_compile.analyze(model, (torch.randn(2, L, d_in),), max_len=LMAX, capture=capture)


class Conv(nn.Module):
    """An FFT conv whose filter / FFT size / output slice is chosen by `kind` (mostly look-alikes)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.k = nn.Parameter(decay_filter(C, LMAX, 0))
        self.k_rev = nn.Parameter(decay_filter(C, LMAX, 1))
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        u = x.transpose(1, 2)
        n_l = u.shape[-1]
        k, n, out = self.k[:, :n_l], 2 * n_l, slice(0, n_l)
        if self.kind == "wrap":  # FFT size L: circular
            n = n_l
        elif self.kind == "fixed_size":  # n fixed at 1.5 max_len with a full-length filter
            k, n = self.k, 3 * LMAX // 2
        elif self.kind == "bidirectional":  # M2-BERT: k_fwd padded right + flipped k_rev padded left
            k = F.pad(k, (0, n_l)) + F.pad(self.k_rev[:, :n_l].flip(-1), (n_l, 0))
        elif self.kind == "input_filter":  # the filter is a projection of the input
            k = self.proj(x).transpose(1, 2)
        elif self.kind == "linspace":  # filter rebuilt from positions linspace(0, 1, L)
            t = torch.arange(n_l, dtype=x.dtype) / (n_l - 1)
            k = torch.exp(-3 * t)[None] * self.k[:, :1]
        elif self.kind == "late_slice":  # output slice [1, L+1): reads one step ahead
            out = slice(1, n_l + 1)
        elif self.kind == "squared":  # the input times its own spectrum: not linear
            return torch.fft.irfft(torch.fft.rfft(u, n=n) ** 2, n=n)[..., out].transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., out]
        return y.transpose(1, 2)


@pytest.mark.parametrize("kind,reason", [
    ("wrap", Reason.WRAP_AROUND),
    ("fixed_size", Reason.WRAP_AROUND),
    ("bidirectional", Reason.BIDIRECTIONAL_FILTER),
    ("input_filter", Reason.FILTER_DEPENDS_ON_INPUT),
    ("linspace", Reason.FILTER_DEPENDS_ON_LENGTH),
    ("late_slice", Reason.NOT_CAUSAL_SLICE),
    ("squared", Reason.NONLINEAR),
])
def test_look_alikes_are_declined(kind, reason):
    report = analyze(Conv(kind))
    assert not report.decodable
    assert reason in reasons(report), report.table()
    assert not report.accepted


def test_same_padding_is_non_causal():
    class Same(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(C, C, 3, groups=C, padding=1)

        def forward(self, x):
            return self.conv(x.transpose(1, 2)).transpose(1, 2)

    report = analyze(Same())
    (cand,) = [c for c in report.candidates if c.spelling == "conv1d"]
    assert cand.reason is Reason.NON_CAUSAL_PADDING and cand.offending
    assert Reason.CAUSALITY_CHECK_FAILED in reasons(report)  # the safety net agrees


def test_dense_conv1d_is_channel_mixing():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(C, C, 3, padding=2)

        def forward(self, x):
            return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)

    assert reasons(analyze(Dense())) == {Reason.CHANNEL_MIXING}


class Gated(nn.Module):
    """An FFT conv gated by an activation after its output slice (Hyena's gate, outside the conv), by
    a parameter inside the spectrum (still a convolution), or by a function of the input's own
    spectrum inside it (no longer linear in the input)."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate
        self.k = nn.Parameter(decay_filter(C, LMAX, 2))
        self.g = nn.Parameter(torch.randn(C, 1))

    def forward(self, x):
        u = x.transpose(1, 2)
        n_l = u.shape[-1]
        n = 2 * n_l
        spec = torch.fft.rfft(u, n=n) * torch.fft.rfft(self.k[:, :n_l], n=n)
        if self.gate == "spectrum_of_input":
            spec = spec * torch.sigmoid(torch.fft.rfft(u, n=n).real)
        elif self.gate == "parameter":
            spec = spec * torch.sigmoid(self.g)
        y = torch.fft.irfft(spec, n=n)[..., :n_l]
        if self.gate == "after_slice":
            y = y * torch.sigmoid(u)
        return y.transpose(1, 2)


@pytest.mark.parametrize("gate", ["after_slice", "parameter"])
def test_gates_that_keep_a_convolution_are_accepted(gate):
    report = analyze(Gated(gate))
    assert report.decodable, report.table()
    assert [(c.kind, c.verdict) for c in report.candidates] == [("long", Verdict.ACCEPTED)]


def test_spectrum_gated_by_the_input_is_nonlinear():
    """The same convolution with its spectrum multiplied by a function of the input's spectrum: the
    candidate itself is declined as NONLINEAR (by the linearity check, not because some op was
    seen to mix positions: no TIME_MIXING_OP), where the parameter gate above is accepted."""
    report = analyze(Gated("spectrum_of_input"))
    assert not report.decodable
    (conv,) = [c for c in report.candidates if c.kind == "long"]
    assert conv.verdict is Verdict.REJECTED and conv.reason is Reason.NONLINEAR, report.table()
    assert Reason.TIME_MIXING_OP not in reasons(report)


def _cap(lo=2, hi=64):
    Ls = sympy.Symbol("s0", positive=True, integer=True)
    return Captured(gm=None, level="export", user_inputs=(), roles={}, length_symbol=Ls,
                    example_length=16, max_len=hi, min_len=lo), Ls


def test_no_wrap_proof():
    cap, Ls = _cap()
    assert prove_no_wrap(2 * Ls, Ls, cap)[0]  # n = 2L, Lh = L
    assert prove_no_wrap(Ls + 40, 40, cap)[0]  # n = L + Lk
    assert prove_no_wrap(2 * Ls, sympy.Min(64, Ls), cap)[0]
    ok, text = prove_no_wrap(Ls, Ls, cap)  # n = L
    assert not ok and "L=2" in text
    ok, text = prove_no_wrap(96, 64, cap)  # fixed n: fine up to L = 33 only
    assert not ok and "L=34" in text


def test_causal_conv_reference():
    x, h = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    direct = torch.stack([sum(h[:, t - s] * x[..., s] for s in range(t + 1)) for t in range(10)], -1)
    assert float((causal_conv(x, h) - direct).norm() / direct.norm()) < 1e-12


@pytest.mark.parametrize("capture", ["export", "dynamo"])
def test_safety_net_catches_what_no_recogniser_sees(capture):
    class Peek(nn.Module):  # x_t + x_{t+1}, spelled with a roll (wraps the last position)
        def forward(self, x):
            return x + torch.roll(x, -1, dims=1)

    report = analyze(Peek(), capture)
    assert not report.decodable
    assert not report.safety["future_perturbation"]["passed"]
    assert {Reason.CAUSALITY_CHECK_FAILED, Reason.TIME_MIXING_OP} <= reasons(report)


def test_safety_net_passes_on_causal_model():
    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(C, C, 3, groups=C, padding=2)

        def forward(self, x):
            return torch.tanh(self.conv(x.transpose(1, 2))[..., : x.shape[1]]).transpose(1, 2)

    report = analyze(Causal())
    assert report.decodable
    assert all(v["passed"] and v["rel_err"] < 1e-10 for v in report.safety.values())


class LinspaceFilter(nn.Module):
    """positions rebuilt by torch.linspace(0, 1, L): export bakes the step count into a constant
    without a guard, so the analysis must notice the graph is unfaithful and fall back."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(C, 1))

    def forward(self, x):
        u = x.transpose(1, 2)
        n_l = u.shape[-1]
        k = torch.exp(-3 * torch.linspace(0, 1, n_l))[None] * self.w
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * n_l) * torch.fft.rfft(k, n=2 * n_l), n=2 * n_l)[..., :n_l]
        return y.transpose(1, 2)


@pytest.mark.parametrize("capture", ["export", "dynamo"])
def test_linspace_filter_depends_on_length(capture):
    report = analyze(LinspaceFilter(), capture)
    assert Reason.FILTER_DEPENDS_ON_LENGTH in reasons(report), report.table()
    assert not report.decodable


def test_nan_filter_is_not_accepted():
    """Random-init trap: a NaN filter makes every relative error NaN, which must not read as a pass."""
    model = Conv("safari_like")
    with torch.no_grad():
        model.k[0, 3] = float("nan")
    report = analyze(model)
    assert not report.decodable and not report.accepted
    assert Reason.NUMERIC_MISMATCH in reasons(report)
