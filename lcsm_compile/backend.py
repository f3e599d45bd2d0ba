"""The torch.compile backend "lcsm": the naive generation loop, made fast and exact.

    compiled = torch.compile(model, backend="lcsm", dynamic=True, options={"max_len": 8192})
    for t in range(P, L):
        logits = compiled(ids[:, : t + 1])        # unchanged user code; O(log^2 t) per call, not O(t)

What a call does. The backend keeps one decode session per compiled graph. When a call's input
extends the previous call's input along the sequence dim (dim 1) with the same prefix, only the new
positions go through the decode programs (`Decoder`: prefill for the first call, then a step for
one new position, an extend (Session.extend) for several); otherwise (first call, a changed
prefix, a shorter input, another batch size, dtype or device, or many more new positions than old
ones) it starts again with a prefill of the whole input. The result is exact either way: equal to `model(x)` up to floating-point rounding.

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

How the decoder is built. The dynamo graph goes through every pass once (lcsm_compile.pipeline,
the same passes `optimize` runs): it is wrapped as a module of the user input alone (state held as
attributes, SymInts read off the input's shape) and exported to the one canonical ATen graph, then
analysed, rewritten and validated teacher-forced against that module. The Report is kept in
`backend.records[-1].report`. If the model's parameters change after compiling (written in place,
or dynamo passes other tensors: lcsm_compile.staleness), the decoder is rebuilt at the next call.
A call that does not finish (any exception, KeyboardInterrupt included) drops its session: the
next call starts a new one with a prefill of its whole input, so it is exact.

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
    compile_step  True (default) | False: compile the step program with inductor (optimize(compile=True)),
              or run it eagerly (no compile time; slower per position).
Unknown or invalid options raise BackendOptionError (a ValueError) naming the allowed values, at
the first call of the compiled model: torch.compile hands a backend its options only then. It is
raised as itself, not wrapped in dynamo's BackendCompilerFailed. A token id outside the model's
vocabulary raises InputError (BackendInputError at the call that compiles the graph): the input's
mistake, so the graph is not demoted to the fallback.
"""

import collections
import copy
import logging
import operator
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from lcsm_compile.checks import check_choice, check_ids, check_options, vocab_size
from lcsm_compile.errors import InputError, LcsmError, MaxLenExceeded, NotDecodable
from lcsm_compile.passes import capture
from lcsm_compile.staleness import Fingerprint

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
    trace_id: Any = None  # dynamo's (compile id, attempt) of the graph


def _record(record):
    """Append `record`; when dynamo restarted the analysis of the same frame (a new attempt of one
    compile id, e.g. after inductor's float specialization), replace that attempt's entry instead.
    Returns True for a restart that came to the same conclusion (its warning was already logged)."""
    record.trace_id = torch._guards.CompileContext.current_trace_id()
    last = records[-1] if records else None
    restart = (last is not None and record.trace_id is not None and last.trace_id is not None
               and last.trace_id.compile_id == record.trace_id.compile_id
               and last.trace_id.attempt < record.trace_id.attempt)
    if restart:
        records.pop()
    records.append(record)
    return restart and (last.kind, last.reason) == (record.kind, record.reason)


class _Fallback(Exception):
    """This graph is not decoded; the message says why."""

    def __init__(self, reason, report=None):
        super().__init__(reason)
        self.reason, self.report = reason, report


class BackendOptionError(LcsmError, ValueError, torch._dynamo.exc.ShortenTraceback):
    """An unknown or invalid option of the lcsm backend. Dynamo re-raises a ShortenTraceback as it is,
    so the user sees this ValueError rather than a BackendCompilerFailed around it."""

    def __init__(self, message):
        torch._dynamo.exc.ShortenTraceback.__init__(self, message, first_useful_frame=None)


class BackendInputError(InputError, torch._dynamo.exc.ShortenTraceback):
    """An input the model cannot take (a token id outside its vocabulary) at the call that compiles
    its graph: raised as itself, and the graph is not demoted to the fallback, since the mistake is
    the input's, not the graph's (the next call compiles it again)."""

    def __init__(self, message):
        torch._dynamo.exc.ShortenTraceback.__init__(self, message, first_useful_frame=None)


def parse_options(options):
    opts = dict(OPTIONS)
    unknown = sorted(set(options or {}) - set(OPTIONS))
    if unknown:
        raise BackendOptionError(f"lcsm backend: unknown option(s) {unknown}; allowed keys: {sorted(OPTIONS)}")
    opts.update(options or {})
    try:  # the checks optimize() runs on the same options (lcsm_compile.checks)
        for key, allowed in CHOICES.items():
            check_choice(key, opts[key], allowed)
        check_options(max_len=opts["max_len"])
    except (TypeError, ValueError) as exc:
        raise BackendOptionError(f"lcsm backend: option {exc}") from None
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
        try:
            check_ids("input", example_inputs[plan.input_index], vocab_size(gm, plan.input_index))
        except InputError as exc:
            raise BackendInputError(str(exc)) from None
        # analysis and torch.export run outside dynamo's tracing context: guards they would add
        # there (about their own inputs) would be installed on the user's frame
        with torch._guards.tracing(None), torch._guards.compile_context(None):
            runner = DecodedGraph(gm, example_inputs, plan, opts, record)
    except _Static as exc:
        record.kind, record.reason = "static", str(exc)
        if not _record(record):
            log.warning("lcsm backend: %s; running this graph eagerly (torch.compile(..., dynamic=True) "
                        "compiles one graph for every length)", exc)
        return gm.forward
    except _Fallback as exc:
        record.kind, record.reason, record.report = "fallback", exc.reason, exc.report or record.report
        record.seconds = time.perf_counter() - t0
        repeated = _record(record)
        return _fallback(gm, example_inputs, exc.reason, record.report, opts, warn=not repeated)
    record.runner, record.seconds = runner, time.perf_counter() - t0
    _record(record)
    log.info("lcsm backend: decoding this graph (max_len=%d, built in %.2fs)", runner.max_len, record.seconds)
    return runner


def _fallback(gm, example_inputs, reason, report, opts, warn=True):
    if opts["fallback"] == "error":
        error = NotDecodable(report if report is not None else _reason_report(reason, opts))

        def raise_not_decodable(*args):
            raise error

        return raise_not_decodable
    if warn:
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
class InputPlan(capture.InputPlan):
    """capture.InputPlan (the role of each graph input) plus what the runtime needs: the length
    symbol, each output's sequence dim and the module compiled."""

    length_symbol: Any = None  # sympy symbol of the sequence length
    out_dims: list = field(default_factory=list)  # per graph output: its sequence dim (None: state written back)
    frame_module: Any = None  # the nn.Module whose forward was compiled, if any


def _plan(gm, example_inputs):
    from lcsm_compile.passes.capture import meta_value, sym_expr

    tx = _current_tx()
    reason = getattr(gm, "compile_subgraph_reason", None)
    code = getattr(getattr(tx, "f_code", None), "co_name", "")
    if getattr(reason, "graph_break", False) or code.startswith("torch_dynamo_resume_in_"):
        why = reason.reason.splitlines()[0] if getattr(reason, "graph_break", False) else f"resumes after a graph break ({code})"
        raise _Fallback(f"the model is split into several graphs by graph breaks: {why}")
    try:
        plan = capture.plan_inputs(gm, example_inputs)
    except capture.CaptureError as exc:
        raise _Fallback(str(exc)) from None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    length = sym_expr(meta_value(placeholders[plan.input_index]).shape[1])
    if isinstance(length, int):
        raise _Static(f"the sequence length is static in this graph (L={length})")
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    from_input = _value_closure(placeholders[plan.input_index])
    out_dims = []
    for o in pytree.tree_leaves(out_node.args[0]):
        val = meta_value(o) if isinstance(o, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            raise _Fallback(f"graph output {o} is not a tensor")
        if o not in from_input:  # model state written back (self.table = ...): not decoded, recomputed
            out_dims.append(None)
            continue
        sdims = [d for d, s in enumerate(val.shape) if _is_length(sym_expr(s), length)]
        if len(sdims) != 1:
            raise _Fallback(f"graph output {o} of shape {tuple(val.shape)} has no single sequence axis")
        out_dims.append(sdims[0])
    # the module compiled: `self` of the frame (torch.compile(model)), else a module among its locals
    frame_locals = getattr(tx, "f_locals", None) or {}
    modules = [frame_locals["self"]] if isinstance(frame_locals.get("self"), nn.Module) else []
    modules += [v for v in frame_locals.values() if isinstance(v, nn.Module)]
    return InputPlan(plan.roles, plan.input_index, length, out_dims, modules[0] if modules else None)


def _is_length(size, length):
    """size is the sequence length: L, or Min(c, L) (positions cut to a table's reach c), which the
    analysis later proves equal to L over the served lengths (or declines)."""
    return size == length or (type(size).__name__ == "Min" and length in size.args  # sympy's or torch's Min
                              and all(a == length or a.is_Integer for a in size.args))


def _value_closure(x):
    """The nodes whose values are computed from the input's values (sizes read off it do not count)."""
    from lcsm_compile.passes.capture import meta_value

    seen, todo = set(), [x]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen and isinstance(meta_value(u), (torch.Tensor, list, tuple)):
                seen.add(u)
                todo.append(u)
    return seen


def _static_outputs(gm, out_dims):
    """A copy of the graph that computes only the outputs not decoded (out_dims None), or None."""
    keep = [i for i, d in enumerate(out_dims) if d is None]
    if not keep:
        return None
    g = copy.deepcopy(gm.graph)
    out = next(n for n in g.nodes if n.op == "output")
    leaves = pytree.tree_leaves(out.args[0])
    out.args = (tuple(leaves[i] for i in keep),)
    g.eliminate_dead_code()
    g._codegen = torch.fx.graph.CodeGen()
    return torch.fx.GraphModule(gm, g)


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


# -- the runtime -------------------------------------------------------------------------------------


class DecodedGraph:
    """What the backend returns for a decodable graph: called with dynamo's graph inputs, returns
    the graph's outputs as views of [B, max_len, ...] buffers (see the module docstring)."""

    def __init__(self, gm, example_inputs, plan, opts, record):
        self.gm, self.plan, self.opts = gm, plan, opts
        self.max_len = opts["max_len"] or _default_max_len(gm, plan, example_inputs)
        x = example_inputs[plan.input_index]
        if x.shape[1] > self.max_len:
            raise _Fallback(f"the input is longer ({x.shape[1]}) than max_len={self.max_len}")
        self.state_index = [i for i, (kind, _) in enumerate(plan.roles) if kind == "state"]
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.state_names = [names[i] for i in self.state_index]
        # Python floats dynamo hands over as a fresh 0-d tensor at every call: compared by value
        self.scalars = {names[i] for i in self.state_index if plan.roles[i][1] == "scalar"}
        self.static_outputs = _static_outputs(gm, plan.out_dims)
        self._build(list(example_inputs), record)
        self.in_buf = self.out_bufs = None
        self.key = None  # (batch, trailing dims, dtype, device) of the session's input
        self.stats = collections.Counter()  # prefill / step / extend / restart counts

    def _build(self, inputs, record=None):
        """Every pass once on this graph (lcsm_compile.pipeline): analysis, rewrite, validation."""
        from lcsm_compile import pipeline
        from lcsm_compile.analysis import quiet

        t0 = time.perf_counter()
        x = inputs[self.plan.input_index]
        source = capture.DynamoSource(self.gm, inputs, None, self.plan)
        options = {"conv": self.opts["conv"], "compile": self.opts["compile_step"], "validate": True}
        with quiet():
            ctx = pipeline.run(pipeline.Context(source, (x.detach().clone(),), self.max_len, "dynamo", options))
        if record is not None:
            record.report, record.times["pipeline_s"] = ctx.report, time.perf_counter() - t0
            record.times.update({f"{name}_s": round(s, 4) for name, _, s in ctx.passes})
        if ctx.decoder is None:
            raise _Fallback("not decodable: " + ctx.report.refusal(), ctx.report)
        self.decoder = ctx.decoder
        self.session = None
        self.n = 0  # positions in the session (and in the buffers)
        self.fingerprint = Fingerprint(self._state(inputs), values=self.scalars)

    def _state(self, args):
        """(name, tensor) of the model state among the graph inputs `args`."""
        return [(name, args[i]) for name, i in zip(self.state_names, self.state_index)]

    def __call__(self, *args):
        x = args[self.plan.input_index]
        changed = self.fingerprint.changed(self._state(args))
        if changed is not None:
            log.info("lcsm backend: the model's state %s changed; rebuilding the decoder", changed)
            try:
                with torch._guards.tracing(None), torch._guards.compile_context(None):
                    self._build(list(args))
            except _Fallback as exc:
                raise NotDecodable(exc.report or _reason_report(exc.reason, self.opts)) from None
        with torch.no_grad():
            outs = self._run(x)
            if self.static_outputs is not None:  # state the model writes back: computed as the graph does
                statics = iter(self.static_outputs(*args))
                outs = tuple(next(statics) if d is None else o for o, d in zip(outs, self.plan.out_dims))
            return outs

    def _run(self, x):
        t = x.shape[1]
        if t > self.max_len:
            raise MaxLenExceeded(f"input of {t} positions exceeds max_len={self.max_len} "
                                 f"(torch.compile(..., options={{'max_len': N}}))")
        key = (x.shape[0], tuple(x.shape[2:]), x.dtype, x.device)
        fresh = self.session is None or key != self.key or t < self.n or not self._prefix_ok(x)
        if not fresh and t - self.n > self.n:  # more new positions than old ones: one prefill is cheaper
            fresh = True
        try:
            if fresh:
                self._prefill(x, key)
            elif t > self.n:
                new = x[:, self.n : t]
                if t - self.n > 1 and self.decoder.can("extend"):
                    self._write(self.session.extend(new), self.n, t - self.n)
                    self.stats["extend"] += 1
                else:
                    for i in range(self.n, t):
                        self._write(self.session.step(x[:, i : i + 1]), i, 1)
                    self.stats["step"] += t - self.n
                self.in_buf[:, self.n : t] = new
                self.n = t
        except BaseException:
            # the session, the buffers and the count of positions done may be out of step: the
            # next call starts a new session with a prefill
            self.session, self.n = None, 0
            raise
        return tuple(None if d is None else buf.narrow(d, 0, t) for buf, d in zip(self.out_bufs, self.plan.out_dims))

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
                if d is not None:
                    shape[d] = self.max_len
                self.out_bufs.append(o.new_empty(shape) if d is not None else None)
        self._write(outs, 0, t, flat=True)
        self.in_buf[:, :t] = x
        self.n = t
        self.stats["prefill"] += 1

    def _flat(self, outs):
        return pytree.tree_leaves(outs)

    def _write(self, outs, start, count, flat=False):
        outs = outs if flat else self._flat(outs)
        for buf, o, d in zip(self.out_bufs, outs, self.plan.out_dims):
            if d is not None:
                buf.narrow(d, start, count).copy_(o)


register()
