"""Hybrids: Hyena convolution layers interleaved with causal attention layers (StripedHyena / Evo
style), each attention written in one of the spellings public code uses, plus look-alikes whose
attention is not causal (or not provably so) that the analysis must decline.

Causal spellings:
- "sdpa": F.scaled_dot_product_attention(q, k, v, is_causal=True);
- "sdpa_mask": the same with attn_mask = a boolean tril buffer sliced [:L, :L] (True: attend);
- "masked_fill": nanoGPT, att.masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf")), scale as a mul;
- "additive": an additive mask built in forward, torch.full((L, L), -inf).triu(1), einsum scores / sqrt(d);
- "where": torch.where(tril, scores, finfo.min) (HF's finite minimum), scores by bmm on [B*H, L, D];
- "rotary": rotary position codes computed from arange(L) in forward, then SDPA(is_causal=True);
- "finite_additive": GPT-2's finite mask, scores + triu(ones) * -10000 (exp underflows to exactly 0).
Look-alikes (declined):
- "no_mask": softmax(q k^T / sqrt(d)) v with no mask;          NON_CAUSAL_MASK
- "full_mask": SDPA with an all-True attn_mask;                   NON_CAUSAL_MASK
- "wrong_triu": masked_fill(triu(ones) == 0, -inf): the past blocked, the future kept; NON_CAUSAL_MASK
- "sdpa_not_causal": SDPA with is_causal=False and no mask;         NON_CAUSAL_MASK
- "input_mask": a padding mask from the input ids combined with the triangle; MASK_FROM_INPUT
- "sliding_window": a causal band of WINDOW keys;                 SLIDING_WINDOW
- "leaky_fill": masked_fill with -10 (exp(-10) leaks weight to the future);  NON_CAUSAL_MASK
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models.common import LM, Block, seeded, token_inputs
from examples.models.hyena import HyenaOperator

D_MODEL, HEADS, MAX_LEN, VOCAB, LENGTH, WINDOW = 32, 4, 256, 64, 64, 8
CAUSAL = ("sdpa", "sdpa_mask", "masked_fill", "additive", "where", "rotary", "finite_additive")
DECLINED = {"no_mask": "NON_CAUSAL_MASK", "full_mask": "NON_CAUSAL_MASK", "wrong_triu": "NON_CAUSAL_MASK",
            "sdpa_not_causal": "NON_CAUSAL_MASK", "input_mask": "MASK_FROM_INPUT", "sliding_window": "SLIDING_WINDOW",
            "leaky_fill": "NON_CAUSAL_MASK"}


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalAttention(nn.Module):
    """Multi-head self-attention, `spelling` selects how the causal mask (or its absence) is written."""

    def __init__(self, d_model, heads, max_len, spelling="sdpa"):
        super().__init__()
        if spelling not in CAUSAL and spelling not in DECLINED:
            raise ValueError(f"spelling: expected one of {CAUSAL + tuple(DECLINED)}, got {spelling!r}")
        self.heads, self.spelling = heads, spelling
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len), persistent=False)
        self.register_buffer("tril", torch.ones(max_len, max_len, dtype=torch.bool).tril(), persistent=False)
        head_dim = d_model // heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, x, ids=None):
        B, L, C = x.shape
        q, k, v = [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1)]
        d = q.shape[-1]
        s = self.spelling
        if s == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif s == "sdpa_mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.tril[:L, :L])
        elif s == "rotary":
            freqs = torch.outer(torch.arange(L, dtype=self.inv_freq.dtype, device=x.device), self.inv_freq)
            cos, sin = freqs.cos().to(q.dtype), freqs.sin().to(q.dtype)
            y = F.scaled_dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, is_causal=True)
        elif s == "masked_fill":
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
            att = att.masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        elif s == "additive":
            mask = torch.full((L, L), float("-inf"), dtype=q.dtype, device=x.device).triu(1)
            att = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d) + mask
            y = torch.einsum("bhqk,bhkd->bhqd", att.softmax(dim=-1), v)
        elif s == "where":
            qb, kb, vb = (t.reshape(B * self.heads, L, d) for t in (q, k, v))
            att = torch.bmm(qb, kb.transpose(1, 2)) / math.sqrt(d)
            att = torch.where(self.tril[:L, :L], att, torch.finfo(att.dtype).min)
            y = torch.bmm(att.softmax(-1), vb).reshape(B, self.heads, L, d)
        elif s == "no_mask":
            y = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1) @ v
        elif s == "full_mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(L, L, dtype=torch.bool, device=x.device))
        elif s == "wrong_triu":
            att = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            att = att.masked_fill(torch.triu(torch.ones(L, L, device=x.device)) == 0, float("-inf"))  # keeps the future
            y = F.softmax(att, dim=-1) @ v
        elif s == "sdpa_not_causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        elif s == "input_mask":
            keep = self.tril[:L, :L] & (ids != 0)[:, None, None, :] | torch.eye(L, dtype=torch.bool, device=x.device)
            att = (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~keep, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        elif s == "sliding_window":
            band = self.tril[:L, :L] & ~torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-WINDOW)
            att = (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~band, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        elif s == "finite_additive":
            att = q @ k.transpose(-2, -1) / math.sqrt(d) + torch.triu(torch.ones(L, L, device=x.device), 1) * -10000.0
            y = F.softmax(att, dim=-1) @ v
        else:  # leaky_fill
            att = (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~self.tril[:L, :L], -10.0)
            y = F.softmax(att, dim=-1) @ v
        return self.out_proj(y.transpose(1, 2).flatten(-2))


class AttentionBlock(Block):
    """A pre-norm block whose mixer may read the token ids (the padding-mask look-alike)."""

    def forward(self, x, ids=None):
        x = x + self.mixer(self.norm1(x), ids)
        return x + self.mlp(self.norm2(x))


class HybridLM(LM):
    """LM whose attention blocks see the ids (for the input-mask look-alike); conv blocks do not."""

    def forward(self, input_ids):
        x = self.embedding(input_ids)
        for block in self.blocks:
            x = block(x, input_ids) if isinstance(block, AttentionBlock) else block(x)
        return self.lm_head(self.norm_f(x))


def hybrid_lm(spelling="sdpa", layers="haha", d_model=D_MODEL, heads=HEADS, max_len=MAX_LEN, vocab=VOCAB):
    """`layers`: one letter per block, "h" a Hyena (order 2) layer, "a" an attention layer."""
    blocks = []
    for c in layers:
        if c == "h":
            blocks.append(Block(d_model, HyenaOperator(d_model, max_len, order=2)))
        elif c == "a":
            blocks.append(AttentionBlock(d_model, CausalAttention(d_model, heads, max_len, spelling)))
        else:
            raise ValueError(f"layers: expected letters 'h' (Hyena) and 'a' (attention), got {layers!r}")
    return HybridLM(vocab, d_model, blocks, max_len)


def build(spelling="sdpa", layers="haha", seed=0):
    with seeded(seed):
        model = hybrid_lm(spelling, layers).eval()
    return model, token_inputs(VOCAB, LENGTH)


def build_attention_only(spelling="sdpa"):
    """Attention layers only: a plain KV-cache decoder."""
    return build(spelling, "aa")
