"""Capture a model to one FX GraphModule, and evaluate pieces of it numerically.

Two levels: torch.export (non-strict, dim 1 of the first input dynamic) for `analyze`, and the graph
dynamo hands a torch.compile backend. Either way the result is a `Captured`: the graph, the role of
each placeholder (user input, parameter, symbolic int), the sympy symbol of the sequence length and
the shape bindings needed to evaluate any node at another length. `Runner` evaluates the closure of
a few nodes in float64 with placeholders bound to shapes only, so numeric checks never run the
whole model.
"""

import contextlib
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

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
    roles: dict  # placeholder node -> "input" | "param" | "sym"
    values: dict  # placeholder node -> tensor for params (dynamo lifts them to inputs)
    length_symbol: object  # sympy.Symbol of dim 1 of the first input, or None (concrete)
    example_length: int
    max_len: int
    min_len: int = 2
    note: str = ""
    alt_shapes: dict = field(default_factory=dict)  # concrete captures: node name -> shape at another L

    @property
    def symbolic(self):
        return self.length_symbol is not None

    def bindings(self, length):
        """Symbol -> int for every symbol of the user input shapes, with the sequence at `length`."""
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
                    out[expr] = length if expr == self.length_symbol else _example_size(self, node, d)
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

    def size_at(self, expr, length):
        expr = sym_expr(expr)
        if isinstance(expr, int):
            return expr
        return int(expr.subs(self.bindings(length)))


def _example_size(cap, node, dim):
    idx = [n for n, r in cap.roles.items() if r == "input"].index(node)
    return int(cap.user_inputs[idx].shape[dim])


def meta_value(node):
    return node.meta.get("val", node.meta.get("example_value"))


def sym_expr(x):
    """sympy expression of a SymInt (int stays int)."""
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        return int(expr) if expr.is_Integer else expr
    return int(x) if isinstance(x, (int, sympy.Integer)) else x


def _first_line(exc, lines=2):
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " ".join(t.strip() for t in text[:lines] if t.strip())[:400]


# ---- export -------------------------------------------------------------------------------------

def capture_export(model, example_inputs, max_len, dynamic=True, decompose=False):
    """torch.export with the sequence dynamic in [2, max_len]; a concrete export if that fails.

    decompose: lower to the core ATen opset (rfft -> constant_pad_nd + _fft_r2c, conv1d ->
    convolution, ...), the spelling other exporters hand over.
    """
    x = example_inputs[0]
    specs = [None] * len(example_inputs)
    specs[0] = {1: torch.export.Dim.DYNAMIC(min=2, max=max_len)}
    # Other inputs that share the sequence length follow it.
    for i, t in enumerate(example_inputs[1:], 1):
        if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[1] == x.shape[1]:
            specs[i] = {1: torch.export.Dim.DYNAMIC(min=2, max=max_len)}
    note = ""
    try:
        if not dynamic:
            raise CaptureError("a concrete capture was asked for")
        ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=tuple(specs), strict=False)
    except Exception as exc:  # noqa: BLE001 - any exporter failure falls back to a concrete length
        note = f"dynamic export failed ({_first_line(exc, 1)}); captured at concrete L={x.shape[1]}" if dynamic else ""
        try:
            ep = torch.export.export(model, _fresh(example_inputs), strict=False)
        except Exception as exc2:  # noqa: BLE001
            raise CaptureError(_first_line(exc2)) from None
    if decompose:
        ep = ep.run_decompositions()
    gm = ep.module()
    roles = {n: "input" for n in gm.graph.nodes if n.op == "placeholder"}
    cap = Captured(gm, "export", tuple(example_inputs), roles, {}, None, int(x.shape[1]), int(max_len), note=note)
    _set_length_symbol(cap)
    if cap.symbolic:
        rng = ep.range_constraints.get(cap.length_symbol)
        if rng is not None:
            lo, hi = int(rng.lower), int(min(rng.upper, max_len))
            cap.min_len = lo
            if hi < max_len:
                cap.note = f"export narrowed the served lengths to [{lo}, {hi}]"
                cap.max_len = hi
    return cap


def _set_length_symbol(cap):
    first = next(n for n, r in cap.roles.items() if r == "input")
    size = sym_expr(meta_value(first).shape[1])
    cap.length_symbol = size if isinstance(size, sympy.Symbol) else None


# ---- dynamo -------------------------------------------------------------------------------------

def capture_dynamo(model, example_inputs, dynamic=True):
    """Run torch.compile(model, backend=recorder, dynamic=True, fullgraph=True) once.

    Returns (gm, backend_example_inputs): exactly what a torch.compile backend receives.
    """
    graphs = []

    def recorder(gm, inputs):
        graphs.append((gm, list(inputs)))
        return gm.forward

    # A fresh cache, so the recorder is called even if this forward was compiled before (the
    # recompile limit would otherwise silently fall back to eager). This clears dynamo's cache for
    # the whole process: compiled functions recompile on their next call.
    torch._dynamo.reset()
    try:
        torch.compile(model, backend=recorder, dynamic=dynamic, fullgraph=True)(*example_inputs)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(_first_line(exc)) from None
    finally:
        torch._dynamo.reset()
    if not graphs:
        raise CaptureError("dynamo compiled no graph (the model ran eagerly)")
    return graphs[0]


def from_dynamo(gm, backend_inputs, user_inputs=None, max_len=None):
    """Wrap a dynamo graph: placeholders are user inputs, lifted parameters/buffers or SymInts."""
    roles, values, users = {}, {}, []
    user_ids = {id(t) for t in user_inputs} if user_inputs is not None else None
    for node, val in zip([n for n in gm.graph.nodes if n.op == "placeholder"], backend_inputs):
        ex = meta_value(node)
        if isinstance(ex, torch.SymInt) or isinstance(val, (int, torch.SymInt)):
            roles[node] = "sym"
        elif (id(val) in user_ids) if user_ids is not None else not _is_attribute(node, val):
            roles[node] = "input"
            users.append(val)
        else:
            roles[node] = "param"
            values[node] = val
    if not users:
        raise CaptureError("the dynamo graph has no tensor input")
    length = int(users[0].shape[1])
    cap = Captured(gm, "dynamo", tuple(users), roles, values, None, length, int(max_len or length))
    _set_length_symbol(cap)
    return cap


def _is_attribute(node, val):
    # Dynamo names lifted module state L_self_... / L_fn_...; parameters keep their class.
    name = str(node.target)
    return isinstance(val, torch.nn.Parameter) or name.startswith(("L_self_", "L_fn_", "L_mod_")) or "_parameters_" in name or "_buffers_" in name


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
    """Evaluates nodes of a Captured graph in float64 (low-precision casts and factories widened)."""

    def __init__(self, cap):
        super().__init__(cap.gm, garbage_collect_values=False)
        self.cap = cap
        self._params = {n: _widen(v) for n, v in cap.values.items()}
        self._attrs = {}  # parameters/buffers widened on first use: no copy of the whole model
        self._order = {n: i for i, n in enumerate(cap.gm.graph.nodes)}
        self._syms = {}  # (node, length) -> int: sympy substitution is slow, lengths repeat

    def get_attr(self, target, args, kwargs):
        if target not in self._attrs:
            self._attrs[target] = _widen(super().get_attr(target, args, kwargs))
        return self._attrs[target]

    def run_node(self, n):
        if _skip(n):
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args, kwargs = torch.utils._pytree.tree_map(_widen_dtype, (args, kwargs))
        if n.target in _CONV1D and args[0].dtype == torch.float64:
            return conv1d_f64(*args, **kwargs)
        return getattr(self, n.op)(n.target, args, kwargs)

    def evaluate(self, targets, length, overrides=None):
        """Values of `targets` (original nodes) at `length`, with `overrides` {node: value}.

        Placeholders are bound by shape only: reaching a user input raises NeedsActivation.
        """
        overrides = dict(overrides or {})
        bind = self.cap.bindings(length)
        env, todo = {}, set()
        stack = list(targets)
        while stack:
            n = stack.pop()
            if n in todo or n in overrides:
                continue
            todo.add(n)
            val = meta_value(n)
            if isinstance(val, torch.SymInt) and not isinstance(sym_expr(val), int):
                if (n, length) not in self._syms:
                    self._syms[n, length] = int(sym_expr(val).subs(bind))
                env[n] = self._syms[n, length]
                continue
            if n.op == "placeholder":
                role = self.cap.roles[n]
                if role == "input":
                    raise NeedsActivation(n.name)
                if role == "param":
                    env[n] = self._params[n]
                elif role == "sym":
                    env[n] = int(sympy.sympify(sym_expr(val)).subs(bind))
                continue
            stack.extend(n.all_input_nodes)
        self.env = {**env, **overrides}
        with torch.no_grad(), _default_dtype(torch.float64):
            for n in sorted(todo - set(env), key=self._order.__getitem__):
                self.env[n] = self.run_node(n)
        out = [self.env[t] for t in targets]
        self.env = {}
        return out

    def run_full(self, user_inputs):
        """The graph's outputs for the given user inputs (float inputs widened to float64)."""
        length = int(user_inputs[0].shape[1])
        bind = self.cap.bindings(length)
        args, it = [], iter(user_inputs)
        for n in self.module.graph.nodes:
            if n.op != "placeholder":
                continue
            role = self.cap.roles[n]
            if role == "input":
                args.append(_widen(next(it)))
            elif role == "param":
                args.append(self._params[n])
            else:
                args.append(int(sym_expr(meta_value(n)).subs(bind)))
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
        with torch.no_grad():
            ours = Runner(cap).run_full(x)
            ref = model(*x)
    except Exception:  # noqa: BLE001 - a graph that cannot run at this length is not faithful
        return False
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    for a, b in zip(ours, ref):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            if a.shape != b.shape or float((a - b.double()).norm()) > 1e-3 * float(b.double().norm()):
                return False
    return True


def _fresh(inputs):
    # export / mark_dynamic tag the tensors they saw as dynamic; a retry needs untagged copies
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)


def capture(model, inputs, level, max_len, dynamic=True):
    inputs = _fresh(inputs)
    if level == "export":
        return capture_export(model, inputs, max_len, dynamic)
    gm, backend_inputs = capture_dynamo(model, inputs, dynamic)
    return from_dynamo(gm, backend_inputs, inputs, max_len)


def run(model, ctx):
    """The capture pass: model -> Captured, checked against the model at a second length. A concrete
    capture (dynamic capture failed or was not faithful) comes with a second one at a shorter length
    (ctx.alt_cap): the dims whose size differs between the two are the position axes."""
    cap = capture(model, ctx.example_inputs, ctx.capture, ctx.max_len)
    L = cap.example_length
    other = max(cap.min_len, (2 * min(L, 48)) // 3)
    if cap.symbolic and other != L and not faithful(cap, model, other):
        note = (f"the {cap.level} graph differs from the model at L={other} (a length-dependent value was "
                f"specialized); analysed concrete captures instead")
        cap = capture(model, ctx.example_inputs, ctx.capture, ctx.max_len, dynamic=False)
        cap.note = note
    if not cap.symbolic and L > 2:
        short = tuple(t[:, : L - L // 4] if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[1] == L else t
                      for t in ctx.example_inputs)
        ctx.alt_cap = capture(model, short, ctx.capture, L - L // 4, dynamic=False)
        cap.alt_shapes, ctx.alt_cap.alt_shapes = _shapes(ctx.alt_cap), _shapes(cap)
    return cap


def _shapes(cap):
    return {n.name: tuple(meta_value(n).shape) for n in cap.gm.graph.nodes if isinstance(meta_value(n), torch.Tensor)}
