"""Decode plan: the lowering's decisions in one artifact, which the Decoder is built from.

Every site of the decode programs gets its strategy, a row of lcsm_compile.runtime.state.STRATEGIES:
a long convolution on the tiled bank ("tile") or by its recurrence ("recurrent", as the layer
schedule chose), a short one on a ring buffer ("ring"), a causal attention on a KV cache
("kv_cache"). A tiled site also gets its channels in the bank; every site its dtype. The plan
holds the served lengths (every position below max_len) and the bank with its options. The
Decoder (lcsm_compile.runtime.decoder) materialises it: filters, recurrences, ring taps; it runs
no pass.
"""

from dataclasses import dataclass
from typing import Any

import torch

from lcsm_compile.passes.capture import float_dtype

_FIXED = {"short": "ring", "attention": "kv_cache"}  # the strategy of every site of these kinds


@dataclass(frozen=True)
class SitePlan:
    index: int  # into the programs' sites (attention: into their attention sites)
    name: str
    kind: str  # "long" | "short" | "attention"
    strategy: str  # "tile" | "recurrent" | "ring" | "kv_cache"
    dtype: torch.dtype  # of its output: a tiled site's input is brought to the bank's dtype and back
    channels: slice | None = None  # "tile": its channels in the bank


@dataclass
class DecodePlan:
    programs: Any  # passes/decode_rewrite.Programs (this rank's, with tp)
    schedule: Any  # passes/layer_schedule.LayerSchedule
    max_len: int  # the served lengths: every position below it
    bank: str  # the tiled sites' bank: "flash" | "partitioned" | "lazy" | "floor" (runtime.tiled.BANKS)
    bank_options: dict  # the bank's own options (crossover; partition, latency)
    sites: tuple = ()  # SitePlan per convolution site, by index
    attention: tuple = ()  # SitePlan per attention site, by index
    shard_plan: Any = None  # with tp: the step program's passes/shard_plan.ShardPlan

    def strategy(self, index) -> str:
        return self.sites[index].strategy

    def tiled(self) -> list:
        return [s for s in self.sites if s.strategy == "tile"]

    def table(self) -> str:
        width = sum(s.channels.stop - s.channels.start for s in self.tiled())
        options = "".join(f", {k} {v}" for k, v in self.bank_options.items() if v is not None and k != "partition")
        bank = f"{self.bank} bank of {width} channels{options}" if width else "no tiled convolution"
        lines = [f"max_len {self.max_len}; {bank}"]
        for s in (*self.sites, *self.attention):
            where = f", bank channels {s.channels.start}:{s.channels.stop}" if s.channels is not None else ""
            lines.append(f"  {s.name} ({s.kind}): {s.strategy}, {str(s.dtype).removeprefix('torch.')}{where}")
        return "\n".join(lines)


def run(programs, schedule, *, max_len, conv, crossover, latency=False, shard_plan=None) -> DecodePlan:
    """The plan of `programs` as the layer schedule decoded them; `crossover` the flash bank's
    largest direct tile (resolved: the device's calibration when the caller gave none)."""
    recurrent, sites, start = set(schedule.recurrent), [], 0
    for i, site in enumerate(programs.sites):
        strategy = _FIXED.get(site.kind) or ("recurrent" if i in recurrent else "tile")
        channels = slice(start, start + site.width) if strategy == "tile" else None
        start += site.width if strategy == "tile" else 0
        sites.append(SitePlan(i, site.name, site.kind, strategy, float_dtype(site.conv.output), channels))
    attention = tuple(SitePlan(i, a.name, "attention", "kv_cache", float_dtype(a.attn.output))
                      for i, a in enumerate(programs.attention))
    options = {"flash": {"crossover": crossover},
               "partitioned": {"partition": _served_partition(schedule, max_len), "latency": latency}}.get(conv, {})
    return DecodePlan(programs, schedule, int(max_len), conv, options, tuple(sites), attention, shard_plan)


def _served_partition(schedule, max_len):
    """The partitioned bank's plan, chosen by the layer schedule for the served max_len."""
    part = schedule.partition
    return part if part is not None and part.max_len == max_len else None
