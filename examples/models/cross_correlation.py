"""A gated long convolution written as a cross-correlation, as signal-processing code often does:
the modal kernel stored time-reversed (powers over arange(L-1, ..., 0)), the filter's spectrum
conjugated, an FFT size planned in Python (next_fast_len(2L - 1), not a power of two), the result
rolled by -1 and the last L positions taken with index_select. Its net filter h[j] = sum_m B_m
lam_m^j is causal and independent of L; the FFT size makes export specialise L, so it is also
captured at concrete lengths."""

import torch
import torch.nn as nn

from examples.models.common import LM, MAX_LEN, Block, fft_dtype, seeded, token_inputs
from examples.models.length_in_python import next_fast_len

D_MODEL, VOCAB, MODES = 32, 64, 8


class CrossCorrelationMixer(nn.Module):
    def __init__(self, d_model, modes=MODES):
        super().__init__()
        self.in_proj = nn.Linear(d_model, 2 * d_model)
        self.log_decay = nn.Parameter(torch.log(torch.linspace(0.02, 0.3, modes)).repeat(d_model, 1))
        self.B = nn.Parameter(torch.randn(d_model, modes) / modes ** 0.5)
        self.D = nn.Parameter(torch.randn(d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        L = x.shape[1]
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        f = fft_dtype(x.dtype)
        u = u.transpose(1, 2).to(f)
        powers = torch.arange(L - 1, -1, -1, dtype=f)
        lam = torch.exp(-self.log_decay.exp().to(f))
        k_rev = (self.B.to(f)[..., None] * lam[..., None] ** powers).sum(1)  # k_rev[j] = h[L-1-j]
        n = next_fast_len(2 * L - 1)
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k_rev, n=n).conj(), n=n)
        y = torch.roll(y, -1, dims=-1).index_select(-1, torch.arange(n - L, n))
        y = (y + u * self.D.to(f)[:, None]).transpose(1, 2).to(x.dtype)
        return self.out_proj(y * torch.sigmoid(gate))


def build():
    with seeded(0):
        blocks = [Block(D_MODEL, CrossCorrelationMixer(D_MODEL)) for _ in range(2)]
        model = LM(VOCAB, D_MODEL, blocks, MAX_LEN)
    return model.eval(), token_inputs(VOCAB, 64)
