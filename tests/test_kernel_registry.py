"""kernels.registry: the one rule that assigns a tile its kernel, and the block it implies."""

import pytest

from lcsm_compile.kernels.registry import KERNELS, block_rows, kernel_for
from lcsm_compile.schedule import tile_sizes


def test_the_block_holds_every_direct_tile_and_fft_tiles_start_on_its_boundary():
    """The engine decodes direct tiles on its time-major block and FFT tiles on the history: every
    direct tile must fit a block, and every FFT tile must be a whole number of blocks."""
    for crossover in range(1, 300):
        block = block_rows(crossover)
        for U in tile_sizes(0, 4096):
            if kernel_for(U, crossover) == "direct_tile":
                assert U <= crossover and U < block and block % U == 0, (crossover, U)
            else:
                assert U > crossover and U % block == 0, (crossover, U)


def test_a_crossover_below_one_is_refused():
    with pytest.raises(ValueError, match="crossover: expected >= 1"):
        block_rows(0)


def test_every_kernel_the_rule_names_is_registered_with_its_reference():
    named = {kernel_for(U, c) for U in (1, 64) for c in (1, 32)} | {"update"}
    assert named == set(KERNELS)
    for kernel in KERNELS.values():
        assert callable(kernel.reference)
        if kernel.triton is not None:  # a Triton kernel names its source and how to check it
            assert kernel.specialise is not None and kernel.check_inputs is not None
