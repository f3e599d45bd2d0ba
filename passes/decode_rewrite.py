"""Decode rewrite: the captured sequence graph becomes a prefill program and a step program.

Both are copies of the exported graph. In each, every accepted convolution's output is replaced
by a call on the session's state (custom ops in lcsm_compile.ops): the prefill program runs the
convolution over the whole prompt (and records what future positions need); the step program runs
one position. The filter subgraphs become dead and are removed: filters were evaluated once at
max_len by the analysis. Everything else is time-local and runs unchanged on one position, except
position-indexed constants (a table sliced [:L], an arange(L)), which the step program indexes by
the current position. Each convolution's input is brought to a canonical [B, C, T] layout (time
last, channels flattened, broadcast to the output's channels) so the runtime never sees layouts.
"""

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from lcsm_compile import ops  # noqa: F401  (registers torch.ops.lcsm)

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
class DecodePrograms:
    prefill: fx.GraphModule  # (session, *user_inputs) -> flat outputs
    step: fx.GraphModule  # (session, pos, *user_inputs at one position) -> flat outputs
    sites: list  # the ConvSites, in call order
    out_spec: object  # pytree spec to rebuild the model's output structure
    position_constants: list = field(default_factory=list)  # names of nodes indexed by position
    dumps: dict = field(default_factory=dict)  # program name -> readable graph


def run(captured, candidates, ctx=None) -> DecodePrograms:
    """Rewrite the captured graph (lcsm_compile.passes.capture.Captured, sequence dim dynamic)
    around the accepted candidates of its Report."""
    sites = [ConvSite(c.name, c.kind, c.conv) for c in candidates]
    out_spec = captured.gm.graph._codegen.pytree_info.out_spec
    prefill, _ = _rewrite(captured.gm, sites, step=False)
    step, position_constants = _rewrite(captured.gm, sites, step=True)
    dumps = {"prefill": prefill.print_readable(print_output=False), "step": step.print_readable(print_output=False)}
    return DecodePrograms(prefill, step, sites, out_spec, position_constants, dumps)


def _rewrite(source, sites, *, step):
    gm = copy.deepcopy(source)
    graph = gm.graph
    for node in list(graph.nodes):  # export's input guards pin L >= 2; a step has L = 1
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    names = {n.name: n for n in graph.nodes}
    user_inputs = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(user_inputs[0]):
        session = graph.placeholder("lcsm_session")
        pos = graph.placeholder("lcsm_pos") if step else None

    outputs = []
    for index, site in enumerate(sites):
        u, y = names[site.conv.input.name], names[site.conv.output.name]
        with graph.inserting_before(y):
            canon = _to_canonical(graph, u, site)
            if site.kind == "long":
                op = lcsm.conv_step.default if step else lcsm.conv_prefill.default
            else:
                op = lcsm.short_conv_step.default if step else lcsm.short_conv_prefill.default
            result = graph.call_function(op, (session, canon, index))
            new_y = _from_canonical(graph, result, site, y)
        y.replace_all_uses_with(new_y)
        outputs.append(result)

    position_constants = _index_position_constants(graph, user_inputs, pos) if step else []
    if step:
        out = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(out):
            graph.call_function(lcsm.advance.default, (session, outputs))
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS:
            graph.erase_node(node)
    graph.eliminate_dead_code()  # advance survives: its schema mutates `session`, so it is impure
    graph._codegen = fx.graph.CodeGen()  # plain positional signature: we added placeholders
    graph.lint()
    gm.recompile()
    return gm, position_constants


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


def _depends_on(node, sources, memo):
    """Whether `node`'s values are computed from any of `sources` (the user inputs); reading a
    source's shape (sym_size) does not count: that is how constants get sliced by L."""
    if node in memo:
        return memo[node]
    if node.op == "call_function" and node.target is aten.sym_size.int:
        memo[node] = False
    else:
        memo[node] = node in sources or any(_depends_on(a, sources, memo) for a in node.all_input_nodes)
    return memo[node]


def _is_length(node, user_inputs):
    """The sequence length: sym_size(user_input, 1)."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target is aten.sym_size.int
        and node.args[0] in user_inputs
        and node.args[1] == 1
    )


def _index_position_constants(graph, user_inputs, pos):
    """table[..., :L, ...] -> index_select(table, dim, pos); arange(L) -> pos. Only for values that
    do not depend on the inputs (those are position-indexed constants, not activations)."""
    memo, rewritten = {}, []
    for node in list(graph.nodes):
        if node.op != "call_function" or _depends_on(node, set(user_inputs), memo):
            continue
        if node.target is aten.slice.Tensor:
            table, dim, start, end = (list(node.args) + [0, None, None])[:4]
            if start in (None, 0) and _is_length(end, user_inputs) and not _depends_on(table, set(user_inputs), memo):
                with graph.inserting_before(node):
                    new = graph.call_function(aten.index_select.default, (table, dim, pos))
                node.replace_all_uses_with(new)
                rewritten.append(node.name)
        elif node.target in (aten.arange.default, aten.arange.start) and _is_length(node.args[-1], user_inputs):
            if node.target is aten.arange.start and node.args[0] != 0:
                continue
            with graph.inserting_before(node):
                new = graph.call_function(aten.to.dtype, (pos, node.meta["val"].dtype)) if "val" in node.meta else pos
            node.replace_all_uses_with(new)
            rewritten.append(node.name)
    return rewritten
