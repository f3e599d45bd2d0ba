"""Pieces shared by the zoo: seeded construction, example inputs, a pre-norm LM shell, the dtype
FFTs run in."""

from contextlib import contextmanager

import torch

from lcsm_compile.models.hyena import fft_dtype  # noqa: F401  (FFTs and complex math: at least float32)
from lcsm_compile.models.lm import LM, Block, Mlp  # noqa: F401  (the LM shell ships with the package)

BATCH = 2
MAX_LEN = 320  # decodable entries serve 320 positions: N >= 256 decode steps after a short prompt


@contextmanager
def seeded(seed=0):
    """Build modules with a fixed seed without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def token_inputs(vocab, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (BATCH, length), generator=g),)


def float_inputs(d_in, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, length, d_in, generator=g),)
