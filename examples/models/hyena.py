"""Hyena operator LM: the zoo's entries. The model itself ships with the package
(lcsm_compile.models.hyena) because `lcsm-compile demo` decodes it."""

from examples.models.common import MAX_LEN, seeded, token_inputs
from lcsm_compile.models.hyena import ExponentialModulation, HyenaFilter, HyenaOperator, PositionalEmbedding, Sin, fftconv_ref, hyena_lm

__all__ = ["ExponentialModulation", "HyenaFilter", "HyenaOperator", "PositionalEmbedding", "Sin", "fftconv_ref", "hyena_lm"]


def build_order2():
    with seeded(0):
        model = hyena_lm(order=2, n_layer=2, max_len=MAX_LEN).eval()
    return model, token_inputs(64, 64)


def build_order3():
    with seeded(0):
        model = hyena_lm(order=3, n_layer=1, max_len=MAX_LEN).eval()
    return model, token_inputs(64, 64)
