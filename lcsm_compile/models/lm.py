"""A pre-norm LM shell (safari's Block/LM): embedding -> residual blocks -> norm -> head."""

import torch.nn as nn


class Mlp(nn.Module):
    def __init__(self, d_model, hidden=None):
        super().__init__()
        hidden = hidden or 2 * d_model
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) (safari's Block)."""

    def __init__(self, d_model, mixer, mlp=None, norm_cls=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_cls(d_model)
        self.mixer = mixer
        self.norm2 = norm_cls(d_model)
        self.mlp = mlp if mlp is not None else Mlp(d_model)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LM(nn.Module):
    """Token embedding -> blocks -> final norm -> LM head: ids [B, L] -> logits [B, L, V]."""

    def __init__(self, vocab, d_model, blocks, max_len, norm_cls=nn.LayerNorm):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = norm_cls(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embedding(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))
