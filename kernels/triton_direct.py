"""Triton direct tile: the gray tile of size U as a U x U Toeplitz product, gathered from the filter.

A[out_start + j] += sum_{k<U} h[:, U + j - k] * X[in_start + k]   for j < out_stop - out_start <= U,
with out_start = in_start + U (lags 1 .. 2U-1; lags past h's length count as zero). Same semantics
as lcsm_compile.kernels.reference.direct_tile, without a precomputed Toeplitz block.

Layout (Triton-tutorial order): kernel, wrapper, correctness check, benchmark.
Run the check with `python -m lcsm_compile.kernels.triton_direct` (on a machine without CUDA it
switches on the Triton interpreter itself).
"""

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from lcsm_compile.errors import ShapeError
from lcsm_compile.kernels import triton_common as common

triton = common.require_triton()  # a clear error naming the [gpu] extra when triton is not installed
import triton.language as tl  # noqa: E402


# -- kernel -------------------------------------------------------------------------------------
# Positions are runtime scalars excluded from specialisation (Triton would otherwise compile extra
# variants for values equal to 1 or divisible by 16): one compiled kernel per (U, BLOCK_C, dtype).
@triton.jit(do_not_specialize=["in_start", "out_start", "m"])
def _direct_tile_kernel(
    X,  # [B, N, C] state dtype, contiguous (time-major block)
    A,  # [B, N, C] state dtype, contiguous
    h,  # [C, Lh] state dtype, lag axis contiguous
    in_start,
    out_start,
    m,  # outputs to write: out_stop - out_start, 1 <= m <= U
    N,
    C,
    Lh,
    stride_hc,
    U: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, U)  # output offset within the tile
    cmask = c < C
    out_mask = (j < m)[:, None] & cmask[None, :]
    acc_ty = A.dtype.element_ty  # float32 or float64
    row = N * C  # elements per position; int64 offsets below since B * N * C may pass 2**31
    col = n * C + c

    acc = tl.zeros([U, BLOCK_C], dtype=acc_ty)
    for k in range(U):  # input in_start + k feeds output j through lag U + j - k
        xk = tl.load(X + (in_start + k).to(tl.int64) * row + col, mask=cmask, other=0.0).to(acc_ty)
        lag = U + j - k
        hk = tl.load(
            h + c[None, :] * stride_hc + lag[:, None],
            mask=(lag < Lh)[:, None] & out_mask,  # lags past the filter are zero, as in the reference
            other=0.0,
        ).to(acc_ty)
        acc += hk * xk[None, :]  # 0 * NaN stays NaN: a NaN input poisons its outputs as in torch

    offs = (out_start + j).to(tl.int64)[:, None] * row + col[None, :]
    a = tl.load(A + offs, mask=out_mask, other=0.0)
    tl.store(A + offs, a + acc, mask=out_mask)


# -- wrapper ------------------------------------------------------------------------------------
def direct_tile(X, A, h, in_start, out_start, out_stop, U, *, block_c=None):
    """Direct tile of size U on the time-major block (see the module docstring).

    X, A: [B, N, C] float32/float64 contiguous; h: [C, Lh] same dtype, lag axis contiguous.
    in_start, out_start, out_stop: block rows (runtime scalars); U: a power of two (compile-time).
    block_c: channel block (a power of two); default common.block_c_direct(C, U).
    """
    common.check_state("X", X)
    if X.dim() != 3:
        raise ShapeError(f"X: expected shape [B, N, C], got {tuple(X.shape)}")
    B, N, C = X.shape
    common.check_state("A", A, shape=(B, N, C))
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h: expected a torch.Tensor, got {type(h).__name__}")
    if h.dim() != 2 or h.shape[0] != C:
        raise ShapeError(f"h: expected shape [C, Lh] with C = {C}, got {tuple(h.shape)}")
    if h.stride(1) != 1 and h.shape[1] > 1:
        raise ValueError(f"h: expected the lag axis contiguous (stride 1), got strides {h.stride()}")
    common.check_same([("X", X), ("A", A), ("h", h)])
    common.check_device(X)
    U, in_start, out_start, out_stop = int(U), int(in_start), int(out_start), int(out_stop)
    if U < 1 or U & (U - 1):
        raise ValueError(f"U: expected a power of two >= 1, got {U}")
    if out_start != in_start + U:
        raise ValueError(f"out_start: expected in_start + U = {in_start + U}, got {out_start}")
    m = out_stop - out_start
    if not 0 <= m <= U:
        raise ValueError(f"out_stop: expected in [out_start, out_start + U] = [{out_start}, {out_start + U}], got {out_stop}")
    if in_start < 0 or out_stop > B:
        raise IndexError(f"tile rows [{in_start}, {out_stop}) fall outside the block of {B} rows")
    BLOCK_C = common.block_c_direct(C, U) if block_c is None else common.check_block_c(block_c)
    if m == 0 or N == 0 or C == 0:
        return A
    common.record_launch("direct_tile", {"U": U, "BLOCK_C": BLOCK_C}, X.dtype)
    grid = (N, triton.cdiv(C, BLOCK_C))
    _direct_tile_kernel[grid](X, A, h, in_start, out_start, m, N, C, h.shape[1], h.stride(0), U=U, BLOCK_C=BLOCK_C)
    return A


# -- correctness check --------------------------------------------------------------------------

def _check(device=None, N=3, C=37, sizes=(1, 2, 4, 8, 16, 32), verbose=True):
    """Compare with the torch reference (full and partial tiles, short filters) on fresh random
    inputs; returns the worst relative error per state dtype, raises AssertionError past tolerance."""
    from lcsm_compile.kernels import reference

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}
    results = {}
    for sd in common.STATE_DTYPES:
        worst = 0.0
        for U in sizes:
            B = 2 * U + 3
            for m, Lh in ((U, 2 * U + 5), (max(1, U // 2 + 1), 2 * U), (U, U + 1)):
                X = torch.randn(B, N, C, dtype=sd, device=device)
                A = torch.randn(B, N, C, dtype=sd, device=device)
                h = torch.randn(C, Lh, dtype=sd, device=device)
                in_start = int(torch.randint(0, B - 2 * U + 1, ()).item())
                args = (in_start, in_start + U, in_start + U + m, U)
                A0, Ar = A.clone(), A.clone()
                reference.direct_tile(X, Ar, h, *args)
                direct_tile(X, A, h, *args)
                err = common.rel_err(A - A0, Ar - A0)  # the tile's contribution: A's own size cannot hide an error
                worst = max(worst, err)
        results[str(sd)] = worst
        assert worst <= tol[sd], (sd, worst)
        if verbose:
            print(f"direct_tile state={sd} U in {sizes}: worst rel err {worst:.2e}")
    return results


# -- benchmark ----------------------------------------------------------------------------------
def _bench():
    from lcsm_compile.kernels import reference

    print(f"{'N':>4} {'C':>6} {'U':>4} {'triton us':>10} {'torch us':>10} {'ratio':>7}")
    for N in (1, 8):
        for C in (512, 2048, 8192):
            for U in (1, 4, 16, 64):
                X = torch.randn(2 * U, N, C, device="cuda")
                A, h = torch.randn_like(X), torch.randn(C, 2 * U, device="cuda")
                T = reference.toeplitz(h, U).contiguous()
                tt = triton.testing.do_bench(lambda: direct_tile(X, A, h, 0, U, 2 * U, U)) * 1e3
                tr = triton.testing.do_bench(lambda: reference.direct_tile_from_toeplitz(X, A, T, 0, U, 2 * U, U)) * 1e3
                print(f"{N:>4} {C:>6} {U:>4} {tt:>10.2f} {tr:>10.2f} {tr / tt:>7.2f}")


if __name__ == "__main__":
    _check()
    if torch.cuda.is_available():
        _bench()
