"""analyze(): the legality analysis, the analysis stage of lcsm_compile.pipeline.

    capture -> canonicalize -> time_axis -> detect -> properties -> position_constants -> safety_net

Each pass is a function in its own file under passes/; the pipeline keeps every pass's text dump
and time, which the Report carries for the CLI.
"""

import itertools
import logging
import warnings

import torch

from lcsm_compile import pipeline
from lcsm_compile.checks import check_choice, check_options
from lcsm_compile.errors import DeviceError, ShapeError
from lcsm_compile.passes import capture as capture_pass
from lcsm_compile.passes.detect import register_mixer
from lcsm_compile.report import Report

__all__ = ["analyze", "analyze_graph", "register_mixer", "CAPTURE_LEVELS", "check_args"]

CAPTURE_LEVELS = ("export", "dynamo")


def check_args(model, example_inputs, max_len, capture_level):
    """(example_inputs as a tuple, max_len): a single tensor is taken as the only input; max_len
    defaults to the model's int `max_len` attribute, else the example length. The caller's mistakes
    (options, an example the capture cannot use, weights not loaded) raise here, before any work."""
    check_choice("capture", capture_level, CAPTURE_LEVELS)
    check_options(max_len=max_len)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs or not isinstance(example_inputs[0], torch.Tensor):
        raise TypeError("example_inputs: expected a tensor or a non-empty tuple of tensors (the sequence on dim 1 "
                        f"of the first), got {type(example_inputs).__name__}")
    x = example_inputs[0]
    if x.dim() < 2:
        raise ShapeError(f"example_inputs[0]: expected the sequence on dim 1 (e.g. token ids [B, L]), got shape "
                         f"{tuple(x.shape)}")
    L = int(x.shape[1])
    if L < 2:
        raise ShapeError(f"example_inputs[0]: expected at least 2 positions on dim 1, got {tuple(x.shape)}: the capture "
                         "keeps the length symbolic, and torch.export fixes a dim of size 0 or 1")
    if isinstance(model, torch.nn.Module):
        _check_model(model, x)
    if max_len is None and isinstance(getattr(model, "max_len", None), int):
        max_len = model.max_len
    max_len = L if max_len is None else int(max_len)
    if max_len < L:
        raise ValueError(f"max_len={max_len} is shorter than the example length {L}")
    return tuple(example_inputs), max_len


def _check_model(model, x):
    """The model can run on the example: real weights, on the example's device. (Float ids for an embedding
    are found only when the capture fails: pipeline._caller_notes.)"""
    state = next(itertools.chain(model.parameters(), model.buffers()), None)
    if state is not None and state.is_meta:
        raise DeviceError("model parameters are on the meta device; load real weights first "
                          "(e.g. model.to_empty(device=...) then load_state_dict)")
    if state is not None and state.device != x.device:
        raise DeviceError(f"example_inputs[0]: expected the model's device {state.device}, got {x.device}")


def analyze(model, example_inputs, *, max_len=None, capture="export") -> Report:
    """Capture `model` and report which of its time-mixing ops are decodable causal convolutions.

    example_inputs: a tensor or a tuple of tensors, the sequence on dim 1 of the first.
    capture: "export" (torch.export, sequence dim dynamic in [2, max_len]) or "dynamo" (the graph
    torch.compile hands a backend). max_len defaults to the model's `max_len` attribute, else the
    example length. Never raises for a model it cannot handle: the Report says why
    (CAPTURE_FAILED names the pass, the exception and the source line).
    """
    example_inputs, max_len = check_args(model, example_inputs, max_len, capture)
    with quiet():
        return pipeline.run(pipeline.Context(model, example_inputs, max_len, capture), stages=("analysis",)).report


def analyze_graph(gm, example_inputs, *, max_len=None, source="dynamo", user_inputs=None) -> Report:
    """Analyze a graph already captured by dynamo (what a torch.compile backend receives).

    example_inputs: the backend's example inputs (user inputs, lifted parameters, SymInts).
    user_inputs: the model's own inputs, when known (else dynamo's record of where each graph
    input came from, or the names of lifted state, tell them apart).
    """
    if source != "dynamo":
        raise ValueError(f"source: expected 'dynamo', got {source!r}")
    try:
        plan = capture_pass.plan_inputs(gm, example_inputs, user_inputs)
    except capture_pass.CaptureError as exc:
        tensors = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() >= 2] or [torch.zeros(1, 1)]
        ctx = pipeline.Context(gm, tuple(tensors[:1]), max_len or 0, "dynamo")
        pipeline._refuse(ctx, pipeline._failure("capture", str(exc), ctx))
        return pipeline._report(ctx)
    x = example_inputs[plan.input_index]
    (x,), max_len = check_args(None, (x,), max_len, "dynamo")
    src = capture_pass.DynamoSource(gm, list(example_inputs), user_inputs, plan)
    with quiet():
        return pipeline.run(pipeline.Context(src, (x,), max_len, "dynamo"), stages=("analysis",)).report


class quiet(warnings.catch_warnings):
    """torch's deprecation notes while exporting and copying graphs, and the tracebacks its fake-tensor
    dispatcher logs for an op a capture attempt cannot trace (the Report carries that failure), are
    not the user's business."""

    LOGGERS = ("torch._subclasses.fake_tensor",)

    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
        self._levels = [(log, log.level) for log in map(logging.getLogger, self.LOGGERS)]
        for log, _ in self._levels:
            log.setLevel(logging.CRITICAL)
        return out

    def __exit__(self, *exc):
        for log, level in self._levels:
            log.setLevel(level)
        return super().__exit__(*exc)
