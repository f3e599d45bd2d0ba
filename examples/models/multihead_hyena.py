"""Multi-head Hyena with per-head outer products (Massaroli et al. 2023, "Laughing Hyena"; the MAD /
zoology multi-head mixers; safari's H3 head_dim > 1 path).

Per head: kv = k (x) v over head dims ([B, H, dk, dv, L]), long-convolved along L with one implicit
Hyena filter per head (shared over dk, dv), plus the D skip, then contracted with q over dk:
y = einsum('bhkvl,bhkl->bhvl'). Spellings exercised: einsum outer product, 5-d FFT convolution with
the filter broadcast over head dims, unflatten/flatten between heads and channels.
"""

import torch
import torch.nn as nn

from examples.models.common import Block, LM, MAX_LEN, fft_dtype, seeded, token_inputs
from examples.models.hyena import HyenaFilter


class MultiHeadHyenaOperator(nn.Module):
    def __init__(self, d_model, l_max, num_heads=4, filter_order=16):
        super().__init__()
        self.d_model = d_model
        self.num_heads = num_heads
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        total_width = 3 * d_model
        self.short_filter = nn.Conv1d(total_width, total_width, kernel_size=3, groups=total_width, padding=2)
        self.filter_fn = HyenaFilter(num_heads, order=filter_order, seq_len=l_max)

    def forward(self, u):
        L = u.size(-2)
        u = self.in_proj(u).transpose(1, 2)
        uc = self.short_filter(u)[..., :L]
        q, k, v = [x.unflatten(1, (self.num_heads, -1)) for x in uc.split(self.d_model, dim=1)]  # b h d l

        kv = torch.einsum("bhkl,bhvl->bhkvl", k, v)
        h = self.filter_fn.filter(L)[0].transpose(0, 1)  # l h -> h l
        fft_size = 2 * L
        dtype = fft_dtype(kv.dtype)
        kv_f = torch.fft.rfft(kv.to(dtype), n=fft_size) / fft_size
        h_f = torch.fft.rfft(h.to(dtype), n=fft_size)
        y = torch.fft.irfft(kv_f * h_f[None, :, None, None, :], n=fft_size, norm="forward")[..., :L].to(kv.dtype)
        y = y + kv * self.filter_fn.bias[None, :, None, None, None]

        y = torch.einsum("bhkvl,bhkl->bhvl", y, q)
        return self.out_proj(y.flatten(1, 2).transpose(1, 2))


def build():
    d_model, max_len, vocab = 32, MAX_LEN, 64
    with seeded(0):
        blocks = [Block(d_model, MultiHeadHyenaOperator(d_model, max_len)) for _ in range(2)]
        model = LM(vocab, d_model, blocks, max_len)
    return model.eval(), token_inputs(vocab, 64)
