"""A sequence-to-sequence S4D model in the style of the standalone state-spaces/s4 code (models/s4/s4d.py
and example.py): float features in, float features out.

Spellings exercised: the activations stay channels-first [B, H, L] between layers, with the prenorm
LayerNorm applied through transposes; the S4D kernel is the Vandermonde product over torch.arange(L)
built in forward (prefix-stable: position l of the kernel never depends on L); rfft / irfft with the
default norm; the output transform is a kernel-1 Conv1d to 2H channels followed by nn.GLU(dim=-2), a
GLU over the channel axis of a channels-first tensor; dropout (eval: identity) in between.
"""

import math

import torch
import torch.nn as nn
from einops import repeat

from examples.models.common import MAX_LEN, fft_dtype, float_inputs, seeded


class S4DKernel(nn.Module):
    """Diagonal SSM kernel K[h, l] = 2 Re(sum_n C_n (exp(dt A_n) - 1) / A_n exp(dt A_n l)) (S4D-Lin)."""

    def __init__(self, d_model, N=32, dt_min=0.001, dt_max=0.1):
        super().__init__()
        H = d_model
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(H, N // 2, dtype=torch.cfloat)))
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(H, N // 2)))
        self.A_imag = nn.Parameter(math.pi * repeat(torch.arange(N // 2).float(), "n -> h n", h=H))

    def forward(self, L):
        dtype = fft_dtype(self.log_dt.dtype)  # complex math: there is no complex bfloat16
        dt = torch.exp(self.log_dt.to(dtype))  # (H)
        C = torch.view_as_complex(self.C.to(dtype))  # (H N)
        A = -torch.exp(self.log_A_real.to(dtype)) + 1j * self.A_imag.to(dtype)  # (H N)
        dtA = A * dt.unsqueeze(-1)
        K = dtA.unsqueeze(-1) * torch.arange(L, device=A.device)  # (H N L)
        C = C * (torch.exp(dtA) - 1.0) / A
        return 2 * torch.einsum("hn,hnl->hl", C, torch.exp(K)).real


class S4D(nn.Module):
    """y = GLU(Conv1d_1(dropout(GELU(K * u + D u)))) on channels-first u [B, H, L]."""

    def __init__(self, d_model, d_state=32, dropout=0.1):
        super().__init__()
        self.h = d_model
        self.D = nn.Parameter(torch.randn(self.h))
        self.kernel = S4DKernel(self.h, N=d_state)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Sequential(nn.Conv1d(self.h, 2 * self.h, kernel_size=1), nn.GLU(dim=-2))

    def forward(self, u):
        L = u.size(-1)
        k = self.kernel(L=L)  # (H L)
        dtype = fft_dtype(u.dtype)
        k_f = torch.fft.rfft(k.to(dtype), n=2 * L)
        u_f = torch.fft.rfft(u.to(dtype), n=2 * L)
        y = torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L].to(u.dtype)
        y = y + u * self.D.unsqueeze(-1)
        y = self.dropout(self.activation(y))
        return self.output_linear(y)


class S4Model(nn.Module):
    def __init__(self, d_input=3, d_output=4, d_model=32, n_layers=2, dropout=0.1, max_len=MAX_LEN):
        super().__init__()
        self.max_len = max_len
        self.encoder = nn.Linear(d_input, d_model)
        self.s4_layers = nn.ModuleList([S4D(d_model, dropout=dropout) for _ in range(n_layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(d_model) for _ in range(n_layers)])
        self.dropouts = nn.ModuleList([nn.Dropout(dropout) for _ in range(n_layers)])
        self.decoder = nn.Linear(d_model, d_output)

    def forward(self, x):
        """x: (B, L, d_input) -> (B, L, d_output)"""
        x = self.encoder(x)  # (B, L, d_model)
        x = x.transpose(-1, -2)  # (B, d_model, L)
        for layer, norm, dropout in zip(self.s4_layers, self.norms, self.dropouts):
            z = norm(x.transpose(-1, -2)).transpose(-1, -2)  # prenorm
            x = dropout(layer(z)) + x
        return self.decoder(x.transpose(-1, -2))


def build():
    with seeded(0):
        model = S4Model()
    return model.eval(), float_inputs(3, 64)
