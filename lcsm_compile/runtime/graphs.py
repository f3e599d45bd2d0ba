"""CUDA-graph capture of the step: the sequential part captured once, the tile call launched outside.

A step is two parts. (1) The step program without lcsm::advance: every time-local op, every red
cell, ring buffer, KV-cache write and attention, every position-table read. Once a session is
graph-safe (SessionState.graph_safe) it issues the same kernels with the same arguments at every
position: what changes per step is in device tensors (the inputs, the positions, the block row).
(2) advance, on the host: the tile call, whose size and offsets change per step, block loads and
the positions. CapturedStep captures (1) once per session and replays it; (2) runs eagerly after
each replay.

The first step after a (re)start runs eagerly (the warm-up a CUDA graph needs), the next one is
captured, every later one replays. A prefill, add or remove, or rows leaving the shared position,
re-captures (the state's layout or kernels may have changed).

Backends: "cuda" (torch.cuda.CUDAGraph) and "emulate", which records the aten ops one call issues
(through the lcsm ops' Python) and replays them without running any Python, on any device. What
the emulator gets wrong a CUDA graph gets wrong too (a baked-in position, a buffer rebound instead
of written in place, a read of a device value on the host, which it refuses), so CPU tests check
the capture logic.
"""

import copy

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lcsm_compile.runtime import ops
from lcsm_compile.errors import DeviceError, LcsmError


class GraphCaptureError(LcsmError):
    """The step cannot be captured: an op reads a device value on the host, or the bank is not graph-safe."""


def check_device(cuda_graph, device):
    """cuda_graph=True needs CUDA: a DeviceError before any work otherwise."""
    if cuda_graph is True and not (torch.cuda.is_available() and torch.device(device).type == "cuda"):
        raise DeviceError(f"cuda_graph=True: expected a model on a CUDA device, got {device} "
                          "(cuda_graph='emulate' checks the capture on any device)")


def check_capturable(decoder, cuda_graph):
    """Raise before any work if `decoder` cannot run its steps as captured graphs."""
    check_device(cuda_graph, decoder.device)
    if not decoder.can("graph_safe"):
        raise GraphCaptureError(f"cuda_graph: the {type(decoder.bank).__name__} bank's red cells are not graph-safe; "
                                "use conv='flash'")


def core_program(step):
    """The step program without its lcsm::advance call: the part a graph captures."""
    gm = fx.GraphModule(step, copy.deepcopy(step.graph))
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.lcsm.advance.default:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


class CapturedStep:
    """A session's step as (replayed graph, eager advance). backend: "cuda" or "emulate"."""

    def __init__(self, session, backend):
        self.session, self.backend = session, backend
        self.core = core_program(session.decoder.programs.step)
        self.graph, self.inputs, self.eager_steps = None, None, 0

    def invalidate(self):
        """The state's layout changed (prefill, add, remove): capture again."""
        self.graph = self.inputs = None
        self.eager_steps = 0

    def __call__(self, pos, x):
        state = self.session.state
        if not state.graph:
            state.graph_safe()
        key = (tuple(pos.shape), tuple(x.shape), x.dtype)
        if self.graph is not None and self.key == key:
            self.inputs[0].copy_(pos)
            self.inputs[1].copy_(x)
            out = self.graph.replay()
        elif self.eager_steps == 0:
            out = self._eager(pos, x)
        else:
            out = self._capture(key, pos, x)
        state.advance()
        return pytree.tree_unflatten([t.clone() if isinstance(t, torch.Tensor) else t for t in out],
                                     self.session.decoder.programs.out_spec)

    def _eager(self, pos, x):
        """The warm-up step: eager, on a side stream on CUDA (what capture needs first)."""
        self.eager_steps += 1
        if self.backend != "cuda":
            return list(self.core(self.session.handle, pos, x))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = list(self.core(self.session.handle, pos, x))
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture(self, key, pos, x):
        self.key, self.inputs = key, (pos.clone(), x.clone())
        fn = lambda: list(self.core(self.session.handle, *self.inputs))  # noqa: E731
        if self.backend == "cuda":
            self.graph = _CudaGraph(fn)
            return self.graph.replay()  # capturing runs nothing: this step runs now
        self.graph = _EmulatedGraph(fn, host=[self.session.handle, self.session.state.positions, self.session.state.live])
        return self.graph.outputs  # recording ran the step


class _CudaGraph:
    def __init__(self, fn):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn()

    def replay(self):
        self.graph.replay()
        return self.outputs


class _EmulatedGraph:
    """Records the aten ops fn() issues (seeing through the lcsm ops), then replays them with the
    same tensors: inputs and state by identity, intermediates by what the replay produced. Ops on
    host tensors only (the session handle, the positions kept on the host) run at recording time
    and are not replayed, as a CUDA graph does not capture CPU work."""

    def __init__(self, fn, host):
        recorder = _Recorder({id(t) for t in host})
        with recorder:
            self.outputs = fn()
        self.ops = recorder.ops

    def replay(self):
        env = {}
        swap = lambda v: env.get(id(v), v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        for func, args, kwargs, out in self.ops:
            new = func(*pytree.tree_map(swap, args), **pytree.tree_map(swap, kwargs))
            for old, fresh in zip(pytree.tree_leaves(out), pytree.tree_leaves(new)):
                if isinstance(old, torch.Tensor):
                    env[id(old)] = fresh
        return [swap(t) for t in self.outputs]


_aten = torch.ops.aten
# ops that answer from a tensor's metadata (under inference mode some composite ops query sizes
# through the dispatcher): host values a CUDA graph capture allows, unlike a read of device data
_METADATA = {_aten.sym_size, _aten.sym_stride, _aten.sym_numel, _aten.sym_storage_offset, _aten.dim,
             _aten.is_contiguous}


class _Recorder(TorchDispatchMode):
    def __init__(self, host_ids):
        super().__init__()
        self.host, self.ops, self.keep = set(host_ids), [], []  # keep: host results stay alive, so ids stay unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "lcsm":  # the session op's Python runs once; the kernels it issues are recorded
            with self:
                return ops.IMPLS[func._schema.name.split("::")[1]](*args, **kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        if tensors and all(id(t) in self.host for t in tensors):  # host bookkeeping: not captured
            results = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.keep += results
            self.host.update(id(t) for t in results)
            return out
        if func.overloadpacket in _METADATA:  # sizes and strides: no device value is read, nothing to replay
            return out
        if not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(out)) and pytree.tree_leaves(out):
            raise GraphCaptureError(f"the step reads a device value on the host ({func}): a captured step cannot")
        self.ops.append((func, args, kwargs, out))
        return out
