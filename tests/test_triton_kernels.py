"""Triton kernels (red cell, direct tile) against the torch reference, on fresh random inputs.

Without CUDA the kernels run in the Triton interpreter, which must be switched on before the first
`import triton` (triton.jit reads TRITON_INTERPRET when it decorates a kernel).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from lcsm_compile.errors import DeviceError, DTypeError, ShapeError  # noqa: E402
from lcsm_compile.kernels import reference  # noqa: E402
from lcsm_compile.kernels import triton_common as common  # noqa: E402
from lcsm_compile.kernels import triton_direct, triton_update  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not common.interpret_mode():
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (triton was imported before this module)", allow_module_level=True)

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
C = 37  # not a multiple of any channel block: the channel mask is exercised


def rel_err(a, b):
    """||a - b|| / ||b||; the absolute error when b is exactly zero (a tile with every lag masked)."""
    a, b = a.double(), b.double()
    scale = b.norm()
    return ((a - b).norm() / (scale if scale > 0 else 1.0)).item()


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


# -- red cell -----------------------------------------------------------------------------------
IO_CASES = [(torch.float32, io) for io in (torch.float32, torch.bfloat16, torch.float16)] + [
    (torch.float64, io) for io in (torch.float64, torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("state_dtype,io_dtype", IO_CASES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("block_c", [None, 16])
def test_update_matches_reference(state_dtype, io_dtype, N, block_c):
    B = 6
    X, A = randn(B, N, C, dtype=state_dtype), randn(B, N, C, dtype=state_dtype)
    h0, x = randn(C, dtype=state_dtype), randn(N, C, dtype=io_dtype)
    t = int(torch.randint(0, B, ()))
    Xr, Ar, yr = X.clone(), A.clone(), torch.empty(N, C, dtype=io_dtype, device=DEVICE)
    reference.update(Xr, Ar, x, h0, t, yr)
    A0 = A.clone()
    y = torch.full((N, C), float("nan"), dtype=io_dtype, device=DEVICE)
    triton_update.update(X, A, x, h0, t, y, block_c=block_c)
    assert rel_err(y, yr) <= TOL[io_dtype]
    assert torch.equal(X, Xr)  # row t holds x in the state dtype, every other row untouched
    assert torch.equal(A, A0)  # the red cell reads the accumulator, never writes it


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
    assert rel_err(y[ok], yr[ok]) <= 1e-6
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
    assert rel_err(y, yr) <= TOL[torch.bfloat16]
    assert torch.equal(X, Xr)  # exactly the sliced channels of row 4 written


# -- direct tile --------------------------------------------------------------------------------
def tile_cases(U):
    """(m outputs, filter length): full tile, partial tile, filter shorter than 2U (lags masked)."""
    return [(U, 2 * U + 3), (max(1, U // 2), 2 * U + 1), (U, U + 1), (max(1, U - 1), max(1, U // 2))]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("U", [1, 2, 4, 8, 16, 32])
def test_direct_tile_matches_reference(U, state_dtype):
    for N in (1, 3):
        for m, Lh in tile_cases(U):
            B = 2 * U + 2
            X, A = randn(B, N, C, dtype=state_dtype), randn(B, N, C, dtype=state_dtype)
            h = randn(C, Lh, dtype=state_dtype)
            in_start = int(torch.randint(0, B - 2 * U + 1, ()))
            args = (in_start, in_start + U, in_start + U + m, U)
            A0, Ar = A.clone(), A.clone()
            reference.direct_tile(X, Ar, h, *args)
            triton_direct.direct_tile(X, A, h, *args, block_c=16 if N == 3 else None)
            # compare the tile's contribution: A's own size must not hide an error in it; rows
            # outside [out_start, out_stop) are zero in both, so a stray write shows up too
            err = rel_err(A - A0, Ar - A0)
            assert err <= TOL[state_dtype], (N, m, Lh, err)


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
    assert rel_err(A[ok], Ar[ok]) <= 1e-6


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
    cache_before = _device_cache_size(rec.kernel)
    for launch in launches:
        launch()
    return rec, cache_before


def _device_cache_size(kernel):
    """Compiled variants of a kernel on the current GPU; None under the interpreter."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None or not torch.cuda.is_available():
        return None
    return len(caches[torch.cuda.current_device()][0])


POSITIONS = [0, 1, 2, 16, 5]  # 1 and multiples of 16 are what Triton specialises by default


def test_update_compiles_once_across_positions(monkeypatch):
    B, N = 32, 2
    X, A, h0, x, y = randn(B, N, C), randn(B, N, C), randn(C), randn(N, C), randn(N, C)
    triton_update.update(X, A, x, h0, 3, y)  # warm: compile before counting
    rec, before = _run_positions(
        monkeypatch, triton_update, "_update_kernel", [lambda t=t: triton_update.update(X, A, x, h0, t, y) for t in POSITIONS]
    )
    assert len(set(_cache_keys(rec.kernel, rec.calls))) == 1
    if before is not None:
        assert _device_cache_size(rec.kernel) == before


def test_direct_tile_compiles_once_across_positions(monkeypatch):
    U, N = 2, 2
    X, A, h = randn(40, N, C), randn(40, N, C), randn(C, 2 * U)
    triton_direct.direct_tile(X, A, h, 3, 3 + U, 4 + U, U)  # warm
    launches = [lambda s=s, m=m: triton_direct.direct_tile(X, A, h, s, s + U, s + U + m, U) for s, m in zip(POSITIONS, [1, 2, 1, 2, 1])]
    rec, before = _run_positions(monkeypatch, triton_direct, "_direct_tile_kernel", launches)
    assert len(set(_cache_keys(rec.kernel, rec.calls))) == 1
    if before is not None:
        assert _device_cache_size(rec.kernel) == before


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
    assert rel_err(ys, want) <= (1e-12 if dtype == torch.float64 else 1e-2)


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

    if "nvidia" not in backends:
        pytest.skip("triton has no nvidia backend here")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
