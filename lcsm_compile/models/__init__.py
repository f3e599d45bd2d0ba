"""Models that ship with the package: the Hyena LM that `lcsm-compile demo` and the generation
benchmark decode."""

from lcsm_compile.models.hyena import HyenaOperator, demo_lm, hyena_lm
from lcsm_compile.models.lm import LM, Block

__all__ = ["Block", "HyenaOperator", "LM", "demo_lm", "hyena_lm"]
