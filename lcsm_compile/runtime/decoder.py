"""Decoder: what every session of one optimized model shares, built from the lowering's DecodePlan
(passes/decode_plan.py). It runs no pass: lcsm_compile.decoder (optimize, build_decoder) lowers."""

import torch
import torch.nn.functional as F

from lcsm_compile import generation
from lcsm_compile.checks import check_options, vocab_size
from lcsm_compile.logs import get_logger
from lcsm_compile.recurrence import Recurrence
from lcsm_compile.errors import StaleDecoder
from lcsm_compile.runtime.program import Program
from lcsm_compile.runtime.session import Session
from lcsm_compile.runtime.tiled import BANKS
from lcsm_compile.staleness import Fingerprint, module_state


class Decoder:
    """Shared by every session of one optimized model: programs, filters, tile operators.

    plan: the lowering's passes/decode_plan.DecodePlan (its programs, schedule, each site's strategy
    and bank channels, max_len, the bank). source: the module it is built from, whose parameters
    and buffers check_fresh() watches (None: nothing to watch)."""

    def __init__(self, plan, report, *, example_inputs, compile="auto", cuda_graph=False, source=None):
        check_options(compile=compile, cuda_graph=cuda_graph)
        # cuda_graph: each session captures its step without advance (lcsm_compile.runtime.graphs) and
        # replays it, the tile call launched eagerly after; "emulate" replays recorded ops on any device
        self.plan, self.cuda_graph, self.report = plan, cuda_graph, report
        # the filters, tables and the programs' copies of the weights are those of the parameters as
        # read now: check_fresh() compares them with the module's at each session, prefill and add
        self.source = source
        self.fingerprint = Fingerprint(module_state(source)) if source is not None else None
        self.rows_why = None  # set when the validation of rows at their own positions failed
        self.extend_why = None  # set when the validation of extends failed
        self.max_len = plan.max_len
        example = example_inputs[0]
        self.input_ndim, self.example_shape = example.dim(), tuple(example.shape)
        self.input_dtype, self.device = example.dtype, example.device
        self.vocab = vocab_size(report.captured.gm)  # token ids are checked against it (Session._check)
        self.batch_dynamic = report.captured.batch_dynamic
        self.programs, self.schedule, self.shard_plan = plan.programs, plan.schedule, plan.shard_plan
        self.sites = self.programs.sites
        self.attention = self.programs.attention  # causal attentions, each on a KV cache
        self.prefill_program = Program(self.programs.prefill, self.programs.out_spec)
        self.extend_program = Program(self.programs.extend, self.programs.out_spec)  # Session.extend, prefill(chunk=)
        self.step_fn = Program(self.programs.step, self.programs.out_spec, compile=compile)

        # modal filters the plan gave a recurrence step their own state; every tiled long convolution
        # of every layer is in one bank at its plan's channels: one tile call per position
        self.recurrent = {s.index: self._recurrence(self.sites[s.index].conv) for s in plan.sites if s.strategy == "recurrent"}
        tiled = plan.tiled()
        self.bank_slices = {s.index: s.channels for s in tiled}
        self.bank = BANKS[plan.bank](torch.cat([self._filter(s) for s in tiled]).to(self.device),
                                     torch.cat([self._skip(s) for s in tiled]).to(self.device), max_len=self.max_len,
                                     **plan.bank_options) if tiled else None  # none: ring buffers alone
        self.short_filters = {s.index: self._short_filter(s) for s in plan.sites if s.strategy == "ring"}
        if cuda_graph:
            from lcsm_compile.runtime.graphs import check_capturable

            check_capturable(self, cuda_graph)
        get_logger("passes").info("decoder: %d sites (%d long in one bank of %d channels, %d recurrent), %d attention "
                                  "sites on KV caches, %s bank, max_len %d", len(self.sites), len(tiled),
                                  sum(s.channels.stop - s.channels.start for s in tiled), len(self.recurrent),
                                  len(self.attention), plan.bank, self.max_len)
        get_logger("schedule").info("layer schedule:\n%s", self.schedule.table())

    def can(self, capability) -> bool:
        """Whether sessions may use `capability` ("rows", "extend", "graph_safe"; see
        OnlineConv.capabilities): every long convolution's bank declares it (ring buffers,
        recurrences and KV caches support all three), and the translation validation did not
        withhold it (rows_why, extend_why)."""
        withheld = {"rows": self.rows_why, "extend": self.extend_why}.get(capability)
        return withheld is None and (self.bank is None or capability in self.bank.capabilities)

    def _filter(self, s):
        """A tiled site's filter [W, max_len] in its dtype (cut or zero-padded to max_len)."""
        h = self.sites[s.index].conv.h.reshape(self.sites[s.index].width, -1)[:, : self.max_len].to(s.dtype)
        return F.pad(h, (0, self.max_len - h.shape[1]))

    def _skip(self, s):
        site = self.sites[s.index]
        skip = site.conv.skip
        return torch.zeros(site.width, dtype=s.dtype) if skip is None else skip.reshape(-1).to(s.dtype)

    def _recurrence(self, conv):
        return Recurrence(conv.modal.poles, conv.modal.residues, conv.skip, self.device)

    def _short_filter(self, s):
        """(conv1d weight [W, 1, K], step taps [K, 1, W], bias [W] or None) in the convolution's
        dtype, oldest input first."""
        conv = self.sites[s.index].conv
        weight = conv.h.reshape(-1, conv.h.shape[-1]).flip(-1).to(dtype=s.dtype, device=self.device)
        bias = None if conv.bias is None else conv.bias.reshape(-1).to(dtype=s.dtype, device=self.device)
        return weight.unsqueeze(1), weight.t().unsqueeze(1).contiguous(), bias

    def check_fresh(self):
        """Raise StaleDecoder naming the first parameter or buffer of the source module that was
        written in place or replaced since the build."""
        name = self.fingerprint.changed(module_state(self.source)) if self.fingerprint is not None else None
        if name is not None:
            raise StaleDecoder(f"the model's {name!r} changed (written in place or replaced) after the decoder was "
                               f"built: it decodes the weights it was built from; call lcsm_compile.optimize(model, "
                               f"...) again")

    def session(self, rows=None) -> Session:
        """A fresh session. rows=N: N free rows for add()/remove() (continuous batching); without
        it the first prefill fixes the rows."""
        self.check_fresh()
        return Session(self, rows)

    def generate(self, prompt_ids, max_new_tokens, attention_mask=None, prefill_chunk=None, **options):
        """Hugging Face generate() semantics on a fresh session; see lcsm_compile.generation.generate.
        attention_mask [B, P]: left-padded prompts (1 on real tokens); each row decodes from its
        first real token exactly as it would alone. prefill_chunk=K: the prompt goes in K positions
        at a time (Session.prefill(chunk=K)), keeping only the last position's outputs, for prompts
        whose whole activations (or logits) do not fit."""
        session = self.session()
        options.setdefault("max_len", self.max_len)
        self.step_fn.expect(max_new_tokens - 1)  # compile="auto" compiles up front for a long generation
        last = 1 if prefill_chunk is not None else None

        def prefill(ids):
            return session.prefill(ids, attention_mask=attention_mask, chunk=prefill_chunk, keep_last=last)

        try:
            with torch.no_grad():
                return generation.generate(prefill, session.step, prompt_ids, max_new_tokens, prefill_last_only=last == 1,
                                           **options)
        finally:
            self.step_fn.expect(0)


