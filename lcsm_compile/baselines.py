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
        self.X = None

    def _bind(self, batch_shape):
        if self.X is None:
            n = math.prod(batch_shape)
            self.X = torch.zeros(n, self.channels, self.max_len, dtype=self.dtype, device=self.device)

    def fork(self):
        other = copy.copy(self)
        other.X = None
        other.reset()
        return other

    def reset(self):
        if self.X is not None:
            self.X.zero_()
        self.position = self.prefill_len = 0

    def prefill(self, x, channels=None):
        sl = slice(None) if channels is None else channels
        P = x.shape[-1]
        self._bind(x.shape[:-2])
        xs = x.reshape(-1, x.shape[-2], P).to(self.dtype)
        self.X[:, sl, :P] = xs
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
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        return {"filters": size(self.h), "history": size(self.X)}

    def memory_bytes(self):
        return sum(self.memory_breakdown().values())


class LazyConv(_Bank):
    """y_t = <history, reversed filter>: O(t) work per position, batched over channels and rows."""

    def __init__(self, h, skip=None, *, max_len=None):
        super().__init__(h, skip, max_len=max_len)
        self.h_rev = self.h.flip(-1).contiguous()

    def red_cell(self, x, channels=None):
        sl = slice(None) if channels is None else channels
        t = self.position
        self._bind(x.shape[:-1])
        xs = x.reshape(-1, x.shape[-1])
        self.X[:, sl, t] = xs.to(self.dtype)
        hist = self.X[:, sl, : t + 1]  # [N, C, t+1]
        taps = self.h_rev[sl, self.max_len - 1 - t :]  # [C, t+1]: h[t], ..., h[0]
        y = torch.bmm(hist.transpose(0, 1), taps.unsqueeze(-1)).squeeze(-1).T  # batched dot per channel
        return y.to(x.dtype).reshape(x.shape)


class FloorConv(_Bank):
    """Lag-0 term only: y_t = h0 * x_t. Not the model's output: a timing floor."""

    def red_cell(self, x, channels=None):
        sl = slice(None) if channels is None else channels
        return (x.to(self.dtype) * self.h[sl, 0]).to(x.dtype)

    def prefill(self, x, channels=None):
        sl = slice(None) if channels is None else channels
        self.position = self.prefill_len = x.shape[-1]
        return (x.to(self.dtype) * self.h[sl, 0, None]).to(x.dtype)
