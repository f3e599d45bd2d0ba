"""Attention layers as public code writes them, in a Hyena hybrid: each must decode on a KV cache.

- "gpt2": Hugging Face GPT-2's eager attention: Conv1D (addmm) projections, heads by view+permute,
  scores / torch.full([], sqrt(d)), torch.where(bias[:, :, k-q:k, :k], scores, finfo.min) with a
  bool tril buffer, softmax, .type(value.dtype), dropout (eval), matmul;
- "llama_gqa_sdpa": Llama's attention: rotary codes from position_ids = arange(L)[None] (inv_freq
  @ positions, cat(freqs, freqs), rotate_half), grouped-query heads by repeat_kv (expand +
  reshape), F.scaled_dot_product_attention(is_causal=True);
- "llama_gqa_eager": the same with the eager path: an additive finfo.min triu mask [None, None],
  softmax in float32;
- "mqa_broadcast": multi-query attention, one k/v head broadcast over the query heads by matmul.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models.common import LM, Block, seeded, token_inputs
from examples.models.hyena import HyenaOperator

D_MODEL, MAX_LEN, VOCAB, LENGTH = 32, 256, 64, 64


class Conv1D(nn.Module):  # HF GPT-2 pytorch_utils.Conv1D
    def __init__(self, nf, nx):
        super().__init__(); self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf)); self.bias = nn.Parameter(torch.zeros(nf)); nn.init.normal_(self.weight, std=0.02)
    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)

class GPT2Attention(nn.Module):
    def __init__(self, d, heads, max_pos):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones((max_pos, max_pos), dtype=torch.bool)).view(1, 1, max_pos, max_pos), persistent=False)
        self.num_heads, self.head_dim, self.split_size = heads, d // heads, d
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.attn_dropout = nn.Dropout(0.1)
    def _split_heads(self, t):
        return t.view(t.size()[:-1] + (self.num_heads, self.head_dim)).permute(0, 2, 1, 3)
    def _attn(self, query, key, value):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=attn_weights.dtype, device=attn_weights.device)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]
        mask_value = torch.finfo(attn_weights.dtype).min
        mask_value = torch.full([], mask_value, dtype=attn_weights.dtype, device=attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value)
    def forward(self, x):
        q, k, v = self.c_attn(x).split(self.split_size, dim=2)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        a = self._attn(q, k, v)
        a = a.permute(0, 2, 1, 3).contiguous()
        a = a.view(a.size()[:-2] + (self.num_heads * self.head_dim,))
        return self.c_proj(a)

def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]; x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)

def repeat_kv(h, n_rep):
    b, nkv, slen, hd = h.shape
    if n_rep == 1: return h
    h = h[:, :, None, :, :].expand(b, nkv, n_rep, slen, hd)
    return h.reshape(b, nkv * n_rep, slen, hd)

class LlamaAttention(nn.Module):
    def __init__(self, d, heads, kv_heads, sdpa=True):
        super().__init__()
        self.h, self.kv, self.hd, self.sdpa = heads, kv_heads, d // heads, sdpa
        self.q_proj = nn.Linear(d, heads * self.hd, bias=False); self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False); self.o_proj = nn.Linear(d, d, bias=False)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd)), persistent=False)
    def forward(self, x):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, -1, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, L, -1, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, L, -1, self.hd).transpose(1, 2)
        position_ids = torch.arange(L, device=x.device)[None]
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (rotate_half(q) * sin); k = (k * cos) + (rotate_half(k) * sin)
        k, v = repeat_kv(k, self.h // self.kv), repeat_kv(v, self.h // self.kv)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.hd)
            causal = torch.full((L, L), torch.finfo(w.dtype).min, dtype=w.dtype, device=x.device).triu(1)
            w = w + causal[None, None]
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            o = torch.matmul(w, v)
        o = o.transpose(1, 2).contiguous().reshape(B, L, -1)
        return self.o_proj(o)

class MQA(nn.Module):  # one k/v head broadcast over query heads by matmul
    def __init__(self, d, heads):
        super().__init__(); self.h, self.hd = heads, d // heads
        self.q = nn.Linear(d, d); self.kv = nn.Linear(d, 2 * self.hd); self.o = nn.Linear(d, d)
    def forward(self, x):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.h, self.hd).transpose(1, 2)
        k, v = self.kv(x).unsqueeze(1).chunk(2, dim=-1)  # [B, 1, L, hd]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        att = att.masked_fill(torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1))

SPELLINGS = {"gpt2": lambda d, m: GPT2Attention(d, 4, m), "llama_gqa_sdpa": lambda d, m: LlamaAttention(d, 4, 2, True),
             "llama_gqa_eager": lambda d, m: LlamaAttention(d, 4, 2, False), "mqa_broadcast": lambda d, m: MQA(d, 4)}


def build(spelling="gpt2", seed=0):
    """(Hyena layer, attention layer) LM with the attention in `spelling`."""
    with seeded(seed):
        blocks = [Block(D_MODEL, HyenaOperator(D_MODEL, MAX_LEN, order=2)), Block(D_MODEL, SPELLINGS[spelling](D_MODEL, MAX_LEN))]
        model = LM(VOCAB, D_MODEL, blocks, MAX_LEN).eval()
    return model, token_inputs(VOCAB, LENGTH)
