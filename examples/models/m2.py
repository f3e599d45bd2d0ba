"""Monarch Mixer causal sequence mixer (Fu et al. 2023), after HazyResearch/m2 bert/src/mm/.

MonarchMixerSequenceMixing with residual_long_conv=True and bidirectional=False: short conv ->
gate v*x1 -> long conv (Hyena filter) -> gate x2, plus a second long conv on the un-projected
input u (filter_fn2), summed. Spellings exercised: M2's fftconv_ref with the skip term D already
shaped [1, d, 1] (u * D, no unsqueeze), the filter transposed 'c l d -> c d l' before use, Sin
activations with w=10, and a block-diagonal (Monarch) GLU MLP via einsum.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models.common import Block, LM, MAX_LEN, fft_dtype, seeded, token_inputs
from examples.models.hyena import HyenaFilter


def fftconv_ref(u_variable, k, D_variable):
    seqlen = u_variable.shape[-1]
    fft_size = 2 * seqlen
    dtype = fft_dtype(u_variable.dtype)
    k_f = torch.fft.rfft(k.to(dtype), n=fft_size) / fft_size
    u_f = torch.fft.rfft(u_variable.to(dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    out = y + u_variable * D_variable
    return out.to(dtype=u_variable.dtype)


class MonarchMixerSequenceMixing(nn.Module):
    def __init__(self, d_model, l_max=256, hyena_filter_order=16, hyena_w=10):
        super().__init__()
        self.d_model = d_model
        self.l_max = l_max
        self.filter_fn = HyenaFilter(d_model, order=hyena_filter_order, seq_len=l_max, w=hyena_w)
        self.filter_fn2 = HyenaFilter(d_model, order=hyena_filter_order, seq_len=l_max, w=hyena_w)
        self.in_linear = nn.Linear(d_model, 3 * d_model)
        self.out_linear = nn.Linear(d_model, d_model)
        total_width = 3 * d_model
        self.short_filter = nn.Conv1d(total_width, total_width, kernel_size=3, groups=total_width, padding=2)

    def forward(self, u):
        L = u.size(-2)
        u_orig = u
        u = self.in_linear(u).transpose(1, 2)  # b l d -> b d l
        uc = self.short_filter(u)[..., :L]
        x1, x2, v = uc.split(self.d_model, dim=1)
        v = v * x1

        k = self.filter_fn.filter(L).transpose(1, 2)[0]  # c l d -> c d l, c = 1
        y = fftconv_ref(v, k, self.filter_fn.bias[None, :, None])

        k2 = self.filter_fn2.filter(L).transpose(1, 2)[0]
        yu = fftconv_ref(u_orig.transpose(-1, -2), k2, self.filter_fn2.bias[None, :, None])

        y = y * x2 + yu
        return self.out_linear(y.transpose(-1, -2))


class BlockdiagLinear(nn.Module):
    """Monarch block-diagonal linear layer: nblocks independent dense blocks over channel groups."""

    def __init__(self, in_features, out_features, nblocks=4):
        super().__init__()
        self.nblocks = nblocks
        self.weight = nn.Parameter(torch.randn(nblocks, out_features // nblocks, in_features // nblocks)
                                   / (in_features // nblocks) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        x = x.unflatten(-1, (self.nblocks, -1))
        y = torch.einsum("...ki,koi->...ko", x, self.weight)
        return y.flatten(-2) + self.bias


class M2GLUMlp(nn.Module):
    def __init__(self, d_model, hidden=64):
        super().__init__()
        self.gated_layers = BlockdiagLinear(d_model, 2 * hidden)
        self.wo = BlockdiagLinear(hidden, d_model)

    def forward(self, x):
        gated, non_gated = self.gated_layers(x).chunk(2, dim=-1)
        return self.wo(F.gelu(gated) * non_gated)


def build():
    d_model, max_len, vocab = 32, MAX_LEN, 64
    with seeded(0):
        blocks = [Block(d_model, MonarchMixerSequenceMixing(d_model, max_len), M2GLUMlp(d_model)) for _ in range(2)]
        model = LM(vocab, d_model, blocks, max_len)
    return model.eval(), token_inputs(vocab, 64)
