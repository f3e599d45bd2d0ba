"""`optimize(model, example_inputs, max_len=...)` -> Decoder: the user-facing entry point."""

import torch
import torch.nn.functional as F

from lcsm_compile.baselines import FloorConv, LazyConv
from lcsm_compile.engine import OnlineConv
from lcsm_compile.passes import decode_rewrite
from lcsm_compile.runtime import Program, Session

BANKS = {"flash": OnlineConv, "lazy": LazyConv, "floor": FloorConv}


class Decoder:
    """Shared by every session of one optimized model: programs, filters, tile operators."""

    def __init__(self, exported, sites, *, max_len, example_inputs, report=None, conv="flash", crossover=None):
        if conv not in BANKS:
            raise ValueError(f"conv: expected one of {sorted(BANKS)}, got {conv!r}")
        self.report = report
        self.max_len = int(max_len)
        example = example_inputs[0]
        self.input_ndim, self.example_shape = example.dim(), tuple(example.shape)
        self.input_dtype, self.device = example.dtype, example.device
        self.programs = decode_rewrite.run(exported, sites)
        self.sites = self.programs.sites
        self.prefill_program = Program(self.programs.prefill, exported)
        self.step_program = Program(self.programs.step, exported)
        self.step_fn = self.step_program

        longs = [i for i, s in enumerate(self.sites) if s.kind == "long"]
        filters, skips, self.bank_slices, start = [], [], {}, 0
        for i in longs:
            s = self.sites[i]
            h = s.filter.detach().reshape(s.width, -1)[:, : self.max_len]
            filters.append(F.pad(h, (0, self.max_len - h.shape[1])))
            skips.append(torch.zeros(s.width, dtype=h.dtype, device=h.device) if s.skip is None else s.skip.detach().reshape(-1).to(h.dtype))
            self.bank_slices[i] = slice(start, start + s.width)
            start += s.width
        if not filters:
            raise ValueError("no long convolution to decode")
        kwargs = {"crossover": crossover} if conv == "flash" else {}
        self.bank = BANKS[conv](torch.cat(filters), torch.cat(skips), max_len=self.max_len, **kwargs)
        self.short_filters = {
            i: (s.filter.detach().reshape(s.width, -1), None if s.bias is None else s.bias.detach().reshape(-1))
            for i, s in enumerate(self.sites)
            if s.kind == "short"
        }

    def session(self) -> Session:
        return Session(self)
