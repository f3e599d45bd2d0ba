"""`optimize(model, example_inputs, max_len=...)` -> Decoder: the user-facing entry point."""

import torch
import torch.nn.functional as F

from lcsm_compile import generation
from lcsm_compile.analysis import check_args, quiet
from lcsm_compile.baselines import FloorConv, LazyConv
from lcsm_compile.checks import check_options, vocab_size
from lcsm_compile.engine import OnlineConv
from lcsm_compile.errors import NotDecodable, StaleDecoder
from lcsm_compile.logs import get_logger
from lcsm_compile.partitioned import PartitionedConv
from lcsm_compile.passes.layer_schedule import unknown_strategy_keys
from lcsm_compile.recurrence import Recurrence
from lcsm_compile.runtime import Program, Session
from lcsm_compile.staleness import Fingerprint, module_state

BANKS = {"flash": OnlineConv, "partitioned": PartitionedConv, "lazy": LazyConv, "floor": FloorConv}


class Decoder:
    """Shared by every session of one optimized model: programs, filters, tile operators.

    programs / schedule: the decode_rewrite and layer_schedule artifacts (lcsm_compile.pipeline runs
    those passes when they are not given). source: the module it is built from, whose parameters
    and buffers check_fresh() watches (None: nothing to watch)."""

    def __init__(self, report, *, max_len, example_inputs, conv="flash", crossover=None, compile="auto",
                 cuda_graph=False, strategy="auto", latency=False, programs=None, schedule=None, source=None,
                 shard_plan=None):
        check_options(conv=conv, crossover=crossover, compile=compile, cuda_graph=cuda_graph, strategy=strategy,
                      latency=latency)
        _check_latency(conv, latency)
        # cuda_graph: each session captures its step without advance (lcsm_compile.runtime.graphs) and
        # replays it, the tile call launched eagerly after; "emulate" replays recorded ops on any device
        self.cuda_graph = cuda_graph
        self.report = report
        # the filters, tables and the programs' copies of the weights are those of the parameters as
        # read now: check_fresh() compares them with the module's at each session, prefill and add
        self.source = source
        self.fingerprint = Fingerprint(module_state(source)) if source is not None else None
        self.rows_why = None  # set when the validation of rows at their own positions failed
        self.extend_why = None  # set when the validation of extends failed
        self.max_len = int(max_len)
        example = example_inputs[0]
        self.input_ndim, self.example_shape = example.dim(), tuple(example.shape)
        self.input_dtype, self.device = example.dtype, example.device
        self.vocab = vocab_size(report.captured.gm)  # token ids are checked against it (Session._check)
        self.batch_dynamic = report.captured.batch_dynamic
        if programs is None:
            from lcsm_compile import pipeline

            options = {"conv": conv, "crossover": crossover, "strategy": strategy, "latency": latency}
            lowered = pipeline.lower(report, options, example_inputs)
            programs, schedule = lowered.programs, lowered.schedule
        self.programs, self.schedule = programs, schedule
        self.shard_plan = shard_plan  # optimize(tp=group): what this rank's programs split (passes/shard_plan.py)
        self.sites = self.programs.sites
        self.attention = getattr(self.programs, "attention", [])  # causal attentions, each on a KV cache
        self.prefill_program = Program(self.programs.prefill, self.programs.out_spec)
        self.extend_program = Program(self.programs.extend, self.programs.out_spec)  # Session.extend, prefill(chunk=)
        self.step_fn = Program(self.programs.step, self.programs.out_spec, compile=compile)

        # The long convolutions the layer schedule gave a recurrence (modal filters) step their own
        # state; every other long convolution of every layer is in one bank: one tile call per position.
        self.recurrent = {i: Recurrence(self.sites[i].conv.modal.poles, self.sites[i].conv.modal.residues,
                                        self.sites[i].conv.skip, self.device) for i in self.schedule.recurrent}
        filters, skips, self.bank_slices, start = [], [], {}, 0
        for i, site in enumerate(self.sites):
            if site.kind != "long" or i in self.recurrent:
                continue
            k = site.conv
            dtype = _dtype_of(k.output)
            h = k.h.reshape(site.width, -1)[:, : self.max_len].to(dtype)
            filters.append(F.pad(h, (0, self.max_len - h.shape[1])))
            skips.append(torch.zeros(site.width, dtype=dtype) if k.skip is None else k.skip.reshape(-1).to(dtype))
            self.bank_slices[i] = slice(start, start + site.width)
            start += site.width
        # the flash bank's crossover; the partitioned bank's plan, chosen by the layer schedule (by the
        # same costs the bank would choose it by, for the schedule's max_len)
        part = self.schedule.partition
        part = part if part is not None and part.max_len == self.max_len else None
        kwargs = {"flash": {"crossover": crossover}, "partitioned": {"partition": part, "latency": latency}}.get(conv, {})
        self.bank = BANKS[conv](torch.cat(filters).to(self.device), torch.cat(skips).to(self.device), max_len=self.max_len,
                                **kwargs) if filters else None  # only short convolutions: ring buffers alone
        self.short_filters = {i: self._short_filter(s.conv) for i, s in enumerate(self.sites) if s.kind == "short"}
        if cuda_graph:
            from lcsm_compile.runtime.graphs import check_capturable

            check_capturable(self, cuda_graph)
        get_logger("passes").info("decoder: %d sites (%d long in one bank of %d channels, %d recurrent), %d attention "
                                  "sites on KV caches, %s bank, max_len %d", len(self.sites), len(self.bank_slices), start,
                                  len(self.recurrent), len(self.attention), conv, self.max_len)
        get_logger("schedule").info("layer schedule:\n%s", self.schedule.table())

    def can(self, capability) -> bool:
        """Whether sessions may use `capability` ("rows", "extend", "graph_safe"; see
        OnlineConv.capabilities): every long convolution's bank declares it (ring buffers,
        recurrences and KV caches support all three), and the translation validation did not
        withhold it (rows_why, extend_why)."""
        withheld = {"rows": self.rows_why, "extend": self.extend_why}.get(capability)
        return withheld is None and (self.bank is None or capability in self.bank.capabilities)

    def _short_filter(self, conv):
        """(conv1d weight [W, 1, K], step taps [K, 1, W], bias [W] or None) in the convolution's
        dtype, oldest input first."""
        dtype = _dtype_of(conv.output)
        weight = conv.h.reshape(-1, conv.h.shape[-1]).flip(-1).to(dtype=dtype, device=self.device)
        bias = None if conv.bias is None else conv.bias.reshape(-1).to(dtype=dtype, device=self.device)
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


def optimize(model, example_inputs, *, max_len=None, conv="flash", crossover=None, compile="auto", cuda_graph=False,
             strategy="auto", latency=False, validate=True, tp=None) -> Decoder:
    """Analyze `model`, build its Decoder and check it (lcsm_compile.pipeline: every pass, in order).

    Raises NotDecodable (carrying the Report) when some op that mixes positions is not an accepted
    causal convolution, when a pass fails on the model, or when the built decoder does not
    reproduce the model teacher-forced on random inputs (DECODE_MISMATCH).
    conv: "flash" (ours: the paper's tiling), "partitioned" (frequency-domain delay lines,
    lcsm_compile.partitioned: fewer transforms, more multiply-adds; one shared position, one step at
    a time), or the "lazy"/"floor" baselines on the same step program ("floor" drops every lag > 0,
    so it is never validated).
    latency (conv="partitioned"): False plans for throughput; True bounds the step latency: every
    level whose firing would cost several mean steps is delayed by one block and spread over it
    (lcsm_compile.partition.plan).
    compile: "auto" (default) runs the step program eagerly and compiles it with inductor (once
    per batch size, a few seconds on CPU, so a step is not dominated by Python dispatch) when a
    generation is long enough to pay for it (runtime.program.AUTO_COMPILE_CALLS steps, taken or announced
    by generate); True compiles on the first step, False never.
    strategy: how each long convolution decodes (conv="flash"): "auto" (its recurrence where the filter
    is proved modal and recurrence.choose's cost model prefers it, else the tiling), "tile" (always
    the tiling) or "recurrent" (the recurrence wherever the filter is proved modal); or per site, a
    dict {site name or module path, as the layer schedule prints them: one of those} ("auto" for
    the others; a key that names no long convolution is a ValueError).
    validate: run the translation validation (passes/validate.py; its time is in report.passes).
    tp: a torch.distributed ProcessGroup or 1-D DeviceMesh: every rank of it calls optimize with the
    same model and example and gets a decoder holding 1/world of the channels the shard plan splits
    (passes/shard_plan.py: projections into depthwise convolutions and per-channel ops, up to the
    projection that reduces them, which all-reduces). Its sessions take the same inputs on every
    rank and return the full outputs on every rank."""
    from lcsm_compile import pipeline

    check_options(conv=conv, crossover=crossover, compile=compile, cuda_graph=cuda_graph, strategy=strategy,
                  latency=latency, validate=validate)
    _check_latency(conv, latency)
    example_inputs, max_len = check_args(model, example_inputs, max_len, "export")
    get_logger("passes").info("optimize: %s at max_len %d, %d passes (seconds: capture, analysis, rewrite, validation)",
                              type(model).__name__, max_len, len(pipeline.PASSES))
    if cuda_graph:  # an argument error, not the model's: raised, not a refusal in the Report
        from lcsm_compile.runtime.graphs import check_device

        check_device(cuda_graph, example_inputs[0].device)
    if tp is not None:
        from lcsm_compile.passes.shard_rewrite import group_of

        group_of(tp)  # an argument error (not a group, torch.distributed not initialized): raised here
    options = {"conv": conv, "crossover": crossover, "compile": compile, "cuda_graph": cuda_graph, "strategy": strategy,
               "latency": latency, "validate": validate and conv != "floor", "tp": tp}
    with quiet():
        ctx = pipeline.run(pipeline.Context(model, example_inputs, max_len, "export", options))
    if ctx.decoder is None:
        raise NotDecodable(ctx.report)
    unknown = unknown_strategy_keys(strategy, ctx.decoder.schedule)
    if unknown:
        sites = [f"{s['name']} ({s['module']})" for s in ctx.decoder.schedule.sites if s["kind"] == "long"]
        raise ValueError(f"strategy: {unknown} name no long convolution of this model; its long convolutions are {sites}")
    return ctx.decoder


def _check_latency(conv, latency):
    if latency and conv != "partitioned":
        raise ValueError(f"latency=True: expected conv='partitioned' (the only bank with a latency mode), got conv={conv!r}")


def _dtype_of(node):
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else torch.float32
