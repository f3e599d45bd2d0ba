"""The tile kernels, one entry each, and the one rule that picks a tile's kernel.

An entry holds the kernel's torch reference (the CPU path and the oracle of every check), its
Triton launcher and @triton.jit function (named by module, so nothing imports triton until a
kernel runs), its specialisation keys, and a builder of check inputs. The engine, the layer
schedule, `lcsm-compile kernels` and lcsm_compile.verify all read this table: adding a kernel is
its file plus one entry here.
"""

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from lcsm_compile.kernels import reference
from lcsm_compile.kernels.triton_common import block_c_direct, block_c_update


def kernel_for(U: int, crossover: int) -> str:
    """The kernel of a gray tile of size U: "direct_tile" up to `crossover`, "fft_tile" above.
    Every reader of the decision (engine, schedule, CLI, checks) calls this one rule."""
    return "direct_tile" if U <= crossover else "fft_tile"


def block_rows(crossover: int) -> int:
    """Rows of the engine's time-major block: twice the largest direct tile (a power of two), so
    every direct tile's inputs and outputs fall inside one block and every FFT tile starts at a
    block boundary."""
    crossover = int(crossover)
    if crossover < 1:
        raise ValueError(f"crossover: expected >= 1 (the size-1 tile is always direct), got {crossover}")
    return 2 << (crossover.bit_length() - 1)


@dataclass(frozen=True)
class TileKernel:
    """One kernel. `specialise(channels, U)` gives its Triton constexprs; `check_inputs(constexprs,
    channels, rows, state_dtype, io_dtype)` gives (args, indices of the written tensors) for one
    call of the reference and of the launcher, which share a signature."""

    name: str
    reference: Callable
    when: str  # which steps launch it, for listings ({U} and {U2} = 2U filled in)
    triton: tuple | None = None  # (module, launcher name, @triton.jit function name); None: torch only
    specialise: Callable | None = None
    check_inputs: Callable | None = None

    def launcher(self):
        """The Triton launcher (imports triton)."""
        module, launcher, _ = self.triton
        return getattr(importlib.import_module(module), launcher)

    def source(self):
        """(module, @triton.jit function name), for listing the kernel's source without importing it."""
        module, _, jit = self.triton
        return module, jit


def _update_inputs(ce, C, rows, sd, io):
    B = 4
    X, A = torch.randn(B, rows, C, dtype=sd), torch.randn(B, rows, C, dtype=sd)
    h0, x = torch.randn(C, dtype=sd), torch.randn(rows, C).to(io)
    t = int(torch.randint(0, B, ()))
    return (X, A, x, h0, t, torch.zeros(rows, C, dtype=io)), (0, 5)


def _direct_inputs(ce, C, rows, sd, io):
    U = int(ce["U"])
    B = 2 * U + 1
    X, A = torch.randn(B, rows, C, dtype=sd), torch.randn(B, rows, C, dtype=sd)
    h = torch.randn(C, 2 * U + 3, dtype=sd)
    in_start = int(torch.randint(0, B - 2 * U + 1, ()))
    return (X, A, h, in_start, in_start + U, in_start + 2 * U, U), (1,)


KERNELS = {
    "update": TileKernel(
        "update", reference.update, "every step: the red cell of each site",
        ("lcsm_compile.kernels.triton_update", "update", "_update_kernel"),
        lambda C, U=None: {"BLOCK_C": block_c_update(C)}, _update_inputs),
    "direct_tile": TileKernel(
        "direct_tile", reference.direct_tile, "steps i with i & -i == {U} (one in {U2}), one call over the bank",
        ("lcsm_compile.kernels.triton_direct", "direct_tile", "_direct_tile_kernel"),
        lambda C, U: {"U": U, "BLOCK_C": block_c_direct(C, U)}, _direct_inputs),
    "fft_tile": TileKernel(
        "fft_tile", reference.fft_tile, "steps i with i & -i == {U}: torch.fft on the channel-major state"),
}
