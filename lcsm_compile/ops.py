"""Custom ops the decode programs call, so a step program stays one traceable graph.

Each op takes `session`, a CPU int64 tensor [session id, position]: the id selects the live
session's state (its convolution bank and ring buffers) from a registry, so one compiled step
program serves every session without recompiling. The convolution index `conv` is a constant of
the program. `advance` takes every red cell's output, which orders it after them in any graph.
"""

import itertools
import weakref

import torch

_sessions: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_ids = itertools.count(1)


def register(state) -> torch.Tensor:
    """Register a session's runtime state; returns its `session` tensor [id, position]."""
    sid = next(_ids)
    _sessions[sid] = state
    return torch.tensor([sid, 0], dtype=torch.int64)


def lookup(session: torch.Tensor):
    sid = int(session[0])
    try:
        return _sessions[sid]
    except KeyError:
        raise RuntimeError(f"lcsm session {sid} is closed or was never registered") from None


@torch.library.custom_op("lcsm::conv_prefill", mutates_args=())
def conv_prefill(session: torch.Tensor, u: torch.Tensor, conv: int) -> torch.Tensor:
    """Prefill long convolution `conv` with its whole prompt input u; returns its outputs."""
    return lookup(session).conv_prefill(conv, u)


@conv_prefill.register_fake
def _(session, u, conv):
    return torch.empty_like(u)


@torch.library.custom_op("lcsm::conv_step", mutates_args=())
def conv_step(session: torch.Tensor, u: torch.Tensor, conv: int) -> torch.Tensor:
    """Red cell of long convolution `conv` at the session's position (u holds one position)."""
    return lookup(session).conv_step(conv, u)


@conv_step.register_fake
def _(session, u, conv):
    return torch.empty_like(u)


@torch.library.custom_op("lcsm::short_conv_prefill", mutates_args=())
def short_conv_prefill(session: torch.Tensor, u: torch.Tensor, conv: int) -> torch.Tensor:
    """Short causal convolution `conv` over the prompt; keeps its last K-1 inputs in a ring buffer."""
    return lookup(session).short_prefill(conv, u)


@short_conv_prefill.register_fake
def _(session, u, conv):
    return torch.empty_like(u)


@torch.library.custom_op("lcsm::short_conv_step", mutates_args=())
def short_conv_step(session: torch.Tensor, u: torch.Tensor, conv: int) -> torch.Tensor:
    """Short causal convolution `conv` at one position from its ring buffer."""
    return lookup(session).short_step(conv, u)


@short_conv_step.register_fake
def _(session, u, conv):
    return torch.empty_like(u)


@torch.library.custom_op("lcsm::advance", mutates_args=("session",))
def advance(session: torch.Tensor, outputs: list[torch.Tensor]) -> None:
    """Finish the position: one batched tile call for every long convolution of every layer."""
    lookup(session).advance()
    session[1] += 1


@advance.register_fake
def _(session, outputs):
    return None
