"""Shard plan: which contractions of the step program split their channels across ranks.

Long and short convolutions are depthwise, so the channels between a projection into a mixer and
the projection out of it can live on different ranks with no communication (the Megatron pattern):
- a contraction whose weight is a parameter and whose input is the same on every rank is
  column-parallel: each rank computes 1/world of its output channels;
- the channel axis is followed through ops that act per channel (elementwise ops, layout changes
  that keep the axis whole, the convolution sites, splits of the axis into equal parts);
- it must end at contractions that reduce that axis: row-parallel, each rank's partial sum
  all-reduced. Every tensor in between holds 1/world of its channels, and so does every state.
A region that reaches anything else (a norm or a sum over the channels, a reshape that mixes the
axis with another, the program's output, an attention site) stays replicated, and the plan says
which op stopped it. Projections that meet in one elementwise op (H3's q, k, v) form one region.

A fused projection's axis may be split downstream into parts (Hyena's x1, x2, v): each rank then
holds its 1/world of every part. `block` is the size of the largest units every part is a whole
number of (the gcd of the parts' sizes and offsets along the projection's axis); each block is split
across ranks, so `block` must be a multiple of the world size.

Shapes come from running the program on fake tensors (3 rows; one position for the step, five for
the prefill and extend programs): a reshape keeps the axis whole when the axis keeps its size and
the product of the dims before it. The three programs must split the same projections
(for_programs); one that a program cannot split stays replicated in all three.
With tp=group, lcsm_compile.pipeline runs this in its "shard" pass, then passes/shard_rewrite.py.
"""

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

aten = torch.ops.aten
lcsm = torch.ops.lcsm

_ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar,
    aten.div.Scalar, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.relu.default, aten.tanh.default,
    aten.exp.default, aten.neg.default, aten.sin.default, aten.cos.default, aten.pow.Tensor_Scalar, aten.rsub.Scalar,
    aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten.to.dtype_layout, aten.type_as.default, aten.where.self, aten.softplus.default,
    aten.square.default, aten.reciprocal.default, aten.abs.default, aten.log.default, aten.erf.default,
}
_LAYOUT = {aten.transpose.int, aten.permute.default, aten.movedim.int, aten.unsqueeze.default, aten.squeeze.dim,
           aten.reshape.default, aten.view.default, aten.expand.default, aten._unsafe_view.default, aten.t.default}
_SIZED = {aten.reshape.default, aten.view.default, aten.expand.default, aten._unsafe_view.default}  # shape lists
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_CONTRACTIONS = {aten.linear.default, aten.mm.default, aten.matmul.default}
_SEE_THROUGH = {aten.t.default, aten.transpose.int, aten.permute.default, aten.to.dtype, aten._to_copy.default, aten.detach.default}
_DEPTHWISE = {lcsm.conv_step.default, lcsm.short_conv_step.default, lcsm.conv_prefill.default, lcsm.short_conv_prefill.default}


@dataclass
class Region:
    """Channels split across ranks from column-parallel contractions to row-parallel ones."""

    columns: list  # contraction nodes whose output channels split
    rows: list  # contraction nodes that sum the split channels: an all-reduce after each
    sites: dict  # site index -> (first, size) of the region's channel range it decodes
    channels: int  # the columns' output width (summed over merged projections)
    block: int  # every part is a whole number of blocks; each block is split across ranks

    def fits(self, world) -> bool:
        return self.block % world == 0


@dataclass
class Declined:
    columns: list
    why: str  # the op that stopped the region, and why


@dataclass
class ShardPlan:
    regions: list = field(default_factory=list)
    declined: list = field(default_factory=list)
    split: dict = field(default_factory=dict)  # node -> (dim, first, size, block) of every split tensor
    shapes: dict = field(default_factory=dict)  # node -> shape on the fake run

    def all_reduces(self) -> int:
        """Collectives per step: one all-reduce per row-parallel contraction."""
        return sum(len(r.rows) for r in self.regions)

    def table(self, names=None) -> str:
        """names: site index -> name (the layer schedule's), for every convolution site."""
        names = names or {}
        lines = [f"shard plan of the step program: {len(self.regions)} regions split their channels, "
                 f"{self.all_reduces()} all-reduces per step, none inside a region"]
        for i, r in enumerate(self.regions):
            sites = ", ".join(f"{names.get(k, k)}" for k in sorted(r.sites)) or "none"
            lines.append(f"  region {i}: column-parallel {', '.join(_weight(n) for n in r.columns)} ({r.channels} channels, "
                         f"blocks of {r.block}) -> sites {sites} -> row-parallel {', '.join(_weight(n) for n in r.rows)} "
                         f"+ all-reduce")
        for d in self.declined:
            lines.append(f"  replicated: {', '.join(_weight(n) for n in d.columns)}: {d.why}")
        whole = [name for k, name in names.items() if not any(k in r.sites for r in self.regions)]
        if whole:
            lines.append(f"  sites decoded whole on every rank (their input is not split): {', '.join(whole)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"regions": [{"columns": [_weight(n) for n in r.columns], "rows": [_weight(n) for n in r.rows],
                             "sites": {str(k): list(v) for k, v in r.sites.items()}, "channels": r.channels,
                             "block": r.block} for r in self.regions],
                "declined": [{"columns": [_weight(n) for n in d.columns], "why": d.why} for d in self.declined]}


def run(gm, example_shape, input_dtype, world=None, positions=1) -> ShardPlan:
    """The shard plan of a decode program (GraphModule) whose input is like `example_shape` and
    `input_dtype` with the sequence on dim 1, run on `positions` positions. world: regions whose
    blocks do not split over that many ranks stay replicated."""
    return _plan(gm, _fake_shapes(gm, example_shape, input_dtype, positions), world, set())


def for_programs(programs, example_shape, input_dtype, world):
    """{"prefill", "step", "extend"} -> the plan of that decode program (decode_rewrite.DecodePrograms):
    all three split the same projections (one that a program cannot split stays replicated in all)."""
    names = ("prefill", "step", "extend")
    shapes = {name: _fake_shapes(getattr(programs, name), example_shape, input_dtype, 1 if name == "step" else 5)
              for name in names}
    excluded, differ_all = set(), set()
    while True:
        plans = {name: _plan(getattr(programs, name), shapes[name], world, excluded) for name in names}
        split = [{n.name for r in p.regions for n in r.columns} for p in plans.values()]
        differ = set.union(*split) - set.intersection(*split)
        if not differ:
            step = plans["step"]
            lost = [n for n in programs.step.graph.nodes if n.name in differ_all]
            if lost:
                step.declined.append(Declined(lost, "the prefill or extend program cannot split it"))
            return plans
        excluded |= differ
        differ_all |= differ


def _plan(gm, shapes, world, excluded):
    """Sweep until every region closes: a region that fails (or whose blocks `world` does not divide)
    is declined, its projections join `excluded` (names), and the graph is swept again without them."""
    excluded, declined = set(excluded), []
    while True:
        sweep = _Sweep(shapes, excluded)
        failure = sweep.run(gm.graph)
        regions = sweep.regions() if failure is None else []
        unfit = [r for r in regions if world is not None and not r.fits(world)]
        if unfit:
            failure = unfit[0].columns, f"blocks of {unfit[0].block} channels do not split over {world} ranks"
        if failure is None:
            return ShardPlan(regions, declined, sweep.layout(), shapes)
        seeds, why = failure
        excluded |= {s.name for s in seeds}
        declined.append(Declined(seeds, why))


def _weight(node):
    w = _parameter(node.args[1]) or _parameter(node.args[0])
    return w.target if w is not None else node.name


def _fake_shapes(gm, example_shape, input_dtype, positions):
    """node -> the shape of its tensor value (a list of shapes for a split) on `positions` positions of 3 rows."""
    shapes = {}

    class Shapes(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = tuple(out.shape)
            elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
                shapes[n] = [tuple(o.shape) for o in out]
            return out

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with FakeTensorMode(allow_non_fake_inputs=True):
        # (session, [positions,] input): the session handle, the positions of a step or an extend
        handles = [torch.zeros(2, dtype=torch.int64), torch.arange(positions)][: len(placeholders) - 1]
        Shapes(gm).run(*handles, torch.zeros((3, positions, *example_shape[2:]), dtype=input_dtype))
    return shapes


@dataclass
class _Piece:
    """A split tensor: its axis `dim` holds channels [first, first + size) of projection `root`'s output."""

    root: fx.Node
    dim: int
    first: int
    size: int


class _Fail(Exception):
    pass


class _Sweep:
    """One pass over the graph in order, projections with replicated inputs as seeds (but `excluded`)."""

    def __init__(self, shapes, excluded):  # excluded: names of projections
        self.shapes, self.excluded = shapes, excluded
        self.parent = {}  # seed -> the seed it merged into (union-find)
        self.bounds = {}  # root seed -> sizes and offsets of every part taken of its channels
        self.pieces, self.splits, self.rows, self.sites = {}, {}, {}, {}  # splits: node -> a _Piece per output

    def find(self, s):
        while self.parent[s] is not s:
            s = self.parent[s]
        return s

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a is not b:
            self.parent[b] = a
            self.bounds[a] |= self.bounds.pop(b)

    def run(self, graph):
        for n in graph.nodes:
            if n.op == "call_function" and n.target is operator.getitem and n.args[0] in self.splits:
                self._take(n, self.splits[n.args[0]][n.args[1]])
                continue
            ins = [self.pieces[a] for a in n.all_input_nodes if a in self.pieces]
            if not ins:
                axis = _projection_axis(n, self.shapes)
                if axis is not None and n.name not in self.excluded:
                    size = self.shapes[n][axis]
                    self.parent[n], self.bounds[n] = n, {size}
                    self.pieces[n] = _Piece(n, axis, 0, size)
                continue
            try:
                self._visit(n, ins)
            except _Fail as exc:
                bad = {self.find(p.root) for p in ins}
                seeds = [s for s in self.parent if self.find(s) in bad]
                return seeds, f"{n.name} ({getattr(n.target, '__name__', n.target)}): {exc}"
        for root in {self.find(s) for s in self.parent}:
            if root not in self.rows:
                return [s for s in self.parent if self.find(s) is root], "its channels reach no projection that reduces them"
        return None

    def regions(self):
        groups = {}
        for s in self.parent:
            groups.setdefault(self.find(s), []).append(s)
        return [Region(columns=seeds, rows=self.rows[root], channels=sum(self.pieces[s].size for s in seeds),
                       block=self.block(root),
                       sites={i: (p.first, p.size) for i, p in self.sites.items() if self.find(p.root) is root})
                for root, seeds in groups.items()]

    def block(self, root):
        """The largest size every part taken of `root`'s channels is a whole number of."""
        return math.gcd(*self.bounds[root])

    def layout(self):
        """node -> (dim, first, size, block) of every split tensor (the splits' getitems included)."""
        return {n: (p.dim, p.first, p.size, self.block(self.find(p.root))) for n, p in self.pieces.items()}

    def _take(self, n, piece):
        self.pieces[n] = piece
        self.bounds[self.find(piece.root)].update((piece.first, piece.size))

    def _visit(self, n, ins):
        """What `n` makes of its split inputs; raises _Fail where it is not per channel."""
        shapes, src = self.shapes, ins[0]
        if n.op != "call_function":
            raise _Fail("split channels reach the program's output" if n.op == "output" else "not a function call")
        t = n.target
        if t in _CONTRACTIONS:
            if len(ins) == 1 and _reduces(n, self.pieces, shapes):
                self.rows.setdefault(self.find(src.root), []).append(n)
                return
            raise _Fail("a contraction of split channels that is not a projection reducing them")
        if t is aten.sym_size.int:
            if n.args[1] % len(shapes[n.args[0]]) == src.dim:
                raise _Fail("reads the number of split channels")
            return
        if t is lcsm.advance.default:  # takes the red cells' outputs only to be ordered after them
            return
        if t in _DEPTHWISE:
            if n.args[1] not in self.pieces or src.dim != 1:
                raise _Fail("a convolution whose channel axis is not the split one")
            self._take(n, src)
            self.sites[int(n.args[2])] = src
            return
        if t in _ELEMENTWISE:
            return self._take(n, self._elementwise(n))
        if t in _LAYOUT:
            dim = _layout(n, src.dim, shapes[n.args[0]], shapes[n])
            if t in _SIZED and isinstance(n.args[1][dim], fx.Node):
                raise _Fail("the size of the split axis is computed in the graph")
            return self._take(n, _Piece(src.root, dim, src.first, src.size))
        if t in _SPLITS:
            self.splits[n] = _split(n, src, shapes)
            return
        raise _Fail("an op that does not act per channel")

    def _elementwise(self, n):
        """Broadcasting aligns dims from the right: every split operand's axis must land on one output
        dim with one channel range; replicated operands broadcast there (size 1) or are sliced on
        each rank (the axis' size: a per-channel parameter, or any tensor every rank holds whole)."""
        out_rank, first = len(self.shapes[n]), None
        for a in n.all_input_nodes:
            if a not in self.pieces:
                continue
            p = self.pieces[a]
            here = _Piece(p.root, p.dim + out_rank - len(self.shapes[a]), p.first, p.size)
            if first is None:
                first = here
            elif (here.dim, here.size) != (first.dim, first.size):
                raise _Fail("split channels meet split channels on another axis or of another width")
            else:  # channel i of one part meets channel i of another: both hold whole blocks, split alike
                self.union(first.root, here.root)  # projections that meet (H3's q, k, v) make one region
        for a in n.all_input_nodes:
            if a in self.pieces or not isinstance(self.shapes.get(a), tuple):
                continue
            d = first.dim - (out_rank - len(self.shapes[a]))
            if d >= 0 and self.shapes[a][d] not in (1, first.size):
                raise _Fail(f"a replicated operand of width {self.shapes[a][d]} on the split axis")
        return first


def _parameter(node):
    """The get_attr node behind `node` seen through transposes and casts (a weight, maybe as W.T), or None."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SEE_THROUGH:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _projection_axis(n, shapes):
    """The output dim a contraction with a 2-D parameter takes from that parameter (its output
    channels: F.linear(x, W) or x @ W, the last; W @ x, the one before), or None where `n` is not one."""
    if n.op != "call_function" or n.target not in _CONTRACTIONS or not isinstance(shapes.get(n), tuple):
        return None
    a, b, rank = n.args[0], n.args[1], len(shapes[n])
    if _parameter(b) is not None and _parameter(a) is None and len(shapes[b]) == 2:
        return rank - 1
    if _parameter(a) is not None and _parameter(b) is None and len(shapes[a]) == 2 and rank >= 2 and \
            n.target is not aten.linear.default:
        return rank - 2
    return None


def _reduces(n, pieces, shapes):
    """Whether contraction `n` sums the split axis of its one split operand against a parameter."""
    a, b = n.args[0], n.args[1]
    if a in pieces and _parameter(b) is not None:  # F.linear(x, W), x @ W: x's last dim
        return pieces[a].dim == len(shapes[a]) - 1
    if b in pieces and _parameter(a) is not None and n.target is not aten.linear.default:  # W @ x: x's dim -2
        return pieces[b].dim == len(shapes[b]) - 2
    return False


def _layout(n, dim, before, after):
    """The output dim the split axis `dim` lands on, or _Fail where the op mixes it with another dim."""
    t, rank = n.target, len(before)
    if t in (aten.transpose.int, aten.t.default):
        a, b = (n.args[1] % rank, n.args[2] % rank) if t is aten.transpose.int else (0, 1)
        return b if dim == a else a if dim == b else dim
    if t is aten.permute.default:
        return [d % rank for d in n.args[1]].index(dim)
    if t is aten.movedim.int:
        order = [d for d in range(rank) if d != n.args[1] % rank]
        order.insert(n.args[2] % rank, n.args[1] % rank)
        return order.index(dim)
    if t is aten.expand.default:
        out = dim + len(after) - rank
        if after[out] != before[dim]:
            raise _Fail("expands the split axis")
        return out
    # reshape, view, unsqueeze, squeeze: the axis keeps its size and what comes before it
    prefix = math.prod(before[:dim])
    for j, size in enumerate(after):
        if size == before[dim] and math.prod(after[:j]) == prefix:
            return j
    raise _Fail(f"reshapes the split axis ({before} -> {after})")


def _split(n, src, shapes):
    """A split along the axis yields consecutive channel ranges; along another dim, the same range."""
    rank = len(shapes[n.args[0]])
    dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % rank
    if dim != src.dim:
        return [src for _ in shapes[n]]
    out, first = [], src.first
    for shape in shapes[n]:
        out.append(_Piece(src.root, dim, first, shape[dim]))
        first += shape[dim]
    return out
