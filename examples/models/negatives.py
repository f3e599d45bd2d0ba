"""Look-alikes the analysis must decline, each written the way public code writes it.

- bidirectional: M2-BERT's bidirectional HyenaFilter, k = pad(k_fwd, (0, L)) + pad(k_rev.flip(-1), (L, 0)).
- wrap-around: a full max_len filter with a fixed FFT size 1.5 max_len, below L + Lh - 1 for long
  inputs, so late inputs wrap onto early outputs.
- length-dependent filter: positions rebuilt from torch.linspace(0, 1, L) at every call, as in
  small Hyena re-implementations (and the same spelled arange(L) / (L - 1), which traces with a
  symbolic L): causal at each L, but a prefix's output changes with L.
- "same" padding: a Hyena operator whose short filter is nn.Conv1d(padding=1): sees one step ahead.
- input-dependent filter: a "data-controlled" long filter k = Linear(u), convolved by FFT.
- attention: a StripedHyena-style hybrid whose attention is a sliding window (a Mistral-style band
  mask passed to SDPA): causal, but it drops older keys, which a full-prefix KV cache does not (causal
  full-prefix attention is decoded: examples/models/hybrid.py).
- mean pooling: x + x.mean(dim=1) broadcast back over positions.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models.common import LM, Block, fft_dtype, seeded, token_inputs
from examples.models.hyena import ExponentialModulation, HyenaFilter, HyenaOperator, Sin, fftconv_ref

D_MODEL, MAX_LEN, VOCAB, LENGTH = 32, 256, 64, 64


class BidirectionalHyenaMixer(nn.Module):
    """M2-BERT mixer with bidirectional=True: a forward and a reversed implicit filter summed."""

    def __init__(self, d_model, l_max):
        super().__init__()
        self.d_model = d_model
        self.filter_fn = HyenaFilter(d_model, seq_len=l_max)
        act = Sin(16, w=1)
        self.implicit_filter_rev = nn.Sequential(nn.Linear(3, 16), act, nn.Linear(16, 16), act,
                                                 nn.Linear(16, d_model, bias=False))
        self.in_linear = nn.Linear(d_model, 2 * d_model)
        self.out_linear = nn.Linear(d_model, d_model)

    def forward(self, u):
        L = u.size(-2)
        x1, v = self.in_linear(u).transpose(1, 2).split(self.d_model, dim=1)
        k_fwd = self.filter_fn.filter(L)[0].transpose(0, 1)
        z, t = self.filter_fn.pos_emb(L)
        k_rev = self.filter_fn.modulation(t, self.implicit_filter_rev(z))[0].transpose(0, 1)  # filter_rev
        k = F.pad(k_fwd, (0, L)) + F.pad(k_rev.flip(-1), (L, 0))
        y = fftconv_ref(v, k, self.filter_fn.bias)
        return self.out_linear((y * x1).transpose(1, 2))


class FixedSizeFFTConv(nn.Module):
    """A full max_len implicit filter with a fixed FFT size 1.5 max_len: below L + max_len - 1
    once L > max_len / 2 + 1, so near max_len late inputs wrap onto early outputs."""

    def __init__(self, d_model, l_max):
        super().__init__()
        self.d_model = d_model
        self.l_max = l_max
        self.in_proj = nn.Linear(d_model, 2 * d_model)
        self.filter_fn = HyenaFilter(d_model, seq_len=l_max)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, u):
        L = u.size(-2)
        x1, v = self.in_proj(u).transpose(1, 2).split(self.d_model, dim=1)
        k = self.filter_fn.filter(self.l_max)[0].transpose(0, 1)  # d, l_max
        fft_size = self.l_max + self.l_max // 2
        dtype = fft_dtype(v.dtype)
        k_f = torch.fft.rfft(k.to(dtype), n=fft_size) / fft_size
        u_f = torch.fft.rfft(v.to(dtype), n=fft_size)
        y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :L].to(v.dtype)
        y = y + v * self.filter_fn.bias.unsqueeze(-1)
        return self.out_proj((y * x1).transpose(1, 2))


class LinspaceHyenaFilter(nn.Module):
    """Implicit filter whose positions are rebuilt from linspace(0, 1, L) at every call."""

    def __init__(self, d_model, order=16, bands=2):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(d_model))
        self.register_buffer("freqs", torch.arange(1, bands + 1).float())
        act = Sin(order, w=1)
        self.implicit_filter = nn.Sequential(nn.Linear(1 + 2 * bands, order), act, nn.Linear(order, order), act,
                                             nn.Linear(order, d_model, bias=False))
        self.modulation = ExponentialModulation(d_model)

    def positions(self, L):
        return torch.linspace(0, 1, L, dtype=self.freqs.dtype, device=self.freqs.device)

    def filter(self, L):
        t = self.positions(L)[None, :, None]
        z = torch.cat([t, torch.sin(2 * torch.pi * self.freqs * t), torch.cos(2 * torch.pi * self.freqs * t)], -1)
        return self.modulation(t, self.implicit_filter(z))

    def forward(self, x, L, k, bias):
        return fftconv_ref(x, k, bias)


class ArangeHyenaFilter(LinspaceHyenaFilter):
    """The same positions spelled arange(L) / (L - 1), which traces with a symbolic L."""

    def positions(self, L):
        return torch.arange(L, dtype=self.freqs.dtype, device=self.freqs.device) / (L - 1)


class LengthDependentHyenaOperator(HyenaOperator):
    def __init__(self, d_model, l_max, filter_cls):
        super().__init__(d_model, l_max, order=2)
        self.filter_fn = filter_cls(d_model)


class SamePaddingHyenaOperator(HyenaOperator):
    """Hyena operator whose depthwise short filter pads symmetrically ("same")."""

    def __init__(self, d_model, l_max):
        super().__init__(d_model, l_max, order=2)
        total_width = d_model * (self.order + 1)
        self.short_filter = nn.Conv1d(total_width, total_width, kernel_size=3, groups=total_width, padding=1)


class InputFilterConv(nn.Module):
    """Long convolution whose filter is computed from the activations: k = Linear(u) per position."""

    def __init__(self, d_model):
        super().__init__()
        self.in_proj = nn.Linear(d_model, d_model)
        self.filter_proj = nn.Linear(d_model, d_model)
        self.D = nn.Parameter(torch.randn(d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, u):
        v = self.in_proj(u).transpose(1, 2)
        k = self.filter_proj(u).transpose(1, 2)  # b d l: a different filter for every input
        return self.out_proj(fftconv_ref(v, k, self.D).transpose(1, 2))


class SlidingWindowAttention(nn.Module):
    def __init__(self, d_model, max_len, num_heads=4, window=16):
        super().__init__()
        self.num_heads = num_heads
        self.Wqkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        ones = torch.ones(max_len, max_len, dtype=torch.bool)
        self.register_buffer("band", ones.tril() & ~ones.tril(-window), persistent=False)

    def forward(self, x):
        L = x.shape[1]
        q, k, v = [t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in self.Wqkv(x).chunk(3, dim=-1)]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.band[:L, :L])
        return self.out_proj(y.transpose(1, 2).flatten(-2))


class MeanPool(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.proj(x + x.mean(dim=1, keepdim=True))


def _lm(*mixers):
    with seeded(0):
        model = LM(VOCAB, D_MODEL, [Block(D_MODEL, m()) for m in mixers], MAX_LEN)
    return model.eval(), token_inputs(VOCAB, LENGTH)


def build_bidirectional():
    return _lm(lambda: BidirectionalHyenaMixer(D_MODEL, MAX_LEN))


def build_wrap_around():
    return _lm(lambda: FixedSizeFFTConv(D_MODEL, MAX_LEN))


def build_length_dependent():
    return _lm(lambda: LengthDependentHyenaOperator(D_MODEL, MAX_LEN, LinspaceHyenaFilter))


def build_length_dependent_arange():
    return _lm(lambda: LengthDependentHyenaOperator(D_MODEL, MAX_LEN, ArangeHyenaFilter))


def build_same_padding():
    return _lm(lambda: SamePaddingHyenaOperator(D_MODEL, MAX_LEN))


def build_input_filter():
    return _lm(lambda: InputFilterConv(D_MODEL))


def build_attention():
    return _lm(lambda: HyenaOperator(D_MODEL, MAX_LEN, order=2), lambda: SlidingWindowAttention(D_MODEL, MAX_LEN))


def build_mean_pool():
    return _lm(lambda: MeanPool(D_MODEL))
