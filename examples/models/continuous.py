"""Continuous-input Hyena regressor (audio / time-series style, as in safari's non-LM tasks).

float features [B, L, D_in] -> Linear encoder -> Hyena block (order 2) -> norm -> Linear decoder
-> predictions [B, L, D_out]. Spelling exercised: no embedding lookup; the model input itself is
the float activation the decoder feeds back.
"""

import torch.nn as nn

from examples.models.common import Block, MAX_LEN, float_inputs, seeded
from examples.models.hyena import HyenaOperator


class HyenaRegressor(nn.Module):
    def __init__(self, d_input=8, d_model=32, d_output=4, max_len=256):
        super().__init__()
        self.max_len = max_len
        self.encoder = nn.Linear(d_input, d_model)
        self.blocks = nn.ModuleList([Block(d_model, HyenaOperator(d_model, max_len, order=2))])
        self.norm = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, d_output)

    def forward(self, x):
        x = self.encoder(x)
        for block in self.blocks:
            x = block(x)
        return self.decoder(self.norm(x))


def build():
    with seeded(0):
        model = HyenaRegressor(max_len=MAX_LEN)
    return model.eval(), float_inputs(8, 64)
