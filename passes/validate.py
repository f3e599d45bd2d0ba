"""Translation validation: a compiler that cannot prove everything checks what it built.

Before a Decoder is handed out, its programs run teacher-forced on fresh random inputs (a fixed
seed, so a refusal reproduces) at two prompt lengths: prefill(x[:, :P]) and one step per position
up to `POSITIONS`, against the original model on the whole sequence: in its own dtype, or for a
bfloat16 / float16 model a float32 copy on the same weights (the decoder's filters are extracted
exactly, so it is closer to that than the half-precision model itself is). The error at each
position is relative to the root-mean-square norm of a reference position, so a wrong rewrite
(O(1) errors) stands out from rounding; the bound follows the lowest precision the model computes
in anywhere. A mismatch, or a program that raises, is a DECODE_MISMATCH refusal naming the first
bad position: a wrong Decoder is never returned. The check runs the eager programs (the compiled
step is inductor's faithful copy). Rows at their own positions and extends (Session.extend: the
extend program, a one-position prefill continued by two extends, then steps) are checked the same
way; a decoder that gets one of them wrong keeps the rest, and that operation raises with the
finding (`decoder.rows_why`, `decoder.extend_why`).
"""

import copy
import time

import torch
import torch.utils._pytree as pytree

from lcsm_compile import verify
from lcsm_compile.errors import LcsmError
from lcsm_compile.logs import get_logger
from lcsm_compile.passes.capture import preserved_state, random_inputs
from lcsm_compile.report import Candidate, Reason, Verdict

POSITIONS = 72  # at least 64 positions decoded per check (fewer only when max_len is shorter)
# Per-position error bound, by the dtype of the model's outputs: far above rounding, far below the
# O(1) error of a wrong program (measured errors are in the README).
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def run(decoder, model, ctx, *, seed=0):
    """-> {"passed", "tol", "length", "max_err", "first_bad", "error", "seconds"}."""
    start = time.perf_counter()
    cap = ctx.cap
    length = min(decoder.max_len, POSITIONS)
    prompts = sorted({1, max(1, length // 2)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inputs = random_inputs(cap, length)
    out_node = next(n for n in reversed(cap.gm.graph.nodes) if n.op == "output")
    leaves = [a for a in pytree.tree_leaves(out_node.args[0])]
    info = ctx.time_info or {}
    dims = [info[a].axis.dim if isinstance(a, torch.fx.Node) and a in info and info[a].dep == "activation"
            and info[a].axis is not None else None for a in leaves]
    with torch.no_grad(), preserved_state(model):
        reference = _reference(model, inputs)
    tol = TOL[lowest_precision(cap.gm)]
    with _eager(decoder):
        check = verify.teacher_forced(model, decoder, inputs[:1], prompts, tol=tol, reference=reference, out_dims=dims,
                                      scale="rms")
        rows = _rows_check(decoder, inputs[0], reference, tol, dims)
        extend = _extend_check(model, decoder, inputs, reference, tol, dims)
        if not cap.symbolic and cap.batch_dynamic:  # generalized over the batch: check another one
            other = _one_row(inputs)
            with torch.no_grad(), preserved_state(model):
                again = verify.teacher_forced(model, decoder, other[:1], prompts[-1:], tol=tol,
                                              reference=_reference(model, other), out_dims=dims, scale="rms")
            check["runs"] += again["runs"]
            check["passed"] = check["passed"] and again["passed"]
            check["max_rel_err"] = max(check["max_rel_err"], again["max_rel_err"])
    first_bad, error = None, None
    for r in check["runs"]:
        if r.get("error"):
            error = error or {"prompt_len": r["prompt_len"], "position": r["first_bad_position"], "error": r["error"]}
        elif r["first_bad_position"] is not None and first_bad is None:
            first_bad = {"prompt_len": r["prompt_len"], "position": r["first_bad_position"], "err": r["max_rel_err"]}
    return {"passed": check["passed"], "tol": tol, "length": length, "prompts": prompts, "max_err": check["max_rel_err"],
            "first_bad": first_bad, "error": error, "rows": rows, "extend": extend,
            "seconds": round(time.perf_counter() - start, 4)}


def _one_row(inputs):
    """The inputs with the first input's batch cut to its first row (or, for one row, doubled)."""
    B = inputs[0].shape[0]
    take = (lambda t: t[:1]) if B > 1 else (lambda t: torch.cat([t, t.flip(1)]))
    return tuple(take(t) if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[0] == B else t for t in inputs)


def _rows_check(decoder, x, reference, tol, dims):
    """Rows at their own positions (ragged prompts, rows joining and leaving), checked the same way
    (verify.rows_teacher_forced). A decoder that cannot or does not get them right keeps its
    one-position decoding: `decoder.rows_why` says why, and row operations raise with it."""
    try:
        decoder.session()._rows_supported("rows")
    except LcsmError as exc:
        return {"passed": None, "why": str(exc)}
    result = verify.rows_teacher_forced(decoder, x, reference, tol=tol, out_dims=dims, scale="rms")
    if not result["passed"]:
        what = result["error"] or f"error {result['max_rel_err']:.2e} > {tol:.0e} at {result['worst']}"
        decoder.rows_why = f"the translation validation of rows at their own positions failed: {what}"
        get_logger("passes").warning("validate: %s; sessions keep one shared position", decoder.rows_why)
    return result


EXTEND_STEPS = 8  # steps after the extends: a step must go on from the state an extend leaves


def _extend_check(model, decoder, inputs, reference, tol, dims):
    """A one-position prefill, extends of 6 and of most of the rest, then EXTEND_STEPS steps
    (verify.teacher_forced). A decoder that fails it keeps prefill and step: `decoder.extend_why`
    says why, and Session.extend / prefill(chunk=) raise with it."""
    if not decoder.can("extend"):
        return {"passed": None, "why": "the bank only steps"}
    length = int(inputs[0].shape[1])
    rest = length - 1 - 6 - EXTEND_STEPS
    if rest < 1:
        return {"passed": None, "why": f"{length} positions are too few to check extends"}
    result = verify.teacher_forced(model, decoder, inputs[:1], [(1, 6, rest)], tol=tol, reference=reference,
                                   out_dims=dims, scale="rms")
    (run,) = result["runs"]
    out = {"passed": result["passed"], "max_rel_err": result["max_rel_err"], "error": run.get("error")}
    if not result["passed"]:
        what = run.get("error") or (f"error {run['max_rel_err']:.2e} > {tol:.0e} from position "
                                    f"{run['first_bad_position']} (prefill 1, extends 6 and {rest})")
        decoder.extend_why = f"the translation validation of extends failed: {what}"
        get_logger("passes").warning("validate: %s; sessions keep prefill and step", decoder.extend_why)
    return out


_HALF = (torch.bfloat16, torch.float16)


def _reference(model, inputs):
    """The model's outputs; a half-precision model runs as a float32 copy on the same weights."""
    params = [p for p in model.parameters()] + [b for b in model.buffers()]
    if not any(t.dtype in _HALF for t in params):
        return model(*inputs)
    try:
        wide = copy.deepcopy(model).float()
    except Exception:  # noqa: BLE001 - a model that cannot be copied is compared in its own dtype
        return model(*inputs)
    return wide(*[x.float() if x.dtype in _HALF else x for x in inputs])


def lowest_precision(gm):
    """The floating dtype with the largest rounding error among the graph's values."""
    dtypes = {v.dtype for n in gm.graph.nodes for v in torch.utils._pytree.tree_leaves(n.meta.get("val"))
              if isinstance(v, torch.Tensor) and v.dtype in TOL}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)


class _eager:
    """Run the decoder's step program uncompiled for the check."""

    def __init__(self, decoder):
        self.program = decoder.step_fn

    def __enter__(self):
        self.compile, self.program.compile = self.program.compile, False

    def __exit__(self, *exc):
        self.program.compile = self.compile


def candidate(result, cap):
    """The DECODE_MISMATCH refusal of a failed check."""
    if result["error"]:
        e = result["error"]
        why = f"the decoder failed at position {e['position']} (prompt {e['prompt_len']}): {e['error']}"
    else:
        b = result["first_bad"] or {"prompt_len": "?", "position": "?", "err": result["max_err"]}
        why = (f"teacher-forced decode differs from the model from position {b['position']} on (prompt {b['prompt_len']}): "
               f"error {result['max_err']:.2e} > {result['tol']:.0e}")
    return Candidate(name="model", spelling="validate", kind="decode", verdict=Verdict.REJECTED,
                     reason=Reason.DECODE_MISMATCH, explanation=why, max_len=cap.max_len)


def dump(result):
    state = "passed" if result["passed"] else "FAILED"
    rows, extend = _operation_text(result.get("rows"), "not supported"), _operation_text(result.get("extend"), "not checked")
    return (f"validate: {state}: {result['length']} positions, prompts {result['prompts']}, max error "
            f"{result['max_err']:.2e} (tol {result['tol']:.0e}), {result['seconds']:.2f} s; rows at own positions: "
            f"{rows}; extend: {extend}")


def _operation_text(check, skipped):
    """One withholdable operation's check (rows, extend): why it was skipped, or its verdict and error."""
    check = check or {}
    if check.get("passed") is None and "why" in check:
        return f"{skipped}: {check['why']}"
    return f"{'passed' if check.get('passed') else 'FAILED'}, max error {check.get('max_rel_err', float('nan')):.2e}"
