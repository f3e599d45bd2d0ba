"""The convolution baselines every benchmark reports beside flash, one home each.

Banks with OnlineConv's decoding interface (prefill(x [..., C, P], channels), red_cell(x [..., C],
channels), advance(), step(x), fork(), reset(), memory_bytes()), so the mixer benchmark and
optimize(conv=...) drive them exactly as they drive the flash bank:
- LazyConv:  y_t = <history, reversed filter>, O(t) reads per position;
- EagerConv: x_t * h scattered into every future accumulator, O(L - t) writes per position;
- NaiveConv: the FFT convolution of the whole prefix at every position (a model's forward, redone);
- FloorConv: each convolution cut to its lag-0 term: not the model, the per-token timing floor.
And fft_conv: one FFT convolution of a finished sequence (the offline lower bound, not causal).
Lazy, eager and naive are exact; the floor is not a convolution.
"""

import bisect
import copy
import math

import torch

from lcsm_compile.engine import prepare_filters, state_dtype_for
from lcsm_compile.kernels.reference import fft_conv  # the offline convolution: every prefill, and a baseline


class StepBank:
    """What every bank that steps one shared position at a time shares (the baselines, and
    lcsm_compile.partitioned): filters [C, max_len] in the state dtype (skip folded into lag 0), a
    position, state allocated by the first call for its batch rows, prefill by one FFT."""

    capabilities = frozenset()  # one shared position, one step at a time (see OnlineConv.capabilities)

    def __init__(self, h, skip=None, *, max_len=None):
        C, Lh = h.shape
        self.channels, self.max_len = C, Lh if max_len is None else int(max_len)
        self.dtype, self.device = state_dtype_for(h.dtype), h.device
        self.h = prepare_filters(h, skip, self.max_len, self.dtype)
        self.layout = None  # the filters in the layout red_cell reads, when not self.h
        self.state = None  # {part name: tensor}, see _allocate
        self.position = self.prefill_len = 0

    def _allocate(self, rows):
        """The state of a decode of `rows` batch rows: {memory_breakdown name: zeroed tensor}."""
        return {}

    def _state(self, batch_shape):
        if self.state is None:
            self.state = self._allocate(math.prod(batch_shape))
        return self.state

    def fork(self):
        """A bank sharing these filters, with no state yet."""
        other = copy.copy(self)
        other.state = None
        other.position = other.prefill_len = 0
        return other

    def reset(self):
        """Forget every input; keeps the allocated state."""
        for t in (self.state or {}).values():
            t.zero_()
        self.position = self.prefill_len = 0

    def prefill(self, x, channels=None):
        """The prompt's outputs [..., C, P] by one FFT convolution; _ingest keeps what later steps need."""
        sl = _cols(channels)
        P = x.shape[-1]
        xs = x.reshape(math.prod(x.shape[:-2]), x.shape[-2], P).to(self.dtype)
        self._ingest(self._state(x.shape[:-2]), xs, sl)
        self.position = self.prefill_len = P
        if P == 0:
            return x.clone()
        return fft_conv(self.h[sl], xs).to(x.dtype).reshape(x.shape)

    def _ingest(self, state, xs, sl):
        """Keep the prompt xs [rows, C, P] in the state."""

    def step(self, x):
        """Take the input at the next position, x [..., C]; returns that position's output [..., C]."""
        y = self.red_cell(x)
        self.advance()
        return y

    def advance(self):
        self.position += 1

    def memory_breakdown(self):
        return {"filters": _nbytes(self.h) + _nbytes(self.layout), **{k: _nbytes(v) for k, v in (self.state or {}).items()}}

    def memory_bytes(self):
        return sum(self.memory_breakdown().values())


def _cols(channels):
    return slice(None) if channels is None else channels


def _nbytes(t):
    return 0 if t is None else t.numel() * t.element_size()


class LazyConv(StepBank):
    """y_t = <history, reversed filter>: O(t) reads per position, batched over channels and rows.

    Time-major history [max_len, rows, C] and reversed filters [max_len, C], accumulated block by
    block of positions into a buffer that stays in cache, in place: the step reads history and
    filter once each, with no large temporary, so the baseline is as fast as its O(t) reads allow.
    """

    # the accumulator [K, rows, C] per device: inside L2/L3 on a CPU; on a GPU larger, so a step is
    # a few kernel launches rather than one per small block
    BLOCK_BYTES = {"cpu": 2 << 20, "cuda": 32 << 20}

    def __init__(self, h, skip=None, *, max_len=None):
        super().__init__(h, skip, max_len=max_len)
        self.layout = self.h.flip(-1).T.contiguous()  # [max_len, C]: layout[max_len-1-k] = h[:, k]

    def _allocate(self, rows):
        X = torch.zeros(self.max_len, rows, self.channels, dtype=self.dtype, device=self.device)
        block = self.BLOCK_BYTES.get(self.device.type, self.BLOCK_BYTES["cpu"])
        self.K = max(8, block // (rows * self.channels * X.element_size()))
        return {"history": X, "block": torch.zeros_like(X[: min(self.K, self.max_len)])}

    def _ingest(self, state, xs, sl):
        state["history"][: xs.shape[-1], :, sl] = xs.permute(2, 0, 1)

    def red_cell(self, x, channels=None):
        sl, t = _cols(channels), self.position
        state = self._state(x.shape[:-1])
        X, hr = state["history"][:, :, sl], self.layout[:, None, sl]
        X[t] = x.reshape(-1, x.shape[-1])
        off = self.max_len - 1 - t  # hr[off + s] = h[t - s]
        acc = state["block"][: min(self.K, t + 1), :, sl]
        acc.zero_()
        for a in range(0, t + 1, self.K):
            b = min(a + self.K, t + 1)
            acc[: b - a].addcmul_(X[a:b], hr[off + a : off + b])
        return acc.sum(0).to(x.dtype).reshape(x.shape)

    def run_bytes(self, length, rows=1):
        """Bytes a decode of positions 0..length-1 reads: history and filter, t+1 positions each, per step."""
        return self.layout.element_size() * rows * self.channels * length * (length + 1)


class EagerConv(StepBank):
    """At position t, acc[t:] += x_t * h[:max_len - t] in place; y_t = acc[t] is then complete.

    Time-major accumulators [max_len, rows, C] and filters [max_len, C]: one contiguous span per step.
    """

    def __init__(self, h, skip=None, *, max_len=None):
        super().__init__(h, skip, max_len=max_len)
        self.layout = self.h.T.contiguous()

    def _allocate(self, rows):
        return {"accumulators": torch.zeros(self.max_len, rows, self.channels, dtype=self.dtype, device=self.device)}

    def _ingest(self, state, xs, sl):
        P = xs.shape[-1]
        if P:  # the prompt's contributions to every later output
            state["accumulators"][P:, :, sl] = fft_conv(self.h[sl], xs, self.max_len)[..., P:].permute(2, 0, 1)

    def red_cell(self, x, channels=None):
        sl, t = _cols(channels), self.position
        acc = self._state(x.shape[:-1])["accumulators"][t:, :, sl]
        acc.addcmul_(self.layout[: self.max_len - t, None, sl], x.reshape(-1, x.shape[-1]).to(self.dtype))
        return acc[0].to(x.dtype, copy=True).reshape(x.shape)  # a copy: reset() clears acc

    def run_bytes(self, length, rows=1):
        """Bytes a decode of positions 0..length-1 touches: reads acc and h, writes acc, L - t positions each."""
        return self.layout.element_size() * 3 * rows * self.channels * length * (length + 1) // 2


class NaiveConv(StepBank):
    """At position t, the FFT convolution of the whole prefix, the filter's spectrum included (a
    model's forward recomputes it each call); y_t is its last output. FFT size: the smallest
    5-smooth n >= 2(t+1), kinder than Hyena's n = 2(t+1), which hits slow prime sizes at many t."""

    def __init__(self, h, skip=None, *, max_len=None):
        super().__init__(h, skip, max_len=max_len)
        self.sizes = fast_sizes(2 * self.max_len)

    def _allocate(self, rows):
        return {"history": torch.zeros(rows, self.channels, self.max_len, dtype=self.dtype, device=self.device)}

    def _ingest(self, state, xs, sl):
        state["history"][:, sl, : xs.shape[-1]] = xs

    def red_cell(self, x, channels=None):
        sl, t = _cols(channels), self.position
        X = self._state(x.shape[:-1])["history"][:, sl]
        X[..., t] = x.reshape(-1, x.shape[-1])
        p = t + 1
        n = self.sizes[bisect.bisect_left(self.sizes, 2 * p)]
        f = torch.fft.rfft(X[..., :p], n=n) * torch.fft.rfft(self.h[sl, :p], n=n)
        return torch.fft.irfft(f, n=n)[..., t].to(x.dtype).reshape(x.shape)


def fast_sizes(limit):
    """Sorted 5-smooth numbers (2^a 3^b 5^c) up to the first one >= limit: fast FFT sizes."""
    out, p2 = [], 1
    while p2 < 2 * limit:
        p3 = p2
        while p3 < 2 * limit:
            p5 = p3
            while p5 < 2 * limit:
                out.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return sorted(out)


class FloorConv(StepBank):
    """Lag-0 term only: y_t = h0 * x_t. Not the model's output: a timing floor."""

    def red_cell(self, x, channels=None):
        return (x.to(self.dtype) * self.h[_cols(channels), 0]).to(x.dtype)

    def prefill(self, x, channels=None):
        self.position = self.prefill_len = x.shape[-1]
        return (x.to(self.dtype) * self.h[_cols(channels), 0, None]).to(x.dtype)
