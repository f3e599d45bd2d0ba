"""analyze(): the legality analysis, run as named passes in one direction.

    capture -> canonicalize -> time_axis -> detect -> properties -> report

Each pass is `run(graph, ctx) -> result` in its own file under passes/; the Context keeps every
pass's text dump and time, which the Report carries for the CLI.
"""

import logging
import time
from dataclasses import dataclass, field

import torch

from lcsm_compile.logs import get_logger
from lcsm_compile.passes import canonicalize, detect, properties, time_axis
from lcsm_compile.passes import capture as capture_pass  # `capture` is analyze()'s argument
from lcsm_compile.passes.capture import CaptureError, Runner
from lcsm_compile.passes.detect import register_mixer

__all__ = ["analyze", "analyze_graph", "register_mixer", "CAPTURE_LEVELS"]
from lcsm_compile.report import Candidate, CaptureInfo, Reason, Report, Verdict

CAPTURE_LEVELS = ("export", "dynamo")


@dataclass
class Context:
    example_inputs: tuple
    max_len: int
    capture: str
    cap: object = None
    canon: dict = None
    time_info: dict = None
    runner: object = None
    alt_cap: object = None  # a second concrete capture, when the symbolic one was not faithful
    alt: list = None  # (match, runner, cap) of alt_cap, paired with the main matches by order
    passes: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def timed(self, name, fn, *args, dump=None):
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        text = dump(out) if dump else ""
        self.passes.append((name, text, dt))
        area = "detect" if name in ("detect", "properties") else "passes"
        get_logger(area).info("%s: %.3f s", name, dt)
        if text and get_logger(area).isEnabledFor(logging.DEBUG):
            get_logger(area).debug("after %s:\n%s", name, text)
        return out


def _check_args(example_inputs, max_len, capture_level):
    if capture_level not in CAPTURE_LEVELS:
        raise ValueError(f"capture: expected one of {CAPTURE_LEVELS}, got {capture_level!r}")
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs or not isinstance(example_inputs[0], torch.Tensor):
        raise TypeError("example_inputs: expected a non-empty tuple of tensors (sequence on dim 1 of the first)")
    x = example_inputs[0]
    if x.dim() < 2:
        raise ValueError(f"example_inputs[0]: expected the sequence on dim 1, got shape {tuple(x.shape)}")
    L = int(x.shape[1])
    max_len = L if max_len is None else int(max_len)
    if max_len < L:
        raise ValueError(f"max_len={max_len} is shorter than the example length {L}")
    return tuple(example_inputs), max_len


def analyze(model, example_inputs, *, max_len=None, capture="export") -> Report:
    """Capture `model` and report which of its time-mixing ops are decodable causal convolutions.

    capture: "export" (torch.export, sequence dim dynamic in [2, max_len]) or "dynamo" (the graph
    torch.compile hands a backend). max_len defaults to the model's `max_len` attribute, else the
    example length. Never raises for a model that fails to capture: the Report says CAPTURE_FAILED.
    """
    if max_len is None and isinstance(getattr(model, "max_len", None), int):
        max_len = model.max_len
    example_inputs, max_len = _check_args(example_inputs, max_len, capture)
    ctx = Context(example_inputs, max_len, capture)
    if getattr(model, "training", False):
        ctx.notes.append("the model is in training mode: dropout and batch statistics make the numeric "
                         "checks fail; call model.eval() first")
    try:
        cap = ctx.timed("capture", capture_pass.run, model, ctx, dump=lambda c: c.gm.graph.python_code("self").src)
    except CaptureError as exc:
        return _capture_failed(str(exc), capture, ctx)
    return _analyze(cap, ctx, _model_fn(model, cap))


def analyze_graph(gm, example_inputs, *, max_len=None, source="dynamo", user_inputs=None) -> Report:
    """Analyze a graph already captured by dynamo (what a torch.compile backend receives).

    example_inputs: the backend's example inputs (user inputs, lifted parameters, SymInts).
    user_inputs: the model's own inputs, when known (else lifted state is recognised by name).
    """
    if source != "dynamo":
        raise ValueError(f"source: expected 'dynamo', got {source!r}")
    users = user_inputs if user_inputs is not None else [
        t for t, n in zip(example_inputs, [n for n in gm.graph.nodes if n.op == "placeholder"])
        if isinstance(t, torch.Tensor) and not capture_pass._is_attribute(n, t)]
    users, max_len = _check_args(tuple(users), max_len, "dynamo")
    ctx = Context(users, max_len, "dynamo")
    try:
        cap = ctx.timed("capture", capture_pass.from_dynamo, gm, example_inputs, user_inputs, max_len,
                        dump=lambda c: c.gm.graph.python_code("self").src)
    except CaptureError as exc:
        return _capture_failed(str(exc), "dynamo", ctx)
    return _analyze(cap, ctx, None)


def _analyze(cap, ctx, model_fn):
    ctx.cap = cap
    ctx.runner = Runner(cap)
    ctx.canon = ctx.timed("canonicalize", canonicalize.run, cap, ctx, dump=canonicalize.dump)
    ctx.time_info = ctx.timed("time_axis", time_axis.run, ctx.canon, ctx,
                              dump=lambda info: time_axis.dump(ctx.canon, info))
    matches = ctx.timed("detect", detect.run, ctx.canon, ctx, dump=detect.dump)
    if ctx.alt_cap is not None:
        ctx.alt = _alt_matches(ctx, matches)
    cands = ctx.timed("properties", properties.run, matches, ctx,
                      dump=lambda cs: "\n".join(f"{c.name}: {c.verdict.value} {c.reason.value if c.reason else ''} {c.explanation}" for c in cs))
    # a runner of its own: the candidates' runner keeps only filter parameters widened, this one
    # widens every parameter and is dropped with the safety net
    f, tol = model_fn or (Runner(cap).run_full, properties.TOL64 * 10)
    safety = ctx.timed("safety_net", properties.safety_net, f, cap, tol, dump=repr)
    notes = ctx.notes + ([cap.note] if cap.note else [])
    if ctx.alt_cap is not None and ctx.alt is None:
        notes.append("the concrete captures at two lengths differ in structure: filter prefix-stability "
                     "was checked only through the whole-model safety net")
    if not all(r["passed"] for r in safety.values()):
        worst = max(safety, key=lambda k: 0 if safety[k]["passed"] else 1)
        cands.append(Candidate(name="model", spelling="safety_net", kind="time_mixing", verdict=Verdict.REJECTED,
                               reason=Reason.CAUSALITY_CHECK_FAILED,
                               explanation=f"{worst}: outputs before t change with inputs at or after t "
                                           f"(rel err {safety[worst]['rel_err']:.1e})", max_len=cap.max_len))
    accepted = [c for c in cands if c.verdict is Verdict.ACCEPTED]
    rejected = [c for c in cands if c.verdict is Verdict.REJECTED]
    if not cands:
        notes.append("NO_CONVOLUTION: nothing to decode (the model mixes no positions)")
    decodable = bool(accepted) and not rejected and all(r["passed"] for r in safety.values())
    info = CaptureInfo(cap.level, cap.symbolic, str(cap.length_symbol if cap.symbolic else cap.example_length),
                       cap.example_length, cap.max_len, cap.note)
    return Report(decodable, cands, info, ctx.passes, safety, notes, captured=cap)


def _alt_matches(ctx, matches):
    """Detect on the second concrete capture; pair its matches with ours by order and spelling."""
    alt = Context(ctx.example_inputs, ctx.alt_cap.max_len, ctx.capture, cap=ctx.alt_cap)
    alt.canon = canonicalize.run(alt.cap, alt)
    alt.time_info = time_axis.run(alt.canon, alt)
    theirs = detect.run(alt.canon, alt)
    if [m.spelling for m in theirs] != [m.spelling for m in matches]:
        return None
    runner = Runner(alt.cap)
    return [(m, runner, alt.cap) for m in theirs]


def _model_fn(model, cap):
    """The whole model for the safety net: the float64 captured graph where it runs at any length,
    else (a concrete capture) the eager model in its own dtype."""
    if cap.symbolic:
        return None
    return lambda xs: model(*xs), 1e-4


def _capture_failed(message, level, ctx):
    cand = Candidate(name="model", spelling="capture", kind="capture", verdict=Verdict.REJECTED,
                     reason=Reason.CAPTURE_FAILED, explanation=message, max_len=ctx.max_len)
    info = CaptureInfo(level, False, "", int(ctx.example_inputs[0].shape[1]), ctx.max_len, message)
    return Report(False, [cand], info, ctx.passes, {}, [f"capture failed: {message}"])
