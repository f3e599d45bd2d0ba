"""The runtime: sessions run the decode programs on their state.

session.py (Session: prefill, extend, step, rows), state.py (SessionState, what the custom ops
act on, and the table of strategies), one file per strategy's state: tiled.py, ring.py,
recurrent.py, kv_cache.py (on strategy.py), ops.py (the custom ops the programs call),
program.py (a program run eagerly or compiled), graphs.py (a step captured as a CUDA graph).
"""

from lcsm_compile.runtime.program import Program
from lcsm_compile.runtime.session import Session
from lcsm_compile.runtime.state import SessionState

__all__ = ["Program", "Session", "SessionState"]
