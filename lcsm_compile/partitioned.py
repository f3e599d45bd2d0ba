"""PartitionedConv: exact online causal convolution by the partitioned schedule (lcsm_compile.partition).

A bank with OnlineConv's stepping interface (prefill, red_cell, advance, step, fork, reset), one
shared position and one step at a time: optimize(conv="partitioned") and the mixer benchmark drive
it as they drive the tiling. Like the tiling, it keeps two layouts, because the transforms want
each channel's positions contiguous and the steps want each position's channels contiguous:
- S [N, C, max_len], channel-major: the input of every position of a finished block, and the
  accumulated contributions to every position to come (a level reads the past and writes the
  future, so one buffer holds both);
- the window [K + D - 1, N, C], time-major, from the current block's first position (K = the first
  level's block, D the direct lags): the block's accumulators, then its inputs as they come, and
  past the block the direct lags' contributions to the next D - 1 positions. At the end of a
  block its inputs go into S, the levels fire, and the next block's accumulators come in;
- per level, its delay line [m, N, C, B+1]: the spectra of the last m input blocks, block q in
  slot q mod m;
- the jobs of spread levels (latency mode): a firing whose outputs are due a block later, done in
  pieces over that block (forward transforms by channel slices, products by segment and channel
  slices into the level's product buffer [N, C, B+1], inverse transforms by channel slices).
"""

import torch
import torch.nn.functional as F

from lcsm_compile.baselines import StepBank
from lcsm_compile.errors import DTypeError, LcsmError, MaxLenExceeded, ShapeError
from lcsm_compile.kernels.reference import channel_chunks, fft_conv
from lcsm_compile.partition import Partition, plan
from lcsm_compile.tuning import costs_for

SMALL_PRODUCT = 1 << 16  # complex bins: below, a firing's products run as one batched product and sum


class PartitionedConv(StepBank):
    """A bank of C causal long convolutions decoded by frequency-domain delay lines.

    h: filters [C, Lh]; skip: optional [C] lag-0 term; max_len: positions the state holds (default
    Lh). partition: a lcsm_compile.partition.Partition of max_len (default: plan(max_len, C) by the
    costs `lcsm-compile tune` measured for the device, lcsm_compile.tuning.costs_for;
    latency=True: its bounded-latency plan, whose large levels are spread over the steps).
    """

    def __init__(self, h, skip=None, *, max_len=None, partition=None, latency=False):
        if not isinstance(h, torch.Tensor) or h.dim() != 2 or not h.is_floating_point() or h.is_complex():
            raise ShapeError(f"h: expected a real floating filter tensor [C, Lh], got {getattr(h, 'shape', type(h).__name__)}")
        super().__init__(h, skip, max_len=max_len)
        if partition is None:
            partition = plan(self.max_len, self.channels, costs_for(self.device), latency=latency)
        if not isinstance(partition, Partition) or partition.max_len != self.max_len:
            raise ValueError(f"partition: expected a lcsm_compile.partition.Partition of max_len {self.max_len}, got {partition!r}")
        self.partition = partition
        self.batch_shape = self.io_dtype = None  # fixed by the first call
        self.h0 = self.h[:, 0].contiguous()
        self.layout = self.h[:, 1 : partition.direct].T.contiguous()  # [D-1, C]: the direct lags, time-major
        self.block = partition.levels[0].block if partition.levels else partition.direct  # K
        self.jobs = []  # [level index, step i, position t, pieces, pieces done]
        # per level and q mod m, the delay-line slots of blocks q-1, q-2, ..., q-m (segment order)
        self._orders = [[torch.tensor([(q - 1 - k) % lv.segments for k in range(lv.segments)], device=self.device)
                         for q in range(lv.segments)] for lv in partition.levels]
        # per level, the spectra of its segments h[:, sB:(s+1)B] (zero past max_len), s = d .. d+m-1: [m, C, B+1]
        self.spectra = []
        for lv in partition.levels:
            (lo, hi), B, m = lv.lags, lv.block, lv.segments
            seg = F.pad(self.h, (0, max(0, hi - self.max_len)))[:, lo:hi]
            self.spectra.append(torch.fft.rfft(seg.reshape(self.channels, m, B), n=2 * B).transpose(0, 1).contiguous())

    def _allocate(self, rows):
        complex_dtype = torch.complex128 if self.dtype == torch.float64 else torch.complex64
        state = {"state": torch.zeros(rows, self.channels, self.max_len, dtype=self.dtype, device=self.device),
                 "window": torch.zeros(self.block + self.partition.direct - 1, rows, self.channels, dtype=self.dtype,
                                       device=self.device)}
        for j, lv in enumerate(self.partition.levels):
            state[f"delay_line_{j}"] = torch.zeros(lv.segments, rows, self.channels, lv.block + 1,
                                                   dtype=complex_dtype, device=self.device)
            if lv.delay == 2:  # a spread level's summed products, between its product and inverse pieces
                state[f"products_{j}"] = torch.zeros(rows, self.channels, lv.block + 1, dtype=complex_dtype, device=self.device)
        return state

    def _state_for(self, batch_shape, width, x, what):
        """The state for inputs x with these batch dims, allocated by the first call; a later call with
        other batch dims or another dtype than the first is refused (ShapeError / DTypeError)."""
        if not x.is_floating_point():
            raise DTypeError(f"x: expected a floating dtype, got {x.dtype}")
        if x.shape[-1 if what == "step" else -2] != width:
            want = "[..., C]" if what == "step" else "[..., C, P]"
            raise ShapeError(f"x: expected shape {want} with C = {width}, got {tuple(x.shape)}")
        if self.state is None:
            self.batch_shape, self.io_dtype = tuple(batch_shape), x.dtype
        elif tuple(batch_shape) != self.batch_shape:
            raise ShapeError(f"x: expected batch dims {self.batch_shape} (fixed by the first call), got {tuple(batch_shape)}")
        return self._state(batch_shape)

    def fork(self):
        other = super().fork()
        other.batch_shape, other.jobs = None, []
        return other

    def reset(self):
        super().reset()
        self.jobs = []

    def prefill(self, x, channels=None):
        """The prompt x [..., C, P] at once (or the channels of the slice `channels`, with the same P):
        one FFT convolution gives its outputs and its contributions to every later position."""
        sl = slice(None) if channels is None else channels
        width = len(range(self.channels)[sl])
        P = x.shape[-1]
        more = channels is not None and self.position == self.prefill_len == P  # another slice, same prompt
        if self.position != 0 and not more:
            raise LcsmError(f"prefill: expected a fresh state (position 0), at position {self.position}; call reset() first")
        if P > self.max_len:
            raise MaxLenExceeded(f"prefill: prompt of {P} positions exceeds max_len = {self.max_len}")
        state = self._state_for(x.shape[:-2], width, x, "prefill")
        self.position = self.prefill_len = P
        if P == 0:
            return x.clone()
        xs = x.reshape(-1, width, P).to(self.dtype)
        full = fft_conv(self.h[sl], xs, self.max_len)
        S = state["state"]
        S[:, sl, :P] = xs
        S[:, sl, P:] = full[..., P:]
        self._load_window(sl, P)
        return full[..., :P].to(x.dtype).reshape(x.shape)

    def red_cell(self, x, channels=None):
        """y_t = A_t + h0 * x_t for x [..., C] (or the channels of `channels`); x_t is stored at t."""
        t = self.position
        if t >= self.max_len:
            raise MaxLenExceeded(f"step: position {t} is past max_len = {self.max_len}; reset() or build with a larger max_len")
        sl = slice(None) if channels is None else channels
        if self.state is None or x.shape[:-1] != self.batch_shape or x.dtype != self.io_dtype:  # the checks, once
            self._state_for(x.shape[:-1], len(range(self.channels)[sl]), x, "step")
        row = self.state["window"][(t - self.prefill_len) % self.block, :, sl]
        if x.shape[-1] != row.shape[-1]:
            raise ShapeError(f"x: expected shape [..., C] with C = {row.shape[-1]}, got {tuple(x.shape)}")
        xs = x if x.dim() == 2 else x.reshape(row.shape)  # each reshape or cast costs as much as the op itself
        xs = xs if xs.dtype == self.dtype else xs.to(self.dtype)
        y = torch.addcmul(row, xs, self.h0 if channels is None else self.h0[sl])
        row.copy_(xs)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y if x.dim() == 2 else y.view(x.shape)

    def advance(self):
        """Finish position t once every red cell ran: its direct lags, the spread levels' pieces due
        now; at the end of a block, the block's inputs into S, every level whose block ends here (B
        divides the step count i; the blocks are nested powers of two; a spread level's firing
        becomes a job), and the next block's accumulators into the window."""
        if self.state is None:
            raise LcsmError("advance: no red cell ran yet")
        t, L, P = self.position, self.max_len, self.prefill_len
        W = self.state["window"]
        r = (t - P) % self.block  # this position's row in the window
        lags = min(self.partition.direct, L - t)  # direct lags 1 .. lags-1 land inside max_len
        if lags > 1:
            W[r + 1 : r + lags].addcmul_(self.layout[: lags - 1, None, :], W[r])
        if r + 1 == self.block or t + 1 == L:
            self.state["state"][..., t - r : t + 1] = W[: r + 1].permute(1, 2, 0)
        if t + 1 < L:
            self._run_jobs(t)  # before the firings: a level's last job ends before its next firing
            if r + 1 == self.block:
                i = t - P + 1
                for j, lv in enumerate(self.partition.levels):
                    if i % lv.block:
                        break
                    if lv.delay == 1:
                        self._fire(j, i, t)
                    elif t + 1 + lv.block < L:  # a job, unless its outputs are past max_len
                        self.jobs.append([j, i, t, self._pieces(lv), 0])
                self._load_window(slice(None), t + 1, carry=True)
        self.position = t + 1

    def _run_jobs(self, t):
        """The pieces due at position t: a job fired at t0 has done ceil((t - t0) n / B) of its n
        pieces after position t, so all of them by t0 + B, before the window of its outputs loads."""
        finished = False
        for job in self.jobs:
            j, i, t0, pieces, done = job
            due = -(-(t - t0) * len(pieces) // self.partition.levels[j].block)
            if due > done:
                for stage, part in pieces[done:due]:
                    self._piece(j, i, t0, stage, part)
                job[4] = due
                finished |= due == len(pieces)
        if finished:
            self.jobs = [job for job in self.jobs if job[4] < len(job[3])]

    def _pieces(self, lv):
        """A spread firing's pieces in order: ("forward", channels)..., ("products", (segments,
        channels))..., ("inverse", channels)...; the products read every forward piece's spectra.
        Up to m product pieces are segment ranges over every channel; more cut each segment into
        channel slices."""
        def cuts(n, most):
            n = max(1, min(n, most))
            return [slice(k * most // n, (k + 1) * most // n) for k in range(n)]

        forward, products, inverse = lv.pieces
        m, every = lv.segments, slice(0, self.channels)
        if products <= m:
            product_pieces = [(s, every) for s in cuts(products, m)]
        else:
            product_pieces = [(slice(k, k + 1), c) for k in range(m) for c in cuts(-(-products // m), self.channels)]
        return ([("forward", c) for c in cuts(forward, self.channels)] + [("products", p) for p in product_pieces]
                + [("inverse", c) for c in cuts(inverse, self.channels)])

    def _piece(self, j, i, t, stage, part):
        """One piece of spread level j's firing at step i, position t (see _fire for the whole)."""
        lv = self.partition.levels[j]
        ring, H, B, m = self.state[f"delay_line_{j}"], self.spectra[j], lv.block, lv.segments
        q, Y = i // B, self.state[f"products_{j}"]
        if stage == "forward":
            ring[(q - 1) % m, :, part] = self._input_spectrum(part, t, B)
        elif stage == "products":
            segments, c = part
            for k in range(segments.start, segments.stop):
                if k == 0:
                    Y[:, c] = ring[(q - 1) % m, :, c] * H[0, c]
                else:
                    Y[:, c].addcmul_(ring[(q - 1 - k) % m, :, c], H[k, c])
        else:
            self._add_outputs(part, Y[:, part], t + 1 + B, B)

    def _load_window(self, sl, t, carry=False):
        """The window of the block starting at position t: its accumulators from S, plus (carry) the
        direct lags' contributions the last block left past its end."""
        W, S, K, D = self.state["window"], self.state["state"], self.block, self.partition.direct
        if carry and D > 1:
            W[: D - 1] = W[K : K + D - 1].clone()  # the ranges overlap when D > K + 1 (a spread first level)
            W[D - 1 :].zero_()
        else:
            W[:, :, sl].zero_()
        n = min(K, self.max_len - t)
        W[:n, :, sl] += S[:, sl, t : t + n].permute(2, 0, 1)

    def _fire(self, j, i, t):
        """Level j's firing at step i, position t: the spectrum of inputs [t+1-2B, t] (positions
        before the prefill end count as zero: the prefill's FFT covered them) joins the delay line,
        then the products with the m segment spectra, summed, give one inverse transform: the
        level's contribution to outputs [t+1, t+B]."""
        lv = self.partition.levels[j]
        ring, H, B, m = self.state[f"delay_line_{j}"], self.spectra[j], lv.block, lv.segments
        if t + 1 >= self.max_len:
            return
        q = i // B  # the newest input spectrum is block q-1's; segment d+k meets block q-1-k's
        for c in channel_chunks(self.state["state"], 2 * B):
            spec = ring[(q - 1) % m, :, c] = self._input_spectrum(c, t, B)
            if m * spec.numel() <= SMALL_PRODUCT:  # small: one gather, one product, one sum (few calls)
                Y = (ring[:, :, c].index_select(0, self._orders[j][q % m]) * H[:, None, c]).sum(0)
            else:  # large: multiply-adds in place, no [m, ...] temporary
                Y = spec * H[0, c]
                for k in range(1, m):
                    Y.addcmul_(ring[(q - 1 - k) % m, :, c], H[k, c])
            self._add_outputs(c, Y, t + 1, B)

    def _input_spectrum(self, c, t, B):
        """The size-2B spectrum of channels c's inputs [t+1-2B, t], each channel's positions contiguous
        in S; positions before the prefill end count as zero (the prefill's FFT covered them)."""
        w = self.state["state"][:, c, max(t + 1 - 2 * B, self.prefill_len) : t + 1]
        return torch.fft.rfft(w if w.shape[-1] == 2 * B else F.pad(w, (2 * B - w.shape[-1], 0)))

    def _add_outputs(self, c, Y, lo, B):
        """Channels c's summed products Y [N, wc, B+1] back to time: their outputs [lo, lo+B) (the
        second half of the cyclic result, overlap-save), cut at max_len, into S."""
        stop = min(lo + B, self.max_len)
        if lo < stop:
            self.state["state"][:, c, lo:stop] += torch.fft.irfft(Y, n=2 * B)[..., B : B + stop - lo]

    def memory_breakdown(self):
        size = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        state = self.state or {}
        return {"filters": size(self.h, self.h0, self.layout), "spectra": size(*self.spectra),
                "state": size(state["state"]) if state else 0, "window": size(state["window"]) if state else 0,
                "delay_lines": size(*(v for k, v in state.items() if k.startswith(("delay_line", "products"))))}
