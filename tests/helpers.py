"""Shared by several test files: the error measure, fresh random inputs shaped like a zoo model's
example input, a teacher-forced decode, and an independent statement of the tuned crossover."""

import torch


def rel_err(a, b):
    """Relative error of `a` against `b`, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_inputs(example, length, batch=2):
    """Fresh inputs like `example` (token ids or floats, sequence on dim 1) of `length` positions."""
    if example.is_floating_point():
        return torch.randn(batch, length, *example.shape[2:])
    return torch.randint(0, int(example.max()) + 1, (batch, length))


def teacher_forced(decoder, x, P):
    """A fresh session's outputs over x [B, T, ...]: the prefill of x[:, :P], then one step per position."""
    session = decoder.session()
    with torch.no_grad():
        return torch.cat([session.prefill(x[:, :P])] + [session.step(x[:, t : t + 1]) for t in range(P, x.shape[1])], 1)


def reference_crossover(rows):
    """The largest tile size U whose direct tile is no slower than its FFT tile, at U and at every
    smaller size: [(U, direct_s, fft_s)] -> U (1 when even U = 1 is faster by FFT)."""
    best = 1
    for i, (U, _, _) in enumerate(rows):
        if all(d <= f for _, d, f in rows[: i + 1]):
            best = U
    return best
