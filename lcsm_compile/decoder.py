"""The user-facing entry points: `optimize(model, example_inputs, max_len=...)` -> a checked Decoder
(every pass of lcsm_compile.pipeline), and `build_decoder(report, ...)` -> the Decoder of an
analysed Report. The Decoder itself (lcsm_compile.runtime.decoder) is built from the lowering's plan.
"""

from lcsm_compile import pipeline
from lcsm_compile.analysis import check_args, quiet
from lcsm_compile.checks import check_options
from lcsm_compile.errors import NotDecodable
from lcsm_compile.logs import get_logger
from lcsm_compile.passes.layer_schedule import unknown_strategy_keys
from lcsm_compile.runtime.decoder import Decoder

__all__ = ["Decoder", "build_decoder", "optimize"]


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


def build_decoder(report, example_inputs, *, max_len=None, conv="flash", crossover=None, compile="auto",
                  cuda_graph=False, strategy="auto", latency=False) -> Decoder:
    """The Decoder of an analysed Report (lcsm_compile.analyze), unchecked: the rewrite passes, then
    the Decoder built from their plan, without the translation validation optimize() runs. For
    benchmarks and tests that drive one Report with several banks (conv=) or lengths (max_len: at
    most the analysed one, which is the default)."""
    check_options(max_len=max_len, conv=conv, crossover=crossover, compile=compile, cuda_graph=cuda_graph,
                  strategy=strategy, latency=latency)
    _check_latency(conv, latency)
    if not report.decodable:
        raise NotDecodable(report)
    options = {"conv": conv, "crossover": crossover, "strategy": strategy, "latency": latency, "max_len": max_len}
    example_inputs = tuple(example_inputs)
    plan = pipeline.lower(report, options, example_inputs).plan
    return Decoder(plan, report, example_inputs=example_inputs, compile=compile, cuda_graph=cuda_graph)


def _check_latency(conv, latency):
    if latency and conv != "partitioned":
        raise ValueError(f"latency=True: expected conv='partitioned' (the only bank with a latency mode), got conv={conv!r}")
