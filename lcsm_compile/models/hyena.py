"""Hyena operator LM (Poli et al. 2023), following HazyResearch/safari src/models/sequence/hyena.py.

Spellings exercised: implicit filter = Sin-MLP over a positional embedding precomputed at max_len
and sliced z[:, :L], ExponentialModulation window, depthwise short conv nn.Conv1d(padding=2)[..., :L],
and safari's fftconv_ref: rfft(k, n=2L)/n * rfft(u, n=2L) -> irfft(norm="forward")[..., :L] + u * D.
"""

import math

import torch
import torch.nn as nn

from lcsm_compile.models.lm import LM, Block


def fft_dtype(dtype):
    """The dtype FFTs, complex filter math and position tables run in for activations of `dtype`:
    torch has no bfloat16/float16 FFT on CPU and no complex bfloat16, so at least float32; float64
    stays float64 (and float32 is unchanged)."""
    return torch.promote_types(dtype, torch.float32)


def fftconv_ref(u, k, D):
    """safari's reference FFT convolution with the lag-0 skip term u * D (u: [B, C, L], k: [C, L])."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    dtype = fft_dtype(u.dtype)
    k_f = torch.fft.rfft(k.to(dtype), n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    out = y + u * D.unsqueeze(-1)
    return out.to(dtype=u.dtype)


class Sin(nn.Module):
    """Periodic activation with a learnable frequency."""

    def __init__(self, dim, w=10):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """Hyena's positional features [t, cos bands, sin bands], built once at seq_len and sliced."""

    def __init__(self, emb_dim, seq_len):
        super().__init__()
        t = torch.linspace(0, 1, seq_len)[None, :, None]  # 1, L, 1
        bands = (emb_dim - 1) // 2
        t_rescaled = torch.linspace(0, seq_len - 1, seq_len)[None, :, None]
        w = 2 * math.pi * t_rescaled / seq_len
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]
        z = torch.exp(-1j * f * w)
        z = torch.cat([t, z.real, z.imag], dim=-1)
        self.z = nn.Parameter(z)  # safari trains z with a tiny learning rate
        self.register_buffer("t", t)

    def forward(self, L):
        return self.z[:, :L], self.t[:, :L]


class ExponentialModulation(nn.Module):
    """Per-channel exponential decay window exp(-t * |delta|)."""

    def __init__(self, d_model, fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2, shift=0.0):
        super().__init__()
        self.shift = shift
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d_model)[None, None])

    def forward(self, t, x):
        decay = torch.exp(-t * self.deltas.abs())
        return x * (decay + self.shift)


class HyenaFilter(nn.Module):
    """Implicit long filter: Sin-MLP over positional features times an exponential window."""

    def __init__(self, d_model, emb_dim=3, order=16, seq_len=256, w=1, num_inner_mlps=2):
        super().__init__()
        self.d_model = d_model
        self.bias = nn.Parameter(torch.randn(d_model))
        act = Sin(dim=order, w=w)
        self.pos_emb = PositionalEmbedding(emb_dim, seq_len)
        self.implicit_filter = nn.Sequential(nn.Linear(emb_dim, order), act)
        for _ in range(num_inner_mlps):
            self.implicit_filter.append(nn.Linear(order, order))
            self.implicit_filter.append(act)
        self.implicit_filter.append(nn.Linear(order, d_model, bias=False))
        self.modulation = ExponentialModulation(d_model)

    def filter(self, L):
        """The filter at length L: [1, L, d_model]."""
        z, t = self.pos_emb(L)
        h = self.implicit_filter(z)
        return self.modulation(t, h)

    def forward(self, x, L, k, bias):
        return fftconv_ref(x, k, bias)


class HyenaOperator(nn.Module):
    """Hyena recurrence of depth `order`: in_proj -> short conv -> (gate, long conv)^(order-1) -> gate."""

    def __init__(self, d_model, l_max, order=2, filter_order=16, short_filter_order=3,
                 filter_cls=HyenaFilter, **filter_args):
        super().__init__()
        self.d_model = d_model
        self.l_max = l_max
        self.order = order
        self.in_proj = nn.Linear(d_model, (order + 1) * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        total_width = d_model * (order + 1)
        self.short_filter = nn.Conv1d(
            in_channels=total_width,
            out_channels=total_width,
            kernel_size=short_filter_order,
            groups=total_width,
            padding=short_filter_order - 1,
        )
        self.filter_fn = filter_cls(d_model * (order - 1), order=filter_order, seq_len=l_max, **filter_args)

    def forward(self, u):
        l = u.size(-2)
        l_filter = min(l, self.l_max)
        u = self.in_proj(u)
        u = u.transpose(1, 2)  # b l d -> b d l
        uc = self.short_filter(u)[..., :l_filter]
        *x, v = uc.split(self.d_model, dim=1)

        k = self.filter_fn.filter(l_filter)[0]  # l (v o)
        k = k.reshape(l_filter, self.d_model, self.order - 1).permute(2, 1, 0)  # o v l
        bias = self.filter_fn.bias.reshape(self.d_model, self.order - 1).t()  # o v

        for o, x_i in enumerate(reversed(x[1:])):
            v = v * x_i
            v = self.filter_fn(v, l_filter, k=k[o], bias=bias[o])

        y = (v * x[0]).transpose(1, 2)  # b d l -> b l d
        return self.out_proj(y)


def hyena_lm(order, n_layer, vocab=64, d_model=32, max_len=256):
    """A pre-norm LM of `n_layer` Hyena blocks: ids [B, L] -> logits [B, L, vocab], L <= max_len."""
    blocks = [Block(d_model, HyenaOperator(d_model, max_len, order=order)) for _ in range(n_layer)]
    return LM(vocab, d_model, blocks, max_len)


def demo_lm(n_layer=4, d_model=128, vocab=256, max_len=8192, order=2, seed=0):
    """The bundled demo: an untrained (seeded, random weights) order-2 Hyena LM, in eval mode.
    The decoder's exactness does not depend on training; the generated text is random."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return hyena_lm(order, n_layer, vocab=vocab, d_model=d_model, max_len=max_len).eval()
