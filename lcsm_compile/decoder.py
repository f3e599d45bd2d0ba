"""`optimize(model, example_inputs, max_len=...)` -> Decoder: the user-facing entry point."""

import torch
import torch.nn.functional as F

from lcsm_compile import generation
from lcsm_compile.analysis import analyze
from lcsm_compile.baselines import FloorConv, LazyConv
from lcsm_compile.engine import OnlineConv
from lcsm_compile.passes import decode_rewrite, layer_schedule
from lcsm_compile.errors import NotDecodable
from lcsm_compile.logs import get_logger
from lcsm_compile.runtime import Program, Session

BANKS = {"flash": OnlineConv, "lazy": LazyConv, "floor": FloorConv}


class Decoder:
    """Shared by every session of one optimized model: programs, filters, tile operators."""

    def __init__(self, report, *, max_len, example_inputs, conv="flash", crossover=None, compile=False):
        if conv not in BANKS:
            raise ValueError(f"conv: expected one of {sorted(BANKS)}, got {conv!r}")
        self.report = report
        self.max_len = int(max_len)
        example = example_inputs[0]
        self.input_ndim, self.example_shape = example.dim(), tuple(example.shape)
        self.input_dtype, self.device = example.dtype, example.device
        convs = [c for c in report.accepted if c.kind in ("long", "short")]
        self.programs = decode_rewrite.run(report.captured, convs)
        self.sites = self.programs.sites
        self.prefill_program = Program(self.programs.prefill, self.programs.out_spec)
        self.step_fn = Program(self.programs.step, self.programs.out_spec, compile=compile)

        # Every long convolution of every layer in one bank: one tile call per position.
        filters, skips, self.bank_slices, start = [], [], {}, 0
        for i, site in enumerate(self.sites):
            if site.kind != "long":
                continue
            k = site.conv
            dtype = k.output.meta["val"].dtype if "val" in k.output.meta else torch.float32
            h = k.h.reshape(site.width, -1)[:, : self.max_len].to(dtype)
            filters.append(F.pad(h, (0, self.max_len - h.shape[1])))
            skips.append(torch.zeros(site.width, dtype=dtype) if k.skip is None else k.skip.reshape(-1).to(dtype))
            self.bank_slices[i] = slice(start, start + site.width)
            start += site.width
        kwargs = {"crossover": crossover} if conv == "flash" else {}
        self.bank = BANKS[conv](torch.cat(filters).to(self.device), torch.cat(skips).to(self.device), max_len=self.max_len, **kwargs)
        self.schedule = layer_schedule.run(
            self.programs.step, self.sites, max_len=self.max_len, crossover=getattr(self.bank, "crossover", None), bank_width=start
        )
        self.short_filters = {i: self._short_filter(s.conv) for i, s in enumerate(self.sites) if s.kind == "short"}
        get_logger("passes").info("decode_rewrite: %d sites (%d long in one bank of %d channels), %s bank, max_len %d",
                                  len(self.sites), len(self.bank_slices), start, conv, self.max_len)
        get_logger("schedule").info("layer schedule:\n%s", self.schedule.table())

    def _short_filter(self, conv):
        """(conv1d weight [W, 1, K], step taps [K, 1, W], bias [W] or None), oldest input first."""
        weight = conv.h.reshape(-1, conv.h.shape[-1]).flip(-1).float().to(self.device)
        bias = None if conv.bias is None else conv.bias.reshape(-1).float().to(self.device)
        return weight.unsqueeze(1), weight.t().unsqueeze(1).contiguous(), bias

    def session(self) -> Session:
        return Session(self)

    def generate(self, prompt_ids, max_new_tokens, **options):
        """Hugging Face generate() semantics on a fresh session; see lcsm_compile.generation.generate."""
        session = self.session()
        options.setdefault("max_len", self.max_len)
        with torch.no_grad():
            return generation.generate(session.prefill, session.step, prompt_ids, max_new_tokens, **options)


def optimize(model, example_inputs, *, max_len=None, conv="flash", crossover=None, compile=False) -> Decoder:
    """Analyze `model` and build its Decoder; raises NotDecodable (carrying the Report) when some
    op that mixes positions is not an accepted causal convolution.

    conv: "flash" (ours), or the "lazy"/"floor" baselines on the same step program.
    compile: compile the step program with inductor (once per batch size, a few seconds on CPU) so
    a step is not dominated by Python dispatch; worth it for long generations."""
    report = analyze(model, tuple(example_inputs), max_len=max_len)
    if not report.decodable:
        raise NotDecodable(report)
    return Decoder(report, max_len=report.capture.max_len, example_inputs=tuple(example_inputs), conv=conv, crossover=crossover, compile=compile)
