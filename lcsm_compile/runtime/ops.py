"""Custom ops the decode programs call, so a step program stays one traceable graph.

Each op takes `session`, a CPU int64 tensor [session id]: the id selects the live session's state
(its convolution bank, ring buffers and KV caches) from a registry, so one compiled step program
serves every session without recompiling. The convolution index `conv` is a constant of
the program. `advance` takes every red cell's output, which orders it after them in any graph; it
declares `session` mutated because it changes the session that tensor names (so no compiler drops
or reorders it), whose positions SessionState.advance moves, the one place they advance.
"""

import itertools
import weakref

import torch

_sessions: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_ids = itertools.count(1)
IMPLS = {}  # op name -> its Python implementation (lcsm_compile.runtime.graphs records the kernels it issues)


def register(state) -> torch.Tensor:
    """Register a session's runtime state; returns its `session` tensor [id]."""
    sid = next(_ids)
    _sessions[sid] = state
    return torch.tensor([sid], dtype=torch.int64)


def lookup(session: torch.Tensor):
    sid = int(session[0])
    try:
        return _sessions[sid]
    except KeyError:
        raise RuntimeError(f"lcsm session {sid} is closed or was never registered") from None


def _session_op(name, method, doc):
    """An op `lcsm::<name>(session, u, conv) -> Tensor` calling `<method>(conv, u)` on the session's
    state. Every conv op maps a canonical [B, C, T] input to a contiguous output of the same shape
    and dtype, which is what the fake promises (opcheck holds the impl to it)."""

    def impl(session: torch.Tensor, u: torch.Tensor, conv: int) -> torch.Tensor:
        return getattr(lookup(session), method)(conv, u).contiguous()

    impl.__doc__ = doc
    IMPLS[name] = impl
    op = torch.library.custom_op(f"lcsm::{name}", impl, mutates_args=())
    op.register_fake(lambda session, u, conv: u.new_empty(u.shape))
    return op


conv_prefill = _session_op("conv_prefill", "conv_prefill", "Long convolution over the whole prompt; records its future contributions.")
conv_step = _session_op("conv_step", "conv_step", "Red cell of a long convolution at the session's position (u holds one position).")
short_conv_prefill = _session_op("short_conv_prefill", "short_prefill", "Short causal convolution over the prompt; keeps its last K-1 inputs.")
short_conv_step = _session_op("short_conv_step", "short_step", "Short causal convolution at one position from its ring buffer.")


def _attention_op(name, method, doc):
    """An op `lcsm::<name>(session, q, k, v, site) -> Tensor` calling `<method>(site, q, k, v)` on the
    session's state: q [B, G, T, D], k [B, G, T, D], v [B, G, T, Dv] -> a contiguous [B, G, T, Dv]."""

    def impl(session: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: int) -> torch.Tensor:
        return getattr(lookup(session), method)(site, q, k, v).contiguous()

    impl.__doc__ = doc
    IMPLS[name] = impl
    op = torch.library.custom_op(f"lcsm::{name}", impl, mutates_args=())
    op.register_fake(lambda session, q, k, v, site: q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype))
    return op


attn_prefill = _attention_op("attn_prefill", "attn_prefill", "Causal attention over the prompt; writes its keys and values to the KV cache.")
attn_step = _attention_op("attn_step", "attn_step", "Appends one key and value per row to the KV cache and attends over the row's prefix.")


# a site's kind -> its (prefill, step) ops: the rewrite calls them (passes/decode_rewrite.py; an
# extend runs the prefill op from the session's position), the layer schedule finds sites by the step op
SITE_OPS = {
    "long": (torch.ops.lcsm.conv_prefill.default, torch.ops.lcsm.conv_step.default),
    "short": (torch.ops.lcsm.short_conv_prefill.default, torch.ops.lcsm.short_conv_step.default),
    "attention": (torch.ops.lcsm.attn_prefill.default, torch.ops.lcsm.attn_step.default),
}


@torch.library.custom_op("lcsm::advance", mutates_args=("session",))
def advance(session: torch.Tensor, outputs: list[torch.Tensor]) -> None:
    """Finish the position: one batched tile call for every long convolution of every layer."""
    lookup(session).advance()


@advance.register_fake
def _(session, outputs):
    return None
