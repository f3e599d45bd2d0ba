"""Decode rewrite: the captured sequence graph becomes a prefill program and a step program.

Each is a copy of the exported graph. In each, every accepted convolution's output is replaced
by a call on the session's state (custom ops in lcsm_compile.runtime.ops): the prefill program runs the
convolution over the whole prompt (and records what future positions need); the step program runs
one position; the extend program runs k known positions of a live session (Session.extend) with
the prefill's ops, which the session state points at its current position. Causal delays (a
token shift) are short convolutions: ring buffers. The filter
subgraphs become dead and are removed: filters were evaluated once at max_len by the analysis.
Everything else is time-local and runs unchanged on one position, except position constants
(passes/position_constants.py), which the step program reads from their max_len table at the
current position. Each convolution's input is brought to a canonical [B, C, T] layout (time last,
channels flattened, broadcast to the output's channels) so the runtime never sees layouts.
Each accepted causal attention (passes/attention.py) is replaced the same way: its q, k, v become
[B, G, T, D] (batch row, heads, time, feature) and an lcsm::attn_prefill / attn_step call on the
session's KV cache computes its output, which goes back to the model's layout.
"""

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from lcsm_compile.runtime import ops

aten = torch.ops.aten
lcsm = torch.ops.lcsm
_ASSERTS = {aten._assert_scalar.default, aten.sym_constrain_range_for_size.default, aten._assert_tensor_metadata.default}


@dataclass
class ConvSite:
    """One accepted convolution: the analysis's ConvStructure plus its kind ("long" or "short")."""

    name: str
    kind: str
    conv: object  # lcsm_compile.report.ConvStructure

    @property
    def width(self) -> int:
        return int(torch.Size(self.conv.channel_shape).numel())


@dataclass
class AttentionSite:
    """One accepted causal attention: the analysis's AttentionStructure, decoded on a KV cache."""

    name: str
    attn: object  # lcsm_compile.report.AttentionStructure

    kind = "attention"

    @property
    def width(self) -> int:
        return self.attn.heads * self.attn.head_dim


@dataclass
class DecodePrograms:
    prefill: fx.GraphModule  # (session, *user_inputs) -> flat outputs
    step: fx.GraphModule  # (session, pos, *user_inputs at one position) -> flat outputs
    extend: fx.GraphModule  # (session, positions [k], *user_inputs at those positions) -> flat outputs
    sites: list  # the ConvSites, in call order
    out_spec: object  # pytree spec to rebuild the model's output structure
    position_constants: list = field(default_factory=list)  # names of the nodes the step reads from tables
    attention: list = field(default_factory=list)  # the AttentionSites, in call order

    def dump(self):
        return "\n".join(f"# {name} program\n{gm.print_readable(print_output=False).rstrip()}"
                         for name, gm in (("prefill", self.prefill), ("step", self.step), ("extend", self.extend)))


def run(captured, candidates, position_constants=(), attention=()) -> DecodePrograms:
    """Rewrite the captured graph (lcsm_compile.passes.capture.Captured) around the accepted
    candidates of its Report (convolutions, then attention sites) and its position constants.
    A concrete capture's programs are still concrete here: passes/generalize.py follows."""
    sites = [ConvSite(c.name, c.kind, c.conv) for c in candidates]
    attn = [AttentionSite(c.name, c.attention) for c in attention]
    out_spec = captured.gm.graph._codegen.pytree_info.out_spec
    # a concrete capture's prefill reads its position constants from their tables too: how the graph
    # computes them may be baked at the captured length (linspace, a sliced cache)
    prefill = _rewrite(captured.gm, sites, attn, "prefill", tables=() if captured.symbolic else position_constants)
    step = _rewrite(captured.gm, sites, attn, "step", tables=position_constants)
    # the extend program reads every position constant from its table: computed in the graph, it
    # would be that of positions 0 .. k-1
    extend = _rewrite(captured.gm, sites, attn, "extend", tables=position_constants)
    return DecodePrograms(prefill, step, extend, sites, out_spec, [c.name for c in position_constants], attn)


def _rewrite(source, sites, attention=(), mode="prefill", *, tables=()):
    """mode: "prefill", "step" (one position at lcsm_pos: [1], or [B] for rows at their own positions,
    then lcsm::advance) or "extend" (the prefill's ops; lcsm_pos [k] the window's positions)."""
    gm = copy.deepcopy(source)
    graph = gm.graph
    step = mode == "step"
    names = {n.name: n for n in graph.nodes}
    user_inputs = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(user_inputs[0]):
        session = graph.placeholder("lcsm_session")
        pos = graph.placeholder("lcsm_pos") if mode != "prefill" else None

    outputs = []
    for index, site in enumerate(sites):
        u, y = names[site.conv.input.name], names[site.conv.output.name]
        with graph.inserting_before(y):
            canon = _to_canonical(graph, u, site)
            result = graph.call_function(ops.SITE_OPS[site.kind][1 if step else 0], (session, canon, index))
            new_y = _from_canonical(graph, result, site, y)
        y.replace_all_uses_with(new_y)
        outputs.append(result)
    for index, site in enumerate(attention):
        a = site.attn
        q, k, v, y = (names[n.name] for n in (a.q, a.k, a.v, a.output))
        with graph.inserting_before(y):
            batch = graph.call_function(aten.sym_size.int, (user_inputs[0], 0))
            qc, kc, vc = (_attn_canonical(graph, n, a.perms[name], batch) for name, n in (("q", q), ("k", k), ("v", v)))
            result = graph.call_function(ops.SITE_OPS["attention"][1 if step else 0], (session, qc, kc, vc, index))
            new_y = _attn_output(graph, result, q, v, a, y)
        y.replace_all_uses_with(new_y)
        outputs.append(result)

    _read_tables(gm, tables, names, user_inputs[0], pos, step)
    if step:
        out = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(out):
            graph.call_function(lcsm.advance.default, (session, outputs))
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS:
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is aten.view.default:
            # the session ops return contiguous tensors where the model's op may have returned
            # another layout (SDPA's output is [B, L, H, D] in memory): a view that the captured
            # strides allowed may not apply to ours. The graph is functional, so a reshape is the
            # same value
            node.target = aten.reshape.default
    # advance survives: its schema mutates `session`. The model's attention, replaced, goes: SDPA and
    # dropout count as impure only for their randomness, which an inference program does not draw
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
    graph._codegen = fx.graph.CodeGen()  # plain positional signature: we added placeholders
    graph.lint()
    gm.recompile()
    return gm


def _letters(site):
    """From the input map ("bhl->bchl"): input letters, batch, channel letters (output order), time."""
    lhs, rhs = site.conv.input_map.split("->")
    time = rhs[site.conv.time_axis]
    batch = rhs[0]
    return lhs, batch, [c for c in rhs if c not in (batch, time)], time


def _to_canonical(graph, u, site):
    """u -> [B, width, T]: batch first, channels in the output's order and broadcast to it, time last."""
    lhs, b, chans, t = _letters(site)
    perm = [lhs.index(b)] + [lhs.index(c) for c in chans if c in lhs] + [lhs.index(t)]
    shape = list(site.conv.channel_shape)
    view = [shape[i] if c in lhs else 1 for i, c in enumerate(chans)]
    batch = graph.call_function(aten.sym_size.int, (u, lhs.index(b)))
    T = graph.call_function(aten.sym_size.int, (u, lhs.index(t)))
    x = graph.call_function(aten.permute.default, (u, perm))
    x = graph.call_function(aten.reshape.default, (x, [batch, *view, T]))
    x = graph.call_function(aten.expand.default, (x, [batch, *shape, T]))
    return graph.call_function(aten.reshape.default, (x, [batch, site.width, T]))


def _from_canonical(graph, result, site, y):
    """[B, width, T] -> y's layout and dtype (time back on its axis)."""
    batch = graph.call_function(aten.sym_size.int, (result, 0))
    T = graph.call_function(aten.sym_size.int, (result, 2))
    x = graph.call_function(aten.reshape.default, (result, [batch, *site.conv.channel_shape, T]))
    x = graph.call_function(aten.movedim.int, (x, -1, site.conv.time_axis))
    dtype = y.meta["val"].dtype if "val" in y.meta else None
    return graph.call_function(aten.to.dtype, (x, dtype)) if dtype is not None else x


def _attn_canonical(graph, x, perm, batch):
    """q / k / v -> [B, G, T, D]: heads (batch row first), time, feature."""
    T = graph.call_function(aten.sym_size.int, (x, perm[-2]))
    D = graph.call_function(aten.sym_size.int, (x, perm[-1]))
    x = graph.call_function(aten.permute.default, (x, perm))
    return graph.call_function(aten.reshape.default, (x, [batch, -1, T, D]))


def _attn_output(graph, result, q, v, a, y):
    """[B, G, T, Dv] -> the head sizes of q, then the model's layout and dtype."""
    heads = [graph.call_function(aten.sym_size.int, (q, d)) for d in a.perms["q"][:-2]]
    T = graph.call_function(aten.sym_size.int, (result, 2))
    Dv = graph.call_function(aten.sym_size.int, (v, a.perms["v"][-1]))
    x = graph.call_function(aten.reshape.default, (result, [*heads, T, Dv]))
    x = graph.call_function(aten.permute.default, (x, a.out_perm))
    dtype = y.meta["val"].dtype if "val" in y.meta else None
    return graph.call_function(aten.to.dtype, (x, dtype)) if dtype is not None else x


def _read_tables(gm, tables, names, x, pos, step):
    """Each position constant becomes its max_len table (a buffer of the program) read at the
    step's position, at the extend's positions, or (prefill: pos None) its first L positions; a
    table of batch 1 is expanded to the input's batch. A step's `pos` is [1] when every row shares
    the position and [B] when each row has its own: the B rows read on the positions axis then move
    to the batch dim (a no-op swap of two size-1 dims for [1])."""
    graph = gm.graph
    for i, const in enumerate(tables):
        node = names[const.node.name]
        val = node.meta["val"]
        table = const.table.to(val.dtype) if const.table.is_floating_point() or const.table.is_complex() else const.table
        name = f"lcsm_position_{i}"
        gm.register_buffer(name, table.to(val.device).contiguous())
        with graph.inserting_before(node):
            if pos is None:
                T = graph.call_function(aten.sym_size.int, (x, 1))
                row = graph.call_function(aten.narrow.default, (graph.get_attr(name), const.axis, 0, T))
            else:
                row = graph.call_function(aten.index_select.default, (graph.get_attr(name), const.axis, pos))
            if const.batch_dims:
                if step:
                    row = graph.call_function(aten.transpose.int, (row, const.axis, const.batch_dims[0]))
                batch = graph.call_function(aten.sym_size.int, (x, 0))
                shape = [batch if d in const.batch_dims else -1 for d in range(val.dim())]
                row = graph.call_function(aten.expand.default, (row, shape))
            elif const.rows_rank is not None and step:  # rows into a leading dim that lines up with the users' batch
                extra = const.rows_rank - val.dim()
                for _ in range(extra):
                    row = graph.call_function(aten.unsqueeze.default, (row, 0))
                row = graph.call_function(aten.transpose.int, (row, const.axis + extra, 0))
        node.replace_all_uses_with(row)
