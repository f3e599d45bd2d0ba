"""Triton red cell: the per-position update of the online convolution, fused into one kernel.

At block row t: Xb[t] = x (cast to the state dtype), then y = Ab[t] + h0 * Xb[t], accumulated in
the state dtype and written in y's dtype. Same semantics as lcsm_compile.kernels.reference.update.

Layout (Triton-tutorial order): kernel, wrapper, correctness check, benchmark.
Run the check with `python -m lcsm_compile.kernels.triton_update` (on a machine without CUDA it
switches on the Triton interpreter itself).
"""

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from lcsm_compile.errors import DTypeError, ShapeError
from lcsm_compile.kernels import triton_common as common

triton = common.require_triton()  # a clear error naming the [gpu] extra when triton is not installed
import triton.language as tl  # noqa: E402


# -- kernel -------------------------------------------------------------------------------------
# t is a runtime scalar and excluded from specialisation: Triton would otherwise compile separate
# variants for t == 1 and for t divisible by 16, and the step must compile once for every t.
@triton.jit(do_not_specialize=["t"])
def _update_kernel(
    X,  # [B, N, C] state dtype (strided: the engine passes channel slices of its block)
    A,  # [B, N, C] state dtype
    x,  # [N, C] io dtype
    h0,  # [C] state dtype
    y,  # [N, C] io dtype
    t,  # block row
    C,
    stride_Xb, stride_Xn, stride_Xc,
    stride_Ab, stride_An, stride_Ac,
    stride_h,
    stride_xn, stride_xc,
    stride_yn, stride_yc,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < C
    acc_ty = X.dtype.element_ty  # float32 or float64: loads are cast before any arithmetic
    t64 = t.to(tl.int64)  # int64 offsets: B * N * C may pass 2**31

    xs = tl.load(x + n * stride_xn + c * stride_xc, mask=mask).to(acc_ty)
    tl.store(X + t64 * stride_Xb + n * stride_Xn + c * stride_Xc, xs, mask=mask)
    a = tl.load(A + t64 * stride_Ab + n * stride_An + c * stride_Ac, mask=mask).to(acc_ty)
    h = tl.load(h0 + c * stride_h, mask=mask).to(acc_ty)
    out = a + h * xs
    if y.dtype.element_ty.primitive_bitwidth < 32:
        out = out.to(tl.float32)  # float64 -> 16-bit through float32, as torch rounds (and the interpreter needs)
    tl.store(y + n * stride_yn + c * stride_yc, out.to(y.dtype.element_ty), mask=mask)


# -- wrapper ------------------------------------------------------------------------------------
def update(X, A, x, h0, t, y, *, block_c=None):
    """Red cell at block row t: X[t] = x; y = A[t] + h0 * X[t] (see the module docstring).

    X, A: [B, N, C] float32/float64; x, y: [N, C] any float dtype; h0: [C] state dtype. Any
    strides (channel slices of the state are fine) except broadcast axes in the written X and y.
    block_c: channel block (a power of two); default common.block_c_update(C).
    """
    common.check_state("X", X, contiguous=False)
    if X.dim() != 3:
        raise ShapeError(f"X: expected shape [B, N, C], got {tuple(X.shape)}")
    B, N, C = X.shape
    common.check_state("A", A, shape=(B, N, C), contiguous=False)
    common.check_state("h0", h0, shape=(C,), contiguous=False)
    for name, v in (("x", x), ("y", y)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
        if tuple(v.shape) != (N, C):
            raise ShapeError(f"{name}: expected shape ({N}, {C}) = [N, C] of the state, got {tuple(v.shape)}")
        if not v.is_floating_point():
            raise DTypeError(f"{name}: expected a floating dtype, got {v.dtype}")
    common.check_writable("X", X)
    common.check_writable("y", y)
    common.check_same([("X", X), ("A", A), ("h0", h0)])
    common.check_same([("X", X), ("x", x), ("y", y)], dtype=False)
    common.check_device(X)
    t = int(t)
    if not 0 <= t < B:
        raise IndexError(f"t: expected a block row in [0, {B}), got {t}")
    BLOCK_C = common.block_c_update(C) if block_c is None else common.check_block_c(block_c)
    if N == 0 or C == 0:
        return y
    common.record_launch("update", {"BLOCK_C": BLOCK_C}, X.dtype, y.dtype)
    grid = (N, triton.cdiv(C, BLOCK_C))
    _update_kernel[grid](
        X, A, x, h0, y, t, C, *X.stride(), *A.stride(), h0.stride(0), *x.stride(), *y.stride(), BLOCK_C=BLOCK_C
    )
    return y


# -- correctness check --------------------------------------------------------------------------

def _check(device=None, B=8, N=3, C=37, verbose=True):
    """Compare with the torch reference on fresh random inputs; returns the worst relative error
    per (state dtype, io dtype) and raises AssertionError past the tolerance."""
    from lcsm_compile.kernels import reference

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}
    results = {}
    for sd in common.STATE_DTYPES:
        for io in (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if sd == torch.float64 else ()):
            X = torch.randn(B, N, C, dtype=sd, device=device)
            A = torch.randn(B, N, C, dtype=sd, device=device)
            h0 = torch.randn(C, dtype=sd, device=device)
            x = torch.randn(N, C, device=device).to(io)
            t = int(torch.randint(0, B, ()).item())
            Xr, Ar, yr = X.clone(), A.clone(), torch.empty(N, C, dtype=io, device=device)
            reference.update(Xr, Ar, x, h0, t, yr)
            y = torch.empty(N, C, dtype=io, device=device)
            update(X, A, x, h0, t, y)
            err = max(common.rel_err(y, yr), common.rel_err(X, Xr))
            assert torch.equal(A, Ar), "update must not write the accumulators"
            results[(str(sd), str(io))] = err
            assert err <= tol[io], (sd, io, err)
            if verbose:
                print(f"update state={sd} io={io}: rel err {err:.2e}")
    return results


# -- benchmark ----------------------------------------------------------------------------------
def _bench():
    from lcsm_compile.kernels import reference

    print(f"{'N':>4} {'C':>6} {'triton us':>10} {'torch us':>10} {'ratio':>7}")
    for N in (1, 8):
        for C in (512, 2048, 8192):
            X = torch.randn(128, N, C, device="cuda")
            A, h0 = torch.randn_like(X), torch.randn(C, device="cuda")
            x, y = torch.randn(N, C, device="cuda", dtype=torch.bfloat16), torch.empty(N, C, device="cuda", dtype=torch.bfloat16)
            tt = triton.testing.do_bench(lambda: update(X, A, x, h0, 5, y)) * 1e3
            tr = triton.testing.do_bench(lambda: reference.update(X, A, x, h0, 5, y)) * 1e3
            print(f"{N:>4} {C:>6} {tt:>10.2f} {tr:>10.2f} {tr / tt:>7.2f}")


if __name__ == "__main__":
    _check()
    if torch.cuda.is_available():
        _bench()
