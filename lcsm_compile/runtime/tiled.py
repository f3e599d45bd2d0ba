"""The tiled strategy: every tiled long convolution of every layer in one bank (lcsm_compile.engine),
red cells per site, one tile call per position."""

from lcsm_compile.baselines import FloorConv, LazyConv
from lcsm_compile.engine import OnlineConv
from lcsm_compile.partitioned import PartitionedConv
from lcsm_compile.runtime.strategy import Strategy

# optimize(conv=...): the bank every tiled long convolution of a model decodes in
BANKS = {"flash": OnlineConv, "partitioned": PartitionedConv, "lazy": LazyConv, "floor": FloorConv}


class TiledConvs(Strategy):
    def __init__(self, decoder, shared):
        super().__init__(decoder, shared)
        self.bank = decoder.bank.fork() if decoder.bank is not None else None  # None: no tiled convolution
        self.slices = decoder.bank_slices  # site index -> channel slice of the bank

    def reset(self, capacity):
        if self.bank is not None:
            if self.shared.capacity is not None and capacity != self.shared.capacity:
                self.bank = self.bank.fork()  # another batch size: fresh state
            self.bank.reset()

    # every site's input is brought to the bank's dtype (convolutions of one model can run in
    # different dtypes, e.g. a bfloat16 model with one FFT in float32): exact widening, one rounding back
    def prefill(self, index, u):
        shared, bank = self.shared, self.bank
        x, channels = u.to(bank.dtype), self.slices[index]
        rows = {} if shared.rows is None else {"rows": shared.rows}  # rows at their own positions (flash bank only)
        if rows and bank.S is None:
            bank.bind(shared.capacity)
        if shared.start is not None:
            y = bank.extend(x, channels=channels, start=shared.start, **rows)
        else:
            y = bank.prefill(x, channels=channels, **rows)
        return self.plus_bias(index, y).to(u.dtype)

    def step(self, index, u):
        y = self.bank.red_cell(u[..., 0].to(self.bank.dtype), channels=self.slices[index]).unsqueeze(-1)
        return self.plus_bias(index, y).to(u.dtype)

    def advance(self):
        if self.bank is not None:
            self.bank.advance()

    def graph_safe(self):
        if self.bank is not None and "graph_safe" in self.bank.capabilities:
            self.bank.graph_safe()

    def release(self, rows):
        if self.bank is not None:
            self.bank.release(rows)

    def memory_breakdown(self):
        return self.bank.memory_breakdown() if self.bank is not None else {}
