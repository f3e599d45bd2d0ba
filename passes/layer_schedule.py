"""Layer schedule: the dependency analysis of the step program, as data the CLI can print.

The step program's dataflow graph (networkx) reduced to its convolution sites gives the order in
which one position passes through the layers: `levels` are sites that depend on no site of a later
level (topological generations), the `critical_path` is the longest chain of dependent sites. The
tile work is not on that chain: `lcsm::advance` runs once per position, after every red cell, and
issues one batched call per tile size over the single bank that holds every long convolution of
every layer and batch row. The pass checks that ordering on the graph, because it is what makes
a tile read only history: inputs up to the current position, which every layer has produced.
Causal attentions (lcsm::attn_step on a KV cache) are sites of kind "attention" beside the
convolutions: they take part in the levels and the critical path, never in a tile group.
Each long convolution's decoding strategy is chosen here (lcsm_compile.recurrence.choose): a
recurrent one (a modal filter) steps its own state in its red cell and joins no tile group.
"""

from dataclasses import dataclass, field

import networkx as nx
import torch

from lcsm_compile.errors import LcsmError
from lcsm_compile.kernels.registry import kernel_for
from lcsm_compile.engine import state_dtype_for
from lcsm_compile.recurrence import choose, recurrent_from
from lcsm_compile import tuning
from lcsm_compile.partition import Partition, plan
from lcsm_compile.passes.capture import float_dtype
from lcsm_compile.report import ModalForm
from lcsm_compile.runtime import ops
from lcsm_compile.schedule import tile_sizes, transform_work

lcsm = torch.ops.lcsm
_SITE_OPS = {step: kind for kind, (_, step) in ops.SITE_OPS.items()}  # a site's step op -> its kind


class ScheduleError(LcsmError):
    """The step program does not order its tile call after every convolution it depends on."""


@dataclass
class LayerSchedule:
    sites: list  # dicts: name, kind, width, module, node (the step program's call); long sites: strategy,
    # state_bytes_per_row, modes (a proved modal filter's, else None), recurrent_from (the max_len from which
    # "auto" takes the recurrence; None: not modal, not on the tiled bank, or slower at every length)
    levels: list  # lists of site names: one level needs only sites of earlier levels
    critical_path: list  # site names: the longest chain of dependent convolutions
    tile_groups: list  # dicts: one batched tile call of one size over the whole bank
    edges: list = field(default_factory=list)  # (site, site) direct dependencies
    recurrent: tuple = ()  # indices (into the programs' sites) of the long convolutions decoded by their recurrence
    transforms: dict | None = None  # schedule.transform_work of the tile groups (None: no tile work)
    partition: Partition | None = None  # conv="partitioned": the bank's plan (lcsm_compile.partition)

    def to_json(self) -> dict:
        return {"sites": self.sites, "levels": self.levels, "critical_path": self.critical_path, "tile_groups": self.tile_groups,
                "edges": self.edges, "recurrent": list(self.recurrent), "transforms": self.transforms,
                "partition": None if self.partition is None else self.partition.to_json()}

    def table(self) -> str:
        n_attn = sum(1 for s in self.sites if s["kind"] == "attention")
        what = f"{len(self.sites) - n_attn} convolution sites" + (f" + {n_attn} attention sites" if n_attn else "")
        lines = [f"{what} in {len(self.levels)} levels; critical path {len(self.critical_path)} sites"]
        for i, level in enumerate(self.levels):
            lines.append(f"  level {i}: " + ", ".join(f"{n} ({self.describe(n)}, {self._site(n)['module']})" for n in level))
        lines.append("  critical path: " + " -> ".join(self.critical_path))
        if self.tile_groups:
            lines.append(f"{'tile':>6} {'kernel':>7} {'channels':>9} {'runs at steps':>16}  sites")
        for g in self.tile_groups:
            steps = f"{g['first_step']} + k*{g['every']}"
            lines.append(f"{g['size']:>6} {g['kernel']:>7} {g['channels']:>9} {steps:>16}  {len(g['sites'])} long convs, one call")
        if self.transforms is not None:
            t = self.transforms
            lines.append(f"FFT work per channel from position 0 (n log2 n per transform of size n): tiles {t['tiles']:.3g}, "
                         f"offline convolution {t['offline']:.3g}: {t['ratio']:.2f}x the offline")
        if self.partition is not None:
            w = self.partition.transform_work()
            lines.append(f"partitioned schedule of the bank (frequency-domain delay lines), "
                         f"{self.partition.multiply_adds()} complex multiply-adds per channel per step:")
            lines.append(self.partition.table())
            lines.append(f"FFT work per channel from position 0 (n log2 n per transform of size n): levels {w['transforms']:.3g}, "
                         f"offline convolution {w['offline']:.3g}: {w['ratio']:.2f}x the offline "
                         f"(the paper's tiling: {transform_work(self.partition.max_len, tuning.DEFAULTS['cpu'])['ratio']:.2f}x)")
        return "\n".join(lines)

    def to_dot(self) -> str:
        lines = ["digraph layer_schedule {", "  rankdir=LR;"]
        for s in self.sites:
            shape = {"long": "box", "attention": "hexagon"}.get(s["kind"], "ellipse")
            lines.append(f'  "{s["name"]}" [shape={shape}, label="{s["name"]}\\n{s["kind"]} x{s["width"]}\\n{s["module"]}"];')
        lines += [f'  "{a}" -> "{b}";' for a, b in self.edges]
        lines.append('  "advance" [shape=doubleoctagon, label="lcsm::advance\\none tile call per size"];')
        lines += [f'  "{s["name"]}" -> "advance" [style=dashed];' for s in self.sites if s["kind"] == "long"]
        lines.append("}")
        return "\n".join(lines)

    def _site(self, name):
        return next(s for s in self.sites if s["name"] == name)

    def describe(self, name) -> str:
        """One site as the schedule decodes it: its kind; a long one's strategy, state per row and crossover."""
        s = self._site(name)
        if s["kind"] != "long":
            return s["kind"]
        what = f"long, {s['strategy']}" + (f": {s['modes']} modes" if s["strategy"] == "recurrent" else "")
        what += f", state {_mib(s['state_bytes_per_row'])}/row"
        if s["recurrent_from"] is not None:
            return what + f", recurrence from max_len {s['recurrent_from']}"
        return what + (", recurrence slower at every max_len" if s["modes"] is not None and self.tile_groups else "")


def dataflow_graph(gm) -> nx.DiGraph:
    """The fx graph as a networkx DAG over node names."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, target=node.target)
        g.add_edges_from((a.name, node.name) for a in node.all_input_nodes)
    return g


def run(step_gm, sites, *, max_len, crossover, costs, attention=(), strategy="auto", partitioned=False,
        latency=False) -> LayerSchedule:
    """Schedule the step program `step_gm` (from passes.decode_rewrite) of the given ConvSites and
    AttentionSites; `crossover` is the flash bank's largest direct tile (None for banks that run no
    tiles, which decode every long convolution themselves); `costs` the device's
    lcsm_compile.costs.Costs, by which "auto" strategies choose and (`partitioned`) the partitioned
    bank's plan is chosen, for throughput or (`latency`) for bounded step latency; `strategy` as
    optimize() takes it."""
    channels = sum(s.width for s in sites if s.kind == "long")
    choice = dict(costs=costs, crossover=crossover, channels=channels)
    recurrent = tuple(i for i, s in enumerate(sites) if s.kind == "long" and crossover is not None
                      and choose(s.conv, max_len, site_strategy(strategy, s.name, _module(s.conv.output)), **choice) == "recurrent")
    g = dataflow_graph(step_gm)
    calls = {n.name: n for n in step_gm.graph.nodes if n.op == "call_function" and n.target in _SITE_OPS}
    advances = [n for n in step_gm.graph.nodes if n.op == "call_function" and n.target is lcsm.advance.default]
    if len(advances) != 1:
        raise ScheduleError(f"step program: expected exactly one lcsm::advance, found {len(advances)}")
    _check_tiles_read_history(g, advances[0].name, calls)

    info, by_call = [], {}
    for name, node in calls.items():
        if node.target is lcsm.attn_step.default:
            site = attention[node.args[4]]
            out = site.attn.output
        else:
            site = sites[node.args[2]]
            out = site.conv.output
        by_call[name] = site.name
        entry = {"name": site.name, "kind": site.kind, "width": site.width, "module": _module(out), "node": name}
        if site.kind == "long":
            entry.update(_long_site(site, node.args[2] in recurrent, max_len, choice))
        if site.kind == "attention":
            entry["cache"] = {"heads": site.attn.heads, "max_len": site.attn.max_len, "head_dim": site.attn.head_dim}
        info.append(entry)

    # site DAG: a -> b when b's input is computed from a's output (through time-local ops only)
    deps = nx.DiGraph()
    deps.add_nodes_from(by_call.values())
    for name in calls:
        for other in nx.ancestors(g, name) & calls.keys():
            deps.add_edge(by_call[other], by_call[name])
    deps = nx.transitive_reduction(deps)
    order = {s["name"]: i for i, s in enumerate(info)}
    levels = [sorted(level, key=order.get) for level in nx.topological_generations(deps)]
    long_sites = [s["name"] for s in info if s["kind"] == "long" and s["strategy"] == "tile"]
    groups = [
        {
            "size": U,
            "kernel": kernel_for(U, crossover).removesuffix("_tile"),
            "channels": sum(s["width"] for s in info if s["name"] in long_sites),
            "first_step": U,  # step i (1-based after the prefill) runs the tile of size i & -i
            "every": 2 * U,
            "sites": long_sites,
        }
        for U in tile_sizes(1, max_len)
    ] if long_sites and crossover is not None else []  # lazy/floor banks run no tiles
    part = plan(max_len, channels, costs, latency) if partitioned and channels else None
    return LayerSchedule(info, levels, nx.dag_longest_path(deps), groups, sorted(deps.edges, key=lambda e: (order[e[0]], order[e[1]])),
                         recurrent, transform_work(max_len, crossover) if groups else None, part)


def _mib(n):
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def site_strategy(strategy, name, module):
    """One long convolution's strategy from optimize()'s `strategy`: a str for every site, or a dict
    keyed by site name or module path (the site's own entry first; "auto" for sites it omits)."""
    if not isinstance(strategy, dict):
        return strategy
    return strategy.get(name, strategy.get(module, "auto"))


def unknown_strategy_keys(strategy, schedule):
    """The keys of a per-site `strategy` dict that name no long convolution of the schedule."""
    if not isinstance(strategy, dict):
        return []
    known = {s[k] for s in schedule.sites if s["kind"] == "long" for k in ("name", "module")}
    return sorted(set(strategy) - known)


def _long_site(site, recurrent, max_len, choice):
    """A long convolution's strategy, its state per batch row, and (a proved modal filter on the
    tiled bank) its modes and the max_len from which "auto" takes the recurrence (None: never)."""
    width, modes = site.conv.modal.poles.shape if isinstance(site.conv.modal, ModalForm) else (None, None)
    start = None if modes is None or choice["crossover"] is None else recurrent_from(modes, width, **choice)
    out = {"strategy": "recurrent" if recurrent else "tile", "modes": None if modes is None else int(modes), "recurrent_from": start}
    if recurrent:
        out["state_bytes_per_row"] = site.width * int(modes) * 16  # complex128 states
    else:
        dtype = state_dtype_for(float_dtype(site.conv.output))
        out["state_bytes_per_row"] = site.width * max_len * dtype.itemsize  # one input or accumulator per position
    return out


def _module(node):
    """The module path that computes `node` ("" at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _check_tiles_read_history(g, advance, calls):
    """The tile call must come after every convolution of the position (so its inputs are all
    history once it runs) and nothing in the step may read what it writes (future positions)."""
    before = nx.ancestors(g, advance)
    missing = sorted(set(calls) - before)
    if missing:
        raise ScheduleError(f"step program: lcsm::advance does not depend on {missing}; its tiles could run before those layers see the position")
    readers = sorted(set(g.successors(advance)) - {"output"})
    if readers:
        raise ScheduleError(f"step program: {readers} read the result of lcsm::advance, which belongs to later positions")
