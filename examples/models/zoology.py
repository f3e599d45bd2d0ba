"""Gated convolutions in the style of HazyResearch/zoology (Arora et al. 2023: mixers/base_conv.py,
mixers/convolution.py), in an LM normalised by a hand-written RMSNorm.

Spellings exercised:
- BaseConv: y = conv(u) * Linear(u) + u, with conv a ShortConvolution (nn.Conv1d(padding=K-1)[..., :L],
  dimension last) or an ImplicitLongConvolution (Sin-MLP filter, zoology's fft_conv with the u skip);
- a per-layer kernel size list: the short-only LM has no long convolution at all;
- RMSNorm written by hand: x / (||x||_2 d^-1/2 + eps) with torch.norm (ATen linalg_vector_norm);
- einops.rearrange between the layouts of the long convolution;
- the filter normalised by its L1 norm over channels (zoology's `normalized=True`): per lag, legal.
Look-alikes: fft_conv's k_rev, a reverse filter added through its conjugate spectrum (bidirectional),
and the filter normalised over its lags instead (the prefix of the filter changes with L).
"""

import torch
import torch.nn as nn
from einops import rearrange

from examples.models.common import LM, MAX_LEN, Block, fft_dtype, seeded, token_inputs
from examples.models.hyena import ExponentialModulation, PositionalEmbedding, Sin

D_MODEL, VOCAB, LENGTH = 32, 64, 64


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) as its reference code writes it: through the L2 norm."""

    def __init__(self, d, eps=1e-8):
        super().__init__()
        self.d = d
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        norm_x = torch.norm(x, p=2, dim=-1, keepdim=True)
        rms_x = norm_x * self.d ** (-1.0 / 2)
        return self.scale * (x / (rms_x + self.eps))


def fft_conv(u, k, k_rev=None):
    """u: [B, D, L], k: [D, L] -> causal convolution plus the skip u. k_rev adds a reversed filter."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    dtype = fft_dtype(u.dtype)
    k_f = torch.fft.rfft(k.to(dtype), n=fft_size) / fft_size
    if k_rev is not None:
        k_f = k_f + (torch.fft.rfft(k_rev.to(dtype), n=fft_size) / fft_size).conj()
    u_f = torch.fft.rfft(u.to(dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    return (y + u).to(dtype=u.dtype)


class ShortConvolution(nn.Module):
    """nn.Conv1d that takes dimension last."""

    def __init__(self, d_model, kernel_size):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=kernel_size, groups=d_model, padding=kernel_size - 1)

    def forward(self, x):
        l = x.size(1)
        return self.conv(x.transpose(1, 2))[..., :l].transpose(1, 2)


class ImplicitFilter(nn.Module):
    """Hyena's implicit filter: [1, L, D] from a Sin-MLP over positional features, decayed."""

    def __init__(self, d_model, l_max, emb_dim=3, order=16):
        super().__init__()
        act = Sin(order, w=1)
        self.pos_emb = PositionalEmbedding(emb_dim, l_max)
        self.mlp = nn.Sequential(nn.Linear(emb_dim, order), act, nn.Linear(order, order), act,
                                 nn.Linear(order, d_model, bias=False))
        self.modulation = ExponentialModulation(d_model)

    def forward(self, l):
        z, t = self.pos_emb(l)
        return self.modulation(t, self.mlp(z))


class ImplicitLongConvolution(nn.Module):
    """normalize: None, "channels" (zoology's p=1 norm over the last dim of [1, L, D]) or "lags" (the
    look-alike: over dim 1, so every lag depends on L). bidirectional: add zoology's k_rev."""

    def __init__(self, d_model, l_max, normalize=None, bidirectional=False):
        super().__init__()
        self.normalize = normalize
        self.filter_fn = ImplicitFilter(d_model, l_max)
        self.filter_rev = ImplicitFilter(d_model, l_max) if bidirectional else None

    def filter(self, fn, l):
        h = fn(l)  # 1 l d
        if self.normalize == "channels":
            h = h / torch.norm(h, dim=-1, p=1, keepdim=True)
        elif self.normalize == "lags":
            h = h / torch.norm(h, dim=1, p=1, keepdim=True)
        return rearrange(h, "1 l d -> d l")

    def forward(self, x):
        u = rearrange(x, "b l d -> b d l")
        l = u.shape[-1]
        k_rev = self.filter(self.filter_rev, l) if self.filter_rev is not None else None
        y = fft_conv(u, self.filter(self.filter_fn, l), k_rev)
        return rearrange(y, "b d l -> b l d")


class BaseConv(nn.Module):
    def __init__(self, d_model, l_max, kernel_size=3, **long_conv_args):
        super().__init__()
        self.projection = nn.Linear(d_model, d_model)
        if kernel_size == -1:
            self.conv = ImplicitLongConvolution(d_model, l_max, **long_conv_args)
        else:
            self.conv = ShortConvolution(d_model, kernel_size)

    def forward(self, u):
        return self.conv(u) * self.projection(u) + u


def _lm(kernel_sizes, **long_conv_args):
    with seeded(0):
        blocks = [Block(D_MODEL, BaseConv(D_MODEL, MAX_LEN, k, **long_conv_args), norm_cls=RMSNorm)
                  for k in kernel_sizes]
        model = LM(VOCAB, D_MODEL, blocks, MAX_LEN, norm_cls=RMSNorm)
    return model.eval(), token_inputs(VOCAB, LENGTH)


def build_short():
    return _lm([3, 4])


def build_implicit():
    return _lm([3, -1], normalize="channels")


def build_conj_rev():
    return _lm([-1], bidirectional=True)


def build_normalized_over_lags():
    return _lm([-1], normalize="lags")
