"""The modal proof (passes/modal.py): long filters that are sums of exponentials, proven from the ops
that compute them, with poles and residues that reproduce conv.h in float64; and filters that are not.

Each model is a tiny LM (embedding, one mixer block, head) whose mixer computes its filter in forward
the way public code does: StripedHyena, S4D, DSS, Mega, a cumprod Vandermonde, a cross-correlation of
a reversed kernel, a running sum; and Hyena's MLP, a truncation window, an unstable pole, too many
modes, which are refused."""

import math

import pytest
import torch
import torch.nn as nn

import lcsm_compile
from lcsm_compile.models.lm import LM, Block
from lcsm_compile.passes.modal import ModalForm, NotModal, prove
from lcsm_compile.report import Verdict

VOCAB, D_MODEL, MAX_LEN = 32, 8, 128


def fft_conv(u, k, D):
    """Causal FFT convolution of u [..., L] with k [..., L] (broadcast), plus the skip D."""
    L = u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
    return y + u * D


class LongConv(nn.Module):
    """in_proj, then y = k * u + D u channel by channel with k = kernel(L) [D, L], then out_proj."""

    def __init__(self, d_model, kernel):
        super().__init__()
        self.in_proj = nn.Linear(d_model, d_model)
        self.kernel = kernel
        self.D = nn.Parameter(torch.randn(d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        u = self.in_proj(x).transpose(1, 2)  # B D L
        y = fft_conv(u, self.kernel(x.shape[1]), self.D[:, None])
        return self.out_proj(y.transpose(1, 2))


class RealModal(nn.Module):
    """StripedHyena's HCL filter with real poles: h[d, t] = sum_n r[d, n] p[d, n]**t."""

    def __init__(self, d_model, state, unstable=False, window=None, ramp="arange"):
        super().__init__()
        self.ramp = ramp
        poles = 0.3 + 0.65 * torch.rand(d_model, state, 1)
        if unstable:
            poles[0, 0] = 1.02
        self.poles = nn.Parameter(poles)
        self.residues = nn.Parameter(torch.randn(d_model, state, 1))
        self.window = window

    def forward(self, L):
        t = torch.arange(L) if self.ramp == "arange" else torch.ones(L).cumsum(0) - 1  # 0, 1, .., L - 1
        t = t[None, None]
        h = (self.residues * self.poles ** t).sum(1)
        if self.window is not None:  # a truncation window: lags past `window` cut
            h = h * (torch.arange(L) < self.window)
        return h


class ComplexModal(nn.Module):
    """StripedHyena's ParallelHyenaFilter: complex poles and residues as real views, exp(log p * t)."""

    def __init__(self, d_model, state):
        super().__init__()
        poles = torch.polar(0.5 + 0.45 * torch.rand(d_model, state, 1), math.pi * torch.rand(d_model, state, 1))
        self.poles = nn.Parameter(torch.view_as_real(poles))
        self.residues = nn.Parameter(torch.randn(d_model, state, 1, 2))

    def forward(self, L):
        t = torch.arange(L)[None, None]
        log_poles = torch.view_as_complex(self.poles).log()
        return (torch.view_as_complex(self.residues) * (log_poles * t).exp()).real.sum(1)


class S4DKernel(nn.Module):
    """S4D: K = 2 Re sum_n C_n B_n exp(dt A_n t), ZOH or bilinear discretisation, Vandermonde by einsum."""

    def __init__(self, d_model, state, disc):
        super().__init__()
        self.disc = disc
        self.log_dt = nn.Parameter(torch.rand(d_model) * (math.log(0.1) - math.log(0.01)) + math.log(0.01))
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(d_model, state)) + 0.1 * torch.randn(d_model, state))
        self.A_imag = nn.Parameter(math.pi * (torch.arange(state) + torch.rand(d_model, state)))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(d_model, state, dtype=torch.cfloat)))

    def forward(self, L):
        dt = torch.exp(self.log_dt)
        A = -torch.exp(self.log_A_real) + 1j * self.A_imag
        C = torch.view_as_complex(self.C)
        dtA = A * dt.unsqueeze(-1)
        if self.disc == "zoh":
            vandermonde = torch.exp(dtA.unsqueeze(-1) * torch.arange(L))
            C = C * (torch.exp(dtA) - 1.0) / A
        else:
            dA = (1 + dtA / 2) / (1 - dtA / 2)
            vandermonde = dA.unsqueeze(-1) ** torch.arange(L)
            C = C * dt.unsqueeze(-1) / (1 - dtA / 2)
        return 2 * torch.einsum("hn,hnl->hl", C, vandermonde).real

    def poles(self):  # in float64, as the proof evaluates
        A = -torch.exp(self.log_A_real.double()) + 1j * self.A_imag.double()
        dtA = A * torch.exp(self.log_dt.double()).unsqueeze(-1)
        return torch.exp(dtA) if self.disc == "zoh" else (1 + dtA / 2) / (1 - dtA / 2)


class DSSKernel(nn.Module):
    """DSS-exp: K = Re sum_n W_n (exp(Lambda_n dt) - 1) / Lambda_n exp(Lambda_n dt t), a sum over dim 1."""

    def __init__(self, d_model, state):
        super().__init__()
        self.Lambda_re = nn.Parameter(-0.5 - torch.rand(state))
        self.Lambda_im = nn.Parameter(math.pi * torch.randn(state))
        self.W = nn.Parameter(torch.randn(d_model, state, 2))
        self.log_dt = nn.Parameter(math.log(0.05) + 0.5 * torch.randn(d_model))
        self.register_buffer("pos", torch.arange(MAX_LEN).float(), persistent=False)

    def forward(self, L):
        Lambda = torch.clamp(self.Lambda_re, max=-1e-4) + 1j * self.Lambda_im
        dt_Lambda = torch.exp(self.log_dt)[:, None] * Lambda  # D N
        S = torch.exp(dt_Lambda.unsqueeze(-1) * self.pos[:L])  # D N L
        C = torch.view_as_complex(self.W) * (torch.exp(dt_Lambda) - 1) / Lambda
        return torch.view_as_real(C.unsqueeze(-1) * S).sum(dim=1)[..., 0]  # the real part


class CumprodKernel(nn.Module):
    """h[d, t] = sum_n B[d, n] lam[d, n]**t with the powers built by cumprod over the lags."""

    def __init__(self, d_model, state):
        super().__init__()
        self.log_decay = nn.Parameter(torch.log(0.02 + 0.5 * torch.rand(d_model, state)))
        self.B = nn.Parameter(torch.randn(d_model, state))

    def forward(self, L):
        lam = torch.exp(-self.log_decay.exp())  # D N
        powers = torch.cumprod(lam.unsqueeze(-1).expand(-1, -1, L + 1), dim=-1)[..., 1:]  # lam ** (t + 2)
        return torch.einsum("dn,dnl->dl", self.B / lam ** 2, powers)


class CrossCorrelation(nn.Module):
    """The modal kernel stored time-reversed (powers over arange(L - 1, .., 0)) and applied as a
    cross-correlation: conjugated spectrum, output rolled by -1, the last L positions taken."""

    def __init__(self, d_model, state):
        super().__init__()
        self.in_proj = nn.Linear(d_model, d_model)
        self.log_decay = nn.Parameter(torch.log(0.02 + 0.3 * torch.rand(d_model, state)))
        self.B = nn.Parameter(torch.randn(d_model, state))

    def forward(self, x):
        L = x.shape[1]
        u = self.in_proj(x).transpose(1, 2)
        lam = torch.exp(-self.log_decay.exp())
        k_rev = (self.B[..., None] * lam[..., None] ** torch.arange(L - 1, -1, -1)).sum(1)  # k_rev[j] = h[L-1-j]
        n = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k_rev, n=n).conj(), n=n)
        return torch.roll(y, -1, dims=-1)[..., n - L:].transpose(1, 2)


class MultiHeadEMA(nn.Module):
    """Mega's damped EMA as a long conv: per head k[h, t] = sum_n gamma p (1 - alpha delta)**t, the same
    filter for every channel of the head."""

    def __init__(self, d_model, heads, ndim):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(d_model, d_model)
        self.delta = nn.Parameter(torch.randn(heads, ndim, 1))
        self.alpha = nn.Parameter(torch.randn(heads, ndim, 1))
        self.beta = nn.Parameter(torch.randn(heads, ndim, 1))
        self.gamma = nn.Parameter(torch.randn(heads, ndim))
        self.omega = nn.Parameter(torch.randn(d_model))


    def forward(self, x):
        B, L, D = x.shape
        u = self.in_proj(x).view(B, L, self.heads, D // self.heads).permute(0, 2, 3, 1)  # B H Dh L
        p = torch.sigmoid(self.delta) * self.beta
        decay = 1.0 - torch.sigmoid(self.alpha) * torch.sigmoid(self.delta)
        kernel = p * decay ** torch.arange(L).to(p)  # H N L
        k = torch.einsum("hnl,hn->hl", kernel, self.gamma / math.sqrt(kernel.shape[1]))
        y = fft_conv(u, k.unsqueeze(1), self.omega.view(self.heads, -1, 1))
        return y.permute(0, 3, 1, 2).reshape(B, L, D)


class HyenaMLPFilter(nn.Module):
    """Hyena's implicit filter: an MLP with sin activations over positional features of t (computed in
    forward), times an exponential decay window."""

    def __init__(self, d_model, bands=3, order=16, with_ramp=False):
        super().__init__()
        self.with_ramp = with_ramp
        self.freqs = nn.Parameter(torch.rand(bands))
        self.mlp = nn.Sequential(nn.Linear(2 * bands + with_ramp, order), nn.Linear(order, d_model))
        self.deltas = nn.Parameter(torch.rand(d_model))

    def forward(self, L):
        t = torch.arange(L)[:, None].float() / MAX_LEN  # L 1
        w = 2 * math.pi * t * self.freqs
        z = torch.cat(([t] if self.with_ramp else []) + [torch.cos(w), torch.sin(w)], dim=-1)
        h = self.mlp[1](torch.sin(10 * self.mlp[0](z)))  # L D
        return h.transpose(0, 1) * torch.exp(-t.transpose(0, 1) * self.deltas[:, None].abs())


class RunningSum(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.proj(x).cumsum(dim=1)


def lm(mixer, seed):
    """A one-block LM around mixer() on fresh random weights (seeded: the test is reproducible)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LM(VOCAB, D_MODEL, [Block(D_MODEL, mixer())], MAX_LEN).eval()


def long_convs(model, max_len=MAX_LEN, length=48):
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))
    report = lcsm_compile.analyze(model, (ids,), max_len=max_len)
    convs = [c for c in report.candidates if c.kind == "long"]
    assert convs and all(c.verdict is Verdict.ACCEPTED for c in convs), report.table()
    return [(c.conv, report.captured) for c in convs]


def impulse(form, length):
    """Re sum_n r p**t for t in [0, length), by the recurrence the decoder runs (no pow: p may be 0)."""
    state, out = form.residues.clone(), []
    for _ in range(length):
        out.append(state.sum(-1).real)
        state = state * form.poles
    return torch.stack(out, -1)


def check_modal(conv, cap, modes):
    """The form reproduces conv.h over every lag in float64, with the expected modes per channel."""
    form = prove(conv, cap)
    assert isinstance(form, ModalForm), form
    h = conv.h
    assert h.shape[1] == MAX_LEN
    err = ((impulse(form, h.shape[1]) - h).norm(dim=1) / h.norm(dim=1)).max().item()
    assert err <= 1e-9 and form.rel_err <= 1e-9, (err, form.rel_err)
    assert form.modes == (modes,) * h.shape[0]
    assert form.poles.shape == form.residues.shape == (h.shape[0], modes)
    assert form.poles.dtype == torch.complex128 and form.poles.abs().max() <= 1
    return form


def same_poles(got, want):
    """Equal as sets of complex numbers (the order is the proof's)."""
    got, want = got.to(torch.complex128), want.to(torch.complex128).flatten()
    return len(got) == len(want) and (got[:, None] - want[None]).abs().min(1).values.max() <= 1e-10 \
        and (got[:, None] - want[None]).abs().min(0).values.max() <= 1e-10


@pytest.mark.parametrize("ramp", ["arange", "cumsum"])
def test_real_poles(ramp):
    state = 4
    model = lm(lambda: LongConv(D_MODEL, RealModal(D_MODEL, state, ramp=ramp)), seed=11 if ramp == "arange" else 23)
    (conv, cap), = long_convs(model)
    form = check_modal(conv, cap, modes=state)
    poles = model.blocks[0].mixer.kernel.poles.detach()
    for d in range(D_MODEL):
        assert same_poles(form.poles[d], poles[d])


def upper(p):
    """Each pole's representative of its conjugate pair: Re(r p^t) = Re(conj(r) conj(p)^t), so a pair
    is one mode of the recurrence."""
    return torch.where(p.imag < 0, p.conj(), p)


def test_complex_poles_give_one_mode_per_conjugate_pair():
    state = 3
    model = lm(lambda: LongConv(D_MODEL, ComplexModal(D_MODEL, state)), seed=12)
    (conv, cap), = long_convs(model)
    form = check_modal(conv, cap, modes=state)  # Re(r p^t) = (r p^t + conj(r p^t)) / 2, folded back
    poles = torch.view_as_complex(model.blocks[0].mixer.kernel.poles.detach().double())
    for d in range(D_MODEL):
        assert same_poles(form.poles[d], upper(poles[d]))


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_s4d_vandermonde(disc):
    state = 4
    model = lm(lambda: LongConv(D_MODEL, S4DKernel(D_MODEL, state, disc)), seed=13 if disc == "zoh" else 14)
    (conv, cap), = long_convs(model)
    form = check_modal(conv, cap, modes=state)
    poles = model.blocks[0].mixer.kernel.poles().detach()
    for d in range(D_MODEL):
        assert same_poles(form.poles[d], upper(poles[d]))


def test_dss_sum_over_state():
    state = 5
    model = lm(lambda: LongConv(D_MODEL, DSSKernel(D_MODEL, state)), seed=15)
    (conv, cap), = long_convs(model)
    check_modal(conv, cap, modes=state)


def test_cumprod_vandermonde():
    state = 3
    model = lm(lambda: LongConv(D_MODEL, CumprodKernel(D_MODEL, state)), seed=16)
    (conv, cap), = long_convs(model)
    form = check_modal(conv, cap, modes=state)
    lam = torch.exp(-model.blocks[0].mixer.kernel.log_decay.detach().double().exp())
    assert same_poles(form.poles[5], lam[5])


def test_cross_correlation_of_a_reversed_kernel():
    state = 3
    model = lm(lambda: CrossCorrelation(D_MODEL, state), seed=24)
    (conv, cap), = long_convs(model)
    form = check_modal(conv, cap, modes=state)  # the conjugated spectrum reverses the kernel back
    lam = torch.exp(-model.blocks[0].mixer.log_decay.detach().double().exp())
    for d in range(D_MODEL):
        assert same_poles(form.poles[d], lam[d])


def test_mega_ema_shared_across_head_channels():
    heads, ndim = 2, 3
    model = lm(lambda: MultiHeadEMA(D_MODEL, heads, ndim), seed=17)
    (conv, cap), = long_convs(model)
    form = check_modal(conv, cap, modes=ndim)  # channels (head, dim) read their head's filter
    ema = model.blocks[0].mixer
    decay = (1 - torch.sigmoid(ema.alpha.double()) * torch.sigmoid(ema.delta.double())).detach()[..., 0]
    per_head = D_MODEL // heads
    for c in range(D_MODEL):
        assert same_poles(form.poles[c], decay[c // per_head])


def test_running_sum_is_one_pole_at_one():
    model = lm(lambda: RunningSum(D_MODEL), seed=18)
    (conv, cap), = long_convs(model)
    form = check_modal(conv, cap, modes=1)
    assert torch.equal(form.poles, torch.ones(D_MODEL, 1, dtype=torch.complex128))


@pytest.mark.parametrize("with_ramp", [False, True])
def test_hyena_mlp_filter_is_not_modal(with_ramp):
    model = lm(lambda: LongConv(D_MODEL, HyenaMLPFilter(D_MODEL, with_ramp=with_ramp)), seed=19)
    (conv, cap), = long_convs(model)
    res = prove(conv, cap)
    assert isinstance(res, NotModal), res
    node = next(n for n in cap.gm.graph.nodes if n.name == res.node)
    if with_ramp:  # t itself is a feature: the cat joins a ramp with exponentials
        assert res.op == "cat" and "ramp" in res.why
    else:  # the sin activation of the first layer
        assert res.op == "sin" and node.target is torch.ops.aten.sin.default and "not exponential" in res.why


def test_truncation_window_is_not_modal():
    model = lm(lambda: LongConv(D_MODEL, RealModal(D_MODEL, 2, window=64)), seed=20)
    (conv, cap), = long_convs(model)
    kernel = model.blocks[0].mixer.kernel
    uncut = (kernel.residues * kernel.poles ** 64).sum(1).detach().double()  # the modal filter at lag 64
    assert conv.h[:, 64:].abs().max() <= 1e-12 * conv.h.abs().max() and uncut.abs().max() > 1e-3  # the cut is in h
    res = prove(conv, cap)
    assert isinstance(res, NotModal) and res.op == "lt" and "step in t" in res.why, res


def test_unstable_pole_is_refused():
    model = lm(lambda: LongConv(D_MODEL, RealModal(D_MODEL, 2, unstable=True)), seed=21)
    (conv, cap), = long_convs(model)
    res = prove(conv, cap)
    assert isinstance(res, NotModal) and "|p| = 1.02 > 1" in res.why, res


def test_too_many_modes_is_refused():
    max_len = 32  # at most 8 modes
    model = lm(lambda: LongConv(D_MODEL, RealModal(D_MODEL, 12)), seed=22)
    (conv, cap), = long_convs(model, max_len=max_len, length=16)
    res = prove(conv, cap)
    assert isinstance(res, NotModal) and "too many modes: 12 > max_len // 4 = 8" in res.why, res
