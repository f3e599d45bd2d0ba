"""StripedHyena / Evo-style gated convolution blocks, after togethercomputer/stripedhyena.

Spellings exercised: modal filter h[t] = Re(sum_n r_n p_n^t) from complex poles/residues stored as
real views (torch.view_as_complex), time index t = arange(max_len) sliced [..., :L]; short FIR via
F.conv1d(padding=K-1, groups=C)[..., :L] plus a manually added bias; the long conv with a COMPLEX
fft of the input sliced to n//2+1 bins times rfft(h)/n, then irfft(norm="forward"); RMSNorm and a
SwiGLU-style ParallelGatedMLP.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models.common import LM, MAX_LEN, fft_dtype, seeded, token_inputs


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)
        return self.scale * y


class ParallelGatedMLP(nn.Module):
    def __init__(self, d_model, inner_size=None):
        super().__init__()
        inner_size = inner_size or 2 * d_model
        self.l1 = nn.Linear(d_model, inner_size, bias=False)
        self.l2 = nn.Linear(d_model, inner_size, bias=False)
        self.l3 = nn.Linear(inner_size, d_model, bias=False)

    def forward(self, z):
        return self.l3(F.silu(self.l1(z)) * self.l2(z))


class ParallelHyenaFilter(nn.Module):
    """Short FIR on [x2, x1, v], then y = x2 * (h * (x1 v) + D x1 v) with a modal long filter h."""

    def __init__(self, d_model, max_len, state_size=4, short_filter_length=3):
        super().__init__()
        self.hidden_size = d_model
        self.short_filter_length = short_filter_length
        self.short_filter_weight = nn.Parameter(0.5 * torch.randn(3 * d_model, 1, short_filter_length))
        self.short_filter_bias = nn.Parameter(0.1 * torch.randn(3 * d_model))
        self.D = nn.Parameter(0.2 * torch.randn(d_model))
        # Stable complex poles |p| in (0.6, 0.97), stored as real views (d, state, 1, 2).
        magnitude = 0.6 + 0.37 * torch.rand(d_model, state_size, 1)
        angle = math.pi * torch.rand(d_model, state_size, 1)
        self.poles = nn.Parameter(torch.view_as_real(torch.polar(magnitude, angle)).contiguous())
        self.residues = nn.Parameter(0.5 * torch.randn(d_model, state_size, 1, 2))
        self.register_buffer("t", torch.arange(max_len)[None, None], persistent=False)  # 1, 1, L

    def compute_filter(self, L):
        dtype = fft_dtype(self.residues.dtype)  # view_as_complex has no bfloat16
        residues = torch.view_as_complex(self.residues.to(dtype))
        log_poles = torch.view_as_complex(self.poles.to(dtype)).log()
        t = self.t[..., :L]
        return (residues * (log_poles * t).exp()).real.sum(1)[None]  # 1, d, L

    def forward(self, u):
        L = u.shape[1]
        z_pre = F.conv1d(
            u.permute(0, 2, 1),
            self.short_filter_weight,
            bias=None,
            stride=1,
            padding=self.short_filter_length - 1,
            groups=u.shape[2],
        )[..., :L]
        z_pre = z_pre + self.short_filter_bias[None, :, None]
        x2, x1, v = z_pre.split([self.hidden_size, self.hidden_size, self.hidden_size], dim=1)
        x1v = x1 * v

        dtype = fft_dtype(x1v.dtype)
        h = self.compute_filter(L).to(dtype=dtype)
        fft_size = 2 * L
        H = torch.fft.rfft(h, n=fft_size) / fft_size
        X_s = torch.fft.fft(x1v.to(dtype), n=fft_size)
        X = X_s[..., : H.shape[-1]]
        y = torch.fft.irfft(X * H, n=fft_size, norm="forward")[..., :L].to(x1v.dtype)
        y = (y + x1v * self.D.unsqueeze(-1)) * x2
        return y.permute(0, 2, 1)


class ParallelGatedConvBlock(nn.Module):
    def __init__(self, d_model, max_len, state_size=4):
        super().__init__()
        self.pre_norm = RMSNorm(d_model)
        self.post_norm = RMSNorm(d_model)
        self.projections = nn.Linear(d_model, 3 * d_model)
        self.filter = ParallelHyenaFilter(d_model, max_len, state_size)
        self.out_filter_dense = nn.Linear(d_model, d_model)
        self.mlp = ParallelGatedMLP(d_model)

    def forward(self, u):
        z = self.projections(self.pre_norm(u))
        z = self.filter(z)
        z = self.out_filter_dense(z) + u
        return self.mlp(self.post_norm(z)) + z


def striped_hyena_lm(layers=2, d_model=32, state_size=4, max_len=MAX_LEN, vocab=64, seed=0):
    with seeded(seed):
        blocks = [ParallelGatedConvBlock(d_model, max_len, state_size) for _ in range(layers)]
        return LM(vocab, d_model, blocks, max_len, norm_cls=RMSNorm).eval()


def build():
    return striped_hyena_lm(), token_inputs(64, 64)
