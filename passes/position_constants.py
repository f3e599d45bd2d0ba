"""Position constants: values computed from positions, shapes and aranges (not from activations)
where they meet activations, e.g. a sinusoidal code built in forward with strided writes, an
alternating sign, a learned table sliced [:L], arange(L) features.

The step program runs the graph at one position, where such a value cannot be re-derived (at
length 1 `pe[:, 1::2] = cos(...)` writes nothing, `s[:, 1::2] *= -1` flips nothing). So each one is
evaluated once over max_len, proven to be the prefix of that table at shorter lengths (else the
model is LENGTH_DEPENDENT: linspace(0, 1, L), positions / L), and the decode rewrite indexes the
table at the step's position. The pass finds them: the static, length-dependent nodes used by an
activation op that no accepted convolution claims.
"""

from dataclasses import dataclass

import sympy
import torch

from lcsm_compile.passes import capture
from lcsm_compile.passes.capture import meta_value, sym_expr
from lcsm_compile.passes.properties import TOL64, _describe, check_lengths, rel_err
from lcsm_compile.passes.time_axis import value_inputs
from lcsm_compile.report import Candidate, Reason, Verdict


@dataclass
class PositionConstant:
    node: object  # fx.Node of the captured graph
    axis: int  # the dim that holds positions
    batch_dims: tuple  # dims of the batch's size: the table holds batch 1, the step expands it
    table: torch.Tensor  # the value over max_len positions, as the model computes it
    # Rows at their own positions read one table row each, into a batch dim: the batch dim when the
    # table has one; else rows_rank (a batchless table whose every user is pointwise with a
    # batch-leading output of that rank is read at that rank, rows in dim 0, which broadcasting
    # lines up with the batch). rows_why: why neither works (per-row reads are then refused).
    rows_rank: int | None = None
    rows_why: str | None = None

    @property
    def name(self):
        return self.node.name


def frontier(ctx, claimed):
    """Static, length-dependent tensors read by an activation op outside every convolution."""
    info = ctx.time_info
    out = []
    for node, t in info.items():
        if t.dep != "static" or not t.length_dependent or not isinstance(meta_value(node), torch.Tensor):
            continue
        users = [u for u in node.users if u not in claimed and info.get(u) is not None and info[u].dep == "activation"
                 and node in value_inputs(u)]
        if users:
            out.append(node)
    return out


def run(matches, ctx):
    """-> (position constants, rejected candidates)."""
    cap = ctx.cap
    claimed = set().union(*(m.claimed for m in matches or ()), *(s.claimed for s in ctx.attention or ()))
    consts, rejected = [], []
    for node in frontier(ctx, claimed):
        try:
            consts.append(_table(node, ctx) if cap.symbolic else _concrete_table(node, ctx))
        except _Declined as exc:
            rejected.append(_candidate(node, cap, exc.reason, exc.why))
        except Exception as exc:  # noqa: BLE001 - a table that cannot be evaluated declines the model
            rejected.append(_candidate(node, cap, Reason.LENGTH_DEPENDENT,
                                       f"position constant {node.name} could not be evaluated: {type(exc).__name__}: {exc}"[:300]))
    return consts, rejected


class _Declined(Exception):
    def __init__(self, reason, why):
        super().__init__(why)
        self.reason, self.why = reason, why


def _table(node, ctx):
    cap, L, B = ctx.cap, ctx.cap.length_symbol, ctx.cap.batch_symbol
    shape = [sym_expr(s) for s in meta_value(node).shape]
    free = lambda e: e.free_symbols if isinstance(e, sympy.Expr) else set()  # noqa: E731
    time = [d for d, s in enumerate(shape) if L in free(s)]
    exact = [d for d in time if sympy.simplify(shape[d] - L) == 0]
    if not time:
        raise _Declined(Reason.LENGTH_DEPENDENT, f"{node.name} is computed from the sequence length L but has no "
                                                 f"positions axis (shape {shape}): it changes with L")
    if len(time) > 1 or len(exact) != 1:
        reason = Reason.TIME_MIXING_OP if len(exact) > 1 else Reason.LENGTH_DEPENDENT
        raise _Declined(reason, f"position table {node.name} of shape {shape}: expected exactly one axis of size L")
    batch_dims = tuple(d for d, s in enumerate(shape) if B is not None and B in free(s))
    if any(sympy.simplify(shape[d] - B) != 0 for d in batch_dims):
        raise _Declined(Reason.LENGTH_DEPENDENT, f"position table {node.name} of shape {shape} depends on the batch size")
    batch = 1 if batch_dims else None
    (axis,) = exact
    runner = ctx.runner  # float64: the prefix proof is about the values, not their rounding
    table = runner.evaluate([node], cap.max_len, batch=batch)[0]
    for length in check_lengths(cap):
        short = runner.evaluate([node], length, batch=batch)[0]
        prefix = table.narrow(axis, 0, length)
        if short.shape != prefix.shape or not _close(short, prefix):
            raise _Declined(Reason.LENGTH_DEPENDENT,
                            f"position constant {node.name} at L={length} is not the prefix of its value at "
                            f"max_len={cap.max_len}: it changes with the length beyond slicing")
    # the step reads what the model itself computes: the table in the model's own arithmetic (a
    # float64 model whose table is built in float32 gets the float32-rounded table it uses)
    native = capture.Runner(cap, widen=False).evaluate([node], cap.max_len, batch=batch)[0]
    rows_rank, rows_why = None, None
    if len(batch_dims) > 1:
        rows_why = f"it has {len(batch_dims)} batch dims"
    elif not batch_dims:
        rows_rank, rows_why = _rows_rank(node, len(shape), B)
    return PositionConstant(node, axis, batch_dims, native, rows_rank, rows_why)


def _rows_rank(node, rank, B):
    """(rank, None) when every user of a batchless table is pointwise with an output of one rank
    >= the table's and the batch on dim 0 (a per-row read at that rank broadcasts row by row), else
    (None, why)."""
    ranks = set()
    for user in node.users:
        if user.op == "call_function" and str(user.target).startswith("aten._assert"):
            continue  # metadata checks: the decode rewrite drops them
        val = meta_value(user)
        pointwise = user.op == "call_function" and torch.Tag.pointwise in getattr(user.target, "tags", ())
        if not (pointwise and isinstance(val, torch.Tensor) and val.dim() >= rank and B is not None
                and sym_expr(val.shape[0]) == B):
            return None, f"its user {user.name} ({user.target}) is not a pointwise op with the batch on dim 0"
        ranks.add(val.dim())
    if len(ranks) != 1:
        return None, f"its users have outputs of ranks {sorted(ranks)}"
    return ranks.pop(), None


def _concrete_table(node, ctx):
    """A model captured at concrete lengths (the analysed one at max_len): the table is the node's
    value there, proven the prefix-extension of its counterpart in the capture at the shorter length."""
    cap, alt = ctx.cap, ctx.cap.alt
    dims = ctx.time_info[node].static_dims
    shape = list(meta_value(node).shape)
    if len(dims) != 1:
        raise _Declined(Reason.LENGTH_DEPENDENT, f"position table {node.name} of shape {shape}: expected exactly one "
                                                 f"axis whose size moves with L, found {len(dims)}")
    (axis,) = dims
    other = cap.counterpart.get(node)
    if other is None:
        raise _Declined(Reason.LENGTH_DEPENDENT, f"position constant {node.name} has no counterpart in the capture at "
                                                 f"a shorter length: its prefix property cannot be checked")
    table = ctx.runner.evaluate([node], cap.example_length)[0]
    short = capture.Runner(alt).evaluate([other], alt.example_length)[0]
    if short.dim() != table.dim() or short.shape[axis] > table.shape[axis] or \
            not _close(short, table.narrow(axis, 0, short.shape[axis])):
        raise _Declined(Reason.LENGTH_DEPENDENT,
                        f"position constant {node.name} at L={alt.example_length} is not the prefix of its value at "
                        f"max_len={cap.max_len}: it changes with the length beyond slicing")
    native = capture.Runner(cap, widen=False).evaluate([node], cap.example_length)[0]
    if cap.alt_batch is None:
        return PositionConstant(node, axis, (), native, None, "the batch is fixed (concrete capture)")
    # the dims that grow with the capture of one row more are batch dims: the table keeps one row
    B = int(cap.user_inputs[0].shape[0])
    twin = cap.batch_counterpart.get(node)
    if twin is None or meta_value(twin).dim() != len(shape):
        raise _Declined(Reason.LENGTH_DEPENDENT, f"position constant {node.name} has no counterpart in the capture "
                                                 f"with one batch row more")
    batch_dims = tuple(d for d, (a, b) in enumerate(zip(meta_value(other).shape, meta_value(twin).shape)) if a != b)
    if any(shape[d] != B or meta_value(twin).shape[d] != meta_value(other).shape[d] + 1 for d in batch_dims):
        raise _Declined(Reason.LENGTH_DEPENDENT, f"position table {node.name} of shape {shape} depends on the batch size")
    for d in batch_dims:
        first = native.narrow(d, 0, 1)
        if not torch.equal(native, first.expand_as(native)):
            raise _Declined(Reason.LENGTH_DEPENDENT, f"position table {node.name} differs between batch rows")
        native = first
    if len(batch_dims) > 1:
        return PositionConstant(node, axis, batch_dims, native, None, f"it has {len(batch_dims)} batch dims")
    rows_rank, rows_why = (None, None) if batch_dims else _rows_rank(node, len(shape), B)
    return PositionConstant(node, axis, batch_dims, native, rows_rank, rows_why)


def _close(a, b):
    if a.is_floating_point() or a.is_complex():
        finite = torch.isfinite(a) & torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(b)) or not torch.equal(a[~finite].isnan(), b[~finite].isnan()):
            return False
        return rel_err(a[finite], b[finite]) <= TOL64 if finite.any() else True
    return torch.equal(a, b)


def _candidate(node, cap, reason, why):
    path, src = _describe(node)
    return Candidate(name=node.name, spelling="position_constant", kind="time_mixing", verdict=Verdict.REJECTED,
                     reason=reason, explanation=why, module_path=path, source=src, offending=node.name,
                     length=str(cap.length_symbol if cap.symbolic else cap.example_length), max_len=cap.max_len)


def dump(result):
    consts, rejected = result
    lines = [f"{c.name}: table {list(c.table.shape)} indexed on dim {c.axis}"
             + (f", batch dims {list(c.batch_dims)} expanded" if c.batch_dims else "") for c in consts]
    lines += [f"{c.name}: REJECTED {c.reason.value} {c.explanation}" for c in rejected]
    return "\n".join(lines)
