"""Capture a model to one FX GraphModule, and evaluate pieces of it numerically.

Two levels: torch.export (non-strict, dim 1 of the first input dynamic) for `analyze`, and the graph
dynamo hands a torch.compile backend. Either way the result is a `Captured`: the graph, the role of
each placeholder (user input, parameter, symbolic int), the sympy symbol of the sequence length and
the shape bindings needed to evaluate any node at another length. `Runner` evaluates the closure of
a few nodes in float64 with placeholders bound to shapes only, so numeric checks never run the
whole model.
"""

import contextlib
import warnings
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

_LOW = {torch.float32: torch.float64, torch.float16: torch.float64, torch.bfloat16: torch.float64,
        torch.complex64: torch.complex128, torch.complex32: torch.complex128}


class CaptureError(Exception):
    """The model could not be captured; the message is the exporter's first line(s)."""


class NeedsActivation(Exception):
    """An evaluation reached a user input: the node depends on activations."""


@dataclass
class Captured:
    gm: torch.fx.GraphModule
    level: str  # "export" | "dynamo"
    user_inputs: tuple  # example user inputs
    roles: dict  # placeholder node -> "input" (parameters and buffers are get_attr nodes)
    length_symbol: object  # sympy.Symbol of dim 1 of the first input, or None (concrete)
    example_length: int
    max_len: int
    min_len: int = 2
    note: str = ""
    alt: "Captured" = None  # concrete captures: the same model captured at a shorter length
    alt_batch: "Captured" = None  # concrete captures: as alt, with one batch row more
    # concrete captures: node -> the node the same code made in the capture at the other length
    # (main <-> alt), and in alt_batch (main only); None where there is none (see counterparts)
    counterpart: dict = field(default_factory=dict)
    batch_counterpart: dict = field(default_factory=dict)
    symbolic_range: tuple | None = None  # concrete captures: the lengths a symbolic export was valid for
    batch_symbol: object = None  # sympy.Symbol of dim 0 of the first input when the batch is dynamic

    @property
    def batch_dynamic(self):
        """Sessions may use another batch size than the example's: the batch is a symbol, or a
        concrete capture's programs are generalized over it (passes/generalize.py)."""
        return self.batch_symbol is not None or self.alt_batch is not None

    @property
    def symbolic(self):
        return self.length_symbol is not None

    def bindings(self, length, batch=None):
        """Symbol -> int for every symbol of the user input shapes, with the sequence at `length`
        (and the batch at `batch`, else the example's)."""
        out = {}
        for node, role in self.roles.items():
            if role != "input":
                continue
            val = meta_value(node)
            if not isinstance(val, torch.Tensor):
                continue
            for d, size in enumerate(val.shape):
                expr = sym_expr(size)
                if isinstance(expr, sympy.Symbol):
                    out[expr] = length if expr == self.length_symbol else (
                        batch if batch is not None and expr == self.batch_symbol else _example_size(self, node, d))
        # a view input (ids[:, :t] of a longer ids) has stride symbols of its own: bound to the example's
        for node, role in self.roles.items():
            val = meta_value(node)
            if role == "input" and isinstance(val, torch.Tensor):
                for d, st in enumerate(val.stride()):
                    expr = sym_expr(st)
                    if isinstance(expr, sympy.Symbol) and expr not in out:
                        idx = [n for n, r in self.roles.items() if r == "input"].index(node)
                        out[expr] = int(self.user_inputs[idx].stride(d))
        return out

    def size_at(self, expr, length, batch=None):
        expr = sym_expr(expr)
        if isinstance(expr, int):
            return expr
        return int(expr.subs(self.bindings(length, batch)))


def _example_size(cap, node, dim):
    idx = [n for n, r in cap.roles.items() if r == "input"].index(node)
    return int(cap.user_inputs[idx].shape[dim])


def attr_value(gm, target):
    """The value a get_attr node's dotted `target` names on `gm`."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def meta_value(node):
    return node.meta.get("val", node.meta.get("example_value"))


def float_dtype(node):
    """The dtype of `node`'s recorded value when it is a floating tensor, else float32."""
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else torch.float32


def sym_expr(x):
    """sympy expression of a SymInt (int stays int)."""
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        return int(expr) if expr.is_Integer else expr
    return int(x) if isinstance(x, (int, sympy.Integer)) else x


def values_over(expr, symbol, values):
    """A symbolic size (torch's sympy functions included: FloorDiv, Mod, Min, ...) evaluated at
    each integer in `values` (a numpy array) for `symbol`, vectorized."""
    import functools

    import numpy as np
    from torch.utils._sympy import functions as tf

    rules = [(tf.FloorDiv, lambda a, b: sympy.floor(a / b)), (tf.CeilDiv, lambda a, b: sympy.ceiling(a / b)),
             (tf.CleanDiv, lambda a, b: a / b), (tf.IntTrueDiv, lambda a, b: a / b), (tf.FloatTrueDiv, lambda a, b: a / b),
             (tf.PythonMod, sympy.Mod), (tf.Mod, sympy.Mod), (tf.ModularIndexing, lambda a, b, c: sympy.Mod(sympy.floor(a / b), c)),
             (tf.FloorToInt, sympy.floor), (tf.CeilToInt, sympy.ceiling), (tf.TruncToInt, lambda a: sympy.sign(a) * sympy.floor(abs(a))),
             (tf.ToFloat, lambda a: a), (tf.Identity, lambda a: a), (tf.PowByNatural, lambda a, b: a ** b),
             (tf.FloatPow, lambda a, b: a ** b)]
    expr = sympy.sympify(expr)
    for fn, repl in rules:
        expr = expr.replace(fn, repl)
    many = lambda op: lambda *a: functools.reduce(op, a)  # noqa: E731
    f = sympy.lambdify(symbol, expr, modules=[{"Min": many(np.minimum), "Max": many(np.maximum)}, "numpy"])
    return np.broadcast_to(np.asarray(f(values), dtype=np.float64), values.shape)


def _first_line(exc, lines=2):
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " ".join(t.strip() for t in text[:lines] if t.strip())[:400]


# ---- export -------------------------------------------------------------------------------------

@contextlib.contextmanager
def preserved_state(model):
    """Undo what a forward pass run for capture does to the model's attributes: export runs the
    forward on fake tensors, and a forward that caches a table (`self.pe = ...`) would otherwise
    leave a fake tensor behind for every later call of the real model."""
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in modules]
    try:
        yield
    finally:
        for m, attrs, params, buffers in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)


def _dynamic_specs(example_inputs, max_len, batch):
    """Dim 1 of the first input (and of other inputs of the same length) dynamic in [2, max_len];
    dim 0 too when `batch` (so sessions may use another batch size than the example's)."""
    x = example_inputs[0]
    specs = []
    for i, t in enumerate(example_inputs):
        spec = None
        if isinstance(t, torch.Tensor) and t.dim() > 1 and (i == 0 or t.shape[1] == x.shape[1]):
            spec = {1: torch.export.Dim.DYNAMIC(min=2, max=max_len)}
            if batch and t.shape[0] == x.shape[0] and t.shape[0] != t.shape[1]:
                spec[0] = torch.export.Dim.DYNAMIC
        specs.append(spec)
    return tuple(specs)


def cut_length(example_inputs, length):
    """The example with every input as long as the first cut to its first `length` positions."""
    L = example_inputs[0].shape[1]
    return tuple(t[:, :length] if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[1] == L else t
                 for t in example_inputs)


def _one_row_more(example_inputs):
    """The example with its first row repeated once more in every input of the first input's batch."""
    B = example_inputs[0].shape[0]
    return tuple(torch.cat([t, t[:1]]) if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[0] == B else t
                 for t in example_inputs)


def _freeze(frozen):
    """Inside preserved_state: each (module, buffer name, value) becomes the plain value, so a branch
    on it is taken as it stands now."""
    for m, name, value in frozen:
        del m._buffers[name]
        object.__setattr__(m, name, value)


def _export(model, example_inputs, specs, frozen=()):
    with preserved_state(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's own notes (attributes assigned in forward, ...)
        _freeze(frozen)
        ep = torch.export.export(model, tuple(_fresh(example_inputs)), dynamic_shapes=specs, strict=False)
        if any(_mutates(n) for n in ep.graph.nodes):
            ep = ep.run_decompositions({})  # functionalize: in-place writes become explicit dataflow
    return ep


def _mutates(node):
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


def _scalar_state(model):
    """(module, name, value) of every one-element integer or bool buffer: a flag set on first use, a
    step count. Export cannot branch on a buffer's value (a data-dependent guard); frozen to its
    value now, the branch is the one every later call takes."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [(m, n, b.item()) for m in model.modules() for n, b in m._buffers.items()
            if b is not None and b.numel() == 1 and not (b.is_floating_point() or b.is_complex())]


def _first_export(model, attempts, max_len, frozen=()):
    """(ep, inputs, errors): the first of the (inputs, dynamic batch or not, dynamic at all) attempts export takes."""
    errors = []
    for inputs, batch, dynamic in attempts:
        try:
            return _export(model, inputs, _dynamic_specs(inputs, max_len, batch) if dynamic else None, frozen), inputs, errors
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the next capture
            errors.append(exc)
    return None, None, errors


def capture_export(model, example_inputs, max_len, dynamic=True, decompose=False, level="export"):
    """torch.export with the sequence dynamic in [2, max_len] (and the batch, where export allows);
    a concrete export if that fails. In-place ops are functionalized. Where export cannot branch on
    the value of a flag or counter buffer, it is frozen to its present value (said in the note).

    decompose: lower to the core ATen opset (rfft -> constant_pad_nd + _fft_r2c, conv1d ->
    convolution, ...), the spelling other exporters hand over.
    """
    x = example_inputs[0]
    # export specializes a dim of size 1, so a batch-1 example is exported as two copies of itself
    # for a dynamic batch (sessions of any batch, rows joining and leaving). A length that meets a
    # size of the model's (an example as long as the table `pos[:L]` slices) makes the slice's
    # clamp guard L >= size and specializes L: the same example one position shorter takes the
    # general branch, so it is tried next. The concrete export comes last.
    cut = [cut_length(example_inputs, x.shape[1] - 1)] if dynamic and x.shape[1] > 3 else []
    attempts = [(_one_row_more(inputs) if x.shape[0] == 1 else inputs, True, True) for inputs in [example_inputs] + cut]
    attempts = (attempts + [(inputs, False, True) for inputs in [example_inputs] + cut] if dynamic else []) \
        + [(example_inputs, False, False)]
    ep, inputs, errors = _first_export(model, attempts, max_len)
    frozen, notes = (), []
    if ep is None and any("data-dependent" in str(e) for e in errors):
        frozen = _scalar_state(model)
        if frozen:
            ep, inputs, errors = _first_export(model, attempts, max_len, frozen)
            if ep is None:
                raise CaptureError(_frozen_failed(frozen, errors[-1])) from None
    if ep is None:
        raise CaptureError(_first_line(errors[-1])) from None
    if frozen:
        notes.append(_frozen_note(frozen))
    if decompose:
        ep = ep.run_decompositions()
    gm = ep.module()
    # export's input guards: the range's bounds, and where a size met the hint, L != that size (a
    # slice clamp's branch). The graph's arithmetic is what the model computes wherever it is
    # checked numerically (faithful, the safety net, the translation validation); a step has L = 1.
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(node)
    gm.recompile()
    roles = {n: "input" for n in gm.graph.nodes if n.op == "placeholder"}
    cap = Captured(gm, level, tuple(inputs), roles, None, int(inputs[0].shape[1]), int(max_len))
    _set_symbols(cap)
    if dynamic and not cap.symbolic:
        notes.insert(0, f"dynamic export failed ({_first_line(errors[-1], 1)}); captured at concrete L={x.shape[1]}")
    if cap.symbolic:
        rng = ep.range_constraints.get(cap.length_symbol)
        if rng is not None:
            lo, hi = int(rng.lower), int(min(rng.upper, max_len))
            cap.min_len = lo
            if hi < max_len:
                notes.append(f"export narrowed the served lengths to [{lo}, {hi}]")
                cap.max_len = hi
    cap.note = "; ".join(notes)
    return cap


def _set_symbols(cap):
    first = next(n for n, r in cap.roles.items() if r == "input")
    shape = [sym_expr(s) for s in meta_value(first).shape]
    cap.length_symbol = shape[1] if isinstance(shape[1], sympy.Symbol) else None
    cap.batch_symbol = shape[0] if isinstance(shape[0], sympy.Symbol) and shape[0] != cap.length_symbol else None


# ---- dynamo -------------------------------------------------------------------------------------

def capture_dynamo(model, example_inputs, dynamic=True):
    """Run torch.compile(model, backend=recorder, dynamic=True, fullgraph=True) once.

    Returns (gm, backend_example_inputs, user_inputs): what a torch.compile backend receives, and
    the user inputs it was called with (the graph's user inputs are these very tensors)."""
    graphs = []

    def recorder(gm, inputs):
        graphs.append((gm, list(inputs)))
        return gm.forward

    # A fresh cache, so the recorder is called even if this forward was compiled before (the
    # recompile limit would otherwise silently fall back to eager). This clears dynamo's cache for
    # the whole process: compiled functions recompile on their next call.
    def compile_once(frozen=()):
        torch._dynamo.reset()
        try:
            with preserved_state(model):
                _freeze(frozen)
                torch.compile(model, backend=recorder, dynamic=dynamic, fullgraph=True)(*inputs)
        finally:
            torch._dynamo.reset()

    inputs = _fresh(example_inputs)
    frozen = ()
    try:
        compile_once()
    except Exception as exc:  # noqa: BLE001
        frozen = _scalar_state(model) if "data-dependent" in str(exc) else ()
        if not frozen:
            raise CaptureError(_first_line(exc)) from None
        try:
            compile_once(frozen)
        except Exception as exc2:  # noqa: BLE001
            raise CaptureError(_frozen_failed(frozen, exc2)) from None
    if not graphs:
        raise CaptureError("dynamo compiled no graph (the model ran eagerly)")
    gm, backend_inputs = graphs[0]
    gm.meta["lcsm_frozen"] = _frozen_note(frozen)
    return gm, backend_inputs, inputs


def _frozen_names(frozen):
    return ", ".join(f"{type(m).__name__}.{n} = {v}" for m, n, v in frozen)


def _frozen_note(frozen):
    return (f"branches on {_frozen_names(frozen)} taken as they stand now (the capture cannot branch on a "
            "buffer's value)") if frozen else ""


def _frozen_failed(frozen, exc):
    return (f"the capture cannot branch on the value of {_frozen_names(frozen)}"
            + f", and the branch taken as it stands now fails ({_first_line(exc, 1)}): the forward changes the "
            "model's own state there (an initialisation on first use?); run the model once on real data before optimize")


@dataclass
class InputPlan:
    """The role of each placeholder of a dynamo graph: ("input", None) the user's sequence input,
    ("state", "tensor" | "scalar") model state (a scalar is a Python float dynamo passes as a fresh
    0-d tensor), ("sym", dim) a size of the user input, ("stride", dim) a stride of it,
    ("state_size", (index, dim)) a size of the state tensor at graph input `index`."""

    roles: list
    input_index: int


def plan_inputs(gm, example_inputs, user_inputs=None):
    """Which placeholders of a dynamo graph are the user's input, model state and sizes.

    Dynamo records where each graph input came from (`grapharg.source`): a bare local (`L['ids']`)
    is the user's input, anything reached through an attribute or a global is model state. Without
    that record (a graph built elsewhere) lifted state is recognised by its name and type, or the
    caller names the user inputs."""
    from torch._dynamo.source import LocalSource

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise CaptureError(f"{len(placeholders)} graph inputs but {len(example_inputs)} example inputs")
    user_ids = {id(t) for t in user_inputs} if user_inputs is not None else None
    users = []
    for i, (node, val) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(val, torch.Tensor) or isinstance(val, torch.nn.Parameter) or _is_scalar(node):
            continue
        src = getattr(node.meta.get("grapharg"), "source", None)
        if user_ids is not None:
            is_user = id(val) in user_ids
        else:
            is_user = isinstance(src, LocalSource) if src is not None else not _is_attribute(node, val)
        if is_user:
            users.append(i)
    if len(users) != 1:
        raise CaptureError(f"the graph has {len(users)} user tensor inputs; the decoder takes exactly one "
                           f"(the sequence input, sequence on dim 1)")
    (index,) = users
    x_meta = meta_value(placeholders[index])
    if x_meta is None or x_meta.dim() < 2:
        raise CaptureError("the user input has no sequence dim (dim 1)")
    dims = [sym_expr(s) for s in x_meta.shape]
    strides = [sym_expr(s) for s in x_meta.stride()]
    state_dims = {}
    for i, (node, val) in enumerate(zip(placeholders, example_inputs)):
        m = meta_value(node)
        if i != index and isinstance(val, torch.Tensor) and isinstance(m, torch.Tensor):
            for d, s in enumerate(m.shape):
                state_dims.setdefault(sym_expr(s), (i, d))
    roles = []
    for i, (node, val) in enumerate(zip(placeholders, example_inputs)):
        if i == index:
            roles.append(("input", None))
        elif isinstance(val, torch.Tensor):
            roles.append(("state", "scalar" if _is_scalar(node) else "tensor"))
        elif isinstance(val, (int, torch.SymInt)):
            expr = sym_expr(meta_value(node)) if meta_value(node) is not None else sym_expr(val)
            if expr in dims:
                roles.append(("sym", dims.index(expr)))
            elif expr in strides:  # a view's stride (ids[:, :t] of a longer ids)
                roles.append(("stride", strides.index(expr)))
            elif expr in state_dims:  # a size of model state (dynamic=True marks a cached table's dims too)
                roles.append(("state_size", state_dims[expr]))
            else:
                raise CaptureError(f"graph input {node.name} is a symbolic int that is not a size or stride of the "
                                   f"user input or of the model's state")
        else:
            raise CaptureError(f"graph input {node.name} of type {type(val).__name__} is not supported")
    return InputPlan(roles, index)


def _is_scalar(node):
    """A Python float dynamo passes as a 0-d tensor (a fresh one at every call)."""
    return bool(getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False))


def _is_attribute(node, val):
    # Dynamo names lifted module state L_self_... / L_fn_...; parameters keep their class.
    name = str(node.target)
    return isinstance(val, torch.nn.Parameter) or name.startswith(("L_self_", "L_fn_", "L_mod_")) or "_parameters_" in name or "_buffers_" in name


class GraphAsModule(torch.nn.Module):
    """A dynamo graph as a module of the user input alone: the state dynamo lifted to graph inputs
    is held as parameters/buffers again, SymInts are read off the input's shape. torch.export of
    this module gives the same ATen graph as exporting the model, so both capture levels end in
    one canonical graph."""

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
                if isinstance(t, torch.nn.Parameter):
                    self.register_parameter(f"state_{i}", t)
                else:
                    self.register_buffer(f"state_{i}", t, persistent=False)

    def forward(self, x):
        # each exported node keeps the module path and source line of the dynamo node it came from
        with torch.fx.traceback.preserve_node_meta():
            return _ItemInterpreter(self.graph_module, self._item_of).run(*self._args(x))

    def _args(self, x):
        args = []
        for i, (kind, dim) in enumerate(self._roles):
            if kind == "state":
                args.append(getattr(self, f"state_{i}"))
            elif kind == "sym":
                args.append(x.shape[dim])
            elif kind == "stride":
                args.append(x.stride(dim))
            elif kind == "state_size":
                i, d = dim
                args.append(getattr(self, f"state_{i}").shape[d])
            else:
                args.append(x)
        return args


class _ItemInterpreter(torch.fx.Interpreter):
    """Runs the graph with `state.item()` replaced by its value: dynamo passes a float attribute
    (eps) as a 0-d tensor and calls .item() on it, which torch.export would see as data-dependent."""

    def __init__(self, gm, item_of):
        super().__init__(gm)
        self.item_of = item_of

    def run_node(self, n):
        if n.op == "call_method" and n.target == "item" and n.args[0].name in self.item_of:
            return self.item_of[n.args[0].name]
        return super().run_node(n)


@dataclass
class DynamoSource:
    """A graph dynamo handed a backend, as the capture pass's input (instead of a model)."""

    gm: torch.fx.GraphModule
    inputs: list  # the backend's example inputs (user input, lifted state, SymInts)
    user_inputs: tuple = None  # the model's own inputs, when known
    plan: InputPlan = None  # which graph input is which (else worked out by plan_inputs)


def from_dynamo(gm, backend_inputs, user_inputs=None, max_len=None, plan=None, dynamic=True):
    """The canonical capture of a dynamo graph: the graph as a module of its user input, exported.
    Returns (Captured, GraphAsModule)."""
    plan = plan or plan_inputs(gm, backend_inputs, user_inputs)
    x = backend_inputs[plan.input_index]
    state = {i: t for i, (t, (kind, _)) in enumerate(zip(backend_inputs, plan.roles)) if kind == "state"}
    module = GraphAsModule(gm, plan, state)
    cap = capture_export(module, (x.detach().clone(),), int(max_len or x.shape[1]), dynamic, level="dynamo")
    return cap, module


def _fresh(inputs):
    # export / mark_dynamic tag the tensors they saw as dynamic; a retry needs untagged copies
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)


# ---- op semantics the evaluator needs ------------------------------------------------------------

def normalized_args(node):
    """The op's arguments by schema name (defaults filled in)."""
    pair = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    kwargs = dict(pair.kwargs) if pair is not None else dict(node.kwargs)
    schema = node.target._schema
    if schema.arguments and schema.arguments[0].name == "self" and "input" in kwargs:
        kwargs["self"] = kwargs["input"]  # FX spells a schema's `self` as `input`: accept both
    for a in schema.arguments:
        if a.name not in kwargs and a.has_default_value():
            kwargs[a.name] = a.default_value
    return kwargs


# Ops whose output takes only the shape or dtype (not the values) of a tensor argument.
_SHAPE_ONLY_ARG = {"copy": ("self",), "fill": ("self",), "new_zeros": ("self",), "new_ones": ("self",),
                   "new_full": ("self",), "new_empty": ("self",), "new_empty_strided": ("self",),
                   "type_as": ("other",), "to": ("other",)}


def value_inputs(node):
    """The tensor inputs whose values flow into the output (not those read for their shape or dtype
    only: zeros_like(x), x.new_zeros(...), the destination of a functional copy, y.type_as(x))."""
    t = node.target
    name = t._overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else ""
    if name.endswith("_like") or name.startswith("sym_") or name in ("size", "stride", "numel", "dim"):
        return []
    skip = set()
    if name in _SHAPE_ONLY_ARG:
        args = normalized_args(node)
        skip = {args.get(k) for k in _SHAPE_ONLY_ARG[name]}
    return [n for n in node.all_input_nodes if n not in skip and _holds_tensor(meta_value(n))]


def _holds_tensor(val):
    return isinstance(val, torch.Tensor) or (isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val))



# ---- numeric evaluation -------------------------------------------------------------------------

@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _skip(node):
    name = getattr(node.target, "__name__", str(node.target))
    return name.startswith("_assert") or name == "_guards_fn" or "assert" in str(node.target)


class Runner(torch.fx.Interpreter):
    """Evaluates nodes of a Captured graph in float64 (low-precision casts and factories widened),
    or, with widen=False, in the model's own dtypes (the same arithmetic as the model)."""

    def __init__(self, cap, widen=True):
        super().__init__(cap.gm, garbage_collect_values=False)
        self.cap, self.widen = cap, widen
        self._attrs = {}  # parameters/buffers widened on first use: no copy of the whole model
        self._order = {n: i for i, n in enumerate(cap.gm.graph.nodes)}
        self._syms = {}  # (node, length, batch) -> int: sympy substitution is slow, lengths repeat

    def get_attr(self, target, args, kwargs):
        if target not in self._attrs:
            value = super().get_attr(target, args, kwargs)
            self._attrs[target] = _widen(value) if self.widen else value
        return self._attrs[target]

    def run_node(self, n):
        if _skip(n):
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if self.widen:
            args, kwargs = torch.utils._pytree.tree_map(_widen_dtype, (args, kwargs))
        if n.target in _CONV1D and args[0].dtype == torch.float64:
            return conv1d_f64(*args, **kwargs)
        return getattr(self, n.op)(n.target, args, kwargs)

    def evaluate(self, targets, length, overrides=None, batch=None):
        """Values of `targets` (original nodes) at `length` (and `batch`, else the example's), with
        `overrides` {node: value}.

        Placeholders are bound by shape only: reaching a user input raises NeedsActivation.
        """
        overrides = dict(overrides or {})
        bind = self.cap.bindings(length, batch)
        env, todo, shape_only = {}, set(), set()
        stack = list(targets)
        while stack:
            n = stack.pop()
            if n in todo or n in overrides:
                continue
            todo.add(n)
            val = meta_value(n)
            if isinstance(val, torch.SymInt) and not isinstance(sym_expr(val), int):
                if (n, length, batch) not in self._syms:
                    self._syms[n, length, batch] = int(sym_expr(val).subs(bind))
                env[n] = self._syms[n, length, batch]
                continue
            if n.op == "placeholder":
                raise NeedsActivation(n.name)
            values = value_inputs(n) if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) else n.all_input_nodes
            # zeros_like(x) needs x's shape, not its values: an empty tensor of that shape stands in
            shape_only.update(i for i in n.all_input_nodes if i not in values and isinstance(meta_value(i), torch.Tensor))
            stack.extend(i for i in n.all_input_nodes if i in values or not isinstance(meta_value(i), torch.Tensor))
        for n in shape_only - todo - set(overrides):
            v = meta_value(n)
            dtype = _LOW.get(v.dtype, v.dtype) if self.widen else v.dtype
            env[n] = torch.empty([self.cap.size_at(s, length, batch) for s in v.shape], dtype=dtype)
        self.env = {**env, **overrides}
        with torch.no_grad(), _default_dtype(torch.float64 if self.widen else torch.get_default_dtype()):
            for n in sorted(todo - set(env), key=self._order.__getitem__):
                self.env[n] = self.run_node(n)
        out = [self.env[t] for t in targets]
        self.env = {}
        return out

    def run_full(self, user_inputs):
        """The graph's outputs for the given user inputs (float inputs widened to float64)."""
        args = [_widen(x) for x in user_inputs]
        with torch.no_grad(), _default_dtype(torch.float64):
            return self.run(*args)


_CONV1D = {torch.conv1d, torch.nn.functional.conv1d, torch.ops.aten.conv1d.default}


def conv1d_f64(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv1d for float64 by unfold + einsum: CPU's float64 grouped conv1d is ~100x slower."""
    one = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731
    stride, dilation = one(stride), one(dilation)
    K = weight.shape[-1]
    if isinstance(padding, str):
        padding = 0 if padding == "valid" else dilation * (K - 1) // 2
        x = torch.nn.functional.pad(x, (padding, dilation * (K - 1) - padding))
    else:
        x = torch.nn.functional.pad(x, (one(padding), one(padding)))
    span = dilation * (K - 1) + 1
    win = x.unfold(-1, span, stride)[..., ::dilation]  # [B, Cin, Lout, K]
    B, Cin, Lout = win.shape[:3]
    Cout = weight.shape[0]
    win = win.reshape(B, groups, Cin // groups, Lout, K)
    w = weight.reshape(groups, Cout // groups, Cin // groups, K)
    y = torch.einsum("bgilk,goik->bgol", win, w).reshape(B, Cout, Lout)
    return y + bias[None, :, None] if bias is not None else y


def _widen(t):
    if isinstance(t, torch.Tensor) and t.dtype in _LOW:
        return t.detach().to(_LOW[t.dtype])
    return t


def _widen_dtype(a):
    return _LOW.get(a, a) if isinstance(a, torch.dtype) else a


def random_inputs(cap, length, batch=None):
    """Fresh random user inputs like the example ones, with the sequence (dim 1) at `length`."""
    out = []
    for t in cap.user_inputs:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        shape = list(t.shape)
        if t.dim() > 1 and shape[1] == cap.example_length:
            shape[1] = length
        if batch is not None and t.dim() > 0:
            shape[0] = batch
        if t.is_floating_point() or t.is_complex():
            out.append(torch.randn(shape, dtype=t.dtype))
        else:
            lo, hi = int(t.min()), int(t.max())
            out.append(torch.randint(lo, hi + 1, shape, dtype=t.dtype))
    return tuple(out)


def faithful(cap, model, length):
    """Does the captured graph compute what the model computes at another length?

    torch.export can bake a length-dependent value (e.g. linspace(0, 1, L)'s step count) into a
    constant without a guard; such a graph is only valid at the example length.
    """
    x = random_inputs(cap, length)
    try:
        with torch.no_grad(), preserved_state(model):
            ours = cap.gm(*x)  # in the model's own dtype: the same arithmetic, so only a changed graph differs
            ref = model(*x)
    except Exception:  # noqa: BLE001 - a graph that cannot run at this length is not faithful
        return False
    ours = torch.utils._pytree.tree_leaves(ours)
    ref = torch.utils._pytree.tree_leaves(ref)
    for a, b in zip(ours, ref):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            tol = 1e-3 if b.dtype in (torch.float32, torch.float64) else 3e-2
            if a.shape != b.shape or float((a.double() - b.double()).norm()) > tol * float(b.double().norm()):
                return False
    return True


def capture(model, inputs, level, max_len, dynamic=True):
    if level == "export":
        return capture_export(model, inputs, max_len, dynamic)
    gm, backend_inputs, used = capture_dynamo(model, inputs, dynamic)
    cap, _ = from_dynamo(gm, backend_inputs, used, max_len, dynamic=dynamic)
    cap.user_inputs = tuple(inputs)
    cap.note = "; ".join(n for n in (gm.meta["lcsm_frozen"], cap.note) if n)
    return cap


def run(model, ctx):
    """The capture pass: model -> Captured, checked against the model at other lengths.

    Captures are tried in order until one has a symbolic length: the requested level, then
    (after torch.export) the dynamo graph, exported in turn. When none is symbolic over the served
    lengths (the model reads L in Python: an FFT size planned from it, a branch on it, a table or
    cache it slices), or the symbolic one was not faithful, or none succeeded, the model is captured
    at concrete lengths instead (concrete): the dims whose size differs between the captures are
    the position axes; the decode programs are generalized from them (passes/generalize.py)."""
    levels = [ctx.capture] + (["dynamo"] if ctx.capture == "export" else [])
    cap, failures = None, []
    for level in levels:
        try:
            got = capture(model, ctx.example_inputs, level, ctx.max_len)
        except CaptureError as exc:
            failures.append(f"{level}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - the exporter's own bugs (a hook's IndexError): the next capture
            failures.append(f"{level}: {_first_line(exc)}")
            continue
        if cap is None or got.symbolic:
            cap = got
        if got.symbolic:
            break
        failures.append(f"{level}: {got.note or 'the length was specialised'}")
    if cap is None:  # no dynamic capture at all: the concrete ones may still be taken
        try:
            return concrete(model, ctx.example_inputs, ctx.capture, ctx.max_len, "; ".join(failures))
        except Exception:  # noqa: BLE001 - it fails for the reasons the dynamic captures gave
            raise CaptureError("; ".join(failures)) from None
    if failures and cap.symbolic:
        cap.note = "; ".join([f"fell back to the {cap.level} capture after {'; '.join(failures)}"] + ([cap.note] if cap.note else []))
    L = int(ctx.example_inputs[0].shape[1])
    # checked at a shorter length, and at the example's own when export took it one position shorter
    others = {max(cap.min_len, (2 * min(L, 48)) // 3), L} - {cap.example_length}
    unfaithful = [o for o in sorted(others) if not faithful(cap, model, o)] if cap.symbolic else []
    if cap.symbolic and not unfaithful and cap.max_len >= ctx.max_len:
        return cap
    if unfaithful:
        why = f"the {cap.level} graph differs from the model at L={unfaithful[0]} (a length-dependent value was specialized)"
    elif cap.symbolic:
        why = f"{cap.note}: the model branches on L in Python"
    else:
        why = cap.note or "the length was specialised"
    served = (cap.min_len, cap.max_len) if cap.symbolic and not unfaithful else None
    cap = concrete(model, ctx.example_inputs, cap.level, ctx.max_len, why)
    cap.symbolic_range = served
    return cap


def concrete(model, example_inputs, level, max_len, why):
    """Captures at max_len (the analysed one), at a shorter length (its .alt) and at that length with
    one batch row more (its .alt_batch): sizes affine in the length and the batch are solved from the
    three (passes/generalize.py)."""
    cap = capture(model, extend_length(example_inputs, max_len), level, max_len, dynamic=False)
    cap.note = f"{why}; captured at concrete L={max_len} and L={{alt}}"
    short = second_length(max_len)
    if 2 <= short < max_len:
        shorter = extend_length(example_inputs, short)
        cap.alt = capture(model, shorter, level, short, dynamic=False)
        cap.counterpart, cap.alt.counterpart = counterparts(cap, cap.alt), counterparts(cap.alt, cap)
        try:
            cap.alt_batch = capture(model, _one_row_more(shorter), level, short, dynamic=False)
            cap.batch_counterpart = counterparts(cap, cap.alt_batch)
        except CaptureError:
            cap.alt_batch = None  # the batch stays the example's (a model built for one batch size)
    cap.note = cap.note.format(alt=short if cap.alt is not None else "-")
    return cap


def second_length(max_len):
    """The second capture's length: near max_len and equal to it modulo a large power of two, so that
    Python branches on the length (a threshold, parity, divisibility) most likely take max_len's side
    at both. The decoder runs max_len's glue at every length, which prefix stability (the safety net,
    then the translation validation) makes the model's own at shorter lengths."""
    return max_len - (1 << max(0, (max_len // 4).bit_length() - 1))


def extend_length(example_inputs, length):
    """The example with every input as long as the first tiled (or cut) to `length` positions:
    values the model accepts (token ids in its vocabulary), at the length to capture."""
    L = example_inputs[0].shape[1]
    reps = -(-length // L)
    return tuple(t.repeat(1, reps, *[1] * (t.dim() - 2))[:, :length]
                 if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[1] == L else t for t in example_inputs)


def counterparts(cap, other):
    """cap's node -> the node of the other capture of the same model that the same code made: the
    same op, module and source line, the k-th such; None where there is none. Names do not
    correspond: once one length takes another branch (a no-op slice elided at one length), every
    later name shifts."""
    def key(node):
        trace = (node.meta.get("stack_trace") or "").strip().splitlines()
        if not trace:  # placeholders and attributes: their names are their identity
            return node.op, node.name
        modules = list((node.meta.get("nn_module_stack") or {}).values())
        target = "aten.slice.Tensor" if node.target is torch.ops.aten.alias.default else str(node.target)  # x[:L] at L = size
        return node.op, target, modules[-1][0] if modules else "", trace[-1].strip()

    theirs, seen = {}, {}
    for node in other.gm.graph.nodes:
        theirs.setdefault(key(node), []).append(node)
    out = {}
    for node in cap.gm.graph.nodes:
        k = key(node)
        i = seen[k] = seen.get(k, -1) + 1
        same = theirs.get(k, ())
        out[node] = same[i] if i < len(same) else None
    return out
