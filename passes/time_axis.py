"""Time-axis analysis: where positions live in every value, and what each op does to them.

Positions enter at dim 1 of the user input and are followed op by op through the symbolic shapes.
An activation's `Axis` says which dim holds them, whether that dim also holds other indices (a
merged (batch x time) axis), and whether the value is shifted (index i holds position i - shift)
or is an FFT of positions. Each op on activations is classified from what it does, not from a list
of known models' ops:

1. pointwise (the ATen overload's `torch.Tag.pointwise`): broadcasting maps every input's axis to
   an output dim; local unless two different position axes meet;
2. movement (the table `MOVEMENT` below): views, permutes and reshapes follow the axis through the
   sizes; slices, pads and cats along positions shift it, and a value shifted toward the past with
   zero fill that is whole again is a causal delay (decoded as a short convolution); selects,
   flips, rolls, strided slices, repeats of positions mix them;
3. contractions (as einsum specs): local when no position axis is contracted and no two meet;
4. ops that take dims (schema arguments named dim/dims/...): local when no dim they act on holds
   positions;
5. anything else: torch's decomposition, classified op by op; failing that, a numeric probe on the
   captured example (perturb one position, see which outputs move).

FFTs and convolutions along positions are `conv_part`: legal only inside a convolution detect
recognises. Values computed from parameters, buffers and positions only are 'static'; those that
depend on the sequence length (by shape or value) are `length_dependent`: where one meets an
activation it is a position constant (passes/position_constants.py).
"""

import operator
from dataclasses import dataclass, field, replace

import numpy as np
import sympy
import torch
import torch.fx

from lcsm_compile.passes.capture import meta_value, normalized_args as _normalized, sym_expr, value_inputs, values_over
from lcsm_compile.passes.detect import registered

aten = torch.ops.aten


@dataclass(frozen=True)
class Axis:
    """Where an activation's positions live."""

    dim: int
    shift: object = 0  # index i holds position i - shift (> 0: a delay, < 0: reads the future); an int, or a
    # sympy expression in L for the causal padding of a convolution whose kernel grows with L
    inner: object = 1  # a merged axis: index = (o * L + t) * inner + r (1: the dim is positions alone)
    freq: bool = False  # an FFT of positions (inside a convolution)
    origin: str = ""  # "shift" | "roll" | "conv": made by a pad/slice/cat, a roll or a convolution, not yet whole

    @property
    def aligned(self):
        return self.shift == 0 and not self.freq and not self.origin


@dataclass
class TimeInfo:
    dep: str  # "activation" | "static" | "sym"
    axis: Axis | None = None  # activations: where positions live (None: nowhere)
    cls: str = "static"  # local | conv_part | delay | mixing | static | sym | input
    why: str = ""
    length_dependent: bool = False  # static / sym values computed from the sequence length
    static_dims: tuple = ()  # static values: the dims whose size depends on the length (lag axes)
    delay: int = 0  # cls "delay": positions the value lags its input by
    reason: str = "TIME_MIXING_OP"  # the Reason a "mixing" op is declined with
    matrix: tuple = ()  # a matrix over positions applied to an activation: (activation operand, its einsum map)
    parts: list = field(default=None, repr=False)  # multi-output ops: one TimeInfo per output

    @property
    def dims(self):
        """Position axes: the time axis of an activation, the length-dependent dims of a static value."""
        if self.dep == "activation":
            return (self.axis.dim,) if self.axis is not None else ()
        return self.static_dims

    @property
    def kind(self):
        return None if not self.dims else ("time" if self.dep == "activation" else "lag")


class Mixing(Exception):
    """The op mixes positions; the message says how."""

    def __init__(self, why, reason="TIME_MIXING_OP"):
        super().__init__(why)
        self.why, self.reason = why, reason


class Unknown(Exception):
    """No rule covers the op: decompose or probe it."""


# ---- sizes --------------------------------------------------------------------------------------

def length_dims(node, cap):
    """Dims of a value whose size depends on the sequence length (symbolic, or differs between the
    two concrete captures)."""
    val = meta_value(node)
    if not isinstance(val, torch.Tensor):
        return ()
    other = meta_value(cap.counterpart[node]) if cap.counterpart.get(node) is not None else None
    if not cap.symbolic and isinstance(other, torch.Tensor) and other.dim() == val.dim():
        return tuple(d for d, (a, b) in enumerate(zip(val.shape, other.shape)) if a != b)
    out = []
    for d, s in enumerate(val.shape):
        e = sym_expr(s)
        hit = (isinstance(e, sympy.Expr) and cap.length_symbol in e.free_symbols) if cap.symbolic else e == cap.example_length
        if hit:
            out.append(d)
    return tuple(out)


class Sizes:
    """Symbolic size questions about one graph, with L the length symbol (or the example length)
    served over [lo, hi]."""

    def __init__(self, length, lo=None, hi=None):
        self.L, self.lo, self.hi = length, lo, hi
        self._is_len = {}

    def is_len(self, e):
        """e == L for every served length (Min(max_len, L) is L where L <= max_len)."""
        e = sym_expr(e)
        if isinstance(self.L, int):
            return e == self.L
        if not isinstance(e, sympy.Expr) or self.L not in e.free_symbols:
            return False
        if e not in self._is_len:
            d = sympy.simplify(e - self.L)
            if d == 0:
                self._is_len[e] = True
            elif d.free_symbols == {self.L} and self.lo is not None:
                self._is_len[e] = bool(np.all(values_over(d, self.L, np.arange(self.lo, self.hi + 1)) == 0))
            else:
                self._is_len[e] = False
        return self._is_len[e]

    def served(self, e):
        """e, or L where e equals L over the served range."""
        return self.L if not isinstance(self.L, int) and self.is_len(e) else e

    def depends(self, e):
        e = sym_expr(e)
        if isinstance(self.L, int):
            return False
        return isinstance(e, sympy.Expr) and self.L in e.free_symbols

    @staticmethod
    def divides(a, b):
        """a divides b, for sizes that are products of positive integer symbols and integers."""
        a, b = sympy.sympify(sym_expr(a)), sympy.sympify(sym_expr(b))
        if a == 0:
            return False
        try:
            num, den = sympy.fraction(sympy.cancel(b / a))
            if den != 1:
                return False
            if not num.free_symbols:
                return bool(num.is_integer)
            return all(c.is_integer for c in sympy.Poly(num, *num.free_symbols).coeffs())
        except (sympy.PolynomialError, TypeError, ValueError):
            return False


def _shape(v):
    return [sym_expr(s) for s in v.shape] if isinstance(v, torch.Tensor) else None


def _prod(xs):
    out = 1
    for x in xs:
        out = out * x
    return sympy.sympify(out) if not isinstance(out, int) else out


# ---- the pass -----------------------------------------------------------------------------------

def run(canon, ctx):
    """Time-axis pass: {node: COp} -> {node: TimeInfo}."""
    cap = ctx.cap
    sizes = Sizes(cap.length_symbol, cap.min_len, cap.max_len) if cap.symbolic else Sizes(cap.example_length)
    analysis = Analysis(sizes, cap=cap, ctx=ctx)
    first_input = next((n for n in cap.gm.graph.nodes if n.op == "placeholder"), None)
    for node in cap.gm.graph.nodes:
        if node.op == "placeholder":
            val = meta_value(node)
            has_time = isinstance(val, torch.Tensor) and val.dim() > 1 and (
                node is first_input or analysis.sizes.is_len(val.shape[1]))
            analysis.info[node] = TimeInfo("activation", Axis(1) if has_time else None, "input")
        else:
            analysis.visit(node)
    return analysis.info


class Analysis:
    """Classifies the nodes of one graph in order; `info` maps node -> TimeInfo. Also runs on the
    decomposition of a single op (then `cap` is None and L is the example length)."""

    def __init__(self, sizes, cap=None, ctx=None, depth=0):
        self.sizes, self.cap, self.ctx, self.depth = sizes, cap, ctx, depth
        self.info = {}

    def visit(self, node):
        try:
            self.info[node] = self._visit(node)
        except Mixing as exc:
            self.info[node] = TimeInfo("activation", self._guess_axis(node), "mixing", exc.why, reason=exc.reason)
        except Exception as exc:  # noqa: BLE001 - a rule that breaks on an op declines it, never crashes
            self.info[node] = TimeInfo("activation", self._guess_axis(node), "mixing",
                                       f"{_name(node)} could not be classified ({type(exc).__name__}: {exc})"[:300])

    def _guess_axis(self, node):
        """Where positions most likely are after a declined op (its first dim of size L), so that
        one declined op is reported once, not again by everything downstream of it."""
        val = meta_value(node)
        val = val if isinstance(val, torch.Tensor) else next(iter(_tensors(val)), None)
        if val is None:
            return None
        dims = [d for d in range(val.dim()) if self.sizes.is_len(val.shape[d])]
        return Axis(dims[0]) if dims else None

    def _visit(self, node):
        if node.op == "get_attr":
            return TimeInfo("static", cls="static")
        if node.op == "output":
            return self._output(node)
        val = meta_value(node)
        ins = [n for n in node.all_input_nodes if n in self.info]
        if val is None:  # runtime asserts and guards
            return TimeInfo("static", cls="none")
        if _is_sym(val):
            ld = any(self.info[n].length_dependent for n in ins) or self.sizes.depends(val)
            return TimeInfo("sym", cls="sym", length_dependent=ld)
        if node.target is operator.getitem:
            return self._getitem(node)
        values = value_inputs(node)
        if not any(self.info[n].dep == "activation" for n in values):
            ld = any(self.info[n].length_dependent for n in ins) or any(
                self.sizes.depends(s) for v in _tensors(val) for s in v.shape)
            dims = length_dims(node, self.cap) if self.cap is not None else ()
            if self.cap is not None and not self.cap.symbolic:  # concrete captures: sizes that differ between two
                ld = ld or bool(dims)
            return TimeInfo("static", cls="static", length_dependent=ld, static_dims=dims)
        try:
            return self.classify(node)
        except Unknown:
            return self.fallback(node)

    def _output(self, node):
        for i, leaf in enumerate(torch.utils._pytree.tree_leaves(node.args[0])):
            if not isinstance(leaf, torch.fx.Node) or self.info[leaf].dep != "activation":
                continue
            t = self.info[leaf]
            if t.axis is None or not t.axis.aligned:
                why = "has no positions axis" if t.axis is None else "is not aligned with the input's positions"
                return TimeInfo("activation", None, "mixing", f"model output {i} ({leaf.name}) {why}")
        return TimeInfo("static", cls="local")

    def _getitem(self, node):
        src, idx = node.args
        t = self.info[src]
        if t.parts is not None and isinstance(idx, int):
            return t.parts[idx]
        return replace(t, parts=None)

    # -- dispatch ---------------------------------------------------------------------------------

    def classify(self, node):
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            raise Unknown()
        name = target._overloadpacket.__name__
        mixer = registered(node)
        if mixer is not None:  # a user-declared convolution keeps its input's layout
            return TimeInfo("activation", self.info[node.args[mixer.input_arg]].axis, "conv_part", "registered mixer")
        args = _normalized(node)
        if name in CONV_PARTS:
            return CONV_PARTS[name](self, node, args)
        if name in MOVEMENT:
            return MOVEMENT[name](self, node, args)
        if name in CONTRACTIONS:
            return self.contraction(node, *CONTRACTIONS[name](self, node, args))
        if name in NORMS:
            return self.reduce_dims(node, NORMS[name](self, node, args), name)
        if torch.Tag.pointwise in target.tags or name in POINTWISE:
            return self.pointwise(node, args)
        dims = _dim_args(args, target)
        if dims is not None:
            return self.reduce_dims(node, None if dims == "all" else dims, name)
        raise Unknown()

    def fallback(self, node):
        """Decompose the op and classify its parts; else probe it; else decline it."""
        if self.depth < 3 and isinstance(node.target, torch._ops.OpOverload):
            try:
                sub = decompose(node, self)
            except Mixing:
                raise
            except Exception:  # noqa: BLE001 - no decomposition: probe instead
                sub = None
            if sub is not None:
                return sub
        return probe(node, self)

    # -- the rules --------------------------------------------------------------------------------

    def act(self, n):
        return isinstance(n, torch.fx.Node) and n in self.info and self.info[n].dep == "activation"

    def local(self, axis, why=""):
        return TimeInfo("activation", axis, _cls_of(axis), why)

    def pointwise(self, node, args):
        """Broadcasting maps each input dim to an output dim (right-aligned)."""
        out_nd = meta_value(node).dim()
        axes = set()
        operands = value_inputs(node)
        for n in operands:
            t, v = self.info[n], meta_value(n)
            if not isinstance(v, torch.Tensor):
                continue
            off = out_nd - v.dim()
            if t.dep == "activation" and t.axis is not None:
                axes.add(replace(t.axis, dim=t.axis.dim + off))
        freq = {a for a in axes if a.freq}
        if freq:  # spectral arithmetic inside a convolution
            return TimeInfo("activation", next(iter(freq)), "conv_part")
        if len({a.dim for a in axes}) > 1:
            raise Mixing(f"{_name(node)} combines values whose positions lie on different axes (pairs positions)")
        if len(axes) > 1:
            raise Mixing(f"{_name(node)} combines values shifted by different numbers of positions")
        axis = next(iter(axes), None)
        for n in operands:  # position constants must put their positions on the activation's axis
            t, v = self.info[n], meta_value(n)
            if t.dep == "static" and t.length_dependent and isinstance(v, torch.Tensor):
                off = out_nd - v.dim()
                dims = {d + off for d in range(v.dim()) if self.sizes.depends(v.shape[d]) or self.sizes.is_len(v.shape[d])}
                if dims and (axis is None or dims != {axis.dim}):
                    raise Mixing(f"{_name(node)}: a position table meets the activation on another axis")
                if not dims and v.numel() > 0:
                    raise Mixing(f"{_name(node)} uses a value computed from the sequence length", "LENGTH_DEPENDENT")
        for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
            if isinstance(a, torch.fx.Node) and a in self.info and self.info[a].dep == "sym" and self.info[a].length_dependent:
                raise Mixing(f"{_name(node)} uses the sequence length as a number", "LENGTH_DEPENDENT")
        return self.local(axis)

    def contraction(self, node, specs, out):
        """specs: [(operand node, letters)], out: output letters. Positions must not be contracted,
        and at most one position letter may appear."""
        time = {}
        for n, letters in specs:
            t, v = self.info.get(n), meta_value(n)
            if t is None or not isinstance(v, torch.Tensor):
                continue
            if t.dep == "activation" and t.axis is not None:
                time[letters[t.axis.dim]] = t.axis
            elif t.dep == "static" and t.length_dependent:
                for d in range(v.dim()):
                    if self.sizes.depends(v.shape[d]) or self.sizes.is_len(v.shape[d]):
                        time.setdefault(letters[d], None)
        if not time:
            return self.local(None)
        if len(time) > 1:
            matrix = self.position_matrix(node, specs, out, time)
            if matrix is not None:
                return matrix
            raise Mixing(f"{_name(node)} pairs positions of two values (attention-like)")
        (letter, axis), = time.items()
        if letter not in out:
            raise Mixing(f"{_name(node)} contracts over positions")
        if axis is None:  # a position table contracted with an activation without positions
            raise Mixing(f"{_name(node)} contracts a position table with an activation")
        return self.local(replace(axis, dim=out.index(letter)))

    def position_matrix(self, node, specs, out, time):
        """y[..., t, ...] = sum_s M[t, s] x[..., s, ...] with M a table over positions (parameters and
        positions only, [T, T] sliced to [L, L]): a convolution exactly when M is lower-triangular
        Toeplitz, which detect and the numeric checks decide. None when the contraction is not that."""
        acts = [(c, a) for c, a in time.items() if a is not None]
        rows = [c for c, a in time.items() if a is None]
        if len(acts) != 1 or len(rows) != 1:
            return None
        (s, axis), (t,) = acts[0], rows
        tables = [(n, letters) for n, letters in specs if s in letters and t in letters]
        operands = [(n, letters) for n, letters in specs if n in self.info and self.info[n].dep == "activation"]
        if s in out or t not in out or len(tables) != 1 or len(operands) != 1 or not axis.aligned or axis.inner != 1:
            return None
        if self.info[tables[0][0]].dep != "static" or not self.sizes.is_len(meta_value(node).shape[out.index(t)]):
            return None
        x, letters = operands[0]
        return TimeInfo("activation", Axis(out.index(t)), "conv_part", "a matrix over positions",
                        matrix=(x, f"{letters.replace(s, t)}->{out}"))

    def reduce_dims(self, node, dims, name):
        """An op acting along `dims` of its first input (None: all dims)."""
        x = first_tensor(node)
        t = self.info[x]
        if t.dep != "activation" or t.axis is None:
            return self.local(None) if t.axis is None else self.same_axes(node, t.axis)
        nd = meta_value(x).dim()
        dims = set(range(nd)) if dims is None else {d % nd if nd else d for d in dims}
        if t.axis.dim in dims:
            if name == "cumsum" and t.axis.aligned and t.axis.inner == 1 and dims == {t.axis.dim}:
                # y_t = sum_{s<=t} x_s: a causal convolution with the all-ones filter
                return TimeInfo("activation", Axis(t.axis.dim), "conv_part", "a running sum over positions")
            raise Mixing(f"{name} over positions")
        outs = _tensors(meta_value(node))
        parts = []
        for o in outs:
            if o.dim() == nd:
                a = t.axis
            elif o.dim() == nd - len(dims):
                a = replace(t.axis, dim=t.axis.dim - sum(1 for d in dims if d < t.axis.dim))
            else:
                raise Unknown()
            if not self.sizes.is_len(o.shape[a.dim]) and not _same(o.shape[a.dim], meta_value(x).shape[t.axis.dim]):
                raise Unknown()
            parts.append(self.local(a))
        return _multi(node, parts)

    def same_axes(self, node, axis):
        return _multi(node, [self.local(axis) for _ in _tensors(meta_value(node))])


def _multi(node, parts):
    val = meta_value(node)
    if isinstance(val, torch.Tensor):
        return parts[0]
    first = parts[0] if parts else TimeInfo("activation", None, "local")
    out = replace(first)
    out.parts = parts
    return out


def _same(a, b):
    a, b = sym_expr(a), sym_expr(b)
    return a == b if isinstance(a, int) or isinstance(b, int) else sympy.simplify(a - b) == 0


def _is_sym(val):
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) and not isinstance(val, torch.Tensor)


def _tensors(val):
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def _name(node):
    t = node.target
    return t._overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def value_live(graph):
    """The nodes whose values reach the output (an op that reads only a value's shape, such as
    zeros_like(x) or the fill of x[:, 0] = 0, does not keep it alive)."""
    live = set()
    for node in reversed(graph.nodes):
        if node.op == "output" or any(u in live and node in value_inputs(u) for u in node.users):
            live.add(node)
    return live


def first_tensor(node):
    return next(n for n in node.all_input_nodes if isinstance(meta_value(n), torch.Tensor))


def _dims_list(v):
    if v is None:
        return None
    return [int(d) for d in v] if isinstance(v, (list, tuple)) else [int(v)]


_DIM_ARGS = ("dim", "dims", "dim0", "dim1", "dim2", "dimension", "axis")


def _dim_args(args, target):
    """The dims a dim-taking op acts on, read from its schema; None when it takes no dims. An
    optional dim left at None means every dim (a full reduction)."""
    found, any_arg = [], False
    for a in target._schema.arguments:
        if a.name not in _DIM_ARGS:
            continue
        if "int" not in str(a.type).lower():
            continue
        any_arg = True
        v = args.get(a.name)
        if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
            return "all"
        found += _dims_list(v)
    if not any_arg:
        return None
    return found


# ---- conv parts ---------------------------------------------------------------------------------

def _fft(analysis, node, args, inverse):
    x = args.get("self") if "self" in args else args.get("input")
    t = analysis.info[x]
    nd = meta_value(x).dim()
    dims = _dims_list(args.get("dim"))
    if dims is None:
        dims = [nd - 1]
    dims = [d % nd for d in dims]
    if t.axis is None or t.axis.dim not in dims:
        return analysis.local(t.axis)  # an FFT over channels: local
    if inverse:
        if not t.axis.freq:
            raise Mixing(f"{_name(node)} of an activation that is not a spectrum")
        return _whole(analysis, node, Axis(t.axis.dim, origin="conv"), meta_value(node).shape[t.axis.dim])
    if t.axis.inner != 1:
        raise Mixing(f"{_name(node)} over a merged positions axis")
    return TimeInfo("activation", Axis(t.axis.dim, freq=True), "conv_part", f"{_name(node)} along positions")


def _fft_c2c(analysis, node, args):
    return _fft(analysis, node, args, inverse=not args.get("forward", True))


def _conv(analysis, node, args):
    x, w = args["input"], args["weight"]
    t = analysis.info[x]
    wv, xv = meta_value(w), meta_value(x)
    if t.axis is None:
        return analysis.local(None)
    if args.get("transposed"):
        raise Mixing(f"{_name(node)} transposed along positions")
    if wv.dim() != 3 or t.axis.dim != xv.dim() - 1:
        if wv.dim() == 3 and t.axis.dim == 1:
            raise Mixing(f"{_name(node)} sums over positions (its channel axis)")
        raise Unknown()
    one = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731
    if sym_expr(wv.shape[-1]) == 1 and one(args.get("padding", 0)) in (0, "valid", "same") and one(args.get("stride", 1)) == 1:
        return analysis.local(t.axis)  # a kernel-1 conv is a channel contraction
    return _whole(analysis, node, Axis(t.axis.dim, origin="conv"), meta_value(node).shape[t.axis.dim])


CONV_PARTS = {
    "fft_rfft": lambda a, n, args: _fft(a, n, args, False), "fft_fft": lambda a, n, args: _fft(a, n, args, False),
    "fft_irfft": lambda a, n, args: _fft(a, n, args, True), "fft_ifft": lambda a, n, args: _fft(a, n, args, True),
    "_fft_r2c": lambda a, n, args: _fft(a, n, args, False), "_fft_c2r": lambda a, n, args: _fft(a, n, args, True),
    "_fft_c2c": _fft_c2c, "conv1d": _conv, "convolution": _conv, "_convolution": _conv,
}


# ---- movement -----------------------------------------------------------------------------------

def _x(analysis, node, args):
    x = args.get("self", args.get("input"))
    return x, analysis.info[x]


def _whole(analysis, node, axis, size):
    """A shifted or convolved value whose positions axis is whole (size L) again: a convolution's
    output (slice), or the end of a causal delay (decoded as a ring buffer)."""
    whole = not axis.freq and axis.inner == 1 and analysis.sizes.is_len(size)
    if axis.origin == "conv":
        if whole and axis.shift == 0:
            return TimeInfo("activation", Axis(axis.dim), "conv_part", "a convolution's output")
        return TimeInfo("activation", axis, "conv_part")
    if not isinstance(axis.shift, int):  # F.pad(u, (L - 1, 0)) before a conv1d: only a convolution may read it
        if whole:
            raise Mixing(f"{_name(node)} shifts positions by {axis.shift}, which depends on the length")
        return TimeInfo("activation", axis, _cls_of(axis))
    if axis.shift < 0:  # a shift toward the past always drops the first positions' inputs
        raise Mixing(f"{_name(node)}: output t reads input t+{-axis.shift} (a shift toward the past)")
    if axis.origin == "shift" and whole:
        return TimeInfo("activation", Axis(axis.dim), "delay", f"a causal delay by {axis.shift}", delay=axis.shift)
    return TimeInfo("activation", axis, _cls_of(axis))


def _cls_of(axis):
    """The class of a value on this axis: inside a convolution, inside a delay, or local."""
    if axis is None:
        return "local"
    if axis.freq or axis.origin == "conv":
        return "conv_part"
    return "delay_part" if axis.origin in ("shift", "roll") else "local"


def _permute(analysis, node, args):
    x, t = _x(analysis, node, args)
    nd = meta_value(x).dim()
    name = _name(node)
    if name == "permute":
        perm = [d % nd for d in args["dims"]]
    elif name in ("transpose", "swapaxes", "swapdims"):
        keys = ("dim0", "dim1") if "dim0" in args else ("axis0", "axis1")
        a, b = (args[keys[0]] % nd, args[keys[1]] % nd)
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
    elif name in ("t", "numpy_T"):
        perm = list(reversed(range(nd)))
    elif name == "movedim":
        src, dst = _dims_list(args["source"]), _dims_list(args["destination"])
        src, dst = [d % nd for d in src], [d % nd for d in dst]
        rest = [d for d in range(nd) if d not in src]
        perm = [None] * nd
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(rest)
        perm = [p if p is not None else next(it) for p in perm]
    else:
        raise Unknown()
    if t.axis is None:
        return analysis.local(None)
    return _whole(analysis, node, replace(t.axis, dim=perm.index(t.axis.dim)), meta_value(node).shape[perm.index(t.axis.dim)])


def _reshape(analysis, node, args):
    """Follow the positions through a reshape: position t contributes t * S to the flat index
    (S = inner x the sizes after the axis); it lands in the output dim k whose stride T divides S
    and whose extent holds all L positions without wrapping."""
    x, t = _x(analysis, node, args)
    if t.axis is None:
        return analysis.local(None)
    a = t.axis
    # a size equal to L over the served range (Min(l_max, L) with max_len <= l_max) is L: the
    # divisibility questions below are polynomial in L only
    ins, outs = ([analysis.sizes.served(s) for s in _shape(meta_value(v))] for v in (x, node))
    if not a.aligned and not a.freq:
        # a shifted value may only be reshaped around its axis (unsqueeze / squeeze of other dims)
        before, after = _prod(ins[: a.dim]), _prod(ins[a.dim + 1:])
        for k in range(len(outs)):
            if _same(_prod(outs[:k]), before) and _same(outs[k], ins[a.dim]) and _same(_prod(outs[k + 1:]), after):
                return _whole(analysis, node, replace(a, dim=k), outs[k])
        raise Mixing(f"{_name(node)} reshapes a shifted positions axis")
    S = a.inner * _prod(ins[a.dim + 1:])
    span = S * (ins[a.dim] if a.freq else analysis.sizes.L)
    for k in range(len(outs)):
        if outs[k] == 1:
            continue
        T = _prod(outs[k + 1:])
        if Sizes.divides(T, S) and Sizes.divides(span, T * outs[k]):
            inner = sympy.cancel(sympy.sympify(S) / T)
            inner = int(inner) if inner.is_Integer else inner
            if a.freq:
                if inner != 1 or not _same(outs[k], ins[a.dim]):
                    raise Mixing(f"{_name(node)} merges a spectrum's frequency axis")
                return TimeInfo("activation", replace(a, dim=k), "conv_part")
            return analysis.local(replace(a, dim=k, inner=inner))
    raise Mixing(f"{_name(node)} splits or scrambles the positions axis ({ins} -> {outs})")


def _expand(analysis, node, args):
    x, t = _x(analysis, node, args)
    if t.axis is None:
        return analysis.local(None)
    off = meta_value(node).dim() - meta_value(x).dim()
    return analysis.local(replace(t.axis, dim=t.axis.dim + off))


def _identity(analysis, node, args):
    x, t = _x(analysis, node, args)
    return analysis.local(t.axis)


def _view_complex(analysis, node, args):
    x, t = _x(analysis, node, args)
    if t.axis is not None and t.axis.dim >= meta_value(node).dim():
        raise Mixing(f"{_name(node)} folds the positions axis into complex numbers")
    return _identity(analysis, node, args)


def _slice(analysis, node, args, start=None, end=None):
    x, t = _x(analysis, node, args)
    nd = meta_value(x).dim()
    dim = args.get("dim", 0) % nd
    if t.axis is None or t.axis.dim != dim:
        return TimeInfo("activation", t.axis, _cls_of(t.axis))
    step = args.get("step", 1) or 1
    if step != 1:
        raise Mixing(f"{_name(node)} takes every {step}-th position")
    size = sym_expr(meta_value(x).shape[dim])
    start = args.get("start") if start is None else start
    start = _int_arg(analysis, start if start is not None else 0)
    if isinstance(start, int) and start < 0:
        start = size + start
    start = sym_expr(start)
    if not isinstance(start, int):
        raise Mixing(f"{_name(node)} starts at position {start}, which depends on the length")
    a = t.axis
    if start == 0 and analysis.sizes.is_len(meta_value(node).shape[dim]) and a.aligned:
        return analysis.local(a)  # x[:, :L]: every position
    if a.freq:
        return TimeInfo("activation", a, "conv_part")
    new = replace(a, shift=a.shift - start, origin=a.origin or "shift")
    return _whole(analysis, node, new, meta_value(node).shape[dim])


def _int_arg(analysis, v):
    if isinstance(v, torch.fx.Node):
        return sym_expr(meta_value(v))
    return v


def _narrow(analysis, node, args):
    s = _int_arg(analysis, args["start"])
    return _slice(analysis, node, {"self": args["input"] if "input" in args else args["self"], "dim": args["dim"], "step": 1}, start=s)


def _select(analysis, node, args):
    x, t = _x(analysis, node, args)
    nd = meta_value(x).dim()
    dim = args["dim"] % nd
    if t.axis is None:
        return analysis.local(None)
    if t.axis.dim == dim:
        raise Mixing(f"{_name(node)} picks position {args.get('index')}")
    return TimeInfo("activation", replace(t.axis, dim=t.axis.dim - (dim < t.axis.dim)), _cls_of(t.axis))


def _split(analysis, node, args):
    x, t = _x(analysis, node, args)
    nd = meta_value(x).dim()
    dim = args.get("dim", 0) % nd
    if t.axis is not None and t.axis.dim == dim:
        raise Mixing(f"{_name(node)} splits the positions")
    axis = t.axis
    if _name(node) == "unbind" and axis is not None:
        axis = replace(axis, dim=axis.dim - (dim < axis.dim))
    return _multi(node, [TimeInfo("activation", axis, _cls_of(t.axis)) for _ in _tensors(meta_value(node))])


def _index_select(analysis, node, args):
    x, t = _x(analysis, node, args)
    nd = meta_value(x).dim()
    dim = args["dim"] % nd
    idx = args["index"]
    if t.axis is not None and t.axis.dim == dim:
        raise Mixing(f"{_name(node)} gathers positions")
    if analysis.act(idx) or (idx in analysis.info and analysis.info[idx].length_dependent):
        raise Unknown()
    return TimeInfo("activation", t.axis, _cls_of(t.axis))


def _gather(analysis, node, args):
    x, t = _x(analysis, node, args)
    nd = meta_value(x).dim()
    dim = args["dim"] % nd
    idx = args["index"]
    if t.axis is not None and t.axis.dim == dim:
        raise Mixing(f"{_name(node)} gathers positions")
    ti = analysis.info.get(idx)
    axis = t.axis if t.axis is not None else (ti.axis if ti is not None and ti.dep == "activation" else None)
    if axis is None:
        return analysis.local(None)
    if not analysis.sizes.is_len(meta_value(node).shape[axis.dim]):
        raise Mixing(f"{_name(node)} keeps only some positions")
    if ti is not None and ti.dep == "activation" and ti.axis is not None and ti.axis.dim != axis.dim:
        raise Mixing(f"{_name(node)} indexes with positions on another axis")
    return analysis.local(axis)


def _index(analysis, node, args):
    x, t = _x(analysis, node, args)
    indices = list(args["indices"])
    if t.axis is None:
        raise Unknown()
    if t.axis.dim < len(indices) and indices[t.axis.dim] is not None:
        raise Mixing(f"{_name(node)} indexes positions with a tensor")
    if any(analysis.act(i) or (i in analysis.info and analysis.info[i].length_dependent) for i in indices if i is not None):
        raise Unknown()
    used = [d for d, i in enumerate(indices) if i is not None]
    idx_nd = max((meta_value(indices[d]).dim() for d in used), default=0)
    d = t.axis.dim
    if used and used == list(range(used[0], used[-1] + 1)):
        new = d if d < used[0] else d - len(used) + idx_nd
    else:
        new = idx_nd + sum(1 for k in range(d) if k not in used)
    return TimeInfo("activation", replace(t.axis, dim=new), _cls_of(t.axis))


def _flip(analysis, node, args):
    x, t = _x(analysis, node, args)
    nd = meta_value(x).dim()
    dims = {d % nd for d in _dims_list(args["dims"])}
    if t.axis is not None and (t.axis.dim in dims):
        raise Mixing(f"{_name(node)} reverses the positions")
    return TimeInfo("activation", t.axis, _cls_of(t.axis))


def _roll(analysis, node, args):
    """A roll along positions by k > 0 is a delay whose first k entries hold the last positions
    (origin "roll"); zeroing exactly those (y[:, :k] = 0) makes it a causal delay."""
    x, t = _x(analysis, node, args)
    nd = meta_value(x).dim()
    dims = [d % nd for d in (_dims_list(args.get("dims")) or [])]
    shifts = _dims_list(args.get("shifts")) or []
    if t.axis is None or (dims and t.axis.dim not in dims):
        return TimeInfo("activation", t.axis, _cls_of(t.axis))
    k = shifts[dims.index(t.axis.dim)] if dims and len(shifts) == len(dims) else None
    if k is None or k <= 0 or not t.axis.aligned or t.axis.inner != 1:
        raise Mixing(f"{_name(node)} rolls the positions (the last wrap around to the front)")
    return TimeInfo("activation", replace(t.axis, shift=k, origin="roll"), "delay_part",
                    f"{_name(node)} rolls the positions (the last {k} wrap around to the front)")


def _repeat(analysis, node, args):
    x, t = _x(analysis, node, args)
    reps = [sym_expr(_int_arg(analysis, r)) for r in args["repeats"]]
    if t.axis is None:
        return analysis.local(None)
    off = len(reps) - meta_value(x).dim()
    d = t.axis.dim + off
    if reps[d] != 1:
        raise Mixing(f"{_name(node)} repeats the positions")
    return TimeInfo("activation", replace(t.axis, dim=d), _cls_of(t.axis))


def _tile(analysis, node, args):
    x, _ = _x(analysis, node, args)
    dims = list(args["dims"])
    reps = [1] * (meta_value(x).dim() - len(dims)) + dims  # tile pads its repeats with ones on the left
    return _repeat(analysis, node, {"self": x, "repeats": reps})


def _repeat_interleave(analysis, node, args):
    x, t = _x(analysis, node, args)
    dim = args.get("dim")
    if t.axis is None:
        return analysis.local(None)
    if dim is None or dim % meta_value(x).dim() == t.axis.dim:
        raise Mixing(f"{_name(node)} repeats the positions")
    return TimeInfo("activation", t.axis, _cls_of(t.axis))


def _pad(analysis, node, args):
    x, t = _x(analysis, node, args)
    pad = [_int_arg(analysis, p) for p in args["pad"]]
    nd = meta_value(x).dim()
    if t.axis is None:
        return analysis.local(None)
    d = t.axis.dim
    i = nd - 1 - d
    left, right = (pad[2 * i], pad[2 * i + 1]) if 2 * i + 1 < len(pad) else (0, 0)
    if left == 0 and right == 0:
        return TimeInfo("activation", t.axis, _cls_of(t.axis))
    if args.get("mode", "constant") not in ("constant", None):
        raise Mixing(f"{_name(node)} pads positions by {args.get('mode')} (reads positions across the edge)")
    if t.axis.freq or t.axis.inner != 1:
        raise Mixing(f"{_name(node)} pads a spectrum or merged positions axis")
    left = sym_expr(left)  # symbolic: the causal padding of a kernel as long as the input (K = L)
    new = replace(t.axis, shift=t.axis.shift + left, origin=t.axis.origin or "shift")
    return _whole(analysis, node, new, meta_value(node).shape[d])


def _cat(analysis, node, args):
    tensors = list(args["tensors"])
    out = meta_value(node)
    nd = out.dim()
    dim = args.get("dim", 0) % nd
    acts = [(n, analysis.info[n]) for n in tensors if analysis.act(n)]
    axes = {a.axis for _, a in acts}
    if any(a is None for a in axes):
        if len(axes) > 1:
            raise Mixing(f"{_name(node)} joins a value without positions to one with positions")
        return analysis.local(None)
    dims = {a.dim for a in axes}
    if len(dims) > 1:
        raise Mixing(f"{_name(node)} joins values whose positions lie on different axes")
    (tdim,) = dims
    if tdim != dim:
        if len(axes) > 1:
            raise Mixing(f"{_name(node)} joins values shifted by different amounts")
        axis = next(iter(axes))
        return TimeInfo("activation", axis, _cls_of(axis))
    # along positions: one activation piece between constant-size static pieces is a shift
    if len(acts) != 1:
        raise Mixing(f"{_name(node)} concatenates positions of several values")
    offset = 0
    for n in tensors:
        if n is acts[0][0]:
            break
        size = sym_expr(meta_value(n).shape[dim])
        if not isinstance(size, int):
            raise Mixing(f"{_name(node)} puts a length-dependent block before the positions")
        offset += size
    a = acts[0][1].axis
    if a.freq or a.inner != 1:
        raise Mixing(f"{_name(node)} concatenates along a spectrum or merged axis")
    return _whole(analysis, node, replace(a, shift=a.shift + offset, origin=a.origin or "shift"), out.shape[dim])


def _stack(analysis, node, args):
    tensors = list(args["tensors"])
    nd = meta_value(node).dim()
    dim = args.get("dim", 0) % nd
    axes = {analysis.info[n].axis for n in tensors if analysis.act(n)}
    if len(axes) > 1:
        raise Mixing(f"{_name(node)} stacks values whose positions differ")
    axis = next(iter(axes), None)
    if axis is None:
        return analysis.local(None)
    return TimeInfo("activation", replace(axis, dim=axis.dim + (dim <= axis.dim)), _cls_of(axis))


def _slice_scatter(analysis, node, args):
    base, src = args["self"], args["src"]
    tb, ts = analysis.info[base], analysis.info[src]
    nd = meta_value(node).dim()
    dim = args.get("dim", 0) % nd
    end = sym_expr(_int_arg(analysis, args.get("end")))
    if (args.get("start") or 0) == 0 and (args.get("step", 1) or 1) == 1 and (
            end is None or (isinstance(end, int) and end >= 2 ** 62) or _same(end, meta_value(node).shape[dim])):
        # the whole of base is overwritten: the value is src's (functionalized `x[:] = y`)
        return TimeInfo("activation", ts.axis, _cls_of(ts.axis)) if ts.dep == "activation" else analysis.local(None)
    axis = tb.axis if tb.dep == "activation" else None
    src_axis = ts.axis if ts.dep == "activation" else None
    ref = axis or src_axis
    if ref is None:
        return analysis.local(None)
    if ref.dim != dim:  # a write into channels: base and source keep their positions on one axis
        if axis is not None and src_axis is not None and (axis.dim != src_axis.dim or axis.shift != src_axis.shift):
            raise Mixing(f"{_name(node)} writes a value with other positions into channels")
        return TimeInfo("activation", ref, _cls_of(ref))
    start = _int_arg(analysis, args.get("start") or 0)
    if axis is not None and src_axis is None and axis.origin == "roll":
        end = sym_expr(_int_arg(analysis, args.get("end")))
        if start == 0 and end == axis.shift and (args.get("step", 1) or 1) == 1:
            return _unroll(analysis, node, axis, ts)
    if axis is not None:  # x[:, a:b] = y: positions of two values meet
        raise Mixing(f"{_name(node)} overwrites some positions of an activation")
    step = args.get("step", 1) or 1
    if step != 1 or not isinstance(sym_expr(start), int):
        raise Mixing(f"{_name(node)} writes every {step}-th position")
    # zeros with src written at [start, ...): a shift of src by start
    new = replace(src_axis, shift=src_axis.shift + int(sym_expr(start)), origin=src_axis.origin or "shift")
    return _whole(analysis, node, new, meta_value(node).shape[dim])


def _select_scatter(analysis, node, args):
    base, src = args["self"], args["src"]
    nd = meta_value(node).dim()
    dim = args["dim"] % nd
    tb, ts = analysis.info[base], analysis.info[src]
    axis = tb.axis if tb.dep == "activation" else None
    src_axis = ts.axis if ts.dep == "activation" else None
    if axis is not None and axis.dim == dim and src_axis is None and axis.origin == "roll" and axis.shift == 1 \
            and args.get("index") == 0:
        return _unroll(analysis, node, axis, ts)
    if axis is not None and axis.dim == dim:
        raise Mixing(f"{_name(node)} writes one position")
    if src_axis is not None:
        lifted = replace(src_axis, dim=src_axis.dim + (dim <= src_axis.dim))
        if axis is not None and lifted.dim != axis.dim:
            raise Mixing(f"{_name(node)} writes a value with other positions")
        axis = lifted
    return analysis.local(axis)


def _unroll(analysis, node, axis, src_info):
    """The wrapped rows of a roll overwritten with a constant: a causal delay (filled with that
    constant, which the delay's numeric check requires to be zero)."""
    if src_info.dep != "static":
        raise Mixing(f"{_name(node)} writes an activation over the wrapped positions")
    return _whole(analysis, node, replace(axis, origin="shift"), meta_value(node).shape[axis.dim])


def _embedding(analysis, node, args):
    t = analysis.info[args["indices"]]
    return analysis.local(t.axis)


def _copy(analysis, node, args):
    src = args["src"]
    t = analysis.info[src]
    off = meta_value(node).dim() - meta_value(src).dim()
    return TimeInfo("activation", replace(t.axis, dim=t.axis.dim + off) if t.axis is not None else None, _cls_of(t.axis))


MOVEMENT = {
    **{n: _permute for n in ("permute", "transpose", "swapaxes", "swapdims", "t", "numpy_T", "movedim")},
    **{n: _reshape for n in ("view", "reshape", "_unsafe_view", "view_copy", "flatten", "unflatten", "_reshape_alias",
                             "squeeze", "unsqueeze", "squeeze_copy", "unsqueeze_copy")},
    **{n: _expand for n in ("expand", "expand_copy", "broadcast_to", "expand_as")},
    **{n: _identity for n in ("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "lift_fresh", "_to_copy", "to",
                              "_conj", "conj", "resolve_conj", "resolve_neg", "view_as_real", "real", "imag", "type_as",
                              "_assert_tensor_metadata", "alias_copy", "dropout", "feature_dropout", "alpha_dropout")},
    "view_as_complex": _view_complex, "slice": _slice, "narrow": _narrow, "select": _select,
    **{n: _split for n in ("split", "split_with_sizes", "unbind", "chunk", "tensor_split", "unsafe_split",
                           "unsafe_split_with_sizes", "split_copy")},
    "index_select": _index_select, "gather": _gather, "index": _index, "flip": _flip, "roll": _roll,
    "repeat": _repeat, "tile": _tile, "repeat_interleave": _repeat_interleave, "pad": _pad, "constant_pad_nd": _pad,
    "cat": _cat, "concat": _cat, "concatenate": _cat, "stack": _stack, "slice_scatter": _slice_scatter,
    "select_scatter": _select_scatter, "embedding": _embedding, "copy": _copy,
}

POINTWISE = {"masked_fill", "where", "lerp", "clamp", "polar", "complex"}  # elementwise ops without the tag


# ---- contractions -------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _letters(n, start=0):
    return _LETTERS[start:start + n]


def _nd(n):
    return meta_value(n).dim()


def _mm(analysis, node, args):
    a, b = args.get("self", args.get("input")), args["mat2"]
    return [(a, "ik"), (b, "kj")], "ij"


def _bmm(analysis, node, args):
    a, b = args.get("self", args.get("input")), args["mat2"]
    return [(a, "bik"), (b, "bkj")], "bij"


def _addmm(analysis, node, args):
    bias, a, b = args["self"], args["mat1"], args["mat2"]
    out = "ij"
    return [(a, "ik"), (b, "kj"), (bias, out[len(out) - _nd(bias):])], out


def _baddbmm(analysis, node, args):
    bias, a, b = args["self"], args["batch1"], args["batch2"]
    out = "bij" if _name(node) == "baddbmm" else "ij"
    return [(a, "bik"), (b, "bkj"), (bias, out[len(out) - _nd(bias):])], out


def _linear(analysis, node, args):
    x, w, bias = args["input"], args["weight"], args.get("bias")
    n = _nd(x)
    lx = _letters(n - 1) + "K"
    out = _letters(n - 1) + "O"
    specs = [(x, lx), (w, "OK" if _nd(w) == 2 else "K")]
    if isinstance(bias, torch.fx.Node):
        specs.append((bias, out[len(out) - _nd(bias):]))
    return specs, out if _nd(w) == 2 else _letters(n - 1)


def _matmul(analysis, node, args):
    a, b = args.get("self", args.get("input")), args["other"]
    na, nb = _nd(a), _nd(b)
    if na == 1 and nb == 1:
        return [(a, "K"), (b, "K")], ""
    batch = max(na, nb) - 2
    bl = _letters(max(batch, 0))
    la = (bl[len(bl) - (na - 2):] + "MK") if na >= 2 else "K"
    lb = (bl[len(bl) - (nb - 2):] + "KN") if nb >= 2 else "K"
    out = bl + ("M" if na >= 2 else "") + ("N" if nb >= 2 else "")
    return [(a, la), (b, lb)], out


def _einsum(analysis, node, args):
    eq = args["equation"].replace(" ", "")
    ops = list(args["tensors"])
    lhs, out = eq.split("->") if "->" in eq else (eq, None)
    subs = lhs.split(",")
    width = max((_nd(o) - len(s.replace("...", "")) for o, s in zip(ops, subs) if "..." in s), default=0)
    ell = "".join(c for c in "0123456789" [:width])
    specs = []
    for o, s in zip(ops, subs):
        if "..." in s:
            k = _nd(o) - len(s.replace("...", ""))
            s = s.replace("...", ell[len(ell) - k:] if k else "")
        specs.append((o, s))
    if out is None:
        counts = {}
        for _, s in specs:
            for c in s:
                counts[c] = counts.get(c, 0) + 1
        out = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    else:
        out = out.replace("...", ell)
    return specs, out


def _tensordot(analysis, node, args):
    a, b = args["self"], args["other"]
    na, nb = _nd(a), _nd(b)
    da = [d % na for d in _dims_list(args["dims_self"])]
    db = [d % nb for d in _dims_list(args["dims_other"])]
    la, lb = list(_letters(na)), list(_letters(nb, na))
    for x, y in zip(da, db):
        lb[y] = la[x]
    out = "".join(c for i, c in enumerate(la) if i not in da) + "".join(c for i, c in enumerate(lb) if i not in db)
    return [(a, "".join(la)), (b, "".join(lb))], out


def _mv(analysis, node, args):
    return [(args["self"], "ik"), (args["vec"], "k")], "i"


def _outer(analysis, node, args):
    return [(args["self"], "i"), (args["vec2"], "j")], "ij"


CONTRACTIONS = {"mm": _mm, "bmm": _bmm, "addmm": _addmm, "baddbmm": _baddbmm, "addbmm": _baddbmm, "linear": _linear,
                "matmul": _matmul, "einsum": _einsum, "tensordot": _tensordot, "mv": _mv, "outer": _outer, "ger": _outer}


# ---- normalizations: the dims they act on -------------------------------------------------------

def _last_dims(analysis, node, args):
    shape = args["normalized_shape"]
    nd = _nd(args["input"])
    return list(range(nd - len(shape), nd))


def _all_but_batch(analysis, node, args):
    return list(range(1, _nd(args["input"])))


def _batch_norm(analysis, node, args):
    if args.get("training"):
        nd = _nd(args["input"])
        return [d for d in range(nd) if d != 1]
    return []  # running statistics: a per-channel affine map


NORMS = {"layer_norm": _last_dims, "native_layer_norm": _last_dims, "rms_norm": _last_dims, "_fused_rms_norm": _last_dims,
         "group_norm": _all_but_batch, "native_group_norm": _all_but_batch, "instance_norm": _all_but_batch,
         "batch_norm": _batch_norm, "native_batch_norm": _batch_norm, "_native_batch_norm_legit": _batch_norm,
         "_native_batch_norm_legit_no_training": lambda a, n, args: [], "_native_batch_norm_legit_functional": _batch_norm}


# ---- decomposition and probe --------------------------------------------------------------------

def decompose(node, analysis):
    """Trace torch's decomposition of the op on the example values and classify its parts with the
    same rules; the op is local when every part is. None when torch has no decomposition."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    op = node.target
    table = core_aten_decompositions()
    implicit = op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd)
    if op not in table and not implicit:
        return None
    values = example_values(analysis)
    flat, spec = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
    pos = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node) and isinstance(values.get(a), torch.Tensor)]
    sources = [flat[i] for i in pos]
    concrete = [values[a] if isinstance(a, torch.fx.Node) else a for a in flat]

    def fn(*tensors):
        args = list(concrete)
        for i, t in zip(pos, tensors):
            args[i] = t
        a, k = torch.utils._pytree.tree_unflatten(args, spec)
        return op(*a, **k)

    gm = make_fx(fn, decomposition_table=table, tracing_mode="real")(*[concrete[i] for i in pos])
    if all(n.target in (op, operator.getitem) or n.op in ("placeholder", "output") for n in gm.graph.nodes):
        return None  # the decomposition is the op itself
    length = _example_length(analysis, sources)
    sub = Analysis(Sizes(length), depth=analysis.depth + 1)
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*[concrete[i] for i in pos])
    sub.example = dict(interp.env)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph, src in zip(placeholders, sources):
        sub.info[ph] = analysis.info[src]
    for n in gm.graph.nodes:
        if n.op != "placeholder" and n.op != "output":
            sub.visit(n)
            if sub.info[n].cls == "mixing":
                raise Mixing(f"{_name(node)} decomposes into {_name(n)}: {sub.info[n].why}", sub.info[n].reason)
            if sub.info[n].cls in ("conv_part", "delay", "delay_part"):
                raise Mixing(f"{_name(node)} decomposes into a shift or transform of positions ({_name(n)})")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [a for a in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(a, torch.fx.Node)]
    parts = [replace(sub.info[a], parts=None) if sub.info[a].dep == "activation" else TimeInfo("activation", None, "local")
             for a in leaves]
    for p in parts:
        p.cls, p.why = "local", "decomposes into local ops"
    return _multi(node, parts) if parts else TimeInfo("activation", None, "local")


def _example_length(analysis, sources):
    values = example_values(analysis)
    for s in sources:
        t = analysis.info[s]
        if t.dep == "activation" and t.axis is not None and t.axis.aligned and t.axis.inner == 1:
            return int(values[s].shape[t.axis.dim])
    return analysis.sizes.L if isinstance(analysis.sizes.L, int) else -1


def example_values(analysis):
    """Every node's value on the captured example (float64), computed once."""
    if getattr(analysis, "example", None) is None:
        from lcsm_compile.passes.capture import Runner

        runner = Runner(analysis.cap)
        runner.run_full(analysis.cap.user_inputs)
        analysis.example = dict(runner.env)
    return analysis.example


def probe(node, analysis):
    """Perturb the inputs at one position and see which outputs move: local when only that
    position's outputs do (at three positions of the example), with the outputs' positions axis
    read off the pattern. Declines what it cannot run."""
    values = example_values(analysis)
    acts = [n for n in value_inputs(node) if analysis.act(n)]
    if any(analysis.info[n].axis is None or not analysis.info[n].axis.aligned or analysis.info[n].axis.inner != 1
           for n in acts):
        raise Mixing(f"{_name(node)}: no rule covers this op and it cannot be probed")
    try:
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
        with torch.no_grad():
            base = node.target(*args, **kwargs)
        base = [base] if isinstance(base, torch.Tensor) else _tensors(base)
        t0 = analysis.info[acts[0]]
        length = values[acts[0]].shape[t0.axis.dim]
        found = [None] * len(base)
        for p in sorted({0, length // 2, length - 1}):
            gen = torch.Generator().manual_seed(p)

            def perturb(n):
                v = values[n]
                if n not in acts:
                    return v
                d = analysis.info[n].axis.dim
                out = v.clone()
                sl = out.narrow(d, p, 1)
                if v.is_floating_point() or v.is_complex():
                    sl.add_(torch.randn(sl.shape, generator=gen, dtype=sl.real.dtype).to(sl.dtype) * (1 + v.abs().mean()))
                else:  # integers / bools: another position's values keep them in range
                    sl.copy_(v.narrow(d, (p + 1) % length, 1))
                return out

            args1, kwargs1 = torch.fx.node.map_arg((node.args, node.kwargs), perturb)
            with torch.no_grad():
                moved = node.target(*args1, **kwargs1)
            moved = [moved] if isinstance(moved, torch.Tensor) else _tensors(moved)
            for i, (a, b) in enumerate(zip(base, moved)):
                diff = (a != b) & ~(torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a != b
                if not diff.any():
                    continue
                dims = [d for d in range(diff.dim()) if diff.shape[d] == length and
                        diff.movedim(d, 0).reshape(length, -1).any(1).nonzero().flatten().tolist() == [p]]
                if not dims:
                    raise Mixing(f"{_name(node)} (probed): changing position {p} moves other positions' outputs")
                found[i] = (found[i] or set(dims)) & set(dims)
                if not found[i]:
                    raise Mixing(f"{_name(node)} (probed): the positions axis of its output is not consistent")
    except Mixing:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Mixing(f"{_name(node)}: no rule covers this op and probing it failed ({type(exc).__name__})") from None
    parts = [TimeInfo("activation", Axis(min(f)) if f else None, "local", "probed: moves only its own position")
             for f in found]
    return _multi(node, parts)


# ---- dump ---------------------------------------------------------------------------------------

def dump(canon, info):
    lines = []
    for node, c in canon.items():
        t = info[node]
        if t.cls in ("sym", "none") or c.op == "none":
            continue
        if t.dep == "activation" and t.axis is not None:
            a = t.axis
            axes = f"{'freq' if a.freq else 'time'}[{a.dim}]" + (f"{a.shift:+}" if isinstance(a.shift, int) and a.shift
                                                                 else f"+({a.shift})" if a.shift else "") + (
                f"*{a.inner}" if a.inner != 1 else "")
        else:
            axes = f"lag{list(t.static_dims)}" if t.static_dims else "-"
        dep = t.dep + ("(L)" if t.length_dependent else "")
        lines.append(f"{node.name:28s} {c.op:12s} {dep:13s} {axes:14s} {t.cls}{(' (' + t.why + ')') if t.why else ''}")
    return "\n".join(lines)


def revisit(ctx, after):
    """Classify again every node after `after` (another pass changed what `after` is, e.g. an
    attention output that is time-local on the query's axis), with the TimeInfos before it kept."""
    cap = ctx.cap
    sizes = Sizes(cap.length_symbol, cap.min_len, cap.max_len) if cap.symbolic else Sizes(cap.example_length)
    analysis = Analysis(sizes, cap=cap, ctx=ctx)
    analysis.info = ctx.time_info
    seen = False
    for node in cap.gm.graph.nodes:
        if seen and node.op != "placeholder":
            analysis.visit(node)
        seen = seen or node is after
