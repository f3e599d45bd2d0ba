"""lcsm_compile: exact, near-linear-time autoregressive decoding for long-convolution sequence models."""

from lcsm_compile.errors import DeviceError, DTypeError, LcsmError, MaxLenExceeded, ShapeError
from lcsm_compile.engine import OnlineConv

__all__ = [
    "OnlineConv",
    "LcsmError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "MaxLenExceeded",
]
__version__ = "0.1.0"
