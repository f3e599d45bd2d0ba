"""Exactness checks the command line runs: teacher-forced decoding against the model, and each
Triton kernel specialisation against its torch reference.

- teacher_forced(model, decoder, inputs, prompt_lens): prefill(P) + one step per remaining
  position must reproduce model(full) at every position; the reference is the model in float64.
- check_kernels(specs): run in a fresh process (`python -m lcsm_compile.verify kernels SPECS`) where
  TRITON_INTERPRET=1 is set before triton is first imported when there is no CUDA device.
"""

import copy
import json
import os
import subprocess
import sys
import time

import torch
import torch.utils._pytree as pytree

TOL = 1e-5
# teacher_forced's default tolerance: the decoder may be this much worse than the model itself is
# against float64 (a bfloat16 model is ~1e-2 off on its own; tests/test_dtypes.py measures at most 1.06)
NO_WORSE = 1.5
KERNEL_TOL = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def position_errors(out, ref, dims=None, scale="position"):
    """Per position t: the error of `out` against `ref` at t, the worst over output leaves, in
    float64. dims: each leaf's positions dim (default 1). scale "position": relative to ||ref[t]||
    (absolute where that is zero); "rms": relative to the root-mean-square norm of a position of
    ref, so that a position whose reference is tiny is not blown up. Positions where both are
    equally non-finite match; other non-finite errors are inf."""
    worst = None
    for i, (o, r) in enumerate(zip(_leaves(out), _leaves(ref))):
        d = 1 if dims is None else dims[i]
        if d is None:
            continue
        o, r = o.double().movedim(d, 0), r.double().movedim(d, 0)
        T = r.shape[0]
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
        diff = torch.where(same, torch.zeros_like(o), o - r)
        dn = diff.reshape(T, -1).norm(dim=1)
        rn = torch.where(torch.isfinite(r), r, torch.zeros_like(r)).reshape(T, -1).norm(dim=1)
        if scale == "rms":
            n = (rn.square().mean().sqrt()).expand_as(rn)
        else:
            n = rn
        e = torch.where(n > 0, dn / n.clamp_min(torch.finfo(torch.float64).tiny), dn)
        e = torch.where(torch.isfinite(e), e, torch.full_like(e, float("inf")))
        worst = e if worst is None else torch.maximum(worst, e)
    return worst


def reference_outputs(model, inputs):
    """model(*inputs) in float64 (a copy of the model; float inputs widened, ids unchanged)."""
    model64 = copy.deepcopy(model).double()
    xs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        return model64(*xs)


def default_prompt_lens(length: int) -> tuple:
    return tuple(sorted({1, max(1, length // 2), max(1, length - 1)}))


def teacher_forced(model, decoder, inputs, prompt_lens=(1,), *, tol=None, progress=None, reference=None,
                   out_dims=None, scale="position") -> dict:
    """Decode `inputs` (the sequence on dim 1 of the first) teacher-forced with `decoder`, once per
    prompt length P: prefill(inputs[:, :P]) then one step per position up to the end, and compare
    every position with the model on the whole sequence: `reference` (its outputs, when given),
    else the model in float64. An entry (P, k1, k2, ...) of prompt_lens extends the session by k1,
    k2, ... positions (Session.extend) after the prefill, then steps.

    tol: the largest error allowed; default: TOL, or NO_WORSE times the model's own error against the
    reference (in the model's dtype) when that is larger, so that a bfloat16 model is held to what
    bfloat16 can do ("model_rel_err" in the result, None when tol is given).

    Returns {"length", "tol", "model_rel_err", "passed", "max_rel_err", "runs": [{"prompt_len", "max_rel_err",
    "worst_position", "first_bad_position", "prefill_max_rel_err", "step_max_rel_err", "seconds"}]}.
    A run that raises records "error" and the position it reached, and fails.
    out_dims: each output leaf's positions dim (default 1); scale: see position_errors.
    progress: optional callable(iterable, desc) -> iterable (e.g. a tqdm factory).
    """
    if len(inputs) != 1:
        raise ValueError(f"teacher_forced: sessions take one input tensor, got {len(inputs)} inputs")
    x = inputs[0]
    L = int(x.shape[1])
    ref = reference_outputs(model, inputs) if reference is None else reference
    dims = out_dims or [1] * len(_leaves(ref))
    own = None
    if tol is None:
        with torch.no_grad():
            own = float(position_errors(model(*inputs), ref, dims, scale).max())
        tol = max(TOL, NO_WORSE * own)
    runs = []
    for spec in prompt_lens:
        P, extends = (int(spec[0]), [int(k) for k in spec[1:]]) if isinstance(spec, (tuple, list)) else (int(spec), [])
        if not 1 <= P <= L or P + sum(extends) > L:
            raise ValueError(f"prompt length {P} and extends {extends}: expected P in [1, {L}] (the input length), "
                             f"the extends within it")
        start = time.perf_counter()
        session = decoder.session()
        first_step = P + sum(extends)
        steps = range(first_step, L)
        if progress is not None:
            steps = progress(steps, f"verify P={P}")
        outs, t = [], P
        try:
            with torch.no_grad():
                outs.append(session.prefill(x[:, :P]))
                for k in extends:
                    outs.append(session.extend(x[:, t : t + k]))
                    t += k
                for t in steps:
                    outs.append(session.step(x[:, t : t + 1]))
        except Exception as exc:  # noqa: BLE001 - a decoder that fails is a failed check, with its error
            runs.append({"prompt_len": P, "extends": extends, "max_rel_err": float("inf"), "first_bad_position": t if outs else 0,
                         "error": f"{type(exc).__name__}: {exc}"[:300], "seconds": round(time.perf_counter() - start, 4)})
            continue
        seconds = time.perf_counter() - start
        leaves = [None if d is None else torch.cat(parts, dim=d) for parts, d in zip(zip(*(_leaves(o) for o in outs)), dims)]
        err = position_errors([v if v is not None else r for v, r in zip(leaves, _leaves(ref))], ref, dims, scale)
        bad = (err > tol).nonzero().flatten()
        runs.append({
            "prompt_len": P,
            "extends": extends,
            "max_rel_err": float(err.max()),
            "worst_position": int(err.argmax()),
            "first_bad_position": int(bad[0]) if len(bad) else None,
            "prefill_max_rel_err": float(err[:P].max()),
            "step_max_rel_err": float(err[first_step:].max()) if first_step < L else None,
            "steps": L - first_step,
            "seconds": round(seconds, 4),
        })
    worst = max(r["max_rel_err"] for r in runs)
    return {"length": L, "tol": tol, "model_rel_err": own, "passed": bool(worst <= tol), "max_rel_err": worst, "runs": runs}


def serve(session, seqs, plan, steps, after_step=None):
    """Sequences through one session whose rows join and leave between steps, teacher-forced.

    seqs[name]: the sequence's inputs [1, T, ...]; plan[name] = (prompt length, the step it joins
    before, the step it leaves before, or None). `steps` steps in all; after_step(positions, rows)
    (each live name's next position and row) after each. Returns ({name: [the output leaves of its
    prefill, then of each of its steps, each [1, positions, ...]]}, {name: positions decoded})."""
    outs, pos, row_of = {}, {}, {}
    first = next(iter(seqs.values()))[:, :1]  # free rows' input: any valid one
    for step in range(steps):
        for name, (P, join, leave) in plan.items():
            if step == leave:
                session.remove(row_of.pop(name))
            if step == join:
                row, out = session.add(seqs[name][:, :P])
                outs[name], pos[name], row_of[name] = [_leaves(out)], P, row
        ids = first.expand(session.state.capacity, *first.shape[1:]).clone()
        for name, r in row_of.items():
            ids[r] = seqs[name][0, pos[name]]
        out = _leaves(session.step(ids))
        for name, r in row_of.items():
            outs[name].append([leaf.narrow(0, r, 1) for leaf in out])
            pos[name] += 1
        if after_step is not None:
            after_step(dict(pos), dict(row_of))
    return outs, pos


def rows_teacher_forced(decoder, x, reference, *, tol=TOL, out_dims=None, scale="position") -> dict:
    """Rows at their own positions, teacher-forced: a session of 2 rows where sequence A starts
    from a 1-position prompt, B joins after L/4 steps with an L/2 prompt (so the rows run different
    tile sizes in one step), B leaves at the end of its input and C (B's input again, a 3-position
    prompt) joins the freed row (verify.serve). Each row's outputs are compared with `reference`
    (the model's outputs on x [b, L], b >= 1; row 1 of it for B and C when b >= 2) over the
    positions it decoded. Returns {"passed", "max_rel_err", "worst": (sequence, position) or None, "error"}."""
    L = int(x.shape[1])
    two = 1 if x.shape[0] > 1 else 0
    ref = {"A": [leaf.narrow(0, 0, 1) for leaf in _leaves(reference)]}
    ref["B"] = ref["C"] = [leaf.narrow(0, two, 1) for leaf in _leaves(reference)]
    dims = out_dims or [1] * len(ref["A"])
    seqs = {"A": x[0:1], "B": x[two : two + 1], "C": x[two : two + 1]}
    PB, PC = max(1, L // 2), min(3, L)
    b_leaves = L // 4 + L - PB  # B's last input decoded: C takes its row
    plan = {"A": (1, 0, None), "B": (PB, L // 4, b_leaves), "C": (PC, b_leaves, b_leaves + L - PC)}
    try:
        with torch.no_grad():
            outs, pos = serve(decoder.session(rows=2), seqs, plan, L - 1)
    except Exception as exc:  # noqa: BLE001 - a failing decoder fails the check, with its error
        return {"passed": False, "max_rel_err": float("inf"), "worst": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
    worst, where = 0.0, None
    for name, parts in outs.items():
        n = pos[name]
        got = [None if d is None else torch.cat(p, dim=d) for p, d in zip(zip(*parts), dims)]
        want = [r if d is None else r.narrow(d, 0, n) for r, d in zip(ref[name], dims)]
        err = position_errors([g if g is not None else w for g, w in zip(got, want)], want, dims, scale)
        if err is not None and float(err.max()) > worst:
            worst, where = float(err.max()), (name, int(err.argmax()))
    return {"passed": worst <= tol, "max_rel_err": worst, "worst": where, "error": None}


# -- Triton kernels -----------------------------------------------------------------------------

def _dtype(name):
    return getattr(torch, name)


def _check_one(spec, rows, device):
    """One call of the specialisation's Triton launcher against its torch reference on the same
    inputs (kernels.registry) on `device`: relative error of what each wrote, and the tolerance of
    its dtype."""
    from lcsm_compile.kernels.registry import KERNELS
    from lcsm_compile.kernels.triton_common import rel_err

    kernel = KERNELS[spec["kernel"]]
    if kernel.triton is None:
        raise ValueError(f"kernel {spec['kernel']!r} has no Triton implementation to check")
    sd = _dtype(spec["state_dtype"])
    io = _dtype(spec.get("io_dtype") or spec["state_dtype"])
    args, written = kernel.check_inputs(spec["constexprs"], int(spec["channels"]), rows, sd, io)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]  # check_inputs builds them on the CPU
    ref_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    before = [a.clone() for a in (args[i] for i in written)]
    kernel.reference(*ref_args)
    kernel.launcher()(*args, block_c=spec["constexprs"]["BLOCK_C"])
    err = max(rel_err(args[i] - b, ref_args[i] - b) for i, b in zip(written, before))
    tol = max(KERNEL_TOL[str(args[i].dtype).replace("torch.", "")] for i in written)  # the least precise output
    return err, tol


def check_kernels_here(specs, rows=2, seed=0, device=None) -> dict:
    """Run each Triton specialisation once against its torch reference, in this process (triton
    must not have been imported before TRITON_INTERPRET was set on a machine without CUDA).
    device: where the inputs live (default: cuda when there is one, else the CPU interpreter)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from lcsm_compile.kernels import triton_common as common

    torch.manual_seed(seed)
    device_note = str(device) if device.type != "cpu" else "cpu (TRITON_INTERPRET=1)"
    common.clear_registry()
    results = []
    for spec in specs:
        start = time.perf_counter()
        try:
            err, tol = _check_one(spec, rows, device)
            results.append({**spec, "rel_err": err, "tol": tol, "passed": bool(err <= tol),
                             "seconds": round(time.perf_counter() - start, 3)})
        except Exception as exc:  # noqa: BLE001 - reported per kernel, the others still run
            results.append({**spec, "rel_err": None, "tol": None, "passed": False,
                            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
    return {"device": device_note, "results": results, "launched": common.kernels_chosen()}


def check_kernels(specs, rows=2, seed=0, timeout=600) -> dict:
    """check_kernels_here in a fresh interpreter, so TRITON_INTERPRET=1 precedes `import triton`."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    payload = json.dumps({"specs": specs, "rows": rows, "seed": seed})
    proc = subprocess.run([sys.executable, "-m", "lcsm_compile.verify", "kernels"], input=payload, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"kernel check process failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv):
    if argv[:1] != ["kernels"]:
        print("usage: python -m lcsm_compile.verify kernels < {\"specs\": [...]}", file=sys.stderr)
        return 2
    req = json.loads(sys.stdin.read())
    print(json.dumps(check_kernels_here(req["specs"], rows=req.get("rows", 2), seed=req.get("seed", 0))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
