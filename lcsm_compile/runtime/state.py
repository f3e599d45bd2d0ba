"""SessionState: what the custom ops of one session act on, and the table of decoding strategies.

Each site of the decode programs is decoded by one strategy, whose state lives in a file of its
own: a long convolution on the tiling (tiled.py) or by its recurrence (recurrent.py), a short one
on a ring buffer (ring.py), a causal attention on a KV cache (kv_cache.py). STRATEGIES is the
table; a new strategy is one file (a runtime.strategy.Strategy) and one row, plus the lowering's
choice of which sites it takes (passes/decode_plan.py, whose plan names each site's row).
"""

import torch

from lcsm_compile.runtime.kv_cache import KVCaches
from lcsm_compile.runtime.recurrent import RecurrentConvs
from lcsm_compile.runtime.ring import RingConvs
from lcsm_compile.runtime.tiled import TiledConvs

STRATEGIES = {"tile": TiledConvs, "recurrent": RecurrentConvs, "ring": RingConvs, "kv_cache": KVCaches}


class SessionState:
    """What the custom ops of one session act on: one state per strategy, and the session's rows.

    capacity: the session's rows N (fixed by its first prefill, or by Decoder.session(rows=N)).
    rows: None while a program runs on every row; during a row prefill (Session.add, a ragged
    prefill) or a row extend the int64 indices of the rows the program's batch stands for.
    start: None during a prefill from position 0; during an extend (Session.extend) the position of
    its first input, from which the prefill ops continue the state.
    positions: int64 [N], each row's own position (where its next step's input goes); live: bool
    [N], the rows holding a sequence. A step runs every row; free rows compute and are ignored.
    """

    def __init__(self, decoder):
        self.max_len, self.device = decoder.max_len, decoder.device
        self.capacity, self.rows, self.positions, self.live, self.start = None, None, None, None, None
        self.graph, self.positions_device = False, None
        self.strategies = {name: cls(decoder, self) for name, cls in STRATEGIES.items()}
        self.tiled, self.ring, self.recurrent, self.kv = (self.strategies[n] for n in ("tile", "ring", "recurrent", "kv_cache"))
        self.convs = [self.strategies[s.strategy] for s in decoder.plan.sites]  # by site index

    def reset(self, capacity):
        """Forget every sequence; `capacity` rows from now on, all free."""
        for strategy in self.strategies.values():
            strategy.reset(capacity)
        self.capacity, self.rows, self.graph = capacity, None, False
        self.positions = torch.zeros(capacity, dtype=torch.long)
        self.live = torch.zeros(capacity, dtype=torch.bool)

    # the custom ops (lcsm_compile.runtime.ops) call these with their site's index
    def conv_prefill(self, index, u):
        return self.convs[index].prefill(index, u)

    def conv_step(self, index, u):
        return self.convs[index].step(index, u)

    short_prefill, short_step = conv_prefill, conv_step  # the short convolutions' ops: their ring, by the same table

    def attn_prefill(self, index, q, k, v):
        return self.kv.prefill(index, q, k, v)

    def attn_step(self, index, q, k, v):
        return self.kv.step(index, q, k, v)

    def advance(self):
        for strategy in self.strategies.values():
            strategy.advance()
        self.positions += self.live
        if self.graph:
            self.positions_device.copy_(self.positions)

    def graph_safe(self):
        """Every op of a step issues the same kernels at every position from now on (until the next
        reset): positions on the device for the KV caches, the bank's red cells graph-safe. For
        lcsm_compile.runtime.graphs, which captures the step without advance."""
        self.graph = True
        self.positions_device = self.positions.to(self.device)
        for strategy in self.strategies.values():
            strategy.graph_safe()

    def release(self, rows):
        for strategy in self.strategies.values():
            strategy.release(rows)

    def memory_breakdown(self):
        parts = {}
        for strategy in self.strategies.values():
            parts.update(strategy.memory_breakdown())
        return parts
