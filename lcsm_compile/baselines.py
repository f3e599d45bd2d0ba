"""Convolution banks with OnlineConv's decoding interface, for the baselines benchmarks report.

- LazyConv: every red cell is a dot product of the whole history with the reversed filter.
- FloorConv: each convolution cut to its lag-0 term, the per-token work no exact method beats.
Both are exact only for what they claim (LazyConv is exact; FloorConv is not a convolution).
"""

import copy
import math

import torch

from lcsm_compile.engine import prepare_filters, state_dtype_for


class _Bank:
    def __init__(self, h, skip=None, *, max_len=None):
        C, Lh = h.shape
        self.channels, self.max_len = C, Lh if max_len is None else int(max_len)
        self.dtype, self.device = state_dtype_for(h.dtype), h.device
        self.h = prepare_filters(h, skip, self.max_len, self.dtype)
        self.position = self.prefill_len = 0

    def fork(self):
        other = copy.copy(self)
        other.reset()
        return other

    def reset(self):
        self.position = self.prefill_len = 0

    def prefill(self, x, channels=None):
        sl = slice(None) if channels is None else channels
        P = x.shape[-1]
        xs = x.reshape(-1, x.shape[-2], P).to(self.dtype)
        n = 2 * max(P, 1)
        y = torch.fft.irfft(torch.fft.rfft(xs, n=n) * torch.fft.rfft(self.h[sl, :P], n=n), n=n)[..., :P]
        self.position = self.prefill_len = P
        return y.to(x.dtype).reshape(x.shape)

    def step(self, x):
        y = self.red_cell(x)
        self.advance()
        return y

    def advance(self):
        self.position += 1

    def memory_breakdown(self):
        return {"filters": _nbytes(self.h)}

    def memory_bytes(self):
        return sum(self.memory_breakdown().values())


def _nbytes(t):
    return 0 if t is None else t.numel() * t.element_size()


class LazyConv(_Bank):
    """y_t = <history, reversed filter>: O(t) work per position, batched over channels and rows.

    Time-major history [max_len, N, C] and reversed filters [max_len, C], accumulated block by
    block of positions into a cache-sized buffer in place (the mixer benchmark's fastest layout:
    it reads history and filter at about copy bandwidth, so the baseline is as fast as its O(t)
    reads allow, not slowed by a large temporary or a per-channel GEMV).
    """

    BLOCK_BYTES = 2 << 20  # the accumulator [K, N, W]: small enough to stay in L2/L3

    def __init__(self, h, skip=None, *, max_len=None):
        super().__init__(h, skip, max_len=max_len)
        self.h_rev = self.h.flip(-1).T.contiguous()  # [max_len, C]: h_rev[max_len-1-k] = h[:, k]
        self.X = None  # [max_len, N, C], bound by the first call
        self.acc = None

    def _bind(self, batch_shape):
        if self.X is None:
            n = math.prod(batch_shape)
            self.X = torch.zeros(self.max_len, n, self.channels, dtype=self.dtype, device=self.device)
            self.K = max(8, self.BLOCK_BYTES // (n * self.channels * self.X.element_size()))
            self.acc = torch.empty(min(self.K, self.max_len), n, self.channels, dtype=self.dtype, device=self.device)

    def fork(self):
        other = super().fork()
        other.X = other.acc = None
        return other

    def reset(self):
        super().reset()
        if self.X is not None:
            self.X.zero_()

    def prefill(self, x, channels=None):
        sl = slice(None) if channels is None else channels
        P = x.shape[-1]
        self._bind(x.shape[:-2])
        self.X[:P, :, sl] = x.reshape(-1, x.shape[-2], P).permute(2, 0, 1).to(self.dtype)
        return super().prefill(x, channels)

    def red_cell(self, x, channels=None):
        sl = slice(None) if channels is None else channels
        t = self.position
        self._bind(x.shape[:-1])
        X, hr = self.X[:, :, sl], self.h_rev[:, None, sl]
        X[t] = x.reshape(-1, x.shape[-1]).to(self.dtype)
        off = self.max_len - 1 - t  # hr[off + s] = h[t - s]
        acc = self.acc[: min(self.K, t + 1), :, sl]
        acc.zero_()
        for a in range(0, t + 1, self.K):
            b = min(a + self.K, t + 1)
            acc[: b - a].addcmul_(X[a:b], hr[off + a : off + b])
        return acc.sum(0).to(x.dtype).reshape(x.shape)

    def memory_breakdown(self):
        return {"filters": _nbytes(self.h) + _nbytes(self.h_rev), "history": _nbytes(self.X), "block": _nbytes(self.acc)}


class FloorConv(_Bank):
    """Lag-0 term only: y_t = h0 * x_t. Not the model's output: a timing floor."""

    def red_cell(self, x, channels=None):
        sl = slice(None) if channels is None else channels
        return (x.to(self.dtype) * self.h[sl, 0]).to(x.dtype)

    def prefill(self, x, channels=None):
        sl = slice(None) if channels is None else channels
        self.position = self.prefill_len = x.shape[-1]
        return (x.to(self.dtype) * self.h[sl, 0, None]).to(x.dtype)
