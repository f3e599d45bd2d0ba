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
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from lcsm_compile import ops  # noqa: F401  (registers torch.ops.lcsm)

aten = torch.ops.aten
lcsm = torch.ops.lcsm
_ASSERTS = {aten._assert_scalar.default, aten.sym_constrain_range_for_size.default, aten._assert_tensor_metadata.default}


@dataclass
class ConvSite:
    """One accepted causal convolution, as the rewrite needs it.

    input/output: the nodes carrying u and y = conv(u) (+ skip, + bias) in the sequence graph.
    time_in/time_out: their time axes. filter: [*channels_out, Lh], lag axis last, causal
    orientation (y_t = sum_k filter[k] u_{t-k}), where channels_out are y's non-batch, non-time
    dims in order; input_view: the shape u's non-batch non-time dims take (inserting 1s) so they
    broadcast to channels_out. skip/bias: [*channels_out] or None. kind: "long" or "short".
    """

    name: str
    kind: str
    input: fx.Node
    output: fx.Node
    time_in: int
    time_out: int
    filter: torch.Tensor
    input_view: tuple
    skip: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def channels_out(self) -> tuple:
        return tuple(self.filter.shape[:-1])

    @property
    def width(self) -> int:
        return int(torch.Size(self.channels_out).numel())


@dataclass
class DecodePrograms:
    prefill: fx.GraphModule  # (session, *user_inputs) -> outputs
    step: fx.GraphModule  # (session, pos, *user_inputs at one position) -> outputs
    sites: list  # the ConvSites, in call order
    position_constants: list = field(default_factory=list)  # names of nodes indexed by position
    dumps: dict = field(default_factory=dict)  # program name -> readable graph


def run(exported, sites, ctx=None) -> DecodePrograms:
    """Rewrite `exported` (a torch.export ExportedProgram, sequence dim dynamic) around `sites`."""
    prefill = _rewrite(exported, sites, step=False)
    step = _rewrite(exported, sites, step=True)
    programs = DecodePrograms(prefill=prefill[0], step=step[0], sites=list(sites), position_constants=step[1])
    programs.dumps = {"prefill": prefill[0].print_readable(print_output=False), "step": step[0].print_readable(print_output=False)}
    return programs


def _rewrite(exported, sites, *, step):
    gm = copy.deepcopy(exported.graph_module)
    graph = gm.graph
    names = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user_inputs = [p for p, spec in zip(placeholders, exported.graph_signature.input_specs) if spec.kind.name == "USER_INPUT"]
    with graph.inserting_before(placeholders[0]):
        session = graph.placeholder("lcsm_session")
        pos = graph.placeholder("lcsm_pos") if step else None

    outputs = []
    for index, site in enumerate(sites):
        u, y = names[site.input.name], names[site.output.name]
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


def _to_canonical(graph, u, site):
    """u (time on axis time_in) -> [B, width, T]: time last, channels broadcast to the output's."""
    x = graph.call_function(aten.movedim.int, (u, site.time_in, -1))
    batch = graph.call_function(aten.sym_size.int, (u, 0))
    T = graph.call_function(aten.sym_size.int, (u, site.time_in))
    x = graph.call_function(aten.reshape.default, (x, [batch, *site.input_view, T]))
    x = graph.call_function(aten.expand.default, (x, [batch, *site.channels_out, T]))
    return graph.call_function(aten.reshape.default, (x, [batch, site.width, T]))


def _from_canonical(graph, result, site, y):
    """[B, width, T] -> y's layout and dtype (time back on axis time_out)."""
    batch = graph.call_function(aten.sym_size.int, (result, 0))
    T = graph.call_function(aten.sym_size.int, (result, 2))
    x = graph.call_function(aten.reshape.default, (result, [batch, *site.channels_out, T]))
    x = graph.call_function(aten.movedim.int, (x, -1, site.time_out))
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
