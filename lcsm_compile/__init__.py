"""lcsm_compile: exact, near-linear-time autoregressive decoding for long-convolution sequence models."""

import os as _os
import sys as _sys

import torch as _torch

# Triton reads TRITON_INTERPRET once, when first imported (its own tl.zeros & co. are decorated then),
# and torch._dynamo, imported below for the backend, imports triton. Without CUDA the interpreter is
# the only way the Triton kernels run at all, so enable it before that first import; an explicit
# TRITON_INTERPRET=0 is kept. The engine uses Triton only on CUDA unless asked (kernels="triton").
if "triton" not in _sys.modules and not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from lcsm_compile.errors import (DeviceError, DTypeError, InputError, LcsmError, MaxLenExceeded, NotDecodable,
                                 SessionBroken, SessionNotStarted, ShapeError, StaleDecoder)
from lcsm_compile.engine import OnlineConv
from lcsm_compile.partitioned import PartitionedConv
from lcsm_compile.analysis import analyze, register_mixer
from lcsm_compile.report import Candidate, Reason, Report, Verdict
from lcsm_compile.decoder import Decoder, build_decoder, optimize
from lcsm_compile import backend  # noqa: F401  registers torch.compile(model, backend="lcsm")
from lcsm_compile.logs import configure_from_env as _configure_logs

_configure_logs()  # LCSM_LOGS=detect,passes,schedule,kernels,backend (lcsm_compile/logs.py): reads the environment only

__all__ = [
    "OnlineConv",
    "PartitionedConv",
    "LcsmError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "InputError",
    "MaxLenExceeded",
    "analyze",
    "register_mixer",
    "Report",
    "Candidate",
    "Verdict",
    "Reason",
    "optimize",
    "Decoder",
    "build_decoder",
    "NotDecodable",
    "SessionNotStarted",
    "SessionBroken",
    "StaleDecoder",
]
__version__ = "0.1.0"
