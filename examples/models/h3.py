"""H3 (Fu et al. 2023), after HazyResearch/safari src/models/sequence/h3.py.

Spellings exercised: projections written as weight @ u.T over a flattened (b l) axis, then
reshaped back; the shift-SSM kernel built from parameters by an FFT cross-correlation of B and C
(rfft(B, n=2N).conj() * rfft(C, n=2N): a filter-construction FFT, not a convolution of
activations), zero-padded to L; both convolutions with fft_size = L_kernel + L:
shift SSM on K with the default norm, diagonal SSM on K*V with the 1/n on the input spectrum and
norm="forward"; gating with Q.

Counting: the shift SSM is a length-N (N=4) filter zero-padded to L and applied by FFT, so we count
it as a LONG convolution; each layer has 2 long, 0 short.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models.common import Block, LM, MAX_LEN, fft_dtype, seeded, token_inputs
from examples.models.s4d import S4DKernel


class ShiftKernel(nn.Module):
    """Shift-SSM kernel: k = C correlated with B over N lags, zero-padded to shape [H, L]."""

    def __init__(self, H, N=4):
        super().__init__()
        self.N = N
        B = torch.zeros(H, N)
        B[:, 0] = 1.0
        self.B = nn.Parameter(B)
        self.C = nn.Parameter(torch.randn(1, H, N))

    def forward(self, L):
        dtype = fft_dtype(self.B.dtype)
        B_f = torch.fft.rfft(self.B.to(dtype), n=2 * self.N)
        C_f = torch.fft.rfft(self.C.to(dtype), n=2 * self.N)
        k = torch.fft.irfft(B_f.conj() * C_f, n=2 * self.N)[..., : self.N]
        k = F.pad(k, (0, L - self.N))  # zero taps beyond N (crops when L < N)
        return k[0]  # 1 h l -> h l


class H3(nn.Module):
    def __init__(self, d_model, d_state=16, l_max=256):
        super().__init__()
        self.d_model = d_model
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.ssm_k_kernel = ShiftKernel(d_model, N=4)
        self.ssm_k_D = nn.Parameter(torch.randn(d_model))
        self.kernel = S4DKernel(d_model, N=d_state, channels=1, l_max=l_max)
        self.D = nn.Parameter(torch.randn(d_model))
        self.output_linear = nn.Linear(d_model, d_model)

    def forward(self, u):
        B, L = u.shape[0], u.size(-2)
        ssm_kernel = self.kernel(L=L)[0]  # 1 h l -> h l

        u = u.reshape(-1, u.shape[-1])  # b l h -> (b l) h
        q = self.q_proj.weight @ u.T + self.q_proj.bias.unsqueeze(-1)
        k = self.k_proj.weight @ u.T + self.k_proj.bias.unsqueeze(-1)
        v = self.v_proj.weight @ u.T + self.v_proj.bias.unsqueeze(-1)
        q, k, v = [x.reshape(self.d_model, B, L).transpose(0, 1) for x in (q, k, v)]  # h (b l) -> b h l

        dtype = fft_dtype(u.dtype)
        ssm_k_kernel = self.ssm_k_kernel(L)
        fft_size = ssm_k_kernel.shape[-1] + L
        ssm_k_kernel_f = torch.fft.rfft(ssm_k_kernel.to(dtype), n=fft_size)
        k_f = torch.fft.rfft(k.to(dtype), n=fft_size)
        shift_k_out = torch.fft.irfft(ssm_k_kernel_f * k_f, n=fft_size)[..., :L].to(k.dtype)
        k = shift_k_out + self.ssm_k_D.unsqueeze(-1) * k

        fft_size = ssm_kernel.shape[-1] + L
        kv = k * v
        kv_f = torch.fft.rfft(kv.to(dtype), n=fft_size) / fft_size
        ssm_kernel_f = torch.fft.rfft(ssm_kernel.to(dtype), n=fft_size)
        y = torch.fft.irfft(kv_f * ssm_kernel_f, n=fft_size, norm="forward")[..., :L].to(kv.dtype)
        y = y + kv * self.D.unsqueeze(-1)
        y = y * q

        return self.output_linear(y.transpose(1, 2))  # b h l -> b l h


def build():
    d_model, max_len, vocab = 32, MAX_LEN, 64
    with seeded(0):
        blocks = [Block(d_model, H3(d_model, l_max=max_len)) for _ in range(2)]
        model = LM(vocab, d_model, blocks, max_len)
    return model.eval(), token_inputs(vocab, 64)
