"""Property checks: turn each Match into an ACCEPTED / REJECTED Candidate with a typed reason.

Order: structural problems found by detect (filter from activations, channel mixing, non-causal
padding, a flipped or left-padded filter term; for an FFT convolution, a window on its output
that leaves the filter's lags reading ahead, `_fft_window`); then numbers, in float64 on
the captured graph at two short lengths: the map input -> output is affine with a time-constant
offset (linear up to a bias), its impulse response h (the causal filter) and skip D reproduce the
subgraph on random inputs, and h at the shorter length is a prefix of h at the longer one (else
FILTER_DEPENDS_ON_LENGTH); then the proof that the FFT size n >= L + Lh - 1 for every served
L <= max_len (sympy, then enumeration over the served range). Numbers come before the proof because
a symbolic shape can be stale (dynamo's fake linspace(0, 1, L) has a fixed size), the evaluated
graph cannot; a numeric misfit is named WRAP_AROUND when the proof fails too.
`safety_net` finally checks the whole model: perturbing positions >= t changes no output before t,
and model(x[:, :t]) == model(x)[:, :t].
"""

import os

import numpy as np
import sympy
import torch

from lcsm_compile.passes.capture import NeedsActivation, meta_value, random_inputs, values_over
from lcsm_compile.passes.time_axis import length_dims, value_live
from lcsm_compile.report import Candidate, ConvStructure, Reason, Verdict

TOL64 = 1e-7  # float64 evaluation (float32 casts in the graph are widened)


def rel_err(a, b):
    a, b = a.double() if not a.is_complex() else a, b.double() if not b.is_complex() else b
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def check_lengths(cap, reach=0):
    """Lengths the numeric checks run at: small (cheap) and distinct when the capture is symbolic; the
    longer one past `reach` (a short convolution's lags), so every tap is seen."""
    if not cap.symbolic:
        return (cap.example_length,)
    la = max(cap.min_len, min(max(min(cap.example_length, 48), reach + 1), cap.max_len))
    lb = max(cap.min_len, (2 * la) // 3)
    return (la, lb) if lb != la else (la,)


# ---- causality proof ----------------------------------------------------------------------------

def _for_all_lengths(expr, cap, pred):
    """(True, None) if pred(value of expr) for every served L, else (False, first failing L).
    pred is vectorized over a numpy array of values."""
    L = cap.length_symbol
    expr = sympy.sympify(expr)
    if L is None or L not in expr.free_symbols:
        v = float(expr.subs(L, cap.example_length)) if L is not None else float(expr)
        return (True, None) if pred(np.asarray(v)) else (False, cap.example_length)
    lengths = np.arange(cap.min_len, cap.max_len + 1)
    bad = np.flatnonzero(~np.asarray(pred(values_over(expr, L, lengths))))
    return (True, None) if len(bad) == 0 else (False, int(lengths[bad[0]]))


def prove_no_wrap(n, lh, cap):
    """(ok, text): FFT size n >= L + Lh - 1 for every served L (symbolic, then by enumeration)."""
    L = cap.length_symbol if cap.symbolic else cap.example_length
    slack = sympy.simplify(sympy.sympify(n) - (L + sympy.sympify(lh) - 1))
    ok, bad = _for_all_lengths(slack, cap, lambda v: v >= 0)
    if not ok:
        hint = ""
        if cap.symbolic and bad > cap.min_len:  # shorter lengths are fine: say how far the model reaches
            hint = f"; the model's filters cover {bad - 1} positions: use max_len <= {bad - 1}"
        return False, f"n={n} < L+Lh-1={L + lh - 1} at L={bad}{hint}"
    where = f"for L in [{cap.min_len}, {cap.max_len}]" if cap.symbolic else f"at L={L}"
    return True, f"n - (L+Lh-1) = {slack} >= 0 {where}"


def _fft_window(m, cap):
    """(ok, text) of the no-wrap proof for an FFT convolution read through its output window, or
    None when the window reads ahead of t.

    Output t reads the circular convolution at (start + t) mod n, whose filter occupies circular
    lags first .. last (width w). Relative to t, those lags sit at c = first - start (mod n): the
    output is causal when some representative c >= 0 (no lag reaches the future) and
    n >= c + w + L - 1 (no lag of a future input wraps around onto t). The plain case (start 0,
    lags 0 .. Lh-1) is c = 0, n >= L + Lh - 1; a conjugated spectrum (lags -(Lh-1) .. 0) read from
    start = n - L + 1 (a roll by -1, then the last L positions) is c = 0 too: a cross-correlation
    with a reversed kernel."""
    first, last = (sympy.sympify(v) for v in m.filter_support)
    start = sympy.sympify(m.out_slice[0] if m.out_slice is not None else 0)
    width = last - first + 1
    n = sympy.sympify(m.fft_size)
    c = sympy.simplify(first - start)
    if c == 0:
        return prove_no_wrap(m.fft_size, width, cap)
    if _for_all_lengths(c, cap, lambda v: v >= 0)[0]:  # a delayed window: it may still wrap
        ok, text = prove_no_wrap(n - c, width, cap)
        return ok, f"lags shifted by c = {c}; {text}"
    for k in (1, -1):  # the window reads ahead, unless the lags come round modulo n
        c = sympy.simplify(first - start + k * n)
        if _for_all_lengths(c, cap, lambda v: v >= 0)[0]:
            ok, text = prove_no_wrap(n - c, width, cap)
            if ok:
                return ok, f"lags shifted by c = {c} (mod n); {text}"
    return None


def _window(m):
    return f"[{m.out_slice[0]}, {m.out_slice[1]})" if m.out_slice is not None else "[0, n)"


def _is_length(expr, cap):
    if expr is None:
        return True
    L = cap.length_symbol if cap.symbolic else cap.example_length
    return _for_all_lengths(sympy.sympify(expr) - L, cap, lambda v: v == 0)[0]


# ---- numerics -----------------------------------------------------------------------------------

def _shape_at(node, cap, length):
    return [cap.size_at(s, length) for s in meta_value(node).shape]


def _time_last(t, axis):
    return t.movedim(axis, -1)


def _broadcast(x, input_map, y_shape_tl):
    """x (time last) in the output layout (time last), following the einsum-style input map."""
    src, dst = input_map.split("->")
    src, dst = src.replace("...", ""), dst.replace("...", "")
    if len(src) != x.dim():
        src = dst[len(dst) - x.dim():]
    order = [c for c in dst if c in src]
    xb = torch.einsum(f"{src}->{''.join(order)}", x)
    for i, c in enumerate(dst):
        if c not in src:
            xb = xb.unsqueeze(i)
    return xb.expand(*y_shape_tl)


def causal_conv(x, h):
    """y_t = sum_s h[..., t-s] x[..., s] along the last axis, by FFT in float64."""
    L = x.shape[-1]
    n = 2 * L
    h = h[..., :L]
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(h, n=n), n=n)[..., :L]
    return y


class _Probe:
    """Evaluates a match's region at a length with a substituted input."""

    def __init__(self, m, runner, cap, length):
        self.m, self.runner, self.cap, self.L = m, runner, cap, length
        self.x_shape = _shape_at(m.input, cap, length)
        self.x_axis = _time_axis(m.input, cap)
        self.y_axis = _time_axis(m.output, cap)
        self.dtype = torch.complex128 if meta_value(m.input).is_complex() else torch.float64

    def __call__(self, x, extra=()):
        outs = self.runner.evaluate([self.m.output, *extra], self.L, {self.m.input: x})
        return [o.double() if not o.is_complex() else o for o in outs]

    def impulse(self, pos=0):
        x = torch.zeros(self.x_shape, dtype=self.dtype)
        x.narrow(self.x_axis, pos, 1).fill_(1.0)
        return x

    def random(self):
        return torch.randn(self.x_shape, dtype=self.dtype)


def _time_axis(node, cap):
    dims = length_dims(node, cap)
    return dims[-1] if dims else meta_value(node).dim() - 1


def impulse_response(m, runner, cap, length, zero=None):
    """Filter h [C, L], skip D [C], constant offset (bias) at `length`, from an impulse at t=0.

    zero: the (time-constant) response to a zero input measured at another length, to save a run.
    """
    pr = _Probe(m, runner, cap, length)
    extra = [m.skip_node] if m.skip_node is not None else []
    imp = pr(pr.impulse(), extra)
    if zero is None:
        zero = pr(torch.zeros(pr.x_shape, dtype=pr.dtype))[0]
    else:
        zero = zero.narrow(pr.y_axis, 0, 1).expand_as(imp[0])
    H = _time_last(imp[0] - zero, pr.y_axis)
    h = H[0].reshape(-1, H.shape[-1])
    skip = None
    if extra:
        skip = _time_last(imp[1], pr.y_axis)[0].reshape(-1, H.shape[-1])[:, 0].clone()
        h[:, 0] -= skip
    off = _time_last(zero, pr.y_axis)
    bias = off[0].reshape(-1, off.shape[-1])[:, 0].clone() if off.abs().max() > 0 else None
    return {"h": h, "skip": skip, "bias": bias, "off": off, "chan": tuple(H.shape[1:-1]), "out_axis": pr.y_axis,
            "probe": pr, "zero": zero}


def measure(m, runner, cap, length):
    """impulse_response plus the relative errors of the affine / convolution model on random inputs."""
    r = impulse_response(m, runner, cap, length)
    pr, zero, off = r["probe"], r["zero"], r["off"]
    x1, x2 = pr.random(), pr.random()
    y1, y2, y12 = pr(x1)[0], pr(x2)[0], pr(0.7 * x1 - 1.3 * x2)[0]
    r["lin_err"] = rel_err(y12 - zero, 0.7 * (y1 - zero) - 1.3 * (y2 - zero))
    r["off_err"] = rel_err(off, off[..., :1].expand_as(off)) if off.abs().max() > 0 else 0.0
    y1 = _time_last(y1, pr.y_axis)
    xb = _broadcast(_time_last(x1, pr.x_axis), m.input_map, y1.shape)
    flat = xb.reshape(xb.shape[0], -1, xb.shape[-1])
    pred = causal_conv(flat, r["h"]) + (r["skip"][:, None] * flat if r["skip"] is not None else 0)
    r["fit_err"] = rel_err(pred.reshape(xb.shape) + off, y1)
    return r


def _registered_filter(m, runner, cap, length):
    args = runner.evaluate([a for a in m.conv_node.all_input_nodes if a is not m.input], length)
    vals = dict(zip([a for a in m.conv_node.all_input_nodes if a is not m.input], args))
    call = [vals.get(a, a) if isinstance(a, torch.fx.Node) else a for a in m.conv_node.args]
    call = [a for i, a in enumerate(call) if i != m.mixer.input_arg]
    res = m.mixer.filter_fn(*call)
    h, skip = res if isinstance(res, tuple) else (res, None)
    return h.double(), (skip.double() if skip is not None else None)


# ---- verdicts -----------------------------------------------------------------------------------

_TORCH_DIR = os.path.dirname(torch.__file__)


def _describe(node):
    """(module path, source line): the innermost frame of the user's code, not torch's."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    path = path.replace("L['self'].", "").replace("L['self']", "")
    lines = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [(ln.strip(), lines[i + 1].strip() if i + 1 < len(lines) else "")
              for i, ln in enumerate(lines) if ln.strip().startswith("File ")]
    user = [f for f in frames if _TORCH_DIR not in f[0]] or frames
    src = f"{user[-1][0][5:]}: {user[-1][1]}" if user else ""
    return path, src


def candidate_for(m, runner, cap, alt=None):
    node = m.conv_node
    path, src = _describe(node)
    out_val = meta_value(m.output)
    cand = Candidate(name=node.name, spelling=m.spelling, kind=m.kind, verdict=Verdict.REJECTED,
                     module_path=path, source=src, offending=node.name,
                     length=str(cap.length_symbol if cap.symbolic else cap.example_length), max_len=cap.max_len,
                     filter_length=str(m.filter_length) if m.filter_length is not None else "",
                     dtype=str(out_val.dtype).replace("torch.", "") if out_val is not None else "",
                     input=m.input.name, output=m.output.name)
    reject = lambda reason, at, text: _reject(cand, reason, at, text)  # noqa: E731
    if m.problem:
        return reject(Reason[m.problem[0]], m.problem[1], m.problem[2])
    # 1. causality, structurally
    if m.reversed_node is not None:
        return reject(Reason.BIDIRECTIONAL_FILTER, m.reversed_node,
                      f"{m.reversed_node.name} adds a reversed filter term (a flip or left pad on the lag axis)")
    if m.fft_size is not None and m.filter_support is not None:
        no_wrap = _fft_window(m, cap)
        if no_wrap is None:
            if m.conj_node is not None:
                return reject(Reason.BIDIRECTIONAL_FILTER, m.conj_node,
                              f"{m.conj_node.name} conjugates the filter spectrum (the filter reversed in time), and "
                              f"the output window {_window(m)} does not make it causal")
            return reject(Reason.NOT_CAUSAL_SLICE, m.output, f"output window {_window(m)} reads ahead of position t")
    else:
        if m.out_slice is not None and m.out_slice[0] != 0:
            return reject(Reason.NOT_CAUSAL_SLICE, m.output, f"output slice starts at {m.out_slice[0]}, not 0")
        no_wrap = prove_no_wrap(m.fft_size, m.filter_length, cap) if m.fft_size is not None else (True, "")
    # 2-3. numbers first: a symbolic shape can be stale (dynamo's fake linspace(0, 1, L) has a fixed
    # size), the evaluated graph cannot
    try:
        reach = m.filter_length
        if m.kind == "short" and m.mixer is not None:  # a registered short op reaches as far as its declared filter
            reach = int(_registered_filter(m, runner, cap, cap.example_length)[0].shape[-1])
        lengths = check_lengths(cap, reach if m.kind == "short" and isinstance(reach, int) else 0)
        meas = [measure(m, runner, cap, L) for L in lengths]
        Lm = cap.max_len if cap.symbolic else cap.example_length
    except NeedsActivation as exc:
        return reject(Reason.NONLINEAR, node, f"the output also depends on activation {exc}")
    except Exception as exc:  # noqa: BLE001 - a region we cannot evaluate is not accepted
        return reject(Reason.NUMERIC_MISMATCH, node, f"numeric check failed to run: {type(exc).__name__}: {exc}"[:300])
    tol = TOL64
    for L, r in zip(lengths, meas):
        if not torch.isfinite(r["h"]).all():  # random-init trap: a NaN / inf filter passes no check
            return reject(Reason.NUMERIC_MISMATCH, node, f"the filter is not finite at L={L} (NaN/inf weights?)")
        if not (r["lin_err"] <= tol and r["off_err"] <= tol):
            return reject(Reason.NONLINEAR, node, f"not affine in its input at L={L} (rel err {max(r['lin_err'], r['off_err']):.1e})")
        if not r["fit_err"] <= tol:
            if not no_wrap[0]:
                return reject(Reason.WRAP_AROUND, node, f"circular convolution: {no_wrap[1]}")
            what = ("the matrix over positions is not lower-triangular Toeplitz (a causal convolution)"
                    if m.spelling == "position_matrix" else "extracted causal filter + skip do not reproduce the output")
            return reject(Reason.NUMERIC_MISMATCH, node, f"{what} at L={L} (rel err {r['fit_err']:.1e})")
    if len(lengths) > 1:  # the filter may change with L only by slicing
        e = rel_err(meas[1]["h"], meas[0]["h"][:, : lengths[1]])
        if not e <= tol:
            return reject(Reason.FILTER_DEPENDS_ON_LENGTH, node,
                          f"filter at L={lengths[1]} is not the prefix of the filter at L={lengths[0]} (rel err {e:.1e})")
    if alt is not None:  # concrete captures: the same convolution captured at a shorter length
        m_b, runner_b, cap_b = alt
        hb = impulse_response(m_b, runner_b, cap_b, cap_b.example_length)["h"]
        e = rel_err(hb, meas[0]["h"][:, : hb.shape[1]])
        if e > tol:
            return reject(Reason.FILTER_DEPENDS_ON_LENGTH, node,
                          f"filter captured at L={cap_b.example_length} is not the prefix of the filter at "
                          f"L={lengths[0]} (rel err {e:.1e})")
    if not no_wrap[0]:
        return reject(Reason.WRAP_AROUND, node, f"circular convolution: {no_wrap[1]}")
    if m.fft_size is not None and m.out_slice is not None and (
            m.out_slice[1] is None or not _is_length(sympy.sympify(m.out_slice[1]) - m.out_slice[0], cap)):
        return reject(Reason.NOT_CAUSAL_SLICE, m.output, f"the output window {_window(m)} is not L positions long")
    if m.mixer is not None:
        h_reg, _ = _registered_filter(m, runner, cap, lengths[0])
        h_reg = torch.nn.functional.pad(h_reg[:, : lengths[0]], (0, max(0, lengths[0] - h_reg.shape[1])))  # fewer lags: zeros
        e = rel_err(meas[0]["h"], h_reg)
        if e > tol:
            return reject(Reason.NUMERIC_MISMATCH, node, f"registered filter_fn disagrees with the op (rel err {e:.1e})")
    first = meas[0]
    cand.verdict, cand.reason, cand.offending = Verdict.ACCEPTED, None, None
    cand.channels = first["h"].shape[0]
    taps = None
    if m.kind == "short":  # a short conv's taps are the op's reach (kernel, dilation, padding, delay): read, not sampled
        taps = reach
        if not (isinstance(taps, int) and taps >= 1):
            return reject(Reason.NUMERIC_MISMATCH, node, f"a short convolution whose reach {taps} is not a known int")
        if not cap.symbolic and taps > lengths[0]:
            return reject(Reason.CAPTURE_FAILED, node, f"the filter reaches {taps} lags, past the example's length "
                                                       f"{lengths[0]}: pass a longer example")
        nz = torch.nonzero(first["h"].abs().sum(0)).flatten()
        if len(nz) and int(nz.max()) + 1 > taps:  # the op reads further back than its own parameters say
            return reject(Reason.NUMERIC_MISMATCH, node, f"the impulse response reaches {int(nz.max()) + 1} lags, past "
                                                         f"the op's reach {taps}")
        cand.filter_length = str(taps)
    wrap = f"no wrap-around: {no_wrap[1]}; " if m.fft_size is not None else ""
    cand.explanation = (f"{wrap}linear and shift-invariant; causal filter + skip reproduce the output at "
                        f"L={list(lengths)}; filter prefix-stable")
    cand.conv = ConvStructure(input=m.input, output=m.output, conv_node=node, filter_nodes=list(m.filter_nodes),
                              filter_at=lambda L: impulse_response(m, runner, cap, L, first["zero"])["h"],
                              max_len=Lm, skip=first["skip"], bias=first["bias"], channel_shape=first["chan"],
                              input_map=m.input_map, time_axis=first["out_axis"], fft_size=m.fft_size,
                              filter_length=m.filter_length, padding=m.padding, taps=taps)
    return cand


def _reject(cand, reason, at, text):
    cand.verdict = Verdict.REJECTED
    cand.reason = reason
    cand.offending = getattr(at, "name", None)
    cand.explanation = text
    return cand


def time_mixing_candidate(node, c, info, cap):
    path, src = _describe(node)
    return Candidate(name=node.name, spelling=c.fn or c.op, kind="time_mixing", verdict=Verdict.REJECTED,
                     reason=Reason[info.reason], explanation=info.why or f"{c.op} mixes positions",
                     module_path=path, source=src, offending=node.name,
                     length=str(cap.length_symbol if cap.symbolic else cap.example_length), max_len=cap.max_len,
                     dtype=str(getattr(meta_value(node), "dtype", "")).replace("torch.", ""))


# ---- whole model --------------------------------------------------------------------------------

def _flat_outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_outputs(o)]
    return []


def safety_net(f, cap, tol):
    """{check: {passed, rel_err}}: causality under perturbation of the future, and prefix stability."""
    L = check_lengths(cap)[0]
    t = max(1, L // 2)
    x = random_inputs(cap, L)
    fut = random_inputs(cap, L)
    x2 = tuple(_splice(a, b, t, L) for a, b in zip(x, fut))
    with torch.no_grad():
        y = _flat_outputs(f(x))
        y2 = _flat_outputs(f(x2))
        res = {}
        errs = [rel_err(b[:, :t], a[:, :t]) for a, b in zip(y, y2) if a.dim() > 1 and a.shape[1] == L]
        res["future_perturbation"] = {"passed": bool(errs) and max(errs) <= tol, "rel_err": max(errs, default=float("nan"))}
        errs = []
        for p in prefix_lengths(cap, L):
            yp = _flat_outputs(f(tuple(a[:, :p] if _has_len(a, L) else a for a in x)))
            errs += [rel_err(b, a[:, :p]) for a, b in zip(y, yp) if a.dim() > 1 and a.shape[1] == L]
        res["prefix_stability"] = {"passed": bool(errs) and max(errs) <= tol, "rel_err": max(errs, default=float("nan"))}
    return res


def prefix_lengths(cap, L):
    """The prefixes the model must reproduce itself on: L // 2, and for a concrete capture (the model
    reads L in Python and may branch on it anywhere) also the second capture's length and the powers
    of two below L, so a branch that changes the model's outputs below some length is seen."""
    lengths = {max(1, L // 2)}
    if not cap.symbolic:
        lengths |= {2 ** k for k in range(L.bit_length()) if 2 ** k < L}
        lengths |= {cap.alt.example_length} if cap.alt is not None and cap.alt.example_length < L else set()
    return sorted(lengths)


def _has_len(a, L):
    return isinstance(a, torch.Tensor) and a.dim() > 1 and a.shape[1] == L


def _splice(a, b, t, L):
    if not _has_len(a, L):
        return a
    out = a.clone()
    out[:, t:] = b[:, t:]
    return out


def run(matches, ctx):
    """Properties pass: matches -> candidates (conv candidates, the attention sites' verdicts, then
    unclaimed time-mixing ops)."""
    alts = ctx.alt or [None] * len(matches)
    cands = [candidate_for(m, ctx.runner, ctx.cap, a) for m, a in zip(matches, alts)]
    cands += [s.candidate for s in ctx.attention or ()]
    claimed = set().union(*(m.claimed for m in matches), *(s.claimed for s in ctx.attention or ()))
    live = value_live(ctx.cap.gm.graph)
    for node, t in ctx.time_info.items():
        if t.dep == "activation" and t.cls in ("mixing", "conv_part", "delay", "delay_part") and node not in claimed \
                and node in live:
            cands.append(time_mixing_candidate(node, ctx.canon[node], t, ctx.cap))
    return cands
