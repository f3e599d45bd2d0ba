"""S4D in convolution mode (Gu et al. 2022), after state-spaces/s4 and safari's ssm/s4d.py.

Spellings exercised: diagonal SSM kernel K = 2 Re(C (exp(dt A) - 1)/A . exp(dt A arange(max_len)))
with complex C stored as a real view, over positions arange(max_len) held in a buffer and sliced
[:L] (the public code calls torch.arange(L)); multi-channel filter applied with einsum 'bhl,chl->bchl' between
rfft(u, n=2L) and rfft(K, n=2L); default-norm irfft; D skip via einsum 'bhl,ch->bchl'; the output
transform is a kernel-size-1 nn.Conv1d (S4's transposed LinearActivation: pointwise, not a conv
over time).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models.common import Block, LM, MAX_LEN, fft_dtype, seeded, token_inputs


class S4DKernel(nn.Module):
    """Diagonal SSM kernel (S4D-Lin init) of shape [channels, H, L]."""

    def __init__(self, H, N=16, channels=1, l_max=256, dt_min=0.001, dt_max=0.1):
        super().__init__()
        self.register_buffer("pos", torch.arange(l_max).float(), persistent=False)
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        C = torch.randn(channels, H, N // 2, dtype=torch.cfloat)
        self.C = nn.Parameter(torch.view_as_real(C))
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(H, N // 2)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(N // 2).float().repeat(H, 1))

    def forward(self, L):
        dtype = fft_dtype(self.log_dt.dtype)  # complex math: there is no complex bfloat16
        dt = torch.exp(self.log_dt.to(dtype))  # (H)
        C = torch.view_as_complex(self.C.to(dtype))  # (C H N)
        A = -torch.exp(self.log_A_real.to(dtype)) + 1j * self.A_imag.to(dtype)  # (H N)
        dtA = A * dt.unsqueeze(-1)  # (H N)
        K = dtA.unsqueeze(-1) * self.pos[:L]  # (H N L)
        C = C * (torch.exp(dtA) - 1.0) / A
        K = 2 * torch.einsum("chn,hnl->chl", C, torch.exp(K)).real
        return K


class S4D(nn.Module):
    def __init__(self, d_model, d_state=16, channels=2, l_max=256):
        super().__init__()
        self.h = d_model
        self.channels = channels
        self.D = nn.Parameter(torch.randn(channels, d_model))
        self.kernel = S4DKernel(d_model, N=d_state, channels=channels, l_max=l_max)
        self.output_linear = nn.Conv1d(channels * d_model, d_model, kernel_size=1)

    def forward(self, u):
        u = u.transpose(-1, -2)  # (B L H) -> (B H L)
        L = u.size(-1)
        k = self.kernel(L=L)  # (C H L)

        dtype = fft_dtype(u.dtype)
        k_f = torch.fft.rfft(k.to(dtype), n=2 * L)
        u_f = torch.fft.rfft(u.to(dtype), n=2 * L)
        y_f = torch.einsum("bhl,chl->bchl", u_f, k_f)
        y = torch.fft.irfft(y_f, n=2 * L)[..., :L].to(u.dtype)  # (B C H L)

        y = y + torch.einsum("bhl,ch->bchl", u, self.D)
        y = y.reshape(y.shape[0], -1, L)  # ... c h l -> ... (c h) l
        y = self.output_linear(F.gelu(y))
        return y.transpose(-1, -2)


def build():
    d_model, max_len, vocab = 32, MAX_LEN, 64
    with seeded(0):
        blocks = [Block(d_model, S4D(d_model, l_max=max_len)) for _ in range(2)]
        model = LM(vocab, d_model, blocks, max_len)
    return model.eval(), token_inputs(vocab, 64)
