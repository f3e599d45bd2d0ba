"""Hyena with RWKV's token shift (Peng et al. 2023, BlinkDL/RWKV-LM): each block lerps its input with
the input one position earlier before the time mixer and the channel mixer.

Spellings exercised: the token shift as F.pad(x, (0, 0, 1, -1)) (pads one zero row in front of the
time axis and drops the last: a causal delay by one position, decoded as a short convolution); the
channel mix with a leaky ReLU written as torch.where(k > 0, k, a * k) (gt + where) and RWKV's
sigmoid(r) * v gate written as F.glu over channels; a Hyena operator as the time mixer.
Look-alike: the shift spelled F.pad(x, (0, 0, -1, 1)), which reads the NEXT position.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models.common import LM, MAX_LEN, seeded, token_inputs
from examples.models.hyena import HyenaOperator

D_MODEL, VOCAB, LENGTH = 32, 64, 64


class TokenShiftBlock(nn.Module):
    def __init__(self, d_model, l_max, shift=(0, 0, 1, -1), negative_slope=0.05):
        super().__init__()
        self.shift = shift
        self.negative_slope = negative_slope
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.time_mix = nn.Parameter(torch.rand(1, 1, d_model))
        self.time_mix_k = nn.Parameter(torch.rand(1, 1, d_model))
        self.mixer = HyenaOperator(d_model, l_max, order=2)
        self.key = nn.Linear(d_model, 2 * d_model, bias=False)
        self.value = nn.Linear(2 * d_model, d_model, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)

    def token_shift(self, x, mix):
        xx = F.pad(x, self.shift)  # x[t - 1], zero at t = 0
        return x * mix + xx * (1 - mix)

    def forward(self, x):
        x = x + self.mixer(self.token_shift(self.ln1(x), self.time_mix))
        xk = self.token_shift(self.ln2(x), self.time_mix_k)
        k = self.key(xk)
        k = torch.where(k > 0, k, self.negative_slope * k)
        gated = F.glu(torch.cat([self.value(k), self.receptance(xk)], dim=-1), dim=-1)  # v * sigmoid(r)
        return x + gated


def _lm(**block_args):
    with seeded(0):
        model = LM(VOCAB, D_MODEL, [TokenShiftBlock(D_MODEL, MAX_LEN, **block_args)], MAX_LEN)
    return model.eval(), token_inputs(VOCAB, LENGTH)


def build():
    return _lm()


def build_future_shift():
    return _lm(shift=(0, 0, -1, 1))
