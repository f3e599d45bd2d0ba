"""Shard plan: which contractions of the step program split their channels across ranks.

Long and short convolutions are depthwise and attention heads independent, so the channels between
a projection into a mixer and the projection out of it can live on different ranks with no
communication (the Megatron pattern):
- a contraction of a tensor every rank holds whole with a constant (a weight computed from
  parameters: F.linear, x @ W, W @ x, addmm, tensordot, an einsum) is column-parallel when one
  output axis comes from the constant alone: each rank computes 1/world of those channels;
- the channel axis is followed through ops that act per channel (elementwise ops, layout changes,
  the convolution sites, splits of the axis, einsums that keep its letter, reductions and norms
  over other dims) and per head: a reshape into (heads, features) moves the split onto the heads
  (`unit`: channels per index), a merge moves it back, and an attention site splits by heads;
- it must end at contractions that sum that axis against a constant: row-parallel, each rank's
  partial sum all-reduced. Every tensor in between holds 1/world of its channels, and so does
  every state and KV cache.
A region that reaches anything else (a norm or a sum over the channels, a reshape that mixes the
axis with another, a concatenation along it) stays replicated, and the plan says which op stopped
it. A split tensor the program outputs is all-gathered (a vocabulary-parallel LM head). Projections that meet in one elementwise op (H3's q, k, v) form one region.

A fused projection's axis may be split downstream into parts (Hyena's x1, x2, v): each rank then
holds its 1/world of every part. `block` is the size of the largest units every part is a whole
number of (the gcd of the parts' sizes and offsets along the projection's axis); each block is split
across ranks, so `block` must be a multiple of the world size, and a rank's share of it a multiple
of `grain`, the channels of a head.

Shapes come from running the program on fake tensors (3 rows; one position for the step, five for
the prefill and extend programs): a reshape is read from them (the dim after as many elements as
the axis had before it, of the same size, or its heads, or leading a merge). The three programs must split the same projections
(for_programs); one that a program cannot split stays replicated in all three.
With tp=group, lcsm_compile.pipeline runs this in its "shard" pass, then passes/shard_rewrite.py.
"""

import math
import operator
import string
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.operator_schemas import normalize_function

aten = torch.ops.aten
lcsm = torch.ops.lcsm

_ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar,
    aten.div.Scalar, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.relu.default, aten.tanh.default,
    aten.exp.default, aten.neg.default, aten.sin.default, aten.cos.default, aten.pow.Tensor_Scalar, aten.rsub.Scalar,
    aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten.to.dtype_layout, aten.type_as.default, aten.where.self, aten.softplus.default,
    aten.square.default, aten.reciprocal.default, aten.abs.default, aten.log.default, aten.erf.default,
    aten.clamp_min.default, aten.clamp.default, aten.clamp_max.default, aten.rsqrt.default, aten.sqrt.default,
    aten.expand_as.default,  # broadcasts its first operand to the second's shape, as an elementwise op would
    aten.dropout.default,  # at inference: the identity
}
_LAYOUT = {aten.transpose.int, aten.permute.default, aten.movedim.int, aten.unsqueeze.default, aten.squeeze.dim,
           aten.squeeze.dims, aten.reshape.default, aten.view.default, aten.expand.default, aten._unsafe_view.default,
           aten.t.default, aten.unflatten.int, aten.flatten.using_ints}
_SIZED = {aten.reshape.default, aten.view.default, aten.expand.default, aten._unsafe_view.default}  # shape lists
# ops that reduce, normalise or index along the dims they name and act per index along the rest: a
# norm over a head's features, a softmax over time, a per-head RMSNorm, rotary's halves of a head.
# Along the split axis they would need every rank's channels
_OVER_DIMS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.linalg_vector_norm.default,
              aten.var.correction, aten.std.correction, aten.logsumexp.default, aten._softmax.default,
              aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int, aten.cumsum.default,
              aten.layer_norm.default, aten.rms_norm.default, aten.slice.Tensor, aten.narrow.default,
              aten.select.int, aten.index_select.default, aten.flip.default, aten.roll.default, aten.glu.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_CONTRACTIONS = {aten.linear.default, aten.mm.default, aten.matmul.default, aten.einsum.default, aten.tensordot.default,
                 aten.addmm.default, aten.conv1d.default}
_DEPTHWISE = {lcsm.conv_step.default, lcsm.short_conv_step.default, lcsm.conv_prefill.default, lcsm.short_conv_prefill.default}
_ATTENTION = {lcsm.attn_step.default, lcsm.attn_prefill.default}  # (session, q, k, v, index), each [B, heads, T, D]


@dataclass
class Region:
    """Channels split across ranks from column-parallel contractions to row-parallel ones (or to the
    program's outputs)."""

    columns: list  # contraction nodes whose output channels split
    rows: list  # contraction nodes that sum the split channels: an all-reduce after each
    sites: dict  # site index -> (first, size) of the region's channel range it decodes
    channels: int  # the columns' output width (summed over merged projections)
    block: int  # every part is a whole number of blocks; each block is split across ranks
    grain: int = 1  # a rank's share of a block must be whole heads: a multiple of this many channels
    attention: list = field(default_factory=list)  # attention site indices whose heads split
    gathers: list = field(default_factory=list)  # split tensors the program outputs: an all-gather each

    def fits(self, world) -> bool:
        return self.block % world == 0 and (self.block // world) % self.grain == 0


@dataclass
class Declined:
    columns: list
    why: str  # the op that stopped the region, and why


@dataclass
class ShardPlan:
    regions: list = field(default_factory=list)
    declined: list = field(default_factory=list)
    split: dict = field(default_factory=dict)  # node -> (dim, size, block) of every split tensor
    shapes: dict = field(default_factory=dict)  # node -> shape on the fake run

    def all_reduces(self) -> int:
        """One all-reduce per step per row-parallel contraction."""
        return sum(len(r.rows) for r in self.regions)

    def all_gathers(self) -> int:
        """One all-gather per step per split output (a vocabulary-parallel LM head's logits)."""
        return sum(len(r.gathers) for r in self.regions)

    def table(self, names=None) -> str:
        """names: site index -> name (the layer schedule's), for every convolution site."""
        names = names or {}
        g = self.all_gathers()
        gathers = f" and {g} all-gather{'s' if g > 1 else ''}" if g else ""
        lines = [f"shard plan of the step program: {len(self.regions)} regions split their channels, "
                 f"{self.all_reduces()} all-reduces{gathers} per step, none inside a region"]
        for i, r in enumerate(self.regions):
            sites = ", ".join(f"{names.get(k, k)}" for k in sorted(r.sites)) or "none"
            heads = f", whole heads of {r.grain}" if r.grain > 1 else ""
            attention = f", attention {', '.join(str(k) for k in r.attention)} by heads" if r.attention else ""
            ends = ([f"row-parallel {', '.join(_weight(n) for n in r.rows)} + all-reduce"] if r.rows else []) + \
                   ([f"{len(r.gathers)} output{'s' if len(r.gathers) > 1 else ''} + all-gather"] if r.gathers else [])
            lines.append(f"  region {i}: column-parallel {', '.join(_weight(n) for n in r.columns)} ({r.channels} channels, "
                         f"blocks of {r.block}{heads}) -> sites {sites}{attention} -> {'; '.join(ends)}")
        for d in self.declined:
            lines.append(f"  replicated: {', '.join(_weight(n) for n in d.columns)}: {d.why}")
        whole = [name for k, name in names.items() if not any(k in r.sites for r in self.regions)]
        if whole:
            lines.append(f"  sites decoded whole on every rank (their input is not split): {', '.join(whole)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"regions": [{"columns": [_weight(n) for n in r.columns], "rows": [_weight(n) for n in r.rows],
                             "sites": {str(k): list(v) for k, v in r.sites.items()}, "channels": r.channels,
                             "block": r.block, "grain": r.grain, "attention": r.attention, "gathers": len(r.gathers)}
                            for r in self.regions],
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
        split = [{seed_key(n) for r in p.regions for n in r.columns} for p in plans.values()]
        differ = set.union(*split) - set.intersection(*split)
        if not differ:
            step = plans["step"]
            lost = [n for n in programs.step.graph.nodes if n.op == "call_function" and seed_key(n) in differ_all]
            if lost:
                step.declined.append(Declined(lost, "the prefill or extend program cannot split it"))
            return plans
        excluded |= differ
        differ_all |= differ


def _plan(gm, shapes, world, excluded):
    """Sweep until every region closes: a region that fails (or whose blocks `world` does not divide)
    is declined, its seeds join `excluded` (seed_key), and the graph is swept again without them."""
    excluded, declined = set(excluded), []
    while True:
        sweep = _Sweep(shapes, excluded)
        failure = sweep.run(gm.graph)
        regions = sweep.regions() if failure is None else []
        unfit = [r for r in regions if not r.fits(world or 1)]
        if unfit:
            r = unfit[0]
            failure = r.columns, (f"blocks of {r.block} channels do not split over {world or 1} ranks"
                                  + (f" in whole heads of {r.grain}" if r.grain > 1 else ""))
        if failure is None:
            return ShardPlan(regions, declined, sweep.layout(), shapes)
        seeds, why = failure
        optional = [x for x in seeds if x.target in _DEPTHWISE]
        seeds = optional or seeds  # without its convolution seeds a region is what it was before them: try that first
        excluded |= {seed_key(x) for x in seeds}
        declined.append(Declined(seeds, why))


def seed_key(node):
    """A seed's name in every program: a projection's node name, a convolution's site index (its op
    differs between the prefill, step and extend programs)."""
    return f"site {node.args[2]}" if node.target in _DEPTHWISE else node.name


def _weight(node):
    """The name a seed goes by: a contraction's parameters (those its constant operand is computed
    from), or a convolution's site (its input sliced on each rank)."""
    if node.target in _DEPTHWISE:
        return f"the input of site {node.args[2]}"
    for a in node.args[1:3] if node.target is aten.addmm.default else node.all_input_nodes:  # addmm: not the bias
        if is_constant(a):
            params, seen = [], [a]
            while seen:
                x = seen.pop(0)
                if x.op == "get_attr" and x.target not in params:
                    params.append(x.target)
                seen.extend(x.all_input_nodes)
            return " & ".join(params)
    return node.name


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
    """A split tensor: its axis `dim` holds channels [first, first + size) of projection `root`'s output,
    `unit` of them per index: 8 where the axis is heads of 8 channels, 1/8 where each channel was
    merged with 8 other values (a head's outer product flattened into the channels of a convolution)."""

    root: fx.Node
    dim: int
    first: int
    size: int
    unit: Fraction = Fraction(1)


class _Fail(Exception):
    def __init__(self, why, culprits=None):  # culprits: the pieces whose regions it declines (default: every input's)
        super().__init__(why)
        self.culprits = culprits


class _Sweep:
    """One pass over the graph in order. Seeds (but `excluded`): projections of tensors every rank holds
    whole, and convolutions of such tensors (each rank slices its channels of the input locally: S4's
    convolutions read the residual stream itself)."""

    def __init__(self, shapes, excluded):  # excluded: seed_keys of seeds
        self.shapes, self.excluded = shapes, excluded
        self.parent = {}  # seed -> the seed it merged into (union-find)
        self.bounds = {}  # root seed -> sizes and offsets of every part taken of its channels
        self.grains = {}  # root seed -> channels a rank's share must be a multiple of (whole heads)
        self.pieces, self.splits, self.rows, self.sites = {}, {}, {}, {}  # splits: node -> a _Piece per output
        self.attention = {}  # attention site index -> the piece of its queries
        self.local_sizes = {}  # sym_size node reading a split axis -> that piece: the rank's count
        self.local_counts = {}  # such a node -> the count it reads on the whole axis
        self.outputs = []  # split tensors the program outputs: gathered from every rank

    def find(self, s):
        while self.parent[s] is not s:
            s = self.parent[s]
        return s

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a is not b:
            self.parent[b] = a
            self.bounds[a] |= self.bounds.pop(b)
            self.grains[a] = math.lcm(self.grains[a], self.grains.pop(b))

    def run(self, graph):
        for n in graph.nodes:
            if n.op == "call_function" and n.target is operator.getitem and n.args[0] in self.splits:
                self._take(n, self.splits[n.args[0]][n.args[1]])
                continue
            ins = [self.pieces.get(a) or self.local_sizes[a] for a in n.all_input_nodes
                   if a in self.pieces or a in self.local_sizes]
            if not ins:
                axis = 1 if n.op == "call_function" and n.target in _DEPTHWISE else _projection_axis(n, self.shapes)
                if axis is not None and seed_key(n) not in self.excluded and self.shapes[n][axis] > 1:
                    size = self.shapes[n][axis]
                    self.parent[n], self.bounds[n], self.grains[n] = n, {size}, 1
                    self.pieces[n] = _Piece(n, axis, 0, size)
                    if n.target in _DEPTHWISE:  # its input, whole on every rank, is sliced to the rank's channels
                        self.sites[int(n.args[2])] = self.pieces[n]
                continue
            try:
                self._visit(n, ins)
            except _Fail as exc:
                bad = {self.find(p.root) for p in exc.culprits or ins}
                seeds = [s for s in self.parent if self.find(s) in bad]
                return seeds, f"{n.name} ({getattr(n.target, '__name__', n.target)}): {exc}"
        gathered = {self.find(self.pieces[a].root) for a in self.outputs}
        for root in {self.find(s) for s in self.parent}:
            if root not in self.rows and root not in gathered:
                return [s for s in self.parent if self.find(s) is root], "its channels reach no projection that reduces them"
        return None

    def regions(self):
        groups = {}
        for s in self.parent:
            groups.setdefault(self.find(s), []).append(s)
        return [Region(columns=seeds, rows=self.rows.get(root, []), channels=sum(self.pieces[s].size for s in seeds),
                       block=self.block(root), grain=self.grains[root],
                       sites={i: (p.first, p.size) for i, p in self.sites.items() if self.find(p.root) is root},
                       attention=sorted(i for i, p in self.attention.items() if self.find(p.root) is root),
                       gathers=[a for a in self.outputs if self.find(self.pieces[a].root) is root])
                for root, seeds in groups.items()]

    def block(self, root):
        """The largest size every part taken of `root`'s channels is a whole number of."""
        return math.gcd(*self.bounds[root])

    def layout(self):
        """node -> (dim, size, block) of every split tensor (the splits' getitems included), in indices
        along its split dim: of every `block` indices, each rank holds its consecutive block/world."""
        out = {}
        for n, p in self.pieces.items():
            block = Fraction(self.block(self.find(p.root))) / p.unit
            out[n] = (p.dim, self.shapes[n][p.dim], int(block))
        return out

    def _take(self, n, piece):
        self.pieces[n] = piece
        root = self.find(piece.root)
        self.bounds[root].update((piece.first, piece.size))
        self.grains[root] = math.lcm(self.grains[root], piece.unit.numerator)

    def _visit(self, n, ins):
        """What `n` makes of its split inputs; raises _Fail where it is not per channel."""
        shapes, src = self.shapes, ins[0]
        if n.op == "output":  # every rank returns the whole output: the ranks' shares gathered
            self.outputs += [a for a in n.all_input_nodes if a in self.pieces]
            return
        if n.op != "call_function":
            raise _Fail("not a function call")
        t = n.target
        if t in _CONTRACTIONS:
            if len(ins) == 1 and _reduces(n, self.pieces, shapes):
                self.rows.setdefault(self.find(src.root), []).append(n)
                return
            if t is aten.einsum.default:  # a per-channel product: the split letter stays in the output
                return self._take(n, self._einsum(n))
            raise _Fail("a contraction of split channels that is not a projection reducing them")
        if t is aten.sym_size.int:
            if n.args[1] % len(shapes[n.args[0]]) == src.dim:  # a shape entry of the split axis, no more
                if not all(u.op == "call_function" and u.target in _SIZED and n in u.args[1] for u in n.users):
                    raise _Fail("reads the number of split channels")
                self.local_sizes[n], self.local_counts[n] = src, shapes[n.args[0]][src.dim]
            return
        if t is lcsm.advance.default:  # takes the red cells' outputs only to be ordered after them
            return
        if t in _DEPTHWISE:
            if n.args[1] not in self.pieces or src.dim != 1:
                raise _Fail("a convolution whose channel axis is not the split one")
            self._take(n, src)
            self.sites[int(n.args[2])] = src
            return
        if t in _ATTENTION:
            return self._take(n, self._attention(n))
        if t is aten.cat.default:
            return self._take(n, self._cat(n))
        if t in _ELEMENTWISE:
            return self._take(n, self._elementwise(n))
        if t in _OVER_DIMS:
            if n.args[0] not in self.pieces:
                raise _Fail("normalises by split channels")
            return self._take(n, _over_dims(n, self.pieces[n.args[0]], shapes))
        if t in _LAYOUT:
            if n.args[0] not in self.pieces:
                raise _Fail("shapes a tensor every rank holds whole by the number of split channels")
            src = self.pieces[n.args[0]]
            dim, factor = _layout(n, src.dim, shapes[n.args[0]], shapes[n])
            if t in _SIZED:
                for i, size in enumerate(n.args[1]):
                    if not isinstance(size, fx.Node):
                        continue
                    if i == dim and self.local_counts.get(size) != shapes[n][dim]:
                        raise _Fail("the size of the split axis is computed in the graph")
                    if i != dim and size in self.local_sizes:
                        raise _Fail("sizes another axis by the number of split channels")
            return self._take(n, _Piece(src.root, dim, src.first, src.size, src.unit * factor))
        if t in _SPLITS:
            self.splits[n] = _split(n, src, shapes)
            return
        raise _Fail("an op that does not act per channel")

    def _meet(self, first, here):
        """Channel i of one split operand meets channel i of another: both hold whole blocks, split
        alike, so projections that meet (H3's q, k, v) make one region."""
        if first is None:
            return here
        if (here.dim, here.size, here.unit) != (first.dim, first.size, first.unit):
            raise _Fail("split channels meet split channels on another axis or of another width")
        self.union(first.root, here.root)
        return first

    def _elementwise(self, n):
        """Broadcasting aligns dims from the right: every split operand's axis must land on one output
        dim with one channel range; replicated operands broadcast there (size 1) or are sliced on
        each rank (the axis' width: a per-channel parameter, or any tensor every rank holds whole)."""
        out_rank, first = len(self.shapes[n]), None
        for a in n.all_input_nodes:
            if a in self.pieces:
                p = self.pieces[a]
                first = self._meet(first, _Piece(p.root, p.dim + out_rank - len(self.shapes[a]), p.first, p.size, p.unit))
        width = self.shapes[n][first.dim]
        for a in n.all_input_nodes:
            if a in self.pieces or not isinstance(self.shapes.get(a), tuple):
                continue
            d = first.dim - (out_rank - len(self.shapes[a]))
            if d >= 0 and self.shapes[a][d] not in (1, width):
                raise _Fail(f"a replicated operand of width {self.shapes[a][d]} on the split axis")
        return first

    def _einsum(self, n):
        """Every split operand's axis carries one letter, kept in the output; an operand every rank
        holds whole that carries the letter too is sliced on each rank."""
        operands = n.args[1]
        terms, out = einsum_terms(n.args[0], [self.shapes[a] for a in operands])
        first, letter = None, None
        for a, sub in zip(operands, terms):
            if a in self.pieces:
                p = self.pieces[a]
                if letter not in (None, sub[p.dim]) or sub.count(sub[p.dim]) > 1:
                    raise _Fail("split channels meet another axis")
                letter = sub[p.dim]
                first = self._meet(first, _Piece(p.root, 0, p.first, p.size, p.unit))
        if letter not in out:
            raise _Fail("sums over the split channels")
        width = self.shapes[n][out.index(letter)]
        for a, sub in zip(operands, terms):
            if a not in self.pieces and letter in sub and self.shapes[a][sub.index(letter)] not in (1, width):
                raise _Fail(f"a replicated operand of width {self.shapes[a][sub.index(letter)]} on the split axis")
        return _Piece(first.root, out.index(letter), first.first, first.size, first.unit)

    def _attention(self, n):
        """Heads attend independently: queries split by heads, and keys and values split alike, or held
        whole: one head that every query head reads (multi-query), or one per query head (Llama's
        repeat_kv), sliced to the rank's heads."""
        q, k, v = n.args[1:4]
        pq = self.pieces.get(q)
        if pq is None or pq.dim != 1:
            raise _Fail("attention whose queries are not split by heads")
        if k in self.pieces or v in self.pieces:
            for x in (k, v):
                px = self.pieces.get(x)
                if px is None or (px.dim, px.size, px.unit) != (pq.dim, pq.size, pq.unit):
                    raise _Fail("keys and values not split by heads as the queries are",
                                [self.pieces[y] for y in (k, v) if y in self.pieces])
                self._meet(pq, px)
        elif {self.shapes[k][1], self.shapes[v][1]} - {1, self.shapes[q][1]}:
            raise _Fail("queries split by heads attend to keys and values in groups")
        self.attention[int(n.args[4])] = pq
        return pq

    def _cat(self, n):
        """A concatenation along another dim: operands split alike, or held whole and sliced."""
        rank = len(self.shapes[n])
        dim, first = (n.args[1] if len(n.args) > 1 else 0) % rank, None
        for a in n.args[0]:
            if a in self.pieces:
                first = self._meet(first, self.pieces[a])
        if first.dim == dim:
            raise _Fail("concatenates along the split channels")
        return first


def einsum_terms(equation, shapes):
    """(operand subscripts, output subscripts) of an einsum with its ellipses spelled as letters."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    spans = [len(shape) - len(t.replace("...", "")) for t, shape in zip(terms, shapes) if "..." in t]
    fresh = "".join(c for c in string.ascii_letters if c not in eq)[: max(spans, default=0)]
    terms = [t.replace("...", fresh[len(fresh) - (len(shape) - len(t.replace("...", ""))):])
             for t, shape in zip(terms, shapes)]
    if arrow:
        return terms, rhs.replace("...", fresh)
    once = sorted(c for c in set("".join(terms)) if "".join(terms).count(c) == 1 and c not in fresh)
    return terms, fresh + "".join(once)


def _over_dims(n, piece, shapes):
    """A reduction or normalisation over the dims it names: the split axis must not be one of them."""
    kw = normalize_function(n.target, tuple(n.args), dict(n.kwargs), normalize_to_only_use_kwargs=True).kwargs
    rank = len(shapes[n.args[0]])
    if "normalized_shape" in kw:  # layer_norm, rms_norm: the trailing dims
        dims, keep = set(range(rank - len(kw["normalized_shape"]), rank)), True
    else:
        dims = kw.get("dim", kw.get("dims"))
        dims = [dims] if isinstance(dims, int) else (dims or range(rank))  # None or []: every dim
        dims, keep = {d % rank for d in dims}, kw.get("keepdim", len(shapes[n]) == rank)
    if piece.dim in dims:
        raise _Fail("acts along the split channels")
    dim = piece.dim if keep else piece.dim - sum(d < piece.dim for d in dims)
    return _Piece(piece.root, dim, piece.first, piece.size, piece.unit)


def is_constant(node):
    """Whether `node` is computed from parameters and buffers only (a weight, maybe transposed, cast,
    scaled or built by an einsum of parameters)."""
    if not isinstance(node, fx.Node):
        return False
    if "lcsm_constant" not in node.meta:
        node.meta["lcsm_constant"] = node.op == "get_attr" or (
            node.op == "call_function" and getattr(node.target, "namespace", None) != "lcsm"
            and node.target is not aten.sym_size.int and bool(node.all_input_nodes)
            and all(is_constant(a) for a in node.all_input_nodes))
    return node.meta["lcsm_constant"]


def contraction_terms(n, shapes):
    """(operands, their subscripts, output subscripts) of a contraction written as an einsum:
    linear, mm, addmm (GPT-2's Conv1D), matmul of two operands of 2 dims or more, tensordot, einsum,
    a pointwise conv1d (S4's output_linear); None for anything else. A bias is not an operand."""
    t = n.target
    if t is aten.einsum.default:
        operands = list(n.args[1])
        return (operands, *einsum_terms(n.args[0], [shapes[a] for a in operands]))
    letters = iter(string.ascii_letters)
    a, b = n.args[1:3] if t is aten.addmm.default else n.args[:2]
    ra, rb = len(shapes[a]), len(shapes[b])
    if t is aten.tensordot.default:
        ta = [next(letters) for _ in range(ra)]
        tb = [next(letters) for _ in range(rb)]
        for da, db in zip(n.args[2], n.args[3]):
            tb[db % rb] = ta[da % ra]
        out = [c for c in ta if c not in tb] + [c for c in tb if c not in ta]
        return [a, b], ["".join(ta), "".join(tb)], "".join(out)
    if t is aten.linear.default:
        batch = "".join(next(letters) for _ in range(ra - 1))
        return [a, b], [batch + "i", "oi"], batch + "o"
    if t is aten.conv1d.default:  # kernel size 1, no stride, padding, dilation or groups: a projection
        kw = normalize_function(t, tuple(n.args), dict(n.kwargs), normalize_to_only_use_kwargs=True).kwargs
        pointwise = shapes[b][-1] == 1 and list(kw["stride"]) == [1] and list(kw["padding"]) in ([0], "valid") \
            and list(kw["dilation"]) == [1] and kw["groups"] == 1
        return ([a, b], ["bil", "oiz"], "bol") if pointwise and ra == 3 else None
    if ra < 2 or rb < 2:
        return None
    batch = "".join(next(letters) for _ in range(max(ra, rb) - 2))  # matmul broadcasts these from the right
    return [a, b], [batch[len(batch) - (ra - 2):] + "ij", batch[len(batch) - (rb - 2):] + "jk"], batch + "ik"


@dataclass
class Projection:
    """A contraction of one operand `x` with a constant `w` (a weight), as einsum subscripts."""

    x: fx.Node
    tx: str
    w: fx.Node
    tw: str
    out: str


def projection(n, shapes):
    """The Projection that contraction `n` is, or None."""
    terms = contraction_terms(n, shapes) if n.op == "call_function" and n.target in _CONTRACTIONS else None
    if terms is None or len(terms[0]) != 2:
        return None
    (a, b), (ta, tb), out = terms
    if is_constant(b) and not is_constant(a):
        return Projection(a, ta, b, tb, out)
    if is_constant(a) and not is_constant(b):
        return Projection(b, tb, a, ta, out)
    return None


def projection_letter(p):
    """The output letter Projection `p` takes from its constant only (its output channels), or None."""
    new = [c for c in p.out if c in p.tw and c not in p.tx]
    return new[0] if len(new) == 1 and p.tw.count(new[0]) == 1 else None


def _projection_axis(n, shapes):
    """The output dim a contraction with a constant takes from that constant (its output channels:
    F.linear(x, W) or x @ W, the last; W @ x, the one before; an einsum's own letter), or None."""
    p = projection(n, shapes)
    letter = None if p is None or not isinstance(shapes.get(n), tuple) else projection_letter(p)
    return None if letter is None else p.out.index(letter)


def _reduces(n, pieces, shapes):
    """Whether contraction `n` sums the split axis of its one split operand against a constant."""
    p = projection(n, shapes)
    if p is None or p.x not in pieces:
        return False
    letter = p.tx[pieces[p.x].dim]
    return letter not in p.out and p.tw.count(letter) == 1 and p.tx.count(letter) == 1


def _layout(n, dim, before, after):
    """(the output dim the split axis `dim` lands on, the factor its unit grows by), or _Fail where
    the op mixes the axis with another dim."""
    t, rank = n.target, len(before)
    if t in (aten.transpose.int, aten.t.default):
        a, b = (n.args[1] % rank, n.args[2] % rank) if t is aten.transpose.int else (0, 1)
        return (b if dim == a else a if dim == b else dim), 1
    if t is aten.permute.default:
        return [d % rank for d in n.args[1]].index(dim), 1
    if t is aten.movedim.int:
        order = [d for d in range(rank) if d != n.args[1] % rank]
        order.insert(n.args[2] % rank, n.args[1] % rank)
        return order.index(dim), 1
    if t is aten.expand.default:
        out = dim + len(after) - rank
        if after[out] != before[dim]:
            raise _Fail("expands the split axis")
        return out, 1
    # reshape, view, (un)flatten, (un)squeeze: the dim after the same number of elements as the axis
    # had before it. The axis may keep its size, be split into (heads, features) (the split lands on
    # the heads, each index now a whole head) or lead a merge with the dims after it
    prefix, size = math.prod(before[:dim]), before[dim]
    for j, new in enumerate(after):
        if math.prod(after[:j]) != prefix or (new == 1 and size != 1):
            continue
        if new == size:
            return j, 1
        if size % new == 0 and any(math.prod(after[j:k]) == size for k in range(j + 1, len(after) + 1)):
            return j, Fraction(size // new)
        if new % size == 0 and any(math.prod(before[dim:k]) == new for k in range(dim + 1, rank + 1)):
            return j, Fraction(1, new // size)
        break
    raise _Fail(f"reshapes the split axis ({before} -> {after})")


def _split(n, src, shapes):
    """A split along the axis yields consecutive channel ranges; along another dim, the same range."""
    rank = len(shapes[n.args[0]])
    dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % rank
    if dim != src.dim:
        return [src for _ in shapes[n]]
    out, first = [], src.first
    for shape in shapes[n]:
        size = shape[dim] * src.unit
        if size.denominator != 1:
            raise _Fail("splits the split axis inside a channel")
        out.append(_Piece(src.root, dim, first, int(size), src.unit))
        first += int(size)
    return out
