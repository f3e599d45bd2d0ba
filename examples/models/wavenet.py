"""A WaveNet-style stack of dilated causal convolutions (van den Oord et al. 2016; the dilated
residual stacks of public audio and DNA models), depthwise: kernel 4, dilations 1, 4, 16, 64 (every
lag up to 255 reached), each layer's gate tanh(f) * sigmoid(g) over its dilated conv, a 1x1
residual and skip projection; the head reads the skips and the last residual.

Spellings exercised: nn.Conv1d(dilation=d, padding=3d) then [..., :L] (the convolution's lags reach
3d, though its kernel has 4 taps: the analysis reads that from the op, never from an impulse
response sampled at a short length); reaches 4 and 13 decode on ring buffers, 49 and 193 as long
convolutions.
"""

import torch
import torch.nn as nn

from examples.models.common import MAX_LEN, seeded, token_inputs

D_MODEL, VOCAB, LENGTH = 16, 64, 64
DILATIONS = (1, 4, 16, 64)


class DilatedGate(nn.Module):
    def __init__(self, channels, dilation, kernel_size=4):
        super().__init__()
        reach = dilation * (kernel_size - 1)
        self.filt = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, padding=reach, groups=channels)
        self.gate = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, padding=reach, groups=channels)
        self.res = nn.Conv1d(channels, channels, 1)
        self.skip = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        L = x.shape[-1]
        h = torch.tanh(self.filt(x)[..., :L]) * torch.sigmoid(self.gate(x)[..., :L])
        return x + self.res(h), self.skip(h)


class WaveNetLM(nn.Module):
    def __init__(self, vocab, channels, dilations, max_len):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab, channels)
        self.layers = nn.ModuleList(DilatedGate(channels, d) for d in dilations)
        self.head = nn.Linear(channels, vocab)

    def forward(self, ids):
        x = self.embedding(ids).transpose(1, 2)  # [B, C, L]
        out = 0
        for layer in self.layers:
            x, s = layer(x)
            out = out + s
        return self.head(torch.relu(out + x).transpose(1, 2))


def build():
    with seeded(0):
        model = WaveNetLM(VOCAB, D_MODEL, DILATIONS, MAX_LEN)
    return model.eval(), token_inputs(VOCAB, LENGTH)
