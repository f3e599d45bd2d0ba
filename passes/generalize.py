"""Generalize: the decode programs of a model captured only at concrete lengths become polymorphic
in the length and the batch.

A model that reads the sequence length in Python (an FFT size planned from L, a branch on L, a
table or cache it slices) is captured at max_len, again at a shorter length, and at that length
with one batch row more (capture.concrete). After the decode rewrite, what is left of the graph is
the time-local glue: the convolutions, attentions and position constants are session ops and
tables, and the filter subgraphs, where the Python-planned sizes live, are gone. Each surviving
node must have its counterpart in the other captures (paired by structure: the same op on
counterpart inputs). Its integer arguments that differ between them are sizes: affine in L and B (a
reshape to [B, L, H, D], arange(L)), solved from the three points. The prefill program computes
them from its input's shape; the step program takes L = 1. Anything else that differs (a float, a
baked tensor, another op) is refused, naming the node. The translation validation then checks the
programs against the model at other lengths and batches, and it runs whatever `validate` says
(pipeline), because three captures are evidence, not a proof, that the glue is affine everywhere.
"""

import operator

import torch
import torch.fx as fx

from lcsm_compile.passes.capture import attr_value, meta_value
from lcsm_compile.report import Reason

aten = torch.ops.aten


class NotGeneralizable(Exception):
    """The glue of the two concrete captures differs beyond sizes affine in L."""

    reason = Reason.LENGTH_DEPENDENT  # the pipeline refuses the model with it


def run(programs, cap, site_pairs):
    """DecodePrograms of a concrete capture -> the same, polymorphic in the length (and the batch, when
    cap.alt_batch was captured); a symbolic capture's are returned unchanged.
    site_pairs: (match in cap, its counterpart match in cap.alt) per convolution site (detect.Match)."""
    if cap.symbolic:
        return programs
    if cap.alt is None:
        raise NotGeneralizable("the model was captured at one concrete length only (example too short for a "
                               "second capture)")
    paired = {m.output.name for m, _ in site_pairs}
    missing = [s.name for s in programs.sites if s.conv.output.name not in paired]
    if missing:
        raise NotGeneralizable(f"the convolutions {missing} have no counterpart in the capture at "
                               f"L={cap.alt.example_length}: the model's structure changes with the length")
    main, alt = _Point(cap), _Point(cap.alt)
    alt.nodes = _pair(cap, cap.alt, site_pairs, (main, alt))  # main's glue node -> alt's
    main.nodes = {n: n for n in alt.nodes}
    points = [main, alt]
    if cap.alt_batch is not None:  # alt's length, one row more: the same graph up to batch sizes
        rows = _Point(cap.alt_batch)
        by_alt = _pair(cap.alt, cap.alt_batch, [], (alt, rows))
        rows.nodes = {n: by_alt.get(a) for n, a in alt.nodes.items()}
        points.append(rows)
    ours = {n.name: n for n in cap.gm.graph.nodes}
    programs.prefill = _generalize(programs.prefill, ours, points, step=False)
    programs.step = _generalize(programs.step, ours, points, step=True)
    programs.extend = _generalize(programs.extend, ours, points, step=False)
    return programs


class _Point:
    """One capture: its length and batch, and each node of the main capture's glue -> its own."""

    def __init__(self, cap):
        self.cap, self.nodes = cap, {}
        self.length, self.batch = cap.example_length, int(cap.user_inputs[0].shape[0])

    def __str__(self):
        return f"L={self.length}, batch {self.batch}"


def _pair(cap, alt_cap, site_pairs, where):
    """Pair the nodes of two captures by structure: a node's class is its op, target, non-int
    arguments and its live inputs' (class, occurrence); ints are left out (they are what may move
    with L), and so are the classes of static inputs (computed from no user input: a mask sliced
    from a buffer is a no-op slice at one length and a real one at another). The k-th node of a
    class in one graph pairs with the k-th in the other. Only the glue is walked: from the output
    back, through each convolution site into its signal but not its filter (the filter subgraphs
    are where Python planning on L changes the structure, and the rewrite drops them); a site's
    class is its index and its signal's class. The outputs must pair, which makes the live glue the
    same graph in both; each node the programs keep is checked in _generalize."""
    classes = {}

    def number(c, sites):
        live = _live(c)
        site_of = {m.output: i for i, m in enumerate(sites)}
        ids, seen = {}, {}
        for node in _glue(c.gm.graph, sites):
            if _no_op(node):  # the same value under another name: its input's class
                ids[node] = ids[node.args[0]]
                continue
            if node in site_of:  # a site pairs with its counterpart fed by counterpart signals
                m = sites[site_of[node]]
                key = ("site", site_of[node], _shape([m.input, m.skip_node], ids, live))
            else:
                exact = node.target is operator.getitem  # which output of a split: structure, not a size
                key = (node.op, str(node.target), _shape(node.args, ids, live, exact),
                       _shape(node.kwargs, ids, live, exact))
            cls = classes.setdefault(key, len(classes))
            ids[node] = (cls, seen.get(cls, 0))
            seen[cls] = ids[node][1] + 1
        return ids

    theirs = {v: n for n, v in number(alt_cap, [a for _, a in site_pairs]).items() if not _no_op(n)}
    ours = number(cap, [m for m, _ in site_pairs])
    out = next(n for n in reversed(cap.gm.graph.nodes) if n.op == "output")
    if ours[out] not in theirs:
        live = _live(cap)  # name where the live glue first differs
        bad = next(n for n in ours if n in live and ours[n] not in theirs
                   and all(ours[i] in theirs for i in n.all_input_nodes if i in ours and i in live))
        raise NotGeneralizable(f"{bad.name} ({_where(bad)}) at {where[0]} has no counterpart at {where[1]}: "
                               "the model's time-local code changes with the length or the batch")
    return {n: theirs.get(v) for n, v in ours.items()}


def _no_op(node):
    """An alias, or a slice that keeps every element (`x[:, :L]` where x has L positions, exported as
    an alias at one length and a slice at another)."""
    if node.op != "call_function" or node.target not in (aten.alias.default, aten.slice.Tensor):
        return False
    val, src = meta_value(node), meta_value(node.args[0])
    return isinstance(val, torch.Tensor) and isinstance(src, torch.Tensor) and tuple(val.shape) == tuple(src.shape)


def _live(cap):
    """The nodes computed from a user input."""
    live = {n for n, role in cap.roles.items() if role == "input"}
    for node in cap.gm.graph.nodes:
        if any(i in live for i in node.all_input_nodes):
            live.add(node)
    return live


def _glue(graph, sites):
    """The nodes the output depends on, in graph order; at a convolution site the walk goes on into
    its signal and skip, not into its filter."""
    signal = {m.output: [n for n in (m.input, m.skip_node) if n is not None] for m in sites}
    keep, todo = set(), [n for n in graph.nodes if n.op == "output"]
    while todo:
        node = todo.pop()
        if node in keep:
            continue
        keep.add(node)
        todo.extend(signal[node] if node in signal else node.all_input_nodes)
    return [n for n in graph.nodes if n in keep]


def _shape(arg, ids, live, exact=False):
    """An argument with its live nodes replaced by their (class, occurrence), its static ones by
    "static" and, unless exact, its ints by a wildcard."""
    if isinstance(arg, fx.Node):
        return ids[arg] if arg in live else "static"
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__, tuple(_shape(a, ids, live, exact) for a in arg))
    if isinstance(arg, dict):
        return tuple((k, _shape(v, ids, live, exact)) for k, v in arg.items())
    if type(arg) is int and not exact:
        return "int"
    return repr(arg)


def _generalize(gm, ours, points, *, step):
    """Each node of the program that came from the capture: its arguments walked beside its
    counterparts' in every capture (the rewrite changed only which nodes it reads); an int that
    differs between them is solved as slope_L * L + slope_B * B + offset, with the prefill's L and B
    read from its input and the step's L = 1."""
    graph = gm.graph
    input_name = next(n.name for n, role in points[0].cap.roles.items() if role == "input")  # [B, L, ...]
    x = next(n for n in graph.nodes if n.op == "placeholder" and n.name == input_name)
    dims = {}  # dim of x -> its sym_size node, made on first need

    def dim(d):
        if d not in dims:
            with graph.inserting_after(x):
                dims[d] = graph.call_function(aten.sym_size.int, (x, d))
        return dims[d]

    def size(node, slope_l, slope_b, offset):
        if step:
            offset, slope_l = offset + slope_l, 0
        with graph.inserting_before(node):
            out = offset
            for d, k in ((1, slope_l), (0, slope_b)):
                if k:
                    term = dim(d) if k == 1 else graph.call_function(operator.mul, (dim(d), k))
                    out = term if out == 0 else graph.call_function(operator.add, (out, term))
            return out

    def solve(node, vals):
        (a, pa), (b, pb) = vals[:2]
        slope_l, rest = divmod(a - b, pa.length - pb.length)
        slope_b = 0
        if len(vals) > 2:
            c, pc = vals[2]
            slope_b, rest_b = divmod(c - b, pc.batch - pb.batch)
            rest = rest or rest_b
        if rest:
            raise _Differs(vals)
        return size(node, slope_l, slope_b, b - slope_l * pb.length - slope_b * pb.batch)

    def fit(node, p, args):
        """p: the program's argument; args: (the argument in each capture, its _Point), paired by
        structure so their nodes correspond."""
        first = args[0][0]
        if all(isinstance(a, fx.Node) for a, _ in args):
            return p
        if all(isinstance(a, (list, tuple)) and len(a) == len(p) for a, _ in args):
            return type(p)(fit(node, q, [(a[i], pt) for a, pt in args]) for i, q in enumerate(p))
        if all(isinstance(a, dict) and a.keys() == p.keys() for a, _ in args):
            return {k: fit(node, p[k], [(a[k], pt) for a, pt in args]) for k in p}
        if all(type(a) is int for a, _ in args) and any(a != first for a, _ in args):
            return solve(node, args)
        if any(type(a) is not type(first) or a != first for a, _ in args):
            raise _Differs(args)
        return p

    for node in list(graph.nodes):
        if node.name not in ours or node.op in ("placeholder", "output"):
            continue  # the rewrite's own nodes are polymorphic already
        orig = ours[node.name]
        if _no_op(orig):
            continue  # passes its input on at every length
        twins = [(pt.nodes.get(orig), pt) for pt in points]
        missing = next((pt for n, pt in twins if n is None), None)
        if missing is not None:
            raise NotGeneralizable(f"{node.name} ({_where(node)}) has no counterpart in the capture at {missing}: "
                                   "the model's time-local code changes with the length or the batch")
        if node.op == "get_attr":
            _same_constant(node, twins)
            continue
        try:
            node.args = fit(node, node.args, [(n.args, pt) for n, pt in twins])
            node.kwargs = fit(node, node.kwargs, [(n.kwargs, pt) for n, pt in twins])
        except _Differs as exc:
            raise NotGeneralizable(f"{node.name} ({_where(node)}): an argument is {exc}, not a size affine in the "
                                   "length and the batch") from None
    graph.lint()
    gm.recompile()
    return gm


class _Differs(Exception):
    def __init__(self, vals):
        super().__init__(", ".join(f"{getattr(v, 'name', v)!r} at {pt}" for v, pt in vals))


def _same_constant(node, twins):
    (n0, p0), rest = twins[0], twins[1:]
    a = attr_value(p0.cap.gm, n0.target)
    for n, pt in rest:
        b = attr_value(pt.cap.gm, n.target)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        else:
            same = a is b or a == b
        if not same:
            raise NotGeneralizable(f"the constant {node.target} ({_where(node)}) differs between the captures at "
                                   f"{p0} and {pt}: a value baked from the length or the batch")


def _where(node):
    val = meta_value(node)
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    return trace[-1].strip() if trace else f"{node.target} {tuple(val.shape) if isinstance(val, torch.Tensor) else ''}"

