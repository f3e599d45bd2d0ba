"""Triton kernels (red cell, direct tile) against float64 references, on fresh random inputs.

Without CUDA the kernels run in the Triton interpreter, which must be switched on before the first
`import triton` (triton.jit reads TRITON_INTERPRET when it decorates a kernel). triton comes with
the [test] extra: a missing install fails this module instead of skipping 50 tests.

Tolerances. The red cell's result is checked element by element against the float64 value
A + h0 * x: within the rounding of the state arithmetic plus half a unit in the last place of the
IO dtype (one rounding to nearest). The interpreter stores bfloat16 by truncating the float32
value (it has no bfloat16 of its own): there the bound is one unit instead, and
test_interpreter_truncates_bfloat16 pins that behaviour so a fixed interpreter shows up. A kernel
that did its arithmetic in the IO dtype fails these bounds (the negative controls). The direct tile
is compared by relative error within about 3x of the error observed here (fp32 ~1.1e-7, fp64
~2.1e-16, largest at U = 32), and exactly on integer data where every operation is exact.
"""

import importlib.util
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if sys.platform != "linux":
    pytest.skip("triton ships Linux wheels only", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.fail("triton is not installed: the kernel tests need it (pip install -e '.[test]')", pytrace=False)

import triton  # noqa: E402

from lcsm_compile.errors import DeviceError, DTypeError, ShapeError  # noqa: E402
from lcsm_compile.kernels import reference  # noqa: E402
from lcsm_compile.kernels import triton_common as common  # noqa: E402
from lcsm_compile.kernels import triton_direct, triton_update  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not common.interpret_mode():
    pytest.fail("no CUDA and TRITON_INTERPRET is not 1: triton was imported before this module set it", pytrace=False)

TILE_TOL = {torch.float32: 3e-7, torch.float64: 6e-16}  # ~3x the largest relative error observed
C = 37  # not a multiple of any channel block: the channel mask is exercised


def rel_err(a, b):
    """||a - b|| / ||b||; the absolute error when b is exactly zero (a tile with every lag masked)."""
    a, b = a.double(), b.double()
    scale = b.norm()
    return ((a - b).norm() / (scale if scale > 0 else 1.0)).item()


def randn(*shape, dtype=torch.float32):
    """Standard normal values that use all of `dtype`'s bits (drawn in float64, then rounded)."""
    return torch.randn(*shape, device=DEVICE, dtype=torch.float64).to(dtype)


def ulp(v, dtype):
    """Spacing of `dtype` at |v| (the subnormal spacing below the smallest normal), as float64."""
    fi = torch.finfo(dtype)
    return fi.eps * torch.exp2(torch.floor(torch.log2(v.double().abs().clamp_min(fi.tiny))))


def truncates(io_dtype):
    """The interpreter stores bfloat16 by truncating float32 (see the module docstring)."""
    return io_dtype == torch.bfloat16 and DEVICE == "cpu"


def check_update(y, X, A, x, h0, t, nearest=None):
    """y against the float64 value A[t] + h0 * x of the red cell: every element within the state
    arithmetic's rounding plus one rounding into y's dtype (to nearest, or toward zero where the
    interpreter truncates). Raises AssertionError naming the worst element."""
    state, io = X.dtype, y.dtype
    nearest = not truncates(io) if nearest is None else nearest
    a, h, xs = A[t].double(), h0.double(), x.to(state).double()
    ideal = a + h * xs
    u = torch.finfo(state).eps / 2
    bound = 2 * u * (a.abs() + (h * xs).abs() + ideal.abs())  # two roundings in the state dtype
    if io != state:
        bound = bound + (0.5 if nearest else 1.0) * ulp(ideal.abs() + bound, io)
        if io.itemsize < 4 < state.itemsize:  # float64 -> float32 -> 16 bits: one more rounding
            bound = bound + 0.5 * ulp(ideal, torch.float32)
    excess = ((y.double() - ideal).abs() - bound) / ulp(ideal, io)
    worst = int(excess.argmax())
    assert excess.max() <= 0, f"{io} red cell off by {excess.flatten()[worst]:.2f} ulp beyond its bound at element {worst}"


def red_cell_inputs(state_dtype, io_dtype, B=6, N=3):
    X, A = randn(B, N, C, dtype=state_dtype), randn(B, N, C, dtype=state_dtype)
    return X, A, randn(N, C, dtype=io_dtype), randn(C, dtype=state_dtype), int(torch.randint(0, B, ()))


# -- red cell -----------------------------------------------------------------------------------
IO_CASES = [(torch.float32, io) for io in (torch.float32, torch.bfloat16, torch.float16)] + [
    (torch.float64, io) for io in (torch.float64, torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("state_dtype,io_dtype", IO_CASES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("block_c", [None, 16])
def test_update_matches_reference(state_dtype, io_dtype, N, block_c):
    X, A, x, h0, t = red_cell_inputs(state_dtype, io_dtype, N=N)
    Xr, Ar, yr = X.clone(), A.clone(), torch.empty(N, C, dtype=io_dtype, device=DEVICE)
    reference.update(Xr, Ar, x, h0, t, yr)
    A0 = A.clone()
    y = torch.full((N, C), float("nan"), dtype=io_dtype, device=DEVICE)
    triton_update.update(X, A, x, h0, t, y, block_c=block_c)
    check_update(y, X, A0, x, h0, t)
    check_update(yr, X, A0, x, h0, t)  # the torch reference meets the same bound
    assert torch.equal(X, Xr)  # row t holds x in the state dtype, every other row untouched
    assert torch.equal(A, A0)  # the red cell reads the accumulator, never writes it


@pytest.mark.parametrize("state_dtype,io_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                  (torch.float64, torch.float32), (torch.float64, torch.bfloat16)],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_update_check_rejects_arithmetic_in_the_io_dtype(state_dtype, io_dtype):
    """Negative control: the red cell computed in the IO dtype (or rounded toward zero where the
    bound asks for rounding to nearest) fails check_update."""
    X, A, x, h0, t = red_cell_inputs(state_dtype, io_dtype, B=2, N=8)
    in_io = A[t].to(io_dtype) + h0.to(io_dtype) * x
    with pytest.raises(AssertionError, match="beyond its bound"):
        check_update(in_io, X, A, x, h0, t)
    if io_dtype == torch.bfloat16:  # truncated stores fail the round-to-nearest bound a GPU is held to
        y32 = (A[t].double() + h0.double() * x.double()).float()
        truncated = (y32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
        check_update(truncated, X, A, x, h0, t, nearest=False)
        with pytest.raises(AssertionError, match="beyond its bound"):
            check_update(truncated, X, A, x, h0, t, nearest=True)


@pytest.mark.parametrize("state_dtype,io_dtype", IO_CASES, ids=lambda d: str(d).replace("torch.", ""))
def test_update_is_exact_where_the_arithmetic_is(state_dtype, io_dtype):
    """Small integers: every product and sum is exact in every dtype, so y equals A + h0 * x exactly."""
    B, N = 4, 3
    ints = lambda *shape, dtype: torch.randint(-8, 9, shape, device=DEVICE).to(dtype)  # noqa: E731
    X, A, h0, x = ints(B, N, C, dtype=state_dtype), ints(B, N, C, dtype=state_dtype), ints(C, dtype=state_dtype), ints(N, C, dtype=io_dtype)
    y = torch.empty(N, C, dtype=io_dtype, device=DEVICE)
    triton_update.update(X, A, x, h0, 2, y)
    assert torch.equal(y, (A[2] + h0 * x.to(state_dtype)).to(io_dtype))


@pytest.mark.skipif(DEVICE != "cpu", reason="a property of the CPU interpreter")
def test_interpreter_truncates_bfloat16():
    """The interpreter writes bfloat16 as the top 16 bits of the float32 value (truncation toward
    zero), not rounded to nearest as a GPU and torch do: the reason truncates() widens the bound.
    If this fails, the interpreter rounds now and the bound can go back to half a unit."""
    X, A, x, h0, t = red_cell_inputs(torch.float32, torch.bfloat16, N=8)
    y = torch.empty_like(x)
    triton_update.update(X, A, x, h0, t, y)
    y32 = A[t] + h0 * x.float()  # the kernel's float32 arithmetic: a multiply, then an add
    top_bits = (y32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(y, top_bits) and not torch.equal(y, y32.to(torch.bfloat16))


def test_update_strided_io_and_nan():
    """x and y may be strided views; a NaN input gives NaN at its channel only."""
    B, N = 4, 3
    X, A, h0 = randn(B, N, C), randn(B, N, C), randn(C)
    x = randn(C, N).t()  # [N, C] with channel stride N
    x[1, 5] = float("nan")
    y_buf = torch.zeros(C, N, device=DEVICE)
    y = y_buf.t()
    Xr, Ar, yr = X.clone(), A.clone(), torch.empty(N, C, device=DEVICE)
    reference.update(Xr, Ar, x, h0, 2, yr)
    triton_update.update(X, A, x, h0, 2, y)
    assert torch.equal(torch.isnan(y), torch.isnan(yr)) and torch.isnan(y).sum() == 1
    ok = ~torch.isnan(yr)
    x0 = x.nan_to_num(0.0)
    y0 = torch.empty(N, C, device=DEVICE)
    triton_update.update(X.clone(), A, x0, h0, 2, y0)  # the same cell without the NaN
    assert torch.equal(y[ok], y0[ok])
    check_update(y0, X, A, x0, h0, 2)
    assert torch.equal(X.isnan(), Xr.isnan())


@pytest.mark.parametrize("channels", [slice(5, 30), slice(1, None, 3)], ids=["range", "step"])
def test_update_on_channel_slices_of_the_state(channels):
    """The engine runs the red cell of a channel group on views Xb[:, :, sl], Ab[:, :, sl], h0[sl]."""
    B, N = 5, 3
    X, A, h0 = randn(B, N, C), randn(B, N, C), randn(C)
    width = len(range(C)[channels])
    x, y = randn(N, width, dtype=torch.bfloat16), torch.empty(N, width, dtype=torch.bfloat16, device=DEVICE)
    Xr, Ar, yr = X.clone(), A.clone(), torch.empty_like(y)
    reference.update(Xr[:, :, channels], Ar[:, :, channels], x, h0[channels], 4, yr)
    triton_update.update(X[:, :, channels], A[:, :, channels], x, h0[channels], 4, y, block_c=8)
    check_update(y, X[:, :, channels], A[:, :, channels], x, h0[channels], 4)
    assert torch.equal(X, Xr)  # exactly the sliced channels of row 4 written


# -- direct tile --------------------------------------------------------------------------------
def tile_cases(U):
    """(m outputs, filter length): full tile, partial tile, filter shorter than 2U (lags masked)."""
    return [(U, 2 * U + 3), (max(1, U // 2), 2 * U + 1), (U, U + 1), (max(1, U - 1), max(1, U // 2))]


def tile_error(A, A0, X, h, args):
    """Relative error of a tile's contribution A - A0 against the torch tile computed in float64.
    The contribution, not A: A's own size must not hide an error in it; rows outside
    [out_start, out_stop) are zero in both, so a stray write shows up too."""
    Ar = A0.double().clone()
    reference.direct_tile(X.double(), Ar, h.double(), *args)
    return rel_err(A.double() - A0.double(), Ar - A0.double())


def tile_problem(U, m, Lh, N, state_dtype):
    B = 2 * U + 2
    X, A, h = randn(B, N, C, dtype=state_dtype), randn(B, N, C, dtype=state_dtype), randn(C, Lh, dtype=state_dtype)
    in_start = int(torch.randint(0, B - 2 * U + 1, ()))
    return X, A, h, (in_start, in_start + U, in_start + U + m, U)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("U", [1, 2, 4, 8, 16, 32])
def test_direct_tile_matches_reference(U, state_dtype):
    for N in (1, 3):
        for m, Lh in tile_cases(U):
            X, A, h, args = tile_problem(U, m, Lh, N, state_dtype)
            A0 = A.clone()
            triton_direct.direct_tile(X, A, h, *args, block_c=16 if N == 3 else None)
            err = tile_error(A, A0, X, h, args)
            assert err <= TILE_TOL[state_dtype], (N, m, Lh, err)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_direct_tile_check_rejects_lower_precision_and_a_missing_lag(state_dtype):
    """Negative controls: the tile with its inputs rounded to a narrower dtype, or without its
    longest lag, fails the tolerance above."""
    U = 8
    X, A, h, args = tile_problem(U, U, 2 * U, 3, state_dtype)
    narrow = torch.float32 if state_dtype == torch.float64 else torch.bfloat16
    low = A.clone()
    reference.direct_tile(X.to(narrow).to(state_dtype), low, h.to(narrow).to(state_dtype), *args)
    assert tile_error(low, A, X, h, args) > 10 * TILE_TOL[state_dtype]
    short = A.clone()
    reference.direct_tile(X, short, h[:, : 2 * U - 1], *args)  # lag 2U - 1 dropped
    assert tile_error(short, A, X, h, args) > 10 * TILE_TOL[state_dtype]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("U", [1, 4, 32])
def test_direct_tile_is_exact_on_integers(U, state_dtype):
    """Small integers: sums of at most 32 products below 64 are exact in float32, so the tile's
    result equals the float64 reference exactly, whatever the order of its additions."""
    B, N = 2 * U + 2, 2
    ints = lambda *shape: torch.randint(-8, 9, shape, device=DEVICE).to(state_dtype)  # noqa: E731
    X, A, h = ints(B, N, C), ints(B, N, C), ints(C, 2 * U)
    args = (1, 1 + U, 1 + 2 * U, U)
    Ar = A.double().clone()
    reference.direct_tile(X.double(), Ar, h.double(), *args)
    triton_direct.direct_tile(X, A, h, *args)
    assert torch.equal(A.double(), Ar)


@pytest.mark.parametrize("U", [1, 4])
def test_direct_tile_nan_propagates_like_reference(U):
    """A NaN input poisons every output of the tile in its channel (0 * NaN is NaN, even through
    a lag past the filter's end), and nothing else; a NaN outside the tile's inputs is never read."""
    B, N = 3 * U, 2
    X, A, h = randn(B, N, C), randn(B, N, C), randn(C, U + 1)  # lags > U are padding
    X[U - 1, 1, 7] = float("nan")  # inside the inputs [0, U)
    X[2 * U, 0, 3] = float("nan")  # an output row: not an input of this tile
    Ar = A.clone()
    reference.direct_tile(X, Ar, h, 0, U, 2 * U, U)
    triton_direct.direct_tile(X, A, h, 0, U, 2 * U, U)
    assert torch.equal(A.isnan(), Ar.isnan()) and A.isnan().sum() == U
    ok = ~Ar.isnan()
    assert rel_err(A[ok], Ar[ok]) <= TILE_TOL[torch.float32]


def test_direct_tile_empty_tile_is_a_noop():
    X, A, h = randn(8, 2, C), randn(8, 2, C), randn(C, 8)
    A0 = A.clone()
    triton_direct.direct_tile(X, A, h, 0, 4, 4, 4)
    assert torch.equal(A, A0)


# -- compile once -------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _cache_keys(kernel, calls):
    """The specialisation part of Triton's compile-cache key for each recorded launch.

    On a GPU JITFunction.run hashes exactly this list (with the launch options, the same here) into
    the key of kernel.device_caches[device][0]. The interpreter has no compile cache, so we rebuild
    the JITFunction binder from the kernel's source and settings and compute the same lists.
    """
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = getattr(kernel, "fn", kernel)
    kwargs = getattr(kernel, "kwargs", None)
    if kwargs is None:  # a real JITFunction
        kwargs = {"do_not_specialize": kernel.do_not_specialize}
    jit = JITFunction(fn, do_not_specialize=kwargs.get("do_not_specialize"))
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    return [repr(binder(*a, **kw)[1]) for a, kw in calls]


def _run_positions(monkeypatch, module, name, launches):
    rec = _Recorder(getattr(module, name))
    monkeypatch.setattr(module, name, rec)
    for launch in launches:
        launch()
    return rec


POSITIONS = [0, 1, 2, 16, 5]  # 1 and multiples of 16 are what Triton specialises by default


def _update_launches():
    B, N = 32, 2
    X, A, h0, x, y = randn(B, N, C), randn(B, N, C), randn(C), randn(N, C), randn(N, C)
    triton_update.update(X, A, x, h0, 3, y)  # warm: compile before counting
    return [lambda t=t: triton_update.update(X, A, x, h0, t, y) for t in POSITIONS]


def _direct_launches():
    U, N = 2, 2
    X, A, h = randn(40, N, C), randn(40, N, C), randn(C, 2 * U)
    triton_direct.direct_tile(X, A, h, 3, 3 + U, 4 + U, U)  # warm
    return [lambda s=s, m=m: triton_direct.direct_tile(X, A, h, s, s + U, s + U + m, U) for s, m in zip(POSITIONS, [1, 2, 1, 2, 1])]


def test_update_compiles_once_across_positions(monkeypatch):
    rec = _run_positions(monkeypatch, triton_update, "_update_kernel", _update_launches())
    assert len(set(_cache_keys(rec.kernel, rec.calls))) == 1


def test_direct_tile_compiles_once_across_positions(monkeypatch):
    rec = _run_positions(monkeypatch, triton_direct, "_direct_tile_kernel", _direct_launches())
    assert len(set(_cache_keys(rec.kernel, rec.calls))) == 1


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: the interpreter compiles nothing, so it has no compile "
                                             "cache; on CPU the cache keys above are checked instead")
@pytest.mark.parametrize("module,name,launches", [(triton_update, "_update_kernel", _update_launches),
                                                  (triton_direct, "_direct_tile_kernel", _direct_launches)])
def test_gpu_compile_cache_holds_one_variant(module, name, launches):
    """On a GPU, the real cache: no new compiled variant once the kernel ran at one position."""
    kernel = getattr(module, name)
    runs = launches()  # compiles the first variant
    cache = kernel.device_caches[torch.cuda.current_device()][0]
    before = len(cache)
    for launch in runs:
        launch()
    assert len(cache) == before


def test_cache_key_check_can_fail():
    """Control for the two tests above: without do_not_specialize, t = 1 and t = 16 give new keys."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = triton_update._update_kernel
    jit = JITFunction(getattr(kernel, "fn", kernel))  # same source, default specialisation
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    X, A, h0, x, y = randn(32, 2, C), randn(32, 2, C), randn(C), randn(2, C), randn(2, C)
    strides = (*X.stride(), *A.stride(), h0.stride(0), *x.stride(), *y.stride())
    keys = {repr(binder(X, A, x, h0, y, t, C, *strides, BLOCK_C=64)[1]) for t in POSITIONS}
    assert len(keys) == 3


# -- registry and input errors ------------------------------------------------------------------
def test_registry_lists_specialisations():
    common.clear_registry()
    X, A, h = randn(16, 1, C), randn(16, 1, C), randn(C, 16)
    triton_direct.direct_tile(X, A, h, 0, 4, 8, 4)
    triton_direct.direct_tile(X, A, h, 4, 8, 12, 4)
    triton_update.update(X, A, randn(1, C, dtype=torch.bfloat16), randn(C), 0, randn(1, C, dtype=torch.bfloat16))
    chosen = common.kernels_chosen()
    assert {"kernel": "direct_tile", "constexprs": {"BLOCK_C": 64, "U": 4}, "state_dtype": "torch.float32", "io_dtype": None, "launches": 2} in chosen
    assert any(k["kernel"] == "update" and k["io_dtype"] == "torch.bfloat16" for k in chosen)


def test_triton_usable():
    assert common.triton_usable(DEVICE)
    assert not common.triton_usable("meta")


def test_bad_inputs_raise_typed_errors():
    X, A, h0, x, y = randn(8, 2, C), randn(8, 2, C), randn(C), randn(2, C), randn(2, C)
    h = randn(C, 8)
    with pytest.raises(ValueError, match="broadcast"):
        triton_update.update(randn(8, 1, C).expand(8, 2, C), A, x, h0, 0, y)
    with pytest.raises(ValueError, match="broadcast"):
        triton_update.update(X, A, x, h0, 0, randn(1, C).expand(2, C))
    with pytest.raises(ValueError, match="contiguous"):
        triton_direct.direct_tile(randn(8, C, 2).transpose(1, 2), A, h, 0, 2, 4, 2)
    with pytest.raises(DTypeError, match="float64"):
        triton_update.update(X, A.double(), x, h0, 0, y)
    with pytest.raises(DTypeError, match="state dtype"):
        triton_update.update(X.half(), A.half(), x, h0.half(), 0, y)
    with pytest.raises(ShapeError, match=r"\[N, C\]"):
        triton_update.update(X, A, randn(3, C), h0, 0, y)
    with pytest.raises(IndexError, match="block row"):
        triton_update.update(X, A, x, h0, 8, y)
    with pytest.raises(TypeError):
        triton_direct.direct_tile(X, A, h.double(), 0, 2, 4, 2)
    with pytest.raises(ValueError, match="power of two"):
        triton_direct.direct_tile(X, A, h, 0, 3, 6, 3)
    with pytest.raises(ValueError, match="in_start \\+ U"):
        triton_direct.direct_tile(X, A, h, 0, 3, 4, 2)
    with pytest.raises(ValueError, match="out_stop"):
        triton_direct.direct_tile(X, A, h, 0, 2, 5, 2)
    with pytest.raises(IndexError, match="outside the block"):
        triton_direct.direct_tile(X, A, h, 5, 7, 9, 2)
    with pytest.raises(ValueError, match="block_c"):
        triton_direct.direct_tile(X, A, h, 0, 2, 4, 2, block_c=24)
    with pytest.raises(ShapeError, match="Lh"):
        triton_direct.direct_tile(X, A, randn(C + 1, 8), 0, 2, 4, 2)
    with pytest.raises(ValueError, match="lag axis"):
        triton_direct.direct_tile(X, A, randn(8, C).t(), 0, 2, 4, 2)
    if DEVICE == "cpu":
        with pytest.raises(DeviceError):
            triton_direct.direct_tile(X, A, h.to("meta"), 0, 2, 4, 2)


# -- through the engine -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_engine_with_triton_kernels_decodes_exactly(dtype):
    """OnlineConv(kernels="triton") after a prefill reproduces the full causal convolution (float64
    brute force); crossover 4 puts tiles of size 1, 2, 4 on the Triton direct kernel."""
    from lcsm_compile import OnlineConv

    Cs, L, P = 5, 40, 3
    h = randn(Cs, L, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x = randn(2, Cs, L, dtype=dtype)
    conv = OnlineConv(h, kernels="triton", crossover=4)
    assert conv.use_triton
    conv.prefill(x[..., :P])
    ys = torch.stack([conv.step(x[..., t]) for t in range(P, L)], -1)
    xd, hd = x.double(), h.double()
    want = torch.stack([(hd[:, : t + 1].flip(-1) * xd[..., : t + 1]).sum(-1) for t in range(P, L)], -1)
    if dtype == torch.float64:
        assert rel_err(ys, want) <= 1e-15  # ~3x the 2.8e-16 observed
    else:  # float32 accumulation: nothing beyond the one rounding of each output into bfloat16
        w32 = want.float()
        stored = (w32.view(torch.int32) & -65536).view(torch.float32) if truncates(dtype) else w32.to(dtype)
        assert rel_err(ys, want) <= 1.05 * rel_err(stored, want) + 1e-6


# -- the GPU compiler, without a GPU ------------------------------------------------------------
AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lcsm_compile.kernels import triton_direct as td, triton_update as tu

assert isinstance(tu._update_kernel, triton.runtime.jit.JITFunction), "interpreter is on"
target = GPUTarget("cuda", 90, 32)  # H100/H200
i32 = "i32"
for sd, io in (("fp32", "bf16"), ("fp32", "fp32"), ("fp64", "fp16")):
    strides = ("Xb", "Xn", "Xc", "Ab", "An", "Ac", "h", "xn", "xc", "yn", "yc")
    sig = dict(X="*" + sd, A="*" + sd, x="*" + io, h0="*" + sd, y="*" + io, t=i32, C=i32,
               **{"stride_" + s: i32 for s in strides}, BLOCK_C="constexpr")
    triton.compile(ASTSource(tu._update_kernel, sig, constexprs={"BLOCK_C": 1024}), target=target)
for sd, U in (("fp32", 1), ("fp32", 64), ("fp64", 8)):
    sig = dict(X="*" + sd, A="*" + sd, h="*" + sd, in_start=i32, out_start=i32, m=i32, N=i32, C=i32, Lh=i32,
               stride_hc=i32, U="constexpr", BLOCK_C="constexpr")
    ptx = triton.compile(ASTSource(td._direct_tile_kernel, sig, constexprs={"U": U, "BLOCK_C": 4096 // U}),
                         target=target).asm["ptx"]
    assert "st.local" not in ptx, f"direct tile U={U} spills registers"
print("compiled")
"""


def test_kernels_compile_to_sm90_cubin():
    """The interpreter runs the kernels as Python; this runs the real Triton compiler (frontend to
    cubin for sm_90, no GPU needed) on a few specialisations, so a kernel the GPU compiler rejects
    fails here too. In a subprocess: this module turned the interpreter on."""
    import subprocess
    import sys

    from triton.backends import backends

    assert "nvidia" in backends, f"triton's Linux wheels ship the nvidia backend; this one has {sorted(backends)}"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
