"""The ring strategy: a short causal convolution keeps its last K-1 inputs per row."""

import torch
import torch.nn.functional as F

from lcsm_compile.runtime.strategy import Strategy


class RingConvs(Strategy):
    def __init__(self, decoder, shared):
        super().__init__(decoder, shared)
        self.filters = decoder.short_filters  # site index -> (conv1d weight [W, 1, K], step taps [K, 1, W], bias or None)
        self.rings = {}  # site index -> [K-1, N, W] last inputs, oldest first

    def reset(self, capacity):
        self.rings.clear()

    def prefill(self, index, u):
        shared = self.shared
        weight, _, bias = self.filters[index]  # weight [W, 1, K], oldest input first
        K = weight.shape[-1]
        ring = self.rings.get(index) if shared.start is not None else None  # an extend continues after its inputs
        if ring is None:
            window = F.pad(u, (K - 1, 0))  # zeros before the prompt
        else:
            window = torch.cat([(ring if shared.rows is None else ring[:, shared.rows]).permute(1, 2, 0).to(u.dtype), u], -1)
        y = F.conv1d(window, weight.to(u.dtype), bias, groups=weight.shape[0])
        past = window[..., u.shape[-1] :].permute(2, 0, 1)  # the last K-1 inputs
        if shared.rows is None:
            self.rings[index] = past.clone(memory_format=torch.contiguous_format)  # [K-1, N, W], oldest first
        else:
            if index not in self.rings:
                self.rings[index] = past.new_zeros(K - 1, shared.capacity, past.shape[-1])
            self.rings[index][:, shared.rows] = past
        return y

    def step(self, index, u):
        _, taps, bias = self.filters[index]  # taps [K, 1, W], oldest input first
        ring = self.rings[index]
        window = torch.cat([ring, u.permute(2, 0, 1)])  # [K, B, W]
        y = (window * taps.to(u.dtype)).sum(0)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ring.copy_(window[1:])  # in place: a captured step (lcsm_compile.runtime.graphs) keeps reading this ring
        return y.unsqueeze(-1)

    def memory_breakdown(self):
        return {"rings": sum(r.numel() * r.element_size() for r in self.rings.values())}
