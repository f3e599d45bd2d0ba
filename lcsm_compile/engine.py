"""OnlineConv: exact online causal convolution of a bank of channels in O(L log^2 L) total work.

y_t = sum_{s<=t} h[t-s] * x_s for every channel, with x_t arriving one position at a time.
Per position the only sequential work is the red cell y_t = A_t + h0 * x_t; the rest is the gray
tile of the relaxed schedule (lcsm_compile.schedule), run as a direct Toeplitz product for small
tiles and as a size-2U FFT middle product with precomputed filter spectra for large ones.

One channel-major buffer S [N, C, max_len] holds the whole position-indexed state: a tile reads
inputs of positions already decoded and adds to accumulators of positions to come, so position p
holds its accumulator A_p until its red cell consumes it and its input x_p from then on. That is
half of keeping the history and the accumulators apart.

Rows at their own positions (ragged prompts, rows that join and leave: `prefill(..., rows=)`,
`release(rows)`): each row keeps its own position and prefill length, in its own coordinates, so
its tiles are the ones it would run alone. Rows whose step has the same tile size share one tile
call (gathered from S by per-row offsets), so a step makes one call per distinct tile size.
"""

import copy
import math

import torch

from lcsm_compile import schedule
from lcsm_compile.errors import DeviceError, DTypeError, LcsmError, MaxLenExceeded, ShapeError, check_tensor
from lcsm_compile.kernels import reference as torch_kernels
from lcsm_compile.kernels.registry import KERNELS, block_rows, kernel_for
from lcsm_compile.kernels.triton_common import triton_usable
from lcsm_compile.tuning import crossover_for

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare_filters(h, skip, max_len, dtype):
    """Filters [C, max_len] in `dtype`: cut or zero-padded to max_len, the skip D folded into lag 0."""
    h = h.detach().to(dtype)[:, :max_len]
    if h.shape[1] < max_len:
        h = torch.nn.functional.pad(h, (0, max_len - h.shape[1]))
    if skip is not None:
        check_tensor("skip", skip, shape=(h.shape[0],))
        h = h.clone()
        h[:, 0] += skip.detach().to(dtype)
    return h.contiguous()


class OnlineConv:
    """A bank of C causal long convolutions decoded one position at a time.

    h: filters [C, Lh] (lag axis last). skip: optional [C] lag-0 term D (y += D * x).
    max_len: positions the state holds (default Lh; a shorter filter is zero-padded).
    crossover: largest tile size computed directly (default: the tuned value for the device).
    kernels: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    Leading batch dims of the inputs are fixed by the first prefill/step; filters are shared by
    every batch row, never copied per row.
    """

    # what sessions may ask of this bank (Decoder.can): rows at their own positions (prefill(rows=),
    # release), several positions at once (extend), red cells a captured graph replays (graph_safe)
    capabilities = frozenset({"rows", "extend", "graph_safe"})

    def __init__(self, h, skip=None, *, max_len=None, crossover=None, kernels="auto"):
        if not isinstance(h, torch.Tensor) or h.dim() != 2:
            raise ShapeError(f"h: expected a filter tensor of shape [C, Lh], got {_describe(h)}")
        if not h.is_floating_point() or h.is_complex():
            raise DTypeError(f"h: expected a real floating dtype, got {h.dtype}")
        if kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"kernels: expected 'auto', 'torch' or 'triton', got {kernels!r}")
        C, Lh = h.shape
        self.max_len = Lh if max_len is None else int(max_len)
        if self.max_len < 1:
            raise ValueError(f"max_len: expected >= 1, got {self.max_len}")
        self.channels = C
        self.device = h.device
        self.dtype = state_dtype_for(h.dtype)
        self.h = prepare_filters(h, skip, self.max_len, self.dtype)
        self.h0 = self.h[:, 0].contiguous()
        self.use_triton = kernels == "triton" or (kernels == "auto" and self.device.type == "cuda" and triton_usable(self.device))
        if self.use_triton:  # imported only here: importing triton is slow and CPU users never need it
            self._update, self._direct = KERNELS["update"].launcher(), KERNELS["direct_tile"].launcher()
        self.crossover = crossover_for(self.device) if crossover is None else int(crossover)

        # Direct tiles run on the time-major block, FFT tiles on the channel-major state
        # (kernels.registry.kernel_for decides). Tile operators for every size a decode can use:
        # Toeplitz blocks for direct tiles (the Triton kernel gathers lags itself), spectra of
        # h[:, :2U] for FFT tiles.
        self.block = block_rows(self.crossover)
        self.toeplitz, self.spectra = {}, {}
        for U in schedule.tile_sizes(0, self.max_len):
            if kernel_for(U, self.crossover) == "fft_tile":
                self.spectra[U] = torch_kernels.tile_spectrum(self.h, U)
            elif not self.use_triton:
                self.toeplitz[U] = torch_kernels.toeplitz(self.h, U).contiguous()

        self._unbind()

    # -- state -------------------------------------------------------------------------------
    def _bind(self, batch_shape, io_dtype):
        """Allocate the state on first use; afterwards check that inputs keep the same layout."""
        if self.batch_shape is None:
            if io_dtype not in (self.dtype,) + (_LOW_PRECISION if self.dtype == torch.float32 else ()):
                allowed = [self.dtype] + (list(_LOW_PRECISION) if self.dtype == torch.float32 else [])
                raise DTypeError(f"x: expected dtype in {allowed} for filters accumulating in {self.dtype}, got {io_dtype}")
            self.batch_shape, self.io_dtype = tuple(batch_shape), io_dtype
            n = math.prod(self.batch_shape)
            self.S = torch.zeros(n, self.channels, self.max_len, dtype=self.dtype, device=self.device)
            self.Xb = torch.zeros(self.block, n, self.channels, dtype=self.dtype, device=self.device)
            self.Ab = torch.zeros_like(self.Xb)
            self._tiles, self._rows_by_slice = self._tile_views(), {}
        elif tuple(batch_shape) != self.batch_shape:
            raise ShapeError(f"x: expected batch dims {self.batch_shape} (fixed by the first call), got {tuple(batch_shape)}")
        elif io_dtype != self.io_dtype:
            raise DTypeError(f"x: expected dtype {self.io_dtype} (fixed by the first call), got {io_dtype}")

    def _tile_views(self):
        """Per block row r, the views of the direct tile that follows its red cell, built once
        (indexing costs as much as a small op): a row's tile size is fixed, the lowest set bit of
        r + 1. None where an FFT tile follows, or on the Triton path."""
        views = []
        for r in range(self.block):
            U = (r + 1) & -(r + 1)
            T = self.toeplitz.get(U) if r + 1 < self.block else None
            views.append(None if T is None else torch_kernels.direct_tile_views(self.Xb, self.Ab, T, r + 1 - U, r + 1, r + 1 + U))
        return views

    def _row_views(self, channels):
        """(per block row: its input and accumulator rows [N, width]; h0) of the channel slice
        `channels` (None: all), built on first use: a bank shared by several convolutions gets
        each one's red cells on its own views."""
        key = None if channels is None else (channels.start, channels.stop, channels.step)
        views = self._rows_by_slice.get(key)
        if views is None:
            sl = slice(None) if channels is None else channels
            rows = tuple(zip(self.Xb[:, :, sl].unbind(0), self.Ab[:, :, sl].unbind(0)))
            views = self._rows_by_slice[key] = (rows, self.h0 if channels is None else self.h0[sl])
        return views

    def _check_input(self, x, name, time_axis, width):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.device != self.device:
            raise DeviceError(f"{name}: expected device {self.device} (where the filters live), got {x.device}")
        if not x.is_floating_point():
            raise DTypeError(f"{name}: expected a floating dtype, got {x.dtype}")
        cdim = -2 if time_axis else -1
        if x.dim() < (2 if time_axis else 1) or x.shape[cdim] != width:
            want = "[..., C, P]" if time_axis else "[..., C]"
            raise ShapeError(f"{name}: expected shape {want} with C = {width}, got {tuple(x.shape)}")

    def _unbind(self):
        """No state yet: the first prefill/step fixes the batch dims and IO dtype and allocates it."""
        self.batch_shape = self.io_dtype = None
        self.S = self.Xb = self.Ab = self._tiles = self._rows_by_slice = None
        self.reset()

    def bind(self, rows, io_dtype=None):
        """Allocate the state for `rows` rows before any prefill (sessions whose rows are filled one
        by one with prefill(..., rows=)); io_dtype defaults to the state dtype."""
        self._bind((int(rows),), self.dtype if io_dtype is None else io_dtype)

    def fork(self):
        """A new engine sharing these filters and tile operators (never copied), with fresh state."""
        other = copy.copy(self)
        other._unbind()
        return other

    def reset(self):
        """Forget every input; keeps the allocated state and the batch layout."""
        if self.S is not None:
            for state in (self.S, self.Xb, self.Ab):
                state.zero_()
        self.position = 0
        self.prefill_len = 0
        self._block_start = -1  # first position of the block loaded into Xb/Ab
        # rows at their own positions (None while every row shares `position`): [N] int64 each
        self.row_position = self.row_prefill = self.live = None
        self._row_over = None  # rows: the first live row whose next position is max_len (found on the host)
        self.row = None  # graph-safe mode: the block row of the next red cell, on the device (see graph_safe)
        self._filling = None  # (rows, P) of the row prefill in progress: its other channel slices may follow

    def memory_breakdown(self) -> dict:
        """Bytes held per part: filters (time domain, for the prefill and direct tiles), Toeplitz
        blocks (direct tiles), spectra (FFT tiles), and once bound the state (inputs of decoded
        positions and accumulators of positions to come, in one buffer) and the time-major block
        (block_rows(crossover) positions, as inputs and accumulators)."""
        size = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        parts = {
            "filters": size(self.h, self.h0),
            "toeplitz": size(*self.toeplitz.values()),
            "spectra": size(*self.spectra.values()),
            "state": 0,
            "block": 0,
        }
        if self.S is not None:
            parts.update(state=size(self.S), block=size(self.Xb, self.Ab))
        return parts

    def memory_bytes(self) -> int:
        """Bytes held: the sum of memory_breakdown()."""
        return sum(self.memory_breakdown().values())

    # -- decoding ----------------------------------------------------------------------------
    def prefill(self, x, channels=None, rows=None):
        """Ingest a prompt x [..., C, P] at once; returns its outputs [..., C, P].

        One FFT convolution gives both the prompt's outputs and its contributions to every
        future output, which go into the accumulators; stepping then tiles from position P.
        With `channels` (a slice), x holds only those channels; a bank shared by several
        convolutions prefills each one's slice with the same P.
        With `rows` (int64 indices into the N rows of a bound state, see bind), x [n, C, P] is the
        prompt of those free rows only: they start at their own position 0 and P, and the other
        rows keep their state and positions untouched.
        """
        if rows is not None:
            return self._prefill_rows(x, channels, rows)
        sl = slice(None) if channels is None else channels
        width = len(range(self.channels)[sl])
        self._check_input(x, "x", time_axis=True, width=width)
        P = x.shape[-1]
        more = channels is not None and self.position == self.prefill_len == P  # another slice, same prompt
        if self.row_position is not None or self.position != 0 and not more:
            raise LcsmError(f"prefill: expected a fresh state (position 0), at position {self.position}; call reset() first")
        if P > self.max_len:
            raise MaxLenExceeded(f"prefill: prompt of {P} positions exceeds max_len = {self.max_len}")
        self._bind(x.shape[:-2], x.dtype)
        if P == 0:
            return x.clone()
        xs, full = self._prompt_conv(x, sl, width)
        self.S[:, sl, :P] = xs  # inputs of the prompt (no tile reads them: the FFT above covered them)
        self.S[:, sl, P:] = full[..., P:]  # accumulators of every position to come
        self.position = self.prefill_len = P
        return full[..., :P].to(x.dtype).reshape(x.shape)

    def _prompt_conv(self, x, sl, width):
        """(prompt inputs [n, width, P] in the state dtype, their convolution [n, width, max_len])."""
        P = x.shape[-1]
        xs = x.reshape(-1, width, P).to(self.dtype)
        bad = ~torch.isfinite(xs)
        has_bad = bool(bad.any())
        if has_bad:  # an FFT would smear a NaN over the past too; mask it and restore causally below
            xs = xs.masked_fill(bad, 0.0)
        full = torch_kernels.fft_conv(self.h[sl], xs, self.max_len)
        if has_bad:  # every output at or after the first non-finite input is NaN, as in the reference
            first = torch.where(bad.any(-1), bad.int().argmax(-1), self.max_len)
            after = torch.arange(self.max_len, device=self.device) >= first[..., None]
            full = full.masked_fill(after, float("nan"))
            xs = x.reshape(-1, width, P).to(self.dtype)
        return xs, full

    # -- continuing with known inputs ----------------------------------------------------------
    def extend(self, x, channels=None, rows=None, start=None):
        """Continue with k known inputs x [..., C, k] at the next k positions; returns their outputs
        [..., C, k], those of k red cells and advances (up to rounding), and leaves the state those
        steps would leave. The k steps' tiles read only known inputs, so they run batched: one
        call per tile size (O(k log^2 k) work plus the tiles that reach back into the past), with
        the outputs read once every tile landed.

        A fresh state extends from position 0 (a prompt fed in pieces: its tiles, not one FFT of
        max_len). With `channels` (a slice) x holds those channels: a bank shared by several
        convolutions extends each one's slice from the same `start` (default: the current
        position), and the position is start + k from the first slice on. With `rows` (int64
        indices of live rows at their own positions) x [n, C, k] continues those rows only."""
        sl = slice(None) if channels is None else channels
        width = len(range(self.channels)[sl])
        self._check_input(x, "x", time_axis=True, width=width)
        k = x.shape[-1]
        if rows is not None:
            return self._extend_rows(x, sl, width, rows, start)
        t0 = self.position if start is None else int(start)
        if self.row_position is not None:
            raise LcsmError("extend: the rows are at their own positions; pass rows=")
        if self.position not in (t0, t0 + k) or t0 < self.prefill_len:
            raise LcsmError(f"extend: start {t0} is not the position {self.position} of this state")
        if t0 + k > self.max_len:
            raise MaxLenExceeded(f"extend: positions {t0} .. {t0 + k - 1} exceed max_len = {self.max_len}")
        self._bind(x.shape[:-2], x.dtype)
        self._flush_block()
        self.row = None  # graph-safe red cells load their block again (graph_safe)
        xs = x.reshape(-1, width, k).to(self.dtype)
        y = self._extend_on(self.S[:, sl], xs, t0, self.prefill_len, sl)
        self.position = t0 + k
        return y.to(x.dtype).reshape(x.shape)

    def _extend_rows(self, x, sl, width, rows, start):
        rows = self._row_input(x, width, rows)
        k = x.shape[-1]
        xs = x.reshape(-1, width, k).to(self.dtype)
        if not bool(self.live[rows].all()):
            raise LcsmError(f"extend: rows {rows[~self.live[rows]].tolist()} hold no sequence; prefill them first")
        self._filling = None
        y = torch.empty_like(xs)
        for j, r in enumerate(rows.tolist()):
            t0 = int(self.row_position[r]) if start is None else int(start)
            if t0 + k > self.max_len:
                raise MaxLenExceeded(f"extend: row {r}'s positions {t0} .. {t0 + k - 1} exceed max_len = {self.max_len}")
            y[j] = self._extend_on(self.S[r : r + 1, sl], xs[j : j + 1], t0, int(self.row_prefill[r]), sl)[0]
            self.row_position[r] = t0 + k
        self._find_row_over()
        return y.to(x.dtype).reshape(x.shape)

    def _extend_on(self, S, xs, t0, prefill_len, sl):
        """The k steps from t0 on S [n, w, max_len] (inputs before t0, accumulators from t0): inputs
        written, the tiles of steps i = t0 - prefill_len + 1 ... grouped by size, outputs returned.
        Tile outputs go straight into S past the window and into its accumulators inside it; the
        transforms run in channel chunks (kernels.reference.channel_chunks), so the temporaries stay
        small whatever the tile size."""
        k, L = xs.shape[-1], self.max_len
        acc = S[..., t0 : t0 + k].clone()  # what earlier tiles (and the prefill) left for these positions
        S[..., t0 : t0 + k] = xs
        first = t0 - prefill_len + 1  # steps first .. first + k - 1; step i runs the tile of size i & -i
        last_t = min(t0 + k - 1, L - 2)  # the last position whose tile has an output
        for U in (1 << b for b in range((first + k - 1).bit_length())):
            i0 = _multiple_in(U, first, first + k)
            if i0 is None:
                continue
            ends = prefill_len - 1 + torch.arange(i0, first + k, 2 * U, device=self.device)  # the tiles' last inputs
            ends = ends[ends <= last_t]
            if ends.numel() == 0:
                continue
            lag = torch.arange(U, device=self.device)
            reads, at = ends[:, None] - U + 1 + lag, ends[:, None] + 1 + lag  # [tiles, U]
            inside, beyond = at < t0 + k, (at >= t0 + k) & (at < L)
            tiles = S[:, None, :, :1].expand(-1, ends.numel(), -1, -1)  # the shape of a batch of tiles, no copy
            for c in torch_kernels.channel_chunks(tiles, 2 * U):
                X = S[:, c][..., reads].transpose(-3, -2)  # [n, tiles, wc, U]
                out = self._tile_product(X, U, sl, c).transpose(-3, -2)  # [n, wc, tiles, U]: outputs at `at`
                acc[:, c].index_add_(-1, (at - t0)[inside], out[..., inside])
                S[:, c].index_add_(-1, at[beyond], out[..., beyond])
        return acc + self.h0[sl, None] * xs

    def _tile_product(self, X, U, sl, c):
        """A batch of gray tiles: inputs X [..., wc, U] of the channels c of the slice sl -> their U outputs."""
        if kernel_for(U, self.crossover) == "fft_tile":
            return torch_kernels.fft_middle(X, self.spectra[U][sl][c], U)
        return torch.einsum("oiw,...wi->...wo", self._toeplitz(U)[..., sl][..., c], X)

    def _toeplitz(self, U):
        """The direct tile's Toeplitz block [U(out), U(in), C]; the Triton path keeps none: built once, on first use."""
        T = self.toeplitz.get(U)
        if T is None:
            T = self.toeplitz[U] = torch_kernels.toeplitz(self.h, U).contiguous()
        return T

    def _flush_block(self):
        """Put the time-major block back into S (its inputs over the consumed accumulators, its
        accumulators over the stale ones): S alone holds the state until the next block load."""
        t, b0 = self.position, self._block_start
        if b0 >= 0 and b0 <= t < b0 + self.block:  # mid-block: the block holds the live values
            nb = min(self.block, self.max_len - b0)
            self.S[..., b0:t] = self.Xb[: t - b0].permute(1, 2, 0)
            self.S[..., t : b0 + nb] = self.Ab[t - b0 : nb].permute(1, 2, 0)
        self._block_start = -1

    # -- rows at their own positions ----------------------------------------------------------
    def _rows_mode(self):
        """Leave the shared-position mode: the block back into S (_flush_block), then every row
        gets the shared position. From here on every row steps on S at its own position."""
        if self.row_position is not None:
            return
        if self.S is None:
            raise LcsmError("rows: the state is not allocated; call bind(rows) or prefill first")
        self._flush_block()
        self.row = None  # rows are graph-safe by their device positions
        n = self.S.shape[0]
        started = self.position > 0 or self.prefill_len > 0
        self.row_position = torch.full((n,), self.position, dtype=torch.long, device=self.device)
        self.row_prefill = torch.full((n,), self.prefill_len, dtype=torch.long, device=self.device)
        self.live = torch.full((n,), started, dtype=torch.bool, device=self.device)
        self._channel_index = torch.arange(self.channels, device=self.device)

    def _prefill_rows(self, x, channels, rows):
        sl = slice(None) if channels is None else channels
        width = len(range(self.channels)[sl])
        self._check_input(x, "x", time_axis=True, width=width)
        rows = self._row_input(x, width, rows)
        P = x.shape[-1]
        if not 1 <= P <= self.max_len:
            raise MaxLenExceeded(f"prefill: prompt of {P} positions: expected 1 .. max_len = {self.max_len}")
        key = (tuple(rows.tolist()), P)
        if self._filling != key and bool(self.live[rows].any()):
            busy = rows[self.live[rows]].tolist()
            raise LcsmError(f"prefill: rows {busy} hold a sequence; release() them first")
        xs, full = self._prompt_conv(x, sl, width)
        self.S[rows, sl, :P] = xs
        self.S[rows, sl, P:] = full[..., P:]
        self.row_position[rows], self.row_prefill[rows], self.live[rows] = P, P, True
        self._filling = key
        self._find_row_over()
        return full[..., :P].to(x.dtype).reshape(x.shape)

    def _row_input(self, x, width, rows):
        """A call on some rows (prefill or extend of x [n, width, T]): the state in rows mode, and
        `rows` as int64 indices, one per row of x, in the dtype the state was bound to."""
        self._rows_mode()
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        if x.reshape(-1, width, x.shape[-1]).shape[0] != rows.numel():
            raise ShapeError(f"x: expected {rows.numel()} rows (one per index in rows), got shape {tuple(x.shape)}")
        if x.dtype != self.io_dtype:
            raise DTypeError(f"x: expected dtype {self.io_dtype} (fixed by the first call), got {x.dtype}")
        return rows

    def release(self, rows):
        """Free rows (their sequences are done): they no longer step, and a row prefill may refill them."""
        self._rows_mode()
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        self.live[rows] = False
        self.row_position[rows] = self.row_prefill[rows] = 0
        self._find_row_over()

    def _find_row_over(self):
        """Host side (after a row prefill, release or advance, never in a red cell, which a captured
        step replays without Python): the first live row at max_len."""
        over = (self.live & (self.row_position >= self.max_len)).nonzero()
        self._row_over = int(over[0]) if over.numel() else None

    def _red_cell_rows(self, x, sl, width):
        """The red cell of every row at its own position, on S: y = A_{t_r} + h0 * x, x stored at t_r."""
        self._filling = None
        if self._row_over is not None:
            raise MaxLenExceeded(f"step: row {self._row_over} is at position {self.max_len}, past max_len = {self.max_len}")
        t = self.row_position
        n = t.numel()
        S = self.S[:, sl]
        at = t.view(n, 1, 1).expand(n, width, 1)
        xs = x.reshape(n, width).to(self.dtype)
        y = torch.addcmul(S.gather(2, at).squeeze(2), xs, self.h0[sl])
        S.scatter_(2, at, xs.unsqueeze(2))  # free rows write their (ignored) input at position 0
        return y.to(x.dtype).reshape(x.shape)

    def _advance_rows(self):
        """One tile call per distinct tile size among the live rows, then every live row moves on."""
        t, live = self.row_position, self.live
        going = live & (t + 1 < self.max_len)
        i = t - self.row_prefill + 1
        sizes = i & -i
        for U in torch.unique(sizes[going]).tolist():
            self._tile_rows((going & (sizes == U)).nonzero().squeeze(1), U)
        t += live
        self._find_row_over()

    def _tile_rows(self, rows, U):
        """The gray tile of size U for `rows`, each at its own position t_r: inputs [t_r-U+1, t_r]
        -> outputs [t_r+1, t_r+U] (cut at max_len), gathered from and added into S."""
        lag = torch.arange(U, device=self.device)
        t = self.row_position[rows]
        r, c = rows[:, None, None], self._channel_index[None, :, None]
        X = self.S[r, c, (t + 1 - U)[:, None, None] + lag]  # [n, C, U]
        if kernel_for(U, self.crossover) == "fft_tile":
            out = torch_kernels.fft_middle(X, self.spectra[U], U)
        else:
            # products then a sum over inputs, not a batched matmul: a row's arithmetic must not
            # depend on which other rows share the call (a matmul's blocking follows the batch)
            out = (self._toeplitz(U).permute(2, 0, 1) * X[:, :, None, :]).sum(-1)
        at = (t + 1)[:, None, None] + lag  # [n, 1, U]
        out = out * (at < self.max_len)  # positions past max_len get nothing: their index is clamped
        self.S.index_put_((r, c, at.clamp(max=self.max_len - 1)), out, accumulate=True)

    def step(self, x):
        """Take the input at the next position, x [..., C]; returns that position's output [..., C]."""
        y = self.red_cell(x)
        self.advance()
        return y

    def red_cell(self, x, channels=None):
        """The sequential part of a step: y_t = A_t + h0 * x_t for x [..., C] (or the channels of
        the slice `channels`). Every channel must get its red cell before advance()."""
        t = self.position
        if t >= self.max_len and self.row_position is None:
            raise MaxLenExceeded(f"step: position {t} is past max_len = {self.max_len}; reset() or build with a larger max_len")
        sl = slice(None) if channels is None else channels
        width = self.channels if channels is None else len(range(self.channels)[sl])
        if self.S is None or x.shape[:-1] != self.batch_shape or x.dtype != self.io_dtype or x.device != self.device:
            self._check_input(x, "x", time_axis=False, width=width)
            self._bind(x.shape[:-1], x.dtype)
        elif x.shape[-1] != width:
            raise ShapeError(f"x: expected shape [..., C] with C = {width}, got {tuple(x.shape)}")
        if self.row_position is not None:
            return self._red_cell_rows(x, sl, width)
        if self.row is not None:  # graph-safe: the row is a device tensor, the block loaded by advance
            y = torch.empty(x.shape, dtype=x.dtype, device=self.device)
            torch_kernels.update_at(self.Xb[:, :, sl], self.Ab[:, :, sl], x.reshape(-1, width), self.h0[sl], self.row,
                                    y.view(-1, width))
            return y
        r = (t - self.prefill_len) % self.block  # this position's row in the block
        if self._block_start != t - r:  # entering a new block: bring in what the prefill and FFT tiles accumulated for it
            self._load_block(t - r)
        if not self.use_triton:  # the update kernel, on this row's prebuilt views
            rows, h0 = self._row_views(channels)
            xr, ar = rows[r]
            nd = x.dim()  # the reshapes only where needed: each costs as much as the op itself
            y = torch_kernels.update_row(xr, ar, x if nd <= 2 else x.reshape(xr.shape), h0)  # [C] broadcasts into [1, C]
            y = y if y.dtype == x.dtype else y.to(x.dtype)
            return y if nd == 2 else y[0] if nd == 1 else y.view(x.shape)
        y = torch.empty(x.shape, dtype=x.dtype, device=self.device)  # the Triton update kernel
        self._update(self.Xb[:, :, sl], self.Ab[:, :, sl], x.reshape(-1, width), self.h0[sl], r, y.view(-1, width))
        return y

    def advance(self):
        """Finish the position once every red cell ran: one tile call covering every channel and row
        (rows at their own positions: one per distinct tile size)."""
        if self.row_position is not None:
            return self._advance_rows()
        t = self.position
        i = t - self.prefill_len + 1  # steps taken since the prefill, this one included
        r, b0 = (i - 1) % self.block, self._block_start
        U = schedule.tile_size(i)  # the gray tile of schedule.tile_after, inlined: this is the hot path
        if r == self.block - 1 or t + 1 == self.max_len:  # block complete: its inputs replace its consumed accumulators
            self.S[..., b0 : t + 1] = self.Xb[: r + 1].permute(1, 2, 0)
        if t + 1 < self.max_len:
            out_stop = min(t + 1 + U, self.max_len)
            if U in self.spectra:  # an FFT tile (kernel_for, decided at build time)
                torch_kernels.fft_tile(self.S, self.S, self.spectra[U], t + 1 - U, t + 1, out_stop, U)
            elif self.use_triton:
                self._direct(self.Xb, self.Ab, self.h, r + 1 - U, r + 1, out_stop - b0, U)
            elif out_stop - b0 == r + 1 + U:  # the whole tile: its prebuilt views
                torch_kernels.run_direct_tile(self._tiles[r])
            else:  # cut at max_len
                torch_kernels.direct_tile_from_toeplitz(self.Xb, self.Ab, self.toeplitz[U], r + 1 - U, r + 1, out_stop - b0, U)
        self.position = t + 1
        if self.row is not None:
            self._next_row()

    def _load_block(self, b0):
        """Bring into Ab what the prefill and the FFT tiles accumulated for the block starting at b0
        (and into Xb the inputs of its positions already taken: an extend may end mid-block)."""
        nb = min(self.block, self.max_len - b0)
        # its rows first (nb contiguous positions per channel), then the transpose within the cache:
        # a transposing copy straight from S strides across every channel's row, which is much slower
        self.Ab[:nb].copy_(self.S[..., b0 : b0 + nb].contiguous().permute(2, 0, 1))
        if self.position > b0:
            self.Xb[: self.position - b0].copy_(self.S[..., b0 : self.position].contiguous().permute(2, 0, 1))
        self._block_start = b0

    # -- graph-safe red cells (lcsm_compile.runtime.graphs) -------------------------------------------------
    def graph_safe(self):
        """From now on a red cell issues the same kernels at every position: its block row is a
        device tensor and advance() (host side) loads each block before its first red cell. A
        captured red cell (a CUDA graph) then serves every step; advance stays outside it. Rows at
        their own positions are graph-safe already (their positions are a device tensor)."""
        if self.row is None and self.row_position is None:
            self.row = torch.zeros(1, dtype=torch.long, device=self.device)
            self._next_row()

    def _next_row(self):
        t = self.position
        r = (t - self.prefill_len) % self.block
        if t < self.max_len and self._block_start != t - r:
            self._load_block(t - r)
        self.row.fill_(r)


def _multiple_in(U, lo, hi):
    """The first step i in [lo, hi) whose tile has size U (i an odd multiple of U), or None."""
    i = (lo + U - 1) // U * U
    i += U if (i // U) % 2 == 0 else 0
    return i if i < hi else None


def _describe(x):
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__

