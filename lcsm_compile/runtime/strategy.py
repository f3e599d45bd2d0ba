"""Strategy: one decoding strategy's state in a session (the base of tiled, ring, recurrent, kv_cache).

A strategy decodes some of the programs' sites. The custom ops reach it through SessionState with
the site's index: prefill(index, ...) runs a window of known positions (a prompt from position 0,
or from `shared.start` for an extend; `shared.rows` the rows the window stands for, None for
every row) and step(index, ...) one position of every row. The session as a whole calls reset,
advance, graph_safe, release and memory_breakdown on every strategy; the defaults do nothing.
"""


class Strategy:
    def __init__(self, decoder, shared):
        self.shared = shared  # the SessionState: capacity, rows, start, positions, live, graph
        self.sites = decoder.sites

    def reset(self, capacity):
        """Forget every sequence (before shared.capacity becomes `capacity`)."""

    def advance(self):
        """Finish the position once every site's step ran."""

    def graph_safe(self):
        """From now on a step issues the same kernels at every position (lcsm_compile.runtime.graphs)."""

    def release(self, rows):
        """`rows` hold no sequence any more."""

    def memory_breakdown(self) -> dict:
        return {}

    def plus_bias(self, index, y):
        """A convolution's output bias [W], added to y [B, W, T]."""
        bias = self.sites[index].conv.bias
        return y if bias is None else y + bias.reshape(-1, 1).to(y.dtype)
