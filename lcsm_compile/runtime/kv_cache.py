"""The KV-cache strategy: a causal attention keeps max_len keys and values per row."""

import torch
import torch.nn.functional as F

from lcsm_compile.runtime.strategy import Strategy


class KVCaches(Strategy):
    def __init__(self, decoder, shared):
        super().__init__(decoder, shared)
        self.attention = getattr(decoder, "attention", [])  # AttentionSites
        self.max_len = decoder.max_len
        self.kv = {}  # attention site index -> (k cache, v cache) [N, G, max_len, D], allocated on first prefill

    # KV caches stay allocated across resets: a row reads only the positions it wrote

    def prefill(self, index, q, k, v):
        shared = self.shared
        if shared.start:
            return self._extend(index, q, k, v)
        N, G, P = shared.capacity or q.shape[0], k.shape[1], k.shape[2]
        cache = self.kv.get(index)
        want = ((N, G, self.max_len, k.shape[3]), (N, G, self.max_len, v.shape[3]))
        if cache is None or tuple(cache[0].shape) != want[0] or tuple(cache[1].shape) != want[1] \
                or cache[0].dtype != k.dtype or cache[0].device != k.device:
            cache = self.kv[index] = (k.new_zeros(want[0]), v.new_zeros(want[1], dtype=v.dtype))
        rows = slice(None) if shared.rows is None else shared.rows.to(k.device)
        cache[0][rows, :, :P] = k
        cache[1][rows, :, :P] = v
        site = self.attention[index].attn
        if site.spelling == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=_sdpa_scale(site))
        causal = torch.ones(P, P, dtype=torch.bool, device=q.device).tril()
        return _softmax_attention(site, q, k, v, causal)

    def _extend(self, index, q, k, v):
        """k positions from `start` on: their keys and values appended, each query attends over the
        row's prefix up to its own position."""
        shared = self.shared
        kc, vc = self.kv[index]
        t, P = shared.start, k.shape[2]
        rows = slice(None) if shared.rows is None else shared.rows.to(kc.device)
        kc[rows, :, t : t + P] = k
        vc[rows, :, t : t + P] = v
        keys, values = kc[rows, :, : t + P], vc[rows, :, : t + P]
        allowed = torch.arange(t + P, device=kc.device) <= torch.arange(t, t + P, device=kc.device)[:, None]  # [P, t + P]
        site = self.attention[index].attn
        if site.spelling == "sdpa":
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=_sdpa_scale(site))
        return _softmax_attention(site, q, keys, values, allowed)

    def step(self, index, q, k, v):
        shared = self.shared
        kc, vc = self.kv[index]
        N = kc.shape[0]
        if shared.graph:  # a captured step reads nothing on the host: positions on the device, every key masked
            pos, m = shared.positions_device, self.max_len
        else:
            pos, m = shared.positions.to(kc.device), int(shared.positions.max()) + 1  # keys any row can see
        r = torch.arange(N, device=kc.device)
        kc[r, :, pos] = k[:, :, 0]  # each row writes its own position
        vc[r, :, pos] = v[:, :, 0]
        allowed = (torch.arange(m, device=kc.device) <= pos[:, None])[:, None, None, :]  # [N, 1, 1, m]
        site = self.attention[index].attn
        if site.spelling == "sdpa":
            return F.scaled_dot_product_attention(q, kc[:, :, :m], vc[:, :, :m], attn_mask=allowed, scale=_sdpa_scale(site))
        return _softmax_attention(site, q, kc[:, :, :m], vc[:, :, :m], allowed)

    def memory_breakdown(self):
        return {"kv_cache": sum(t.untyped_storage().nbytes() for pair in self.kv.values() for t in pair)}


def _sdpa_scale(site):
    (_, scale), = site.scale_ops
    return scale


def _softmax_attention(site, q, k, v, allowed):
    """The explicit spelling as the model computes it: q k^T, its scalings in order, -inf where a
    key is not allowed, softmax over keys, then the weights (in v's dtype) times v."""
    s = q @ k.transpose(-2, -1)
    for op, c in site.scale_ops:
        s = s * c if op == "mul" else s / c
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=site.softmax_dtype)
    return (p.to(v.dtype) @ v).to(v.dtype)
