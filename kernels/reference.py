"""Torch tile kernels: the CPU path and the reference every Triton kernel is tested against.

The engine keeps two views of a bank of N rows x C channels (N = flattened batch rows):
- the block, time-major, holding the B positions being decoded now (B = 2 x the largest
  direct tile): Xb [B, N, C] inputs, Ab [B, N, C] accumulators. The red cell and the direct
  tiles touch only the block, one contiguous row per position, so they stay in cache;
- the state, channel-major: S [N, C, Lmax], the input of every position already decoded and the
  accumulated contributions to every position to come (a tile reads the past and writes the
  future, so one buffer holds both). FFT tiles read and write whole rows of it; a block is loaded
  from its accumulators on entry and its inputs flushed over them once per B positions.
Filters h [C, Lmax] (lag axis last) are shared by all N rows. A tile of size U adds the
contribution of inputs [in_start, in_start + U) to outputs [out_start, out_stop) with
out_start = in_start + U and out_stop <= out_start + U (lags 1..2U-1).
"""

import math

import torch
import torch.nn.functional as F


def update(Xb, Ab, x, h0, t, y):
    """Red cell at block row t: store x_t, then y_t = A_t + h0 * x_t (written into y, any float dtype).

    Xb, Ab: [B, N, C] state dtype; x: [N, C] (any float dtype); h0: [C] state dtype; y: [N, C].
    """
    same = y.dtype == Xb.dtype
    out = update_row(Xb[t], Ab[t], x, h0, out=y if same else None)
    if not same:
        y.copy_(out)


def update_row(xr, ar, x, h0, out=None):
    """update() on one block row's views xr, ar [N, C] (the engine builds them once per row):
    stores x (broadcast into the row), returns A + h0 * x in the state dtype (into `out` if given)."""
    xr.copy_(x)
    return torch.addcmul(ar, xr, h0, out=out) if out is not None else torch.addcmul(ar, xr, h0)


def update_at(Xb, Ab, x, h0, row, y):
    """update() at block row `row`, a device int64 tensor [1]: the same kernels at every row, so a
    captured step (a CUDA graph) serves every position."""
    Xb.index_copy_(0, row, x.to(Xb.dtype)[None])
    y.copy_(torch.addcmul(Ab.index_select(0, row)[0], Xb.index_select(0, row)[0], h0))


def toeplitz(h, U):
    """T[j, k, c] = h[c, U + j - k]: the U x U block mapping a tile's inputs to its outputs, channels last."""
    C, L = h.shape
    lags = U + torch.arange(U, device=h.device)[:, None] - torch.arange(U, device=h.device)[None, :]
    hp = h if L >= 2 * U else F.pad(h, (0, 2 * U - L))
    return hp.T[lags]


def tile_spectrum(h, U):
    """Spectrum of h[:, 0:2U] for a cyclic middle product of size 2U (lags 1..2U-1 never wrap)."""
    return torch.fft.rfft(h[:, : 2 * U], n=2 * U)


def direct_tile_views(Xb, Ab, T, in_start, out_start, out_stop):
    """A direct tile as views: (its output rows of Ab, ((Toeplitz column k, input row k) for each of
    its U inputs)). Indexing costs as much as a small op, so the engine builds these once per block
    row and reuses them at every block (run_direct_tile)."""
    U = T.shape[1]
    cols = T[: out_stop - out_start].unsqueeze(2).unbind(1)  # U columns [m, 1, C]
    return Ab[out_start:out_stop], tuple(zip(cols, Xb[in_start : in_start + U].unbind(0)))


def run_direct_tile(views):
    """out += T[:, k] * x_k for each input k: one fused multiply-add per input and no temporary,
    which beats one broadcast product and sum over a [U, U, N, C] temporary on CPU."""
    out, pairs = views
    for col, x in pairs:
        out.addcmul_(col, x)


def direct_tile_from_toeplitz(Xb, Ab, T, in_start, out_start, out_stop, U):
    """Direct tile on the time-major block with a precomputed Toeplitz block T [U, U, C]."""
    run_direct_tile(direct_tile_views(Xb, Ab, T, in_start, out_start, out_stop))


def direct_tile(Xb, Ab, h, in_start, out_start, out_stop, U):
    """Reference direct tile computed straight from the filter (no precomputed state)."""
    direct_tile_from_toeplitz(Xb, Ab, toeplitz(h, U), in_start, out_start, out_stop, U)


def fft_middle(x, spectrum, U):
    """The contribution of a tile's inputs x [..., C, U] to the U outputs after them: a cyclic
    convolution of size 2U with the precomputed spectrum [C, U+1], whose middle product is outputs
    [U, 2U) of the cyclic result."""
    f = torch.fft.rfft(x, n=2 * U)
    f *= spectrum
    return torch.fft.irfft(f, n=2 * U)[..., U:]


FFT_CHUNK = 1 << 20  # values in one channel chunk of a batch of transforms on CPU (4 MiB in fp32)


def channel_chunks(x, n):
    """Slices of x's channel dim (-2) for transforms of length n: on CPU, chunks of about FFT_CHUNK
    values, since a batch whose temporaries outgrow the caches runs much slower than the same work
    chunk by chunk; one slice elsewhere (a GPU wants the whole batch)."""
    C = x.shape[-2]
    if x.device.type != "cpu":
        return [slice(None)]
    step = max(1, FFT_CHUNK // (n * math.prod(x.shape[:-2])))
    return [slice(c, c + step) for c in range(0, C, step)]


def fft_tile(X, A, spectrum, in_start, out_start, out_stop, U):
    """FFT tile on the channel-major state (X and A may be one tensor: the ranges are disjoint)."""
    m = out_stop - out_start
    for c in channel_chunks(X, 2 * U):
        A[..., c, out_start:out_stop].add_(fft_middle(X[..., c, in_start : in_start + U], spectrum[c], U)[..., :m])


def fft_conv(h, x, length=None):
    """Causal convolution y[..., :length] of x [..., C, P] (zero after P) with filters h [C, >= length]:
    one FFT of a power-of-two size >= P + length - 1, so nothing wraps around. length: default P.
    Every prefill runs it, and it is the offline baseline (a finished sequence, not causal decoding)."""
    P = x.shape[-1]
    length = P if length is None else length
    n = 1 << max(0, (P + length - 2).bit_length())
    def conv(xs, hs):
        return torch.fft.irfft(torch.fft.rfft(xs, n=n) * torch.fft.rfft(hs, n=n), n=n)[..., :length]

    chunks = channel_chunks(x, n)
    if len(chunks) == 1:  # no copy into an output buffer
        return conv(x, h[:, :length])
    y = x.new_empty(*x.shape[:-1], length, dtype=torch.result_type(x, h))
    for c in chunks:
        y[..., c, :] = conv(x[..., c, :], h[c, :length])
    return y
