"""The torch.compile backend "lcsm": the naive generation loop, made fast and exact.

    compiled = torch.compile(model, backend="lcsm", dynamic=True, options={"max_len": 8192})
    for t in range(P, L):
        logits = compiled(ids[:, : t + 1])        # unchanged user code; O(log^2 t) per call, not O(t)

What a call does. The backend keeps one decode session per compiled graph. When a call's input
extends the previous call's input along the sequence dim (dim 1) with the same prefix, only the new
positions go through the decode programs (`Decoder`: prefill for the first call, then one step per
new position); otherwise (first call, a changed prefix, a shorter input, another batch size, dtype
or device, or many more new positions than old ones) it starts again with a prefill of the whole
input. The result is exact either way: equal to `model(x)` up to floating-point rounding.

    The returned tensors are VIEWS of buffers preallocated at [B, max_len, ...] (the sequence on
    the output's own sequence dim): positions [0, t) of a call's result stay valid while later calls
    extend the same sequence, but a restart (new prefix, batch, ...) overwrites them. Clone a result
    you want to keep. Outputs carry no autograd history (the backend is for inference).

Prefix verification (option `verify`): "prefix" (default) compares the whole previous input with
the new input's prefix, one elementwise compare of O(t) per call (O(L^2) over a generation, but
memory-bound and tiny next to the model); "last" compares only the last previous position (O(1));
"none" trusts the caller. The backend keeps its own copy of the inputs, so a caller that writes the
next token into a preallocated ids tensor in place is handled correctly.

How the graph's inputs are identified. With inline_inbuilt_nn_modules (torch >= 2.5), dynamo hands
the backend parameters, buffers and float attributes as graph inputs, plus SymInts for sizes. Each
placeholder's `grapharg.source` says which: a bare local (`L['ids']`) is the user's input, anything
reached through an attribute or a global (`L['self']._modules[...]`) is model state, and a SymInt is
matched to the dim of the user input whose size it is. The decodable case is one user tensor with
the sequence on dim 1 as a symbol (torch.compile(..., dynamic=True): one graph for every length,
so no recompiles while generating).

How the decoder is built. The dynamo graph is analysed as captured (`analyze_graph`, the Report the
backend keeps: `backend.records[-1].report`). The decode rewrite works on an ATen-level export
graph, so the dynamo graph is wrapped as a module of the user input alone (state held as
attributes, SymInts read off the input's shape) and handed to `optimize` (torch.export + analysis +
Decoder). If the model's parameters change in place after compiling (their `_version` moves, or
dynamo passes other tensors), the decoder is rebuilt at the next call.

Fallback. A graph the backend cannot decode (the analysis says it is not decodable, the model is
split into several graphs by graph breaks, it has several user inputs, an output without the
sequence axis, ...) runs through inductor, with the reason logged on the `lcsm_compile.backend`
logger at WARNING. A graph whose sequence length is static (torch.compile without dynamic=True,
first call) runs eagerly: dynamo recompiles it with a symbolic length at the next new length.

Compile cost: the first call runs dynamo, the analysis of the dynamo graph, torch.export of it,
the export-level analysis and the decoder build (filters materialised at max_len): ~3.5 s for the
4-layer demo LM at max_len 8192 on a 2-core CPU, ~5-15 s for the small zoo models (their numeric
checks dominate). Every compile is recorded in `lcsm_compile.backend.records` (kind, reason, the
Report, the runner with its prefill/step/restart counts, build times). The step program itself is
compiled by inductor at the first step of each batch size (option `compile_step`, ~4 s for the
demo LM here); it halves the per-call time of that model on this CPU (3.3 -> 1.6 ms from 4096 to
8192 positions in benchmarks/backend_loop.py).

Recompiles: dynamo itself recompiles on a changed guard, e.g. grad mode or inference mode toggled,
a batch of 1 (specialised), a view input that becomes contiguous, or a first length equal to some
static size of the model (duck sizing makes it static). A recompiled graph starts a fresh session.

Options (torch.compile(model, backend="lcsm", options={...})):
    max_len   longest sequence served (buffers, filters). Default: the model's `max_len` attribute,
              else the length of a parameter/buffer table the graph slices by the sequence length.
    verify    "prefix" | "last" | "none" (above).
    fallback  "inductor" | "eager" | "error" ("error": calls raise NotDecodable with the Report).
    conv      "flash" | "lazy": the decoder's convolution bank.
    compile_step  True (default) | False: compile the step program with inductor (Decoder(compile=True)),
              or run it eagerly (no compile time; slower per position).
Unknown options raise ValueError naming the allowed keys.
"""

import collections
import logging
import operator
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from lcsm_compile.errors import MaxLenExceeded, NotDecodable

log = logging.getLogger("lcsm_compile.backend")

OPTIONS = {"max_len": None, "verify": "prefix", "fallback": "inductor", "conv": "flash", "compile_step": True}
CHOICES = {"verify": ("prefix", "last", "none"), "fallback": ("inductor", "eager", "error"), "conv": ("flash", "lazy"),
           "compile_step": (True, False)}

# What every compile did (newest last), for inspection: `lcsm_compile.backend.records[-1].report`.
records: "collections.deque[CompileRecord]" = collections.deque(maxlen=16)


@dataclass
class CompileRecord:
    kind: str  # "decode" | "fallback" | "static"
    reason: str = ""
    report: Any = None  # the dynamo-level Report, when the analysis ran
    runner: Any = None  # the DecodedGraph (kind "decode")
    seconds: float = 0.0
    times: dict = field(default_factory=dict)


class _Fallback(Exception):
    """This graph is not decoded; the message says why."""

    def __init__(self, reason, report=None):
        super().__init__(reason)
        self.reason, self.report = reason, report


def parse_options(options):
    opts = dict(OPTIONS)
    unknown = sorted(set(options or {}) - set(OPTIONS))
    if unknown:
        raise ValueError(f"lcsm backend: unknown option(s) {unknown}; allowed keys: {sorted(OPTIONS)}")
    opts.update(options or {})
    for key, allowed in CHOICES.items():
        if opts[key] not in allowed:
            raise ValueError(f"lcsm backend: option {key}={opts[key]!r}; expected one of {allowed}")
    if opts["max_len"] is not None and (not isinstance(opts["max_len"], int) or opts["max_len"] < 1):
        raise ValueError(f"lcsm backend: option max_len={opts['max_len']!r}; expected a positive int")
    return opts


# -- the backend ------------------------------------------------------------------------------------


def lcsm_backend(gm, example_inputs, *, options=None, mode=None):
    """torch.compile backend: decode the graph (see the module docstring) or fall back.
    `mode` (torch.compile's) is accepted and ignored."""
    opts = parse_options(options)
    t0 = time.perf_counter()
    record = CompileRecord("decode")
    try:
        plan = _plan(gm, example_inputs)
        # analysis and torch.export run outside dynamo's tracing context: guards they would add
        # there (about their own inputs) would be installed on the user's frame
        with torch._guards.tracing(None), torch._guards.compile_context(None):
            runner = DecodedGraph(gm, example_inputs, plan, opts, record)
    except _Static as exc:
        log.warning("lcsm backend: %s; running this graph eagerly (torch.compile(..., dynamic=True) compiles "
                    "one graph for every length)", exc)
        record.kind, record.reason = "static", str(exc)
        records.append(record)
        return gm.forward
    except _Fallback as exc:
        record.kind, record.reason, record.report = "fallback", exc.reason, exc.report or record.report
        record.seconds = time.perf_counter() - t0
        records.append(record)
        return _fallback(gm, example_inputs, exc.reason, record.report, opts)
    record.runner, record.seconds = runner, time.perf_counter() - t0
    records.append(record)
    log.info("lcsm backend: decoding this graph (max_len=%d, built in %.2fs)", runner.max_len, record.seconds)
    return runner


def _fallback(gm, example_inputs, reason, report, opts):
    if opts["fallback"] == "error":
        error = NotDecodable(report if report is not None else _reason_report(reason, opts))

        def raise_not_decodable(*args):
            raise error

        return raise_not_decodable
    log.warning("lcsm backend: not decoding this graph: %s; running it through %s", reason, opts["fallback"])
    if opts["fallback"] == "eager":
        return gm.forward
    return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)


def _reason_report(reason, opts):
    from lcsm_compile.report import Candidate, CaptureInfo, Reason, Report, Verdict

    cand = Candidate(name="graph", spelling="dynamo", kind="capture", verdict=Verdict.REJECTED,
                     reason=Reason.CAPTURE_FAILED, explanation=reason, max_len=opts["max_len"])
    return Report(False, [cand], CaptureInfo("dynamo", False, note=reason), notes=[reason])


def register():
    """Register "lcsm" with dynamo (idempotent); done on `import lcsm_compile`."""
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    # an entry point already listed (pyproject's torch_dynamo_backends) is loaded by lookup_backend
    if "lcsm" not in _COMPILER_FNS and _BACKENDS.get("lcsm") is None:
        register_backend(lcsm_backend, name="lcsm")


# -- the graph's inputs ------------------------------------------------------------------------------


class _Static(Exception):
    """The sequence length is a constant of this graph."""


@dataclass
class InputPlan:
    """Per placeholder: ("state", "tensor" | "scalar") model state (a scalar is a Python float
    dynamo passes as a fresh 0-d tensor) | ("sym", dim) a size of the user input |
    ("stride", dim) a stride of it | ("input", None) the user's sequence input."""

    roles: list
    input_index: int  # position of the user input among the graph inputs
    length_symbol: Any  # sympy symbol of the sequence length
    out_dims: list  # per graph output: its sequence dim
    frame_module: Any = None  # the nn.Module whose forward was compiled, if any


def _source(node):
    ga = node.meta.get("grapharg")
    return getattr(ga, "source", None)


def _is_scalar(node):
    """A Python float dynamo passes as a 0-d tensor (a fresh one at every call)."""
    return bool(getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False))


def _plan(gm, example_inputs):
    from torch._dynamo.source import LocalSource

    from lcsm_compile.passes.capture import _is_attribute, meta_value, sym_expr

    tx = _current_tx()
    reason = getattr(gm, "compile_subgraph_reason", None)
    code = getattr(getattr(tx, "f_code", None), "co_name", "")
    if getattr(reason, "graph_break", False) or code.startswith("torch_dynamo_resume_in_"):
        why = reason.reason.splitlines()[0] if getattr(reason, "graph_break", False) else f"resumes after a graph break ({code})"
        raise _Fallback(f"the model is split into several graphs by graph breaks: {why}")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise _Fallback(f"{len(placeholders)} graph inputs but {len(example_inputs)} example inputs")
    users = []
    for i, (node, val) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(val, torch.Tensor):
            continue
        src = _source(node)
        is_user = isinstance(src, LocalSource) if src is not None else not _is_attribute(node, val)
        if is_user and not isinstance(val, nn.Parameter) and not _is_scalar(node):
            users.append(i)
    if len(users) != 1:
        raise _Fallback(f"the graph has {len(users)} user tensor inputs; the decoder takes exactly one "
                        f"(the sequence input, sequence on dim 1)")
    (index,) = users
    x_meta = meta_value(placeholders[index])
    if x_meta is None or x_meta.dim() < 2:
        raise _Fallback("the user input has no sequence dim (dim 1)")
    length = sym_expr(x_meta.shape[1])
    if isinstance(length, int):
        raise _Static(f"the sequence length is static in this graph (L={length})")
    dims = [sym_expr(s) for s in x_meta.shape]
    strides = [sym_expr(s) for s in x_meta.stride()]
    roles = []
    for i, (node, val) in enumerate(zip(placeholders, example_inputs)):
        if i == index:
            roles.append(("input", None))
        elif isinstance(val, torch.Tensor):
            roles.append(("state", "scalar" if _is_scalar(node) else "tensor"))
        elif isinstance(val, (int, torch.SymInt)):
            expr = sym_expr(meta_value(node)) if meta_value(node) is not None else None
            if expr in dims:
                roles.append(("sym", dims.index(expr)))
            elif expr in strides:  # a view's stride (ids[:, :t] of a longer ids)
                roles.append(("stride", strides.index(expr)))
            else:
                raise _Fallback(f"graph input {node.name} is a symbolic int that is not a size or stride of the user input")
        else:
            raise _Fallback(f"graph input {node.name} of type {type(val).__name__} is not supported")
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_dims = []
    for o in pytree.tree_leaves(out_node.args[0]):
        val = meta_value(o) if isinstance(o, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            raise _Fallback(f"graph output {o} is not a tensor")
        sdims = [d for d, s in enumerate(val.shape) if sym_expr(s) == length]
        if len(sdims) != 1:
            raise _Fallback(f"graph output {o} of shape {tuple(val.shape)} has no single sequence axis")
        out_dims.append(sdims[0])
    # the module compiled: `self` of the frame (torch.compile(model)), else a module among its locals
    frame_locals = getattr(tx, "f_locals", None) or {}
    modules = [frame_locals["self"]] if isinstance(frame_locals.get("self"), nn.Module) else []
    modules += [v for v in frame_locals.values() if isinstance(v, nn.Module)]
    return InputPlan(roles, index, length, out_dims, modules[0] if modules else None)


def _current_tx():
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - outside dynamo (a direct call of the backend)
        return None


def _default_max_len(gm, plan, example_inputs):
    """The model's `max_len` attribute, else the size of a state table sliced by the length."""
    value = getattr(plan.frame_module, "max_len", None)
    if isinstance(value, int) and value > 0:
        return value
    from lcsm_compile.passes.capture import sym_expr

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state = {n: t for (kind, _), n, t in zip(plan.roles, placeholders, example_inputs) if kind == "state"}
    sizes = []
    for node in gm.graph.nodes:
        # table[:, :L] spelled getitem(table, (slice(None), slice(None, L))) (no Ellipsis / None)
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in state:
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if any(i is Ellipsis or i is None for i in idx):
                continue
            for d, s in enumerate(idx):
                if isinstance(s, slice) and s.start is None and isinstance(s.stop, torch.fx.Node):
                    val = s.stop.meta.get("example_value")
                    if val is not None and sym_expr(val) == plan.length_symbol and d < state[node.args[0]].dim():
                        sizes.append(int(state[node.args[0]].shape[d]))
    if sizes:
        return min(sizes)
    raise _Fallback("max_len is unknown: pass torch.compile(..., options={'max_len': N}) "
                    "(or give the model an int attribute `max_len`)")


# -- the graph as a module of the user input ---------------------------------------------------------


class GraphAsModule(nn.Module):
    """The dynamo graph as a module of the user input alone: the state dynamo lifted to graph
    inputs is held as parameters/buffers again, SymInts are read off the input's shape."""

    def __init__(self, gm, plan, state):
        super().__init__()
        self.graph_module = gm
        self._roles = plan.roles
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._item_of = {placeholders[i].name: state[i].item() for i, (kind, _) in enumerate(plan.roles)
                         if kind == "state" and state[i].numel() == 1}
        for i, (kind, _) in enumerate(plan.roles):
            if kind == "state":
                t = state[i]
                if isinstance(t, nn.Parameter):
                    self.register_parameter(f"state_{i}", t)
                else:
                    self.register_buffer(f"state_{i}", t, persistent=False)

    def forward(self, x):
        return _Interpreter(self.graph_module, self._item_of).run(*self._args(x))

    def _args(self, x):
        args = []
        for i, (kind, dim) in enumerate(self._roles):
            if kind == "state":
                args.append(getattr(self, f"state_{i}"))
            elif kind == "sym":
                args.append(x.shape[dim])
            elif kind == "stride":
                args.append(x.stride(dim))
            else:
                args.append(x)
        return args


class _Interpreter(torch.fx.Interpreter):
    """Runs the graph with `state.item()` replaced by its value: dynamo passes a float attribute
    (eps) as a 0-d tensor and calls .item() on it, which torch.export would see as data-dependent."""

    def __init__(self, gm, item_of):
        super().__init__(gm)
        self.item_of = item_of

    def run_node(self, n):
        if n.op == "call_method" and n.target == "item" and n.args[0].name in self.item_of:
            return self.item_of[n.args[0].name]
        return super().run_node(n)


# -- the runtime -------------------------------------------------------------------------------------


class DecodedGraph:
    """What the backend returns for a decodable graph: called with dynamo's graph inputs, returns
    the graph's outputs as views of [B, max_len, ...] buffers (see the module docstring)."""

    def __init__(self, gm, example_inputs, plan, opts, record):
        from lcsm_compile.analysis import analyze_graph

        self.gm, self.plan, self.opts = gm, plan, opts
        self.max_len = opts["max_len"] or _default_max_len(gm, plan, example_inputs)
        x = example_inputs[plan.input_index]
        if x.shape[1] > self.max_len:
            raise _Fallback(f"the input is longer ({x.shape[1]}) than max_len={self.max_len}")
        t0 = time.perf_counter()
        try:
            report = analyze_graph(gm, example_inputs, max_len=self.max_len, user_inputs=[x])
        except Exception as exc:  # noqa: BLE001 - an analysis that cannot run falls back
            raise _Fallback(f"the analysis failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
        record.report, record.times["analyze_graph_s"] = report, time.perf_counter() - t0
        if not report.decodable:
            raise _Fallback("the analysis says the graph is not decodable: " + _reasons(report), report)
        self.state_index = [i for i, (kind, _) in enumerate(plan.roles) if kind == "state"]
        self._build([example_inputs[i] for i in self.state_index], x, record)
        self.session = None
        self.n = 0  # positions in the session (and in the buffers)
        self.in_buf = self.out_bufs = None
        self.key = None  # (batch, trailing dims, dtype, device) of the session's input
        self.stats = collections.Counter()  # prefill / step / reuse / restart counts

    def _build(self, state, x, record=None):
        from lcsm_compile.decoder import optimize

        t0 = time.perf_counter()
        module = GraphAsModule(self.gm, self.plan, dict(zip(self.state_index, state)))
        try:
            self.decoder = optimize(module, (x.detach().clone(),), max_len=self.max_len, conv=self.opts["conv"],
                                    compile=self.opts["compile_step"])
        except NotDecodable as exc:
            raise _Fallback("the export-level analysis of the graph says it is not decodable: " + _reasons(exc.report), exc.report) from None
        except Exception as exc:  # noqa: BLE001 - any failure to build the decoder falls back
            raise _Fallback(f"building the decoder failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
        self.state = list(state)
        self.versions = [t.item() if self.plan.roles[i][1] == "scalar" else t._version
                         for i, t in zip(self.state_index, state)]
        if record is not None:
            record.times["decoder_s"] = time.perf_counter() - t0

    def _state_changed(self, args):
        for k, i in enumerate(self.state_index):
            t = args[i]
            if self.plan.roles[i][1] == "scalar":
                if t.item() != self.versions[k]:
                    return True
            elif t is not self.state[k] or t._version != self.versions[k]:
                return True
        return False

    def __call__(self, *args):
        x = args[self.plan.input_index]
        if self._state_changed(args):
            log.info("lcsm backend: the model's parameters changed; rebuilding the decoder")
            try:
                with torch._guards.tracing(None), torch._guards.compile_context(None):
                    self._build([args[i] for i in self.state_index], x)
            except _Fallback as exc:
                raise NotDecodable(exc.report or _reason_report(exc.reason, self.opts)) from None
            self.session, self.n = None, 0
        with torch.no_grad():
            return self._run(x)

    def _run(self, x):
        t = x.shape[1]
        if t > self.max_len:
            raise MaxLenExceeded(f"input of {t} positions exceeds max_len={self.max_len} "
                                 f"(torch.compile(..., options={{'max_len': N}}))")
        key = (x.shape[0], tuple(x.shape[2:]), x.dtype, x.device)
        fresh = self.session is None or key != self.key or t < self.n or not self._prefix_ok(x)
        if not fresh and t - self.n > self.n:  # more new positions than old ones: one prefill is cheaper
            fresh = True
        if fresh:
            self._prefill(x, key)
        else:
            for i in range(self.n, t):
                self._write(self.session.step(x[:, i : i + 1]), i, 1)
                self.in_buf[:, i] = x[:, i]
            self.stats["step"] += t - self.n
            self.n = t
        return tuple(buf.narrow(d, 0, t) for buf, d in zip(self.out_bufs, self.plan.out_dims))

    def _prefix_ok(self, x):
        n, verify = self.n, self.opts["verify"]
        if verify == "none" or n == 0:
            return True
        if verify == "last":
            return torch.equal(x[:, n - 1], self.in_buf[:, n - 1])
        return torch.equal(x[:, :n], self.in_buf[:, :n])

    def _prefill(self, x, key):
        if self.session is None or key[0] != self.key[0] or key[1:] != self.key[1:]:
            self.session = self.decoder.session()
            self.in_buf = x.new_empty((x.shape[0], self.max_len, *x.shape[2:]))
            self.out_bufs = None
        if self.n:
            self.stats["restart"] += 1
        self.key = key
        t = x.shape[1]
        outs = self._flat(self.session.prefill(x))
        if self.out_bufs is None or any(b.dtype != o.dtype or b.device != o.device for b, o in zip(self.out_bufs, outs)):
            self.out_bufs = []
            for o, d in zip(outs, self.plan.out_dims):
                shape = list(o.shape)
                shape[d] = self.max_len
                self.out_bufs.append(o.new_empty(shape))
        self._write(outs, 0, t, flat=True)
        self.in_buf[:, :t] = x
        self.n = t
        self.stats["prefill"] += 1

    def _flat(self, outs):
        return pytree.tree_leaves(outs)

    def _write(self, outs, start, count, flat=False):
        outs = outs if flat else self._flat(outs)
        for buf, o, d in zip(self.out_bufs, outs, self.plan.out_dims):
            buf.narrow(d, start, count).copy_(o)


def _reasons(report):
    rejected = [f"{c.name}: {c.reason.value if c.reason else '?'} ({c.explanation})" for c in report.rejected]
    return "; ".join(rejected) if rejected else "; ".join(report.notes) or "no convolution to decode"


register()
