"""Shard rewrite: one rank's decode programs and convolution sites, from the shard plan.

With tp=group, every rank runs this on the same programs (passes/shard_plan.py decides what splits)
and keeps 1/world of every split channel axis: of each block of `block` channels, the rank's
consecutive block/world. Then:
- a column-parallel contraction keeps the rows of its weight (and bias) for those channels;
- a row-parallel one keeps the matching input columns of its weight, and its partial sums are
  all-reduced (a functional collective, which inductor and CUDA-graph capture keep in the program);
  its bias is added after the sum;
- a tensor every rank holds whole that meets split channels (a per-channel parameter, a gate
  broadcast over them) is sliced to the rank's channels: folded once where it is computed from
  parameters only, an index_select in the program otherwise;
- shape lists and split sizes along a split axis shrink by world;
- each convolution site on split channels keeps those channels of its filter, skip, bias and modal
  form, so its bank rows, ring buffer or recurrent state hold 1/world of the channels.
Nothing else changes: the outputs are replicated, the same on every rank.
"""

import copy
import dataclasses

import torch
import torch.fx as fx

from lcsm_compile.passes import shard_plan
from lcsm_compile.passes.capture import attr_value
from lcsm_compile.passes.decode_rewrite import ConvSite
from lcsm_compile.report import ModalForm

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional


def run(programs, plans, rank, world, group_name):
    """programs: decode_rewrite.DecodePrograms; plans: shard_plan.for_programs(programs, ...).
    Returns this rank's DecodePrograms."""
    local = {name: _rewrite(getattr(programs, name), plans[name], rank, world, group_name)
             for name in ("prefill", "step", "extend")}
    split, channels = plans["step"].split, {}  # channels: site index -> the rank's channels of that convolution
    for n in split:
        if n.op == "call_function" and n.target in shard_plan._DEPTHWISE:
            channels[int(n.args[2])] = _indices(split[n], rank, world)
    sites = [_site(s, channels[i]) if i in channels else s for i, s in enumerate(programs.sites)]
    heads = {i for r in plans["step"].regions for i in r.attention}  # their KV caches hold the rank's heads
    attention = [dataclasses.replace(a, attn=dataclasses.replace(a.attn, heads=a.attn.heads // world)) if i in heads else a
                 for i, a in enumerate(programs.attention)]
    return dataclasses.replace(programs, sites=sites, attention=attention, **local)


def _indices(layout, rank, world):
    """The rank's indices along a split tensor's split dim: of every block, the rank's share."""
    dim, size, block = layout
    share = block // world
    blocks = torch.arange(size // block) * block + rank * share
    return (blocks[:, None] + torch.arange(share)).reshape(-1)


def _rewrite(gm, plan, rank, world, group_name):
    gm = copy.deepcopy(gm)
    index = {n.name: n for n in gm.graph.nodes}
    split = {index[n.name]: v for n, v in plan.split.items()}
    shapes = {index[n.name]: v for n, v in plan.shapes.items() if n.name in index}
    rows = {index[n.name] for r in plan.regions for n in r.rows}
    columns = {index[n.name] for r in plan.regions for n in r.columns}
    folded = {}
    for n in list(gm.graph.nodes):
        if n in columns:
            _slice_column(gm, n, split[n], shapes, rank, world, folded)
        elif n in rows:
            _slice_row(gm, n, split, shapes, rank, world, group_name, folded)
        elif n in split and n.op == "call_function":
            _shrink(gm, n, split, shapes, rank, world, folded)
        elif n.op == "call_function" and n.target in shard_plan._SPLITS and n.args[0] in split:
            _shrink_split(n, split[n.args[0]][0], len(shapes[n.args[0]]), world)
    for r in plan.regions:
        for g in r.gathers:
            _gather(gm, index[g.name], split[index[g.name]], world, group_name)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _bias(n):
    if n.target in (aten.linear.default, aten.conv1d.default):
        return n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    return n.args[0] if n.target is aten.addmm.default else None


def _slice_column(gm, n, layout, shapes, rank, world, folded):
    """Keep the output channels of the rank: the constant's (and the bias's) slices for them; a
    convolution of a tensor every rank holds whole slices that tensor."""
    idx = _indices(layout, rank, world)
    if n.target in shard_plan._DEPTHWISE:
        n.args = (n.args[0], _sliced(gm, n.args[1], 1, idx, folded, n), *n.args[2:])
        return
    p, bias = shard_plan.projection(n, shapes), _bias(n)
    n.replace_input_with(p.w, _sliced(gm, p.w, p.tw.index(shard_plan.projection_letter(p)), idx, folded, n))
    if bias is not None and shapes[bias][-1] == layout[1]:  # a bias broadcast over the channels stays whole
        n.replace_input_with(bias, _sliced(gm, bias, len(shapes[bias]) - 1, idx, folded, n))


def _slice_row(gm, n, split, shapes, rank, world, group_name, folded):
    """Keep the constant's slices for the rank's channels, all-reduce the partial sums, add the bias."""
    p, bias = shard_plan.projection(n, shapes), _bias(n)
    if n.target is aten.linear.default:
        n.args = n.args[:2]
    elif n.target is aten.conv1d.default:
        n.args, n.kwargs = (*n.args[:2], None, *n.args[3:]), {k: v for k, v in n.kwargs.items() if k != "bias"}
    elif n.target is aten.addmm.default:  # bias + x @ W: the sum of partial products, then the bias
        n.target, n.args, n.kwargs = aten.mm.default, n.args[1:3], {}
    x, w, tx, tw = p.x, p.w, p.tx, p.tw
    letter = tx[split[x][0]]
    n.replace_input_with(w, _sliced(gm, w, tw.index(letter), _indices(split[x], rank, world), folded, n))
    graph = gm.graph
    with graph.inserting_after(n):
        reduced = graph.call_function(_c10d.all_reduce.default, (n, "sum", group_name))
    with graph.inserting_after(reduced):
        out = graph.call_function(_c10d.wait_tensor.default, (reduced,))
    last = out
    if bias is not None:
        if n.target is aten.conv1d.default:  # a convolution's bias is per output channel, [O] -> [O, 1]
            with graph.inserting_after(out):
                bias = last = graph.call_function(aten.unsqueeze.default, (bias, -1))
        with graph.inserting_after(last):
            last = graph.call_function(aten.add.Tensor, (out, bias))
    n.replace_all_uses_with(last, delete_user_cb=lambda user: user is not reduced)


def _gather(gm, n, layout, world, group_name):
    """The program outputs `n` whole: every rank's share gathered along the split dim, each block's
    shares in rank order."""
    dim, size, block = layout
    graph = gm.graph
    output = next(u for u in n.users if u.op == "output")
    with graph.inserting_before(output):
        x = graph.call_function(aten.movedim.int, (n, dim, 0))
        x = graph.call_function(aten.contiguous.default, (x,))
        x = graph.call_function(_c10d.all_gather_into_tensor.default, (x, world, group_name))
        x = graph.call_function(_c10d.wait_tensor.default, (x,))
        x = graph.call_function(aten.unflatten.int, (x, 0, [world, size // block, block // world]))  # rank, block, share
        x = graph.call_function(aten.transpose.int, (x, 0, 1))
        x = graph.call_function(aten.flatten.using_ints, (x, 0, 2))
        x = graph.call_function(aten.movedim.int, (x, 0, dim))
    output.replace_input_with(n, x)


def _shrink(gm, n, split, shapes, rank, world, folded):
    """A node on split channels: its shape list shrinks; its whole operands are sliced."""
    dim, size, block = split[n]
    t = n.target

    def sliced(a, d):  # a whole operand with the split axis' width on its dim d: the rank's indices
        return _sliced(gm, a, d, _indices((d, size, block), rank, world), folded, n)

    if t in shard_plan._SIZED:
        sizes = list(n.args[1])
        if isinstance(sizes[dim], int) and sizes[dim] != -1:  # a node is the rank's own count (sym_size)
            sizes[dim] = sizes[dim] // world
        n.args = (n.args[0], sizes, *n.args[2:])
    elif t is aten.unflatten.int:
        first, sizes = n.args[1] % len(shapes[n.args[0]]), list(n.args[2])
        if first <= dim < first + len(sizes) and sizes[dim - first] != -1:
            sizes[dim - first] = sizes[dim - first] // world
        n.args = (n.args[0], n.args[1], sizes)
    elif t in shard_plan._ELEMENTWISE:
        out_rank = len(shapes[n])
        args = list(n.args)
        for i, a in enumerate(args):
            if not isinstance(a, fx.Node) or a in split or not isinstance(shapes.get(a), tuple):
                continue
            d = dim - (out_rank - len(shapes[a]))
            if d >= 0 and shapes[a][d] == size and size != 1:
                args[i] = sliced(a, d)
        n.args = tuple(args)
    elif t is aten.cat.default:
        n.args = ([a if a in split else sliced(a, dim) for a in n.args[0]], *n.args[1:])
    elif t in shard_plan._ATTENTION:  # keys and values held whole, one head per query head: the rank's
        n.args = (*n.args[:2], *(a if a in split or shapes[a][1] == 1 else sliced(a, 1) for a in n.args[2:4]), n.args[4])
    elif t is aten.einsum.default:
        operands = n.args[1]
        terms, out = shard_plan.einsum_terms(n.args[0], [shapes[a] for a in operands])
        letter = out[dim]
        n.args = (n.args[0], [sliced(a, sub.index(letter)) if a not in split and letter in sub and size != 1
                              and shapes[a][sub.index(letter)] == size else a for a, sub in zip(operands, terms)])


def _shrink_split(n, axis, rank, world):
    """split / split_with_sizes along the split axis: each part keeps 1/world (chunk: the same count)."""
    args = list(n.args)
    dim = (args[2] if len(args) > 2 else n.kwargs.get("dim", 0)) % rank
    if dim != axis or n.target is aten.chunk.default:
        return
    args[1] = [x // world for x in args[1]] if isinstance(args[1], (list, tuple)) else args[1] // world
    n.args = tuple(args)


def group_of(tp):
    """(rank, world size, group name) of `tp`: a torch.distributed ProcessGroup or a 1-D DeviceMesh."""
    import torch.distributed as dist

    mesh_type = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
    if mesh_type is not None and isinstance(tp, mesh_type):
        if tp.ndim != 1:
            raise ValueError(f"tp: expected a 1-D DeviceMesh, got one of {tp.ndim} dims")
        tp = tp.get_group()
    if not dist.is_available() or not isinstance(tp, dist.ProcessGroup):
        raise TypeError(f"tp: expected a torch.distributed ProcessGroup or a 1-D DeviceMesh, got {type(tp).__name__}")
    return dist.get_rank(tp), dist.get_world_size(tp), tp.group_name


def _sliced(gm, node, dim, idx, folded, before):
    """`node` (a tensor every rank holds whole) at the rank's channels `idx` along `dim`: a new constant
    where it depends on parameters only, else an index_select inserted before `before`."""
    key = (node, dim, tuple(idx.tolist()))
    if key in folded:
        return folded[key]
    value = _constant(gm, node)
    graph = gm.graph
    if value is not None:
        name = f"lcsm_shard_{len(folded)}"
        gm.register_buffer(name, value.index_select(dim, idx.to(value.device)).contiguous())
        with graph.inserting_before(before):
            out = graph.get_attr(name)
    else:
        idx_name = f"lcsm_shard_index_{len(folded)}"
        gm.register_buffer(idx_name, idx)
        with graph.inserting_before(before):
            out = graph.call_function(aten.index_select.default, (node, dim, graph.get_attr(idx_name)))
    folded[key] = out
    return out


def _constant(gm, node):
    """The value of `node` if it is computed from parameters and buffers only, else None."""
    if not shard_plan.is_constant(node):
        return None
    if node.op == "get_attr":
        return attr_value(gm, node.target).detach()
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: _constant(gm, a))
    with torch.no_grad():
        return node.target(*args, **kwargs)


def _site(site, idx):
    """A convolution site keeping channels `idx` (of its flattened channels)."""
    c = site.conv
    width = site.width
    h = c.h.reshape(width, -1)[idx]
    skip = None if c.skip is None else c.skip.reshape(-1)[idx]
    bias = None if c.bias is None else c.bias.reshape(-1)[idx]
    modal = c.modal
    if isinstance(modal, ModalForm):
        modal = dataclasses.replace(modal, poles=modal.poles[idx], residues=modal.residues[idx],
                                    modes=tuple(modal.modes[i] for i in idx.tolist()) if len(modal.modes) == width else modal.modes)
    conv = dataclasses.replace(c, channel_shape=(len(idx),), skip=skip, bias=bias, modal=modal, _h=h)
    return ConvSite(site.name, site.kind, conv)
