"""The pass manager: one ordered list of named passes, used by analyze(), optimize(), the backend
and the CLI (`lcsm-compile passes --print-after P --stop-after P`).

    analysis:  capture -> canonicalize -> time_axis -> attention -> detect -> properties
               -> position_constants -> safety_net -> modal                                 (product: the Report)
    rewrite:   decode_rewrite -> generalize -> shard -> layer_schedule -> decode_plan
                                                          (product: the DecodePlan, the Decoder built from it)
    check:     validate                                               (translation validation)

Each pass reads what earlier passes left on the Context and leaves its artifact there (one
direction); the Context keeps every pass's text dump and time. Adding a pass is its file under
passes/ and one line in PASSES. An exception inside any pass becomes a CAPTURE_FAILED verdict that
names the pass, the exception and the source line of the node it was working on: analyze() returns
that Report, optimize() raises NotDecodable with it, the backend falls back. Nothing else escapes.
"""

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from lcsm_compile import tuning
from lcsm_compile.logs import get_logger
from lcsm_compile.passes import attention, canonicalize, capture, decode_plan, decode_rewrite, detect, generalize
from lcsm_compile.passes import layer_schedule, modal, position_constants, properties, shard_plan, shard_rewrite
from lcsm_compile.passes import time_axis, validate
from lcsm_compile.report import Candidate, CaptureInfo, Reason, Report, Verdict
from lcsm_compile.runtime.decoder import Decoder


@dataclass
class Context:
    """Everything one run of the passes knows: inputs first, then each pass's artifact."""

    source: Any  # the nn.Module, a capture.DynamoSource (a graph dynamo handed the backend) or a Captured
    example_inputs: tuple
    max_len: int
    capture: str = "export"  # "export" | "dynamo"
    options: dict = field(default_factory=dict)  # conv, crossover, compile, validate
    # artifacts, in pass order
    cap: Any = None
    canon: dict = None
    time_info: dict = None
    attention: list = None  # attention.Site list (causal attentions on a KV cache, and declined look-alikes)
    matches: list = None
    candidates: list = None
    position_constants: Any = None  # (PositionConstant list, rejected Candidate list)
    safety: dict = None
    modal: dict = None  # accepted long convolution's name -> modal.ModalForm | modal.NotModal
    report: Report = None
    programs: Any = None
    shard_plan: Any = None  # with tp=group: the step program's shard_plan.ShardPlan (None: one process)
    schedule: Any = None
    plan: Any = None  # decode_plan.DecodePlan: what the Decoder is built from
    decoder: Any = None
    validation: dict = None
    # helpers
    runner: Any = None
    reference: Any = None  # the module the decoder must reproduce (the model, or the dynamo graph's module)
    alt: list = None  # (match, runner, cap) of cap.alt (concrete captures), paired with the main matches by order
    passes: list = field(default_factory=list)  # (name, dump, seconds)
    notes: list = field(default_factory=list)
    failed: bool = False  # a pass failed: the Report is a refusal


@dataclass(frozen=True)
class Pass:
    name: str
    stage: str  # "analysis" | "rewrite" | "check"
    run: Callable  # (ctx) -> artifact
    artifact: str  # the Context attribute it sets
    dump: Callable  # (artifact, ctx) -> str


def _capture(ctx):
    if isinstance(ctx.source, capture.Captured):  # captured elsewhere (e.g. a decomposed export)
        ctx.reference = ctx.source.gm
        ctx.runner = capture.Runner(ctx.source)
        return ctx.source
    if isinstance(ctx.source, capture.DynamoSource):
        cap, module = capture.from_dynamo(ctx.source.gm, ctx.source.inputs, ctx.source.user_inputs, ctx.max_len,
                                          ctx.source.plan)
        ctx.reference = module
    else:
        cap = capture.run(ctx.source, ctx)
        ctx.reference = ctx.source
    ctx.runner = capture.Runner(cap)
    return cap


def _properties(ctx):
    if ctx.cap.alt is not None:
        ctx.alt = _alt_matches(ctx)
    return properties.run(ctx.matches, ctx)


def _safety_net(ctx):
    # a runner of its own: the candidates' runner keeps only filter parameters widened, this one
    # widens every parameter and is dropped with the safety net
    cap = ctx.cap
    if cap.symbolic:
        f, tol = capture.Runner(cap).run_full, properties.TOL64 * 10
    else:  # a concrete capture runs at one length only: check the model itself, to its rounding
        f, tol = (lambda xs: ctx.reference(*xs)), validate.TOL[validate.lowest_precision(cap.gm)]
    with capture.preserved_state(ctx.reference):
        return properties.safety_net(f, cap, tol)


def _shard(ctx):
    """tp=group: this rank's programs and sites (passes/shard_rewrite.py); else the programs as they are.
    shard_preview=WORLD (lcsm-compile schedule --tp, one process): rank 0's of WORLD, for their schedule
    and state; their collectives name no group, so they are not run."""
    tp, preview = ctx.options.get("tp"), ctx.options.get("shard_preview")
    if tp is None and preview is None:
        return ctx.programs
    rank, world, group_name = shard_rewrite.group_of(tp) if tp is not None else (0, preview, "shard_preview")
    x = ctx.example_inputs[0]
    plans = shard_plan.for_programs(ctx.programs, tuple(x.shape), x.dtype, world)
    ctx.shard_plan = plans["step"]
    return shard_rewrite.run(ctx.programs, plans, rank, world, group_name)


def _shard_dump(programs, ctx):
    if ctx.shard_plan is None:
        return "one process: nothing split"
    return ctx.shard_plan.table({i: s.name for i, s in enumerate(programs.sites)}) + "\n" + programs.dump()


def _crossover(ctx):
    """The flash bank's largest direct tile: the caller's, else the device's calibration (None for
    the other banks, which run no tiles)."""
    if ctx.options.get("conv", "flash") != "flash":
        return None
    crossover = ctx.options.get("crossover")
    return tuning.crossover_for(ctx.example_inputs[0].device) if crossover is None else crossover


def _served(ctx):
    """The lengths the decoder serves: every position below the analysed max_len, or below a shorter
    max_len the caller of lower() asked for."""
    return ctx.options.get("max_len") or ctx.report.capture.max_len


def _layer_schedule(ctx):
    return layer_schedule.run(ctx.programs.step, ctx.programs.sites, max_len=_served(ctx),
                              crossover=_crossover(ctx), attention=ctx.programs.attention,
                              costs=tuning.costs_for(ctx.example_inputs[0].device), strategy=ctx.options.get("strategy", "auto"),
                              partitioned=ctx.options.get("conv") == "partitioned", latency=ctx.options.get("latency", False))


def _decode_plan(ctx):
    return decode_plan.run(ctx.programs, ctx.schedule, max_len=_served(ctx),
                           conv=ctx.options.get("conv", "flash"), crossover=_crossover(ctx),
                           latency=ctx.options.get("latency", False), shard_plan=ctx.shard_plan)


def _graph_dump(cap, ctx):
    return cap.gm.graph.python_code("self").src


def _candidates_dump(cands, ctx):
    return "\n".join(f"{c.name}: {c.verdict.value} {c.reason.value if c.reason else ''} {c.explanation}" for c in cands)


PASSES = [
    Pass("capture", "analysis", _capture, "cap", _graph_dump),
    Pass("canonicalize", "analysis", lambda c: canonicalize.run(c.cap, c), "canon", lambda r, c: canonicalize.dump(r)),
    Pass("time_axis", "analysis", lambda c: time_axis.run(c.canon, c), "time_info", lambda r, c: time_axis.dump(c.canon, r)),
    Pass("attention", "analysis", lambda c: attention.run(c.canon, c), "attention", lambda r, c: attention.dump(r)),
    Pass("detect", "analysis", lambda c: detect.run(c.canon, c), "matches", lambda r, c: detect.dump(r)),
    Pass("properties", "analysis", _properties, "candidates", _candidates_dump),
    Pass("position_constants", "analysis", lambda c: position_constants.run(c.matches, c), "position_constants",
         lambda r, c: position_constants.dump(r)),
    Pass("safety_net", "analysis", _safety_net, "safety", lambda r, c: repr(r)),
    Pass("modal", "analysis", lambda c: modal.run(c.candidates, c.cap), "modal", lambda r, c: modal.dump(r)),
    Pass("decode_rewrite", "rewrite", lambda c: decode_rewrite.run(c.cap, c.report.sites, c.report.position_constants,
                                                                     c.report.attention),
         "programs", lambda r, c: r.dump()),
    Pass("generalize", "rewrite", lambda c: generalize.run(c.programs, c.cap, c.report.site_pairs), "programs",
         lambda r, c: r.dump()),
    Pass("shard", "rewrite", _shard, "programs", _shard_dump),
    Pass("layer_schedule", "rewrite", _layer_schedule, "schedule", lambda r, c: r.table()),
    Pass("decode_plan", "rewrite", _decode_plan, "plan", lambda r, c: r.table()),
    Pass("validate", "check", lambda c: validate.run(c.decoder, c.reference, c), "validation", lambda r, c: validate.dump(r)),
]
PASS_NAMES = tuple(p.name for p in PASSES)
ANALYSIS_PASSES = tuple(p.name for p in PASSES if p.stage == "analysis")


def run(ctx, *, stop_after=None, stages=("analysis", "rewrite", "check")):
    """Run the passes of `stages` in order (up to `stop_after`). After the analysis ctx.report is
    set; after the rewrite (for a decodable model) ctx.decoder. Returns ctx."""
    if stop_after is not None and stop_after not in PASS_NAMES:
        raise ValueError(f"stop_after: unknown pass {stop_after!r}; passes: {', '.join(PASS_NAMES)}")
    if "analysis" in stages:
        ctx.notes += _caller_notes(ctx)
    for p in PASSES:
        if p.stage not in stages:
            continue
        if p.stage != "analysis" and (ctx.report is None or not ctx.report.decodable):
            break
        if p.name == "validate" and not ctx.options.get("validate", True):
            if ctx.cap.symbolic:
                continue
            ctx.report.notes.append("validate=False was overridden: a model captured at concrete lengths is decoded "
                                    "from programs generalized from its captures (passes/generalize.py), which only "
                                    "the translation validation checks at other lengths and batches")
        if not _run_pass(p, ctx):
            break
        if ctx.report is not None and p.stage != "analysis" and not ctx.report.decodable:
            break
        if p.name == ANALYSIS_PASSES[-1]:
            ctx.report = _report(ctx)
        if p.name == "decode_plan":
            ctx.report.strategies = {s["name"]: ctx.schedule.describe(s["name"]) for s in ctx.schedule.sites if s["kind"] == "long"}
            ctx.decoder = _build_decoder(ctx)
            if ctx.decoder is None:
                break
        if p.name == "validate" and not ctx.validation["passed"]:
            _refuse(ctx, validate.candidate(ctx.validation, ctx.cap))
            break
        if p.name == stop_after:
            break
    if ctx.report is None:  # the analysis stopped early (stop_after, or a pass failed)
        ctx.report = _report(ctx)
    return ctx


def _caller_notes(ctx):
    """Likely mistakes of the caller that make the analysis refuse the model; a refusal's text
    (Report.refusal) carries them. The module is the model, or the one dynamo compiled (backend)."""
    source = ctx.source
    module = source if isinstance(source, torch.nn.Module) else getattr(getattr(source, "plan", None), "frame_module", None)
    if module is None:
        return []
    notes = []
    if module.training:
        notes.append("the model is in training mode: dropout and batch statistics make the numeric checks fail; "
                     "call model.eval() first")
    x = ctx.example_inputs[0]
    if x.is_floating_point() and any(isinstance(m, torch.nn.Embedding) for m in module.modules()):
        notes.append(f"the example input is {x.dtype} and the model has an nn.Embedding: token ids must be integers")
    return notes


def _run_pass(p, ctx):
    """Run one pass; a failure becomes a CAPTURE_FAILED candidate (False: stop here)."""
    log = get_logger("detect" if p.name in ("detect", "properties") else "passes")
    start = time.perf_counter()
    try:
        artifact = p.run(ctx)
    except capture.CaptureError as exc:
        ctx.passes.append((p.name, f"FAILED: {exc}", time.perf_counter() - start))
        _refuse(ctx, _failure(p.name, str(exc), ctx))
        return False
    except Exception as exc:  # noqa: BLE001 - nothing but typed verdicts leaves the pipeline
        seconds = time.perf_counter() - start
        text = f"{p.name} failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
        where = _failing_node(exc)
        if where:
            text += f" (at {where})"
        ctx.passes.append((p.name, f"FAILED: {text}", seconds))
        log.debug("%s", "".join(traceback.format_exception(exc)))
        _refuse(ctx, _failure(p.name, text, ctx, getattr(exc, "reason", Reason.CAPTURE_FAILED)))
        return False
    seconds = time.perf_counter() - start
    setattr(ctx, p.artifact, artifact)
    try:
        text = p.dump(artifact, ctx) or ""
    except Exception as exc:  # noqa: BLE001 - a dump is for people; it never stops the pipeline
        text = f"(dump failed: {type(exc).__name__}: {exc})"
    ctx.passes.append((p.name, text, seconds))
    log.info("pass %d/%d %s: %.3f s", PASS_NAMES.index(p.name) + 1, len(PASSES), p.name, seconds)  # progress
    if text and log.isEnabledFor(logging.DEBUG):
        log.debug("after %s:\n%s", p.name, text)
    return True


def _failing_node(exc):
    """The source line of the innermost graph node a failing pass was handling (a local `node`,
    `n` or `y` in its frames), if any."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        for name in ("node", "n", "y", "end"):
            v = tb.tb_frame.f_locals.get(name)
            if isinstance(v, torch.fx.Node):
                found = v
                break
        tb = tb.tb_next
    if found is None:
        return ""
    path, src = properties._describe(found)
    return f"node {found.name}" + (f", {src}" if src else "") + (f", in {path}" if path else "")


def _failure(pass_name, text, ctx, reason=Reason.CAPTURE_FAILED):
    """A pass that failed (its exception may carry the Reason it refuses with)."""
    return Candidate(name="model" if pass_name == "capture" else pass_name, spelling=pass_name, kind="capture",
                     verdict=Verdict.REJECTED, reason=reason, explanation=text, max_len=ctx.max_len)


def _refuse(ctx, cand):
    """Record a refusal: on the Report when there is one, else it joins the candidates."""
    if ctx.report is not None:
        ctx.report.candidates.append(cand)
        ctx.report.decodable = False
        ctx.decoder = None
    else:
        ctx.candidates = (ctx.candidates or []) + [cand]
        ctx.failed = True


def _report(ctx):
    cap = ctx.cap
    cands = list(ctx.candidates or [])
    consts, const_rejects = ctx.position_constants or ([], [])
    cands += const_rejects
    notes = list(ctx.notes) + ([cap.note] if cap is not None and cap.note else [])
    safety = ctx.safety or {}
    failed = ctx.failed or ctx.safety is None
    if cap is None:
        why = cands[-1].explanation if cands else "no capture"
        info = CaptureInfo(ctx.capture, False, "", int(ctx.example_inputs[0].shape[1]), ctx.max_len, why)
        return Report(False, cands, info, ctx.passes, {}, notes + [f"capture failed: {why}"])
    if cap is not None and cap.alt is not None and ctx.alt is None and ctx.candidates is not None:
        notes.append("the concrete captures at two lengths differ in structure: filter prefix-stability "
                     "was checked only through the whole-model safety net")
    if safety and not all(r["passed"] for r in safety.values()):
        worst = max(safety, key=lambda k: 0 if safety[k]["passed"] else 1)
        cands.append(Candidate(name="model", spelling="safety_net", kind="time_mixing", verdict=Verdict.REJECTED,
                               reason=Reason.CAUSALITY_CHECK_FAILED,
                               explanation=f"{worst}: outputs before t change with inputs at or after t "
                                           f"(rel err {safety[worst]['rel_err']:.1e})", max_len=cap.max_len))
    accepted = [c for c in cands if c.verdict is Verdict.ACCEPTED]
    rejected = [c for c in cands if c.verdict is Verdict.REJECTED]
    if not accepted and not rejected and not failed:
        notes.append("NO_CONVOLUTION: nothing to decode (the model mixes no positions)")
    if cap is not None and not cap.symbolic and cap.alt is None and not rejected and not failed:
        cands.append(Candidate(name="model", spelling="capture", kind="capture", verdict=Verdict.REJECTED,
                               reason=Reason.CAPTURE_FAILED, max_len=cap.max_len,
                               explanation="the model was captured only at one concrete length "
                                           f"({cap.note or 'the length was specialised'}); decoding needs a graph "
                                           "with a symbolic length, or captures at two lengths"))
        rejected = cands[-1:]
    # serve what was asked, or say at once why not. A symbolic export bounded below max_len was
    # replaced by concrete captures (passes/capture.py); when those fail too, the bound is the news.
    served = cap.symbolic_range
    if served and served[1] < ctx.max_len and (rejected or failed or not all(r["passed"] for r in safety.values())):
        cands.append(Candidate(name="model", spelling="capture", kind="capture", verdict=Verdict.REJECTED,
                               reason=Reason.CAPTURE_FAILED, max_len=served[1],
                               explanation=f"max_len={ctx.max_len} cannot be served: the symbolic graph is valid for "
                                           f"lengths [{served[0]}, {served[1]}] only (torch.export bounded the "
                                           f"length where the model's Python code branches on it: a table or cache "
                                           f"of {served[1]} positions, an FFT size planned from L), and the model "
                                           f"captured at concrete lengths did not decode either; pass max_len <= "
                                           f"{served[1]}, or clear the model's cached state"))
        rejected = rejected + cands[-1:]
    decodable = bool(accepted) and not rejected and not failed and all(r["passed"] for r in safety.values())
    info = CaptureInfo(cap.level, cap.symbolic, str(cap.length_symbol if cap.symbolic else cap.example_length),
                       cap.example_length, cap.max_len, cap.note)
    return Report(decodable, cands, info, ctx.passes, safety, notes, captured=cap, position_constants=consts,
                  time_info=ctx.time_info, site_pairs=[(m, a[0]) for m, a in zip(ctx.matches or (), ctx.alt or ())])


def _build_decoder(ctx):
    try:
        return Decoder(ctx.plan, ctx.report, example_inputs=ctx.example_inputs, source=ctx.reference,
                       compile=ctx.options.get("compile", "auto"), cuda_graph=ctx.options.get("cuda_graph", False))
    except Exception as exc:  # noqa: BLE001 - a decoder that cannot be built is a refusal, not a crash
        text = f"building the decoder failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
        _refuse(ctx, _failure("decoder", text, ctx))
        return None


def lower(report, options, example_inputs):
    """The rewrite passes on an analysed Report: their Context (programs, shard_plan, schedule, plan,
    and passes: [(name, dump, seconds)]). options["max_len"]: serve fewer positions than analysed."""
    ctx = Context(None, tuple(example_inputs), report.capture.max_len, options=dict(options), cap=report.captured,
                  report=report, time_info=report.time_info)
    ctx.max_len = _served(ctx)
    if ctx.max_len > report.capture.max_len:
        raise ValueError(f"max_len={ctx.max_len}: the report was analysed for max_len={report.capture.max_len}; "
                         "analyze the model at the longer max_len")
    for p in PASSES:
        if p.stage == "rewrite":
            start = time.perf_counter()
            setattr(ctx, p.artifact, p.run(ctx))
            ctx.passes.append((p.name, p.dump(getattr(ctx, p.artifact), ctx), time.perf_counter() - start))
    return ctx



def _alt_matches(ctx):
    """Detect on the second concrete capture; pair its matches with ours by order and spelling."""
    alt = Context(ctx.source, ctx.example_inputs, ctx.cap.alt.max_len, ctx.capture, cap=ctx.cap.alt)
    alt.canon = canonicalize.run(alt.cap, alt)
    alt.time_info = time_axis.run(alt.canon, alt)
    theirs = detect.run(alt.canon, alt)
    if [m.spelling for m in theirs] != [m.spelling for m in ctx.matches]:
        return None
    runner = capture.Runner(alt.cap)
    return [(m, runner, alt.cap) for m in theirs]
