"""Multi-head long convolution with a single shared value head (the multi-query idea applied to the
per-head outer-product mixers of MAD / "Laughing Hyena" / safari's multi-head H3).

Per head h: y_h = q_h * (f_h * (k_h v) + D_h k_h v), with one implicit filter f_h per head broadcast
over the head's channels, then an output projection.

Spellings exercised: heads split with B and L taken from x.shape (x.view(B, L, H, Dh).transpose(1, 2));
one value head repeated along channels to every head (v.repeat(1, 1, H)); q and k normalised per head
with F.normalize(dim=-1) (qk-norm) and a learned gain; a channels-last FFT convolution along dim=2 of
[B, H, L, Dh]; the output projection written as torch.tensordot over the channel axis.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models.common import LM, MAX_LEN, Block, fft_dtype, seeded, token_inputs
from examples.models.hyena import HyenaFilter

D_MODEL, VOCAB, LENGTH = 32, 64, 64


class MultiQueryLongConv(nn.Module):
    def __init__(self, d_model, l_max, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, self.head_dim)  # one value head, shared
        self.qk_gain = nn.Parameter(self.head_dim ** 0.5 * torch.ones(2, num_heads, 1, 1))
        self.filter_fn = HyenaFilter(num_heads, seq_len=l_max)  # its bias is the per-head skip D
        self.out_weight = nn.Parameter(torch.randn(d_model, d_model) / d_model ** 0.5)

    def forward(self, x):
        B, L, D = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # B H L Dh
        k = self.k_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).repeat(1, 1, self.num_heads).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        q = F.normalize(q, dim=-1) * self.qk_gain[0]
        k = F.normalize(k, dim=-1) * self.qk_gain[1]

        kv = k * v
        h = self.filter_fn.filter(L)[0].transpose(0, 1)  # H L
        fft_size = 2 * L
        dtype = fft_dtype(kv.dtype)
        kv_f = torch.fft.rfft(kv.to(dtype), n=fft_size, dim=2)
        h_f = torch.fft.rfft(h.to(dtype), n=fft_size, dim=-1)[None, :, :, None] / fft_size  # 1 H F 1
        y = torch.fft.irfft(kv_f * h_f, n=fft_size, dim=2, norm="forward")[:, :, :L].to(kv.dtype)
        y = y + kv * self.filter_fn.bias[None, :, None, None]

        y = (q * y).transpose(1, 2).reshape(B, L, D)
        return torch.tensordot(y, self.out_weight, dims=([2], [0]))


def build():
    with seeded(0):
        blocks = [Block(D_MODEL, MultiQueryLongConv(D_MODEL, MAX_LEN)) for _ in range(2)]
        model = LM(VOCAB, D_MODEL, blocks, MAX_LEN)
    return model.eval(), token_inputs(VOCAB, LENGTH)
