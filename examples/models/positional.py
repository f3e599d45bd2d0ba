"""Hyena LMs with position constants computed in forward, the way tutorials and fairseq write them.

- sinusoidal: the Transformer's position code built at every call from torch.zeros(L, d) with
  strided in-place writes pe[:, 0::2] = sin, pe[:, 1::2] = cos, added to the scaled embedding;
- cached: fairseq's SinusoidalPositionalEmbedding: the table is a plain tensor attribute
  (self.weights, not a buffer), rebuilt in forward when missing or shorter than the input, and
  moved to the dtype / device of a dummy buffer at every call;
- alternating sign: a mixer wrapped as s * mixer(s * x) with s_t = (-1)^t, built in forward as
  torch.full((1, L, 1), 1.0) with s[:, 1::2] *= -1. For a convolution this flips the sign of the odd
  lags of its filter (a half-band frequency shift): still a causal convolution.
All three are prefix-stable: position t of each constant never depends on L.
"""

import math

import torch
import torch.nn as nn

from examples.models.common import MAX_LEN, Block, fft_dtype, seeded, token_inputs
from examples.models.hyena import HyenaOperator

D_MODEL, VOCAB, LENGTH = 32, 64, 64


def sinusoidal_table(L, d_model, device=None, dtype=torch.float):
    pe = torch.zeros(L, d_model, device=device, dtype=dtype)
    position = torch.arange(0, L, dtype=dtype, device=device).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, device=device).to(dtype) * (-math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


class SinusoidalPositionalEmbedding(nn.Module):
    """fairseq-style: the table lives in a plain attribute and grows on demand."""

    def __init__(self, embedding_dim, init_size=16):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.weights = SinusoidalPositionalEmbedding.get_embedding(init_size, embedding_dim)
        self.register_buffer("_float_tensor", torch.zeros(1), persistent=False)

    @staticmethod
    def get_embedding(num_embeddings, embedding_dim):
        half_dim = embedding_dim // 2
        emb = math.log(10000) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, dtype=torch.float) * -emb)
        emb = torch.arange(num_embeddings, dtype=torch.float).unsqueeze(1) * emb.unsqueeze(0)
        return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)

    def forward(self, input_ids):
        bsz, seq_len = input_ids.shape[:2]
        if self.weights is None or seq_len > self.weights.size(0):
            self.weights = SinusoidalPositionalEmbedding.get_embedding(seq_len, self.embedding_dim)
        self.weights = self.weights.to(self._float_tensor)
        return self.weights[:seq_len].unsqueeze(0).expand(bsz, -1, -1)


class AlternatingSign(nn.Module):
    """s * mixer(s * x) with s_t = (-1)^t."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, x):
        L = x.shape[1]
        s = torch.full((1, L, 1), 1.0, dtype=x.dtype, device=x.device)
        s[:, 1::2] *= -1
        return s * self.mixer(s * x)


class PositionalHyenaLM(nn.Module):
    """Embedding (+ position code) -> Hyena blocks -> LayerNorm -> LM head."""

    def __init__(self, position="sinusoidal", n_layer=2, vocab=VOCAB, d_model=D_MODEL, max_len=MAX_LEN):
        super().__init__()
        self.max_len = max_len
        self.d_model = d_model
        self.position = position
        self.embedding = nn.Embedding(vocab, d_model)
        self.embed_positions = SinusoidalPositionalEmbedding(d_model) if position == "cached" else None
        mixers = [HyenaOperator(d_model, max_len, order=2) for _ in range(n_layer)]
        if position == "alternating":
            mixers[-1] = AlternatingSign(mixers[-1])
        self.blocks = nn.ModuleList([Block(d_model, m) for m in mixers])
        self.norm_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embedding(input_ids) * math.sqrt(self.d_model)
        if self.position == "sinusoidal":
            # Built in float32 (float64 for a float64 model), then cast: a bfloat16 table would round positions.
            x = x + sinusoidal_table(input_ids.shape[1], self.d_model, input_ids.device, fft_dtype(x.dtype)).to(x.dtype)
        elif self.position == "cached":
            x = x + self.embed_positions(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))


def _build(position):
    with seeded(0):
        model = PositionalHyenaLM(position)
    return model.eval(), token_inputs(VOCAB, LENGTH)


def build_sinusoidal():
    return _build("sinusoidal")


def build_cached():
    return _build("cached")


def build_alternating():
    return _build("alternating")
