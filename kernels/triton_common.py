"""Helpers shared by the Triton kernels: when Triton can run, channel-block choice, input checks,
and a registry of the specialisations launched (what a CLI prints as "kernels chosen").

This module never imports triton at import time: importing it is slow, and TRITON_INTERPRET must
be set before the first `import triton` for the interpreter to take over.
"""

import os

import torch

from lcsm_compile.errors import DeviceError, DTypeError, ShapeError
from lcsm_compile.logs import get_logger

STATE_DTYPES = (torch.float32, torch.float64)

# (kernel name, ((constexpr, value), ...), state dtype, io dtype) -> launches seen
_LAUNCHED: dict[tuple, int] = {}


TRITON_MISSING = ("the Triton kernels need triton, which lcsm-compile installs only as an extra: "
                  "pip install 'lcsm-compile[gpu]' (CUDA), or '[test]' for the CPU interpreter; "
                  "the torch kernels (lcsm_compile.kernels.reference) need nothing more")


def require_triton():
    """`import triton`, or a ModuleNotFoundError naming the extra that installs it."""
    try:
        import triton
    except ImportError as exc:
        raise ModuleNotFoundError(TRITON_MISSING, name="triton") from exc
    return triton


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_usable(device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`: CUDA with triton installed, or
    CPU under the interpreter (which must have been enabled before triton was first imported)."""
    device = torch.device(device)
    if not (device.type == "cuda" or (device.type == "cpu" and interpret_mode())):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def block_c_update(C: int) -> int:
    """Channel block of the red-cell kernel: elementwise, so a wide block (fewer, fuller programs)."""
    return min(next_pow2(C), 1024)


def block_c_direct(C: int, U: int) -> int:
    """Channel block of the direct tile: the program holds a [U, BLOCK_C] accumulator, so keep
    U * BLOCK_C near 4096 elements (about 32 registers a thread at 4 warps), at least 16 channels."""
    return min(next_pow2(C), max(16, min(1024, 4096 // U)))


def check_block_c(block_c) -> int:
    block_c = int(block_c)
    if block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"block_c: expected a power of two (tl.arange needs one), got {block_c}")
    return block_c


def record_launch(kernel: str, constexprs: dict, state_dtype, io_dtype=None) -> None:
    key = (kernel, tuple(sorted(constexprs.items())), str(state_dtype), None if io_dtype is None else str(io_dtype))
    if key not in _LAUNCHED:
        get_logger("kernels").info("first launch of %s %s (state %s, io %s)", kernel, dict(key[1]), key[2], key[3])
    _LAUNCHED[key] = _LAUNCHED.get(key, 0) + 1


def kernels_chosen() -> list[dict]:
    """Every specialisation launched so far in this process, with its launch count."""
    return [
        {"kernel": k, "constexprs": dict(c), "state_dtype": s, "io_dtype": io, "launches": n}
        for (k, c, s, io), n in sorted(_LAUNCHED.items(), key=lambda kv: str(kv[0]))
    ]


def clear_registry() -> None:
    _LAUNCHED.clear()


# -- input checks (typed errors that name what was expected) -----------------------------------
def check_state(name: str, t, shape=None, *, contiguous=True) -> None:
    """A state tensor: torch.Tensor, float32/float64; contiguous unless the kernel takes its strides."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in STATE_DTYPES:
        raise DTypeError(f"{name}: expected a state dtype in (torch.float32, torch.float64), got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ShapeError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")


def check_writable(name: str, t) -> None:
    """A strided tensor a kernel writes: no broadcast (stride-0) axis, or programs would race on it."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        raise ValueError(f"{name}: expected a tensor without broadcast (stride-0) axes, got strides {t.stride()} for shape {tuple(t.shape)}")


def check_same(names_tensors, *, dtype=True) -> None:
    """All tensors on one device (and, if dtype, of one dtype), naming the first that differs."""
    (n0, t0), rest = names_tensors[0], names_tensors[1:]
    for n, t in rest:
        if t.device != t0.device:
            raise DeviceError(f"{n}: expected device {t0.device} (that of {n0}), got {t.device}")
        if dtype and t.dtype != t0.dtype:
            raise DTypeError(f"{n}: expected dtype {t0.dtype} (that of {n0}), got {t.dtype}")


_USABLE: dict[str, bool] = {}


def check_device(t) -> None:
    # memoised per device type: this runs on every launch of the per-token hot path
    usable = _USABLE.get(t.device.type)
    if usable is None:
        usable = _USABLE[t.device.type] = triton_usable(t.device)
    if not usable:
        how = "set TRITON_INTERPRET=1 before importing triton" if t.device.type == "cpu" else "use CUDA tensors"
        raise DeviceError(f"Triton kernels cannot run on {t.device} here ({how}); use lcsm_compile.kernels.reference")


def rel_err(a, b):
    """||a - b|| / ||b|| in float64: how the kernels' self-checks compare with the reference."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
