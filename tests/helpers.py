"""Shared by the decoder and backend tests: the error measure and fresh random inputs shaped like a
zoo model's example input."""

import torch


def rel_err(a, b):
    """Relative error of `a` against `b`, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_inputs(example, length, batch=2):
    """Fresh inputs like `example` (token ids or floats, sequence on dim 1) of `length` positions."""
    if example.is_floating_point():
        return torch.randn(batch, length, *example.shape[2:])
    return torch.randint(0, int(example.max()) + 1, (batch, length))
