"""Hyena blocks written the way public code reads the length in Python (issue 19's third-party set).

- build_table_at_max_len: a learned position table [max_len, d] sliced `self.pos[:L]`, and the
  example as long as max_len, the most natural example to pass. The slice's clamp meets the
  table's size exactly at that length, so export specializes it; the capture takes the example one
  position shorter.
- build_min_cut_heads: the positions cut to `min(L, l_max)` (a filter's reach, as public code guards
  it), then heads split and merged on that Min-sized axis ([B, Min(l_max, L), D] -> [B, Min(l_max, L),
  H, D/H]): a channel split, which Min(l_max, L) = L over the served lengths makes plain.
"""

import torch
import torch.nn as nn

from examples.models.common import Block, LM, MAX_LEN, seeded, token_inputs
from examples.models.hyena import HyenaOperator

D_MODEL, VOCAB, HEADS = 32, 64, 4


class TablePE(nn.Module):
    def __init__(self, d_model, max_len):
        super().__init__()
        self.pos = nn.Parameter(0.1 * torch.randn(max_len, d_model))

    def forward(self, x):
        return x + self.pos[: x.shape[1]]


class MinCutHeads(nn.Module):
    """Per-head gate on positions cut to min(L, l_max)."""

    def __init__(self, d_model, heads, l_max):
        super().__init__()
        self.heads, self.l_max = heads, l_max
        self.scale = nn.Parameter(1 + 0.2 * torch.randn(heads, d_model // heads))

    def forward(self, x):
        L = min(x.shape[1], self.l_max)
        x = x[:, :L]
        h = x.reshape(x.shape[0], L, self.heads, -1)
        return (h * torch.sigmoid(h * self.scale)).reshape(x.shape[0], L, -1)


def build_table_at_max_len():
    with seeded(0):
        blocks = [nn.Sequential(TablePE(D_MODEL, MAX_LEN), Block(D_MODEL, HyenaOperator(D_MODEL, MAX_LEN, order=2)))]
        model = LM(VOCAB, D_MODEL, blocks, MAX_LEN)
    return model.eval(), token_inputs(VOCAB, MAX_LEN)


def build_min_cut_heads():
    with seeded(0):
        blocks = [nn.Sequential(MinCutHeads(D_MODEL, HEADS, MAX_LEN), Block(D_MODEL, HyenaOperator(D_MODEL, MAX_LEN, order=2)))]
        model = LM(VOCAB, D_MODEL, blocks, MAX_LEN)
    return model.eval(), token_inputs(VOCAB, 64)
