"""Modal proof: a long filter that is a sum of exponentials, h[c, t] = Re sum_n r[c, n] p[c, n]**t.

Such a convolution decodes by its recurrence (N complex states per channel). The proof is an abstract
interpretation of the filter's FX subgraph in graph order. Each value is
- constant: independent of the lag t (evaluated in float64 / complex128 by the capture's Runner);
- Lin: A * t + B (a ramp: arange, linspace, a stored arange, a cumsum of a constant);
- Modal: sum_m C[m] * P[m]**t (exp of a ramp, a constant to the power of a ramp, cos / sin of a
  ramp, a cumprod of a constant, and what products, sums, einsums and real parts make of them).
A form's tensors have the value's shape with the lag dim 1 (Modal: a mode axis in front); `lag` is
the lag dim, counted from the right. Views and indexing run on an index probe and must keep t an
index (t + k) along one dim. Any other op of t refuses, naming the op. Each channel's modes are
those of the filter element it reads (the same index, or a broadcast over heads); its residues are
checked in float64 against conv.h over every lag.
"""

import math
import string
from dataclasses import dataclass

import torch

from lcsm_compile.passes.canonicalize import canonical
from lcsm_compile.passes.capture import Runner, meta_value
from lcsm_compile.passes.properties import rel_err
from lcsm_compile.report import ModalForm, NotModal, Verdict

TOL = 1e-9  # float64 check of the form against conv.h
PROBE_LEN = 256  # the length the filter subgraph is interpreted at (symbolic captures)
MERGE = 1e-12  # poles closer than this are one mode
MOVEMENT = {"slice", "select", "gather", "index", "transpose", "permute", "movedim", "reshape", "unsqueeze",
            "squeeze", "expand", "flip", "roll", "pad", "repeat", "narrow", "tile", "repeat_interleave"}
STEPS = {"lt", "le", "gt", "ge", "eq", "ne", "where", "masked_fill", "heaviside", "sign", "floor", "ceil",
         "round", "clamp", "clamp_min", "clamp_max", "minimum", "maximum", "logical_and", "logical_not"}
CONJ = ("conj", "_conj", "conj_physical")
CPLX = torch.complex128


def run(candidates, cap):
    """The modal pass: each accepted long convolution's form, also set on its ConvStructure (.modal)
    for the decoder's choice of strategy (lcsm_compile.recurrence.choose)."""
    forms = {}
    for cand in candidates:
        if cand.verdict is Verdict.ACCEPTED and cand.kind == "long" and cand.conv is not None:
            try:
                form = prove(cand.conv, cap)
            except Exception as exc:  # noqa: BLE001 - a proof that cannot finish keeps the tiling; it never refuses a model
                form = NotModal("", "", f"the proof failed: {type(exc).__name__}: {str(exc).strip()[:200]}")
            cand.conv.modal = forms[cand.name] = form
    return forms


def dump(forms):
    return "\n".join(f"{name}: {form}" for name, form in forms.items())


@dataclass
class _F:
    lin: bool  # Lin: a = A, b = B; Modal: a = C, b = P ([M, ...])
    a: torch.Tensor
    b: torch.Tensor
    lag: int  # negative


class _Refuse(Exception):
    def __init__(self, node, op, why):
        super().__init__(why)
        self.result = NotModal(node, op, why)


def prove(conv, cap) -> ModalForm | NotModal:
    """Prove that the long convolution `conv` (a ConvStructure of the Captured graph `cap`) has a
    modal filter, from the ops that compute it; its poles and residues follow conv.h's channels."""
    node = conv.conv_node
    c = canonical(node, cap.roles)
    try:
        if c.op == "scan" and c.fn == "cumsum":  # a running sum: the all-ones filter, one pole at 1
            one = torch.ones(1, 1, dtype=CPLX)
            return _fit(conv, [(one, one, node.name, c.op)])
        if c.op not in ("irfft", "ifft"):
            raise _Refuse(node.name, c.op, f"a {c.fn or c.op} convolution: only FFT convolutions of a filter computed "
                                           "in the graph, and running sums, are analysed")
        return _prove_fft(conv, cap, node, c)
    except _Refuse as exc:
        return exc.result


def _prove_fft(conv, cap, node, c):
    canon = {}
    ffts = [n for n in conv.filter_nodes if _canon(n, canon, cap).op in ("rfft", "fft")]
    ffts = [f for f in ffts if not any(f in _ancestors([g]) for g in ffts if g is not f)]  # the outermost ones
    if not ffts:
        raise _Refuse(node.name, c.op, "the filter is given as a spectrum: there is no time-domain filter to prove")
    filters = [_strip_pad(canon[f].inputs[0], canon[f].params["dim"], canon, cap) + (_conjugated(f, conv, canon, cap),)
               for f in ffts]
    order = {n: i for i, n in enumerate(cap.gm.graph.nodes)}
    nodes = sorted(_ancestors([k for k, *_ in filters]), key=order.__getitem__)
    runner = Runner(cap)
    values = [n for n in nodes if n.op != "placeholder" and  # tensors and sizes
               isinstance(meta_value(n), (torch.Tensor, torch.SymInt, torch.SymFloat, int, float))]
    # every value, at a probe length: the modes do not depend on it (the float64 check in _fit is at
    # max_len), and [C, N, max_len] intermediates all held at once would not fit at long max_len. A
    # concrete capture runs at its own length only.
    length = min(conv.max_len, max(cap.min_len, PROBE_LEN)) if cap.symbolic else conv.max_len
    shadow = dict(zip(values, runner.evaluate(values, length)))

    def ev(n, over):  # node n with some inputs replaced
        inputs = {i: shadow[i] for i in n.all_input_nodes if i in shadow}
        return runner.evaluate([n], length, {**inputs, **over})[0]

    groups = {}  # ramps of one length are one t (arange(L) and linspace(0, 1, L) alike)
    for src, form in _sources(nodes, canon, cap, shadow):
        groups.setdefault(shadow[src].shape[form.lag], {})[src] = form
    best = None
    for sources in groups.values():
        try:
            forms = _interpret(sources, nodes, canon, cap, shadow, ev)
            return _fit(conv, [_elements(forms.get(k), k, dim, rev, shadow[k], canon[k].op) for k, dim, rev in filters])
        except _Refuse as exc:  # the failure that got furthest is the most telling
            at = next((n for n in nodes if n.name == exc.result.node), node)
            best = max(best or (-1, exc.result), (order[at], exc.result), key=lambda b: b[0])
    if best is None:
        k = filters[0][0]
        raise _Refuse(k.name, canon[k].op, "the filter is a table over lags (a parameter or buffer): nothing in it "
                                           "is computed from t")
    return best[1]


def _elements(f, k, dim, reverse, v, op):
    """(C, P) [modes, filter elements] of the filter k on its lag dim."""
    if f is None or f.lin or f.lag != dim - v.dim():
        what = "a ramp (a polynomial in t)" if f is not None and f.lin else "not computed from t"
        raise _Refuse(k.name, op, f"the filter on its lag axis is {what}")
    C, P = [T.squeeze(v.dim() + f.lag + 1).reshape(T.shape[0], -1) for T in (f.a, f.b)]
    if reverse:  # k[n-1-t] = sum C P^(n-1) (1/P)^t
        C, P = C * P ** (v.shape[dim] - 1), 1 / P
    return C, P, k.name, op


# ---- the graph ----------------------------------------------------------------------------------

def _canon(n, canon, cap):
    if n not in canon:
        canon[n] = canonical(n, cap.roles)
    return canon[n]


def _ancestors(nodes):
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _conjugated(f, conv, canon, cap):
    """The filter's spectrum reaches the product conjugated: the filter reversed in time (a
    cross-correlation)."""
    inside, seen, stack = set(conv.filter_nodes), set(), [f]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(u for u in n.users if u in inside)
    return sum(_canon(n, canon, cap).fn in CONJ for n in seen) % 2 == 1


def _strip_pad(k, dim, canon, cap):
    """(time-domain filter, its lag dim): rfft(k, n) pads k with zeros on the right first."""
    while (c := _canon(k, canon, cap)).op == "pad" and dim == meta_value(k).dim() - 1 and c.params["mode"] == "constant" \
            and c.params["value"] == 0 and c.params["pad"][0] == 0 and not any(c.params["pad"][2:]):
        k = c.inputs[0]
    return k, dim


def _sources(nodes, canon, cap, shadow):
    """Values that introduce t: a ramp along one dim (arange, linspace, a stored arange), or a
    cumprod / cumsum over a dim of a value that is the same along it."""
    for n in nodes:
        c, v = _canon(n, canon, cap), shadow.get(n)
        if not isinstance(v, torch.Tensor) or v.is_complex() or v.dtype == torch.bool:
            continue
        v = v.detach()
        if c.op == "param" or (c.op == "factory" and c.fn in ("arange", "linspace")):
            dims, flat = [d for d, s in enumerate(v.shape) if s > 1], v.double().flatten()
            if len(dims) == 1 and flat[1] != flat[0]:
                ramp = flat[0] + (flat[1] - flat[0]) * torch.arange(len(flat), dtype=torch.float64)
                # a ramp stored in float32 is rounded: taken as t, the final check refuses it honestly
                if torch.allclose(flat, ramp, rtol=1e-6, atol=1e-6 * float(flat.abs().max())):
                    one = torch.ones([1] * v.dim(), dtype=torch.float64)
                    yield n, _F(True, (flat[1] - flat[0]) * one, flat[0] * one, dims[0] - v.dim())
        elif c.op == "scan" and c.fn in ("cumsum", "cumprod") and c.inputs[0] in shadow:
            (d,), x = c.params["dim"], shadow[c.inputs[0]]
            if x.shape[d] > 1 and torch.equal(x, x.narrow(d, 0, 1).expand_as(x)):
                x0 = x.narrow(d, 0, 1).to(CPLX)
                if c.fn == "cumsum":  # x (t + 1)
                    yield n, _F(True, x0, x0, d - x.dim())
                else:  # x^(t + 1)
                    yield n, _F(False, x0[None], x0[None], d - x.dim())


def _interpret(sources, nodes, canon, cap, shadow, ev):
    forms = {s: _shape(f, shadow[s]) for s, f in sources.items()}
    for n in nodes:
        v = meta_value(n)
        if n in forms or not any(i in forms for i in n.all_input_nodes) or not isinstance(v, (torch.Tensor, list, tuple)):
            continue  # independent of t, a size, or an assert
        c = _canon(n, canon, cap)
        if not isinstance(v, torch.Tensor):
            raise _Refuse(n.name, c.op, "splits the filter into several values")
        forms[n] = _shape(_rule(n, c, forms, shadow, ev), shadow[n])
    return forms


def _shape(f, v):
    """The form with its tensors expanded to the value's shape (lag dim 1): what every rule assumes."""
    s1 = list(v.shape)
    s1[f.lag] = 1
    return _F(f.lin, _fit_to(f.a, s1, 1 - f.lin), _fit_to(f.b, s1, 1 - f.lin), f.lag)


def _fit_to(x, shape, lead=0):
    x = x.reshape(list(x.shape[:lead]) + [1] * (len(shape) + lead - x.dim()) + list(x.shape[lead:]))
    return x.expand(list(x.shape[:lead]) + list(shape))


# ---- rules --------------------------------------------------------------------------------------

def _rule(n, c, forms, shadow, ev):
    op, fn = c.op, c.fn or c.params.get("fn", "")
    refuse = lambda why: _Refuse(n.name, op if op not in ("pointwise", "unknown") else fn, why)  # noqa: E731

    def val(a, fit=False):  # a form (fit: to this node's shape, as broadcasting does) or a constant
        v = forms.get(a, shadow.get(a)) if isinstance(a, torch.fx.Node) else a
        return (_shape(v, shadow[n]) if fit else v) if isinstance(v, _F) else torch.as_tensor(v)

    if op in ("mul", "div", "add", "sub") or fn in ("complex", "pow"):
        x, y = [val(a, fit=True) for a in n.args[:2]]
        x, y = (y, x) if fn == "rsub" else (x, y)
        if fn == "pow":
            return _pow(x, y, refuse)
        if op == "div" and (isinstance(y, _F) or n.kwargs.get("rounding_mode")):
            raise refuse("a division by a t-dependent value, or a rounded one, is not exponential in t")
        if op in ("mul", "div"):
            return _mul(x, y if op == "mul" else 1 / y, refuse)
        alpha = n.kwargs.get("alpha", 1)
        return _add(x, _scale(y, 1j if fn == "complex" else (-alpha if op == "sub" else alpha)), refuse)
    x = next(forms[i] for i in c.inputs if i in forms)  # the t-dependent input of a one-input op
    complex_in = shadow[c.inputs[0]].is_complex()
    if op == "identity" or (op == "cast" and (not complex_in or shadow[n].is_complex())):
        return x
    if op == "cast" or fn in ("real", "imag") + CONJ:  # a cast from complex to real takes Re
        return _complex_part(x, "real" if op == "cast" else "conj" if fn in CONJ else fn)
    if fn == "view_as_real" and not x.lin:  # [..., 2]: (Re, Im)
        re, im = _complex_part(x, "real"), _complex_part(x, "imag")
        return _F(False, torch.stack([re.a, im.a], -1), torch.stack([re.b, im.b], -1), x.lag - 1)
    if op == "pointwise" and fn in ("neg", "exp", "cos", "sin"):
        return _unary(fn, x, refuse)
    if op == "reduce" and fn in ("sum", "mean"):
        return _reduce(n, c, x, shadow, refuse)
    if op == "einsum":
        return _einsum(c.params["equation"], [val(o) for o in c.params["operands"]], refuse)
    if op == "linear":
        y = _einsum("...k,ok->...o", [val(c.inputs[0]), val(c.params["weight"])], refuse)
        return y if c.params.get("bias") is None else _add(_shape(y, shadow[n]), val(c.params["bias"]), refuse)
    if op == "matmul" and n.args[0] in forms and n.args[1] not in forms and val(n.args[1]).dim() == 2:
        return _einsum("...k,kn->...n", [x, val(n.args[1])], refuse)
    if op == "cat" and not c.params["stack"]:
        return _cat(c.params["dim"] - shadow[n].dim(), [val(a, fit=False) for a in n.args[0]], refuse)
    if op in MOVEMENT or fn in MOVEMENT:
        return _move(n, c.inputs[0], x, forms, shadow, ev, refuse)
    if fn in STEPS:
        raise refuse(f"{fn} of a t-dependent value is a step in t (a truncation window or mask), not exponential")
    what = "t (a ramp)" if x.lin else "a sum of exponentials in t (an MLP of positional features?)"
    raise refuse(f"{fn or op} of {what} is not exponential in t")


def _const(v, lag, refuse):
    """A constant next to a form: it may span the lag dim only where it is the same at every lag."""
    v = torch.as_tensor(v)
    if v.dim() >= -lag and v.shape[lag] > 1:
        if not torch.equal(v, v.narrow(lag, 0, 1).expand_as(v)):
            raise refuse("a table over the lag axis (not computed from t) meets the filter")
        v = v.narrow(lag, 0, 1)
    return v


def _scale(x, s):
    return _F(x.lin, x.a * s, x.b * s if x.lin else x.b, x.lag) if isinstance(x, _F) else x * s


def _lag(x, y, refuse):
    lags = {f.lag for f in (x, y) if isinstance(f, _F)}
    if len(lags) > 1:
        raise refuse("two different lag axes meet")
    return lags.pop()


def _modal(x, lag, refuse):
    """A Modal form of x: a constant is one mode with P = 1."""
    if isinstance(x, _F) and x.lin:
        raise refuse("t itself (a ramp) meets exponentials in t: a polynomial term, not a sum of exponentials")
    if isinstance(x, _F):
        return x
    v = _const(x, lag, refuse).to(CPLX)
    return _F(False, v[None], torch.ones_like(v)[None], lag)


def _common(*forms):
    """The forms' C and P, all expanded to one shape."""
    shape = torch.broadcast_shapes(*[T.shape[1:] for f in forms for T in (f.a, f.b)])
    return [(_fit_to(f.a, shape, 1), _fit_to(f.b, shape, 1)) for f in forms]


def _mul(x, y, refuse):
    lag = _lag(x, y, refuse)
    x, y = (x, y) if isinstance(x, _F) else (y, x)
    if not isinstance(y, _F):
        return _scale(x, _const(y, lag, refuse))
    if x.lin or y.lin:
        raise refuse("a product with t (a ramp) is a polynomial in t, not a sum of exponentials")
    (C, P), (D, Q) = _common(x, y)
    return _F(False, (C[:, None] * D[None]).flatten(0, 1), (P[:, None] * Q[None]).flatten(0, 1), lag)  # all pairs


def _add(x, y, refuse):
    lag = _lag(x, y, refuse)
    x, y = (x, y) if isinstance(x, _F) else (y, x)
    if x.lin and not (isinstance(y, _F) and not y.lin):  # ramp + ramp, ramp + constant
        A, B = (y.a, y.b) if isinstance(y, _F) else (0, _const(y, lag, refuse))
        return _F(True, x.a + A, x.b + B, lag)
    (C, P), (D, Q) = _common(_modal(x, lag, refuse), _modal(y, lag, refuse))
    return _F(False, torch.cat([C, D]), torch.cat([P, Q]), lag)


def _pow(base, exp, refuse):
    """b^(A t + B) = b^B (b^A)^t."""
    if isinstance(base, _F) or not (isinstance(exp, _F) and exp.lin):
        raise refuse("a power of a t-dependent value, or to an exponent that is not linear in t")
    b = _const(base, exp.lag, refuse).to(CPLX)
    return _F(False, torch.pow(b, exp.b)[None], torch.pow(b, exp.a)[None], exp.lag)


def _unary(fn, x, refuse):
    if fn == "neg":
        return _scale(x, -1)
    if not x.lin:
        raise refuse(f"{fn} of a sum of exponentials in t is not exponential in t")
    A, B = x.a.to(CPLX), x.b.to(CPLX)
    if fn == "exp":
        return _F(False, torch.exp(B)[None], torch.exp(A)[None], x.lag)
    # cos z = (e^iz + e^-iz) / 2, sin z = (e^iz - e^-iz) / 2i
    C = torch.stack([torch.exp(1j * B), torch.exp(-1j * B) * (1 if fn == "cos" else -1)]) / (2 if fn == "cos" else 2j)
    return _F(False, C, torch.stack([torch.exp(1j * A), torch.exp(-1j * A)]), x.lag)


def _complex_part(x, part):
    """real / imag / conj. Re z = (z + conj z) / 2: the conjugate modes join."""
    if x.lin:
        f = {"real": torch.real, "imag": torch.imag, "conj": torch.conj}[part]
        return _F(True, f(x.a.to(CPLX)), f(x.b.to(CPLX)), x.lag)
    if part == "conj":
        return _F(False, x.a.conj(), x.b.conj(), x.lag)
    s, d = (1, 2) if part == "real" else (-1, 2j)
    return _F(False, torch.cat([x.a / d, s * x.a.conj() / d]), torch.cat([x.b, x.b.conj()]), x.lag)


def _reduce(n, c, x, shadow, refuse):
    """A sum over non-lag dims: a Modal form folds them into its modes."""
    v = shadow[c.inputs[0]]
    nd = v.dim()
    dims = tuple(range(nd)) if c.params["dim"] is None else tuple(d % nd for d in c.params["dim"])
    if nd + x.lag in dims:
        raise refuse("a sum over t (the lag axis) is not a filter of t")
    keep = shadow[n].dim() == nd
    scale = 1 / math.prod(v.shape[d] for d in dims) if c.fn == "mean" else 1
    lag = x.lag if keep else x.lag + sum(1 for d in dims if d > nd + x.lag)
    if x.lin:
        return _F(True, x.a.sum(dims, keep) * scale, x.b.sum(dims, keep) * scale, lag)
    perm = [0] + [d + 1 for d in dims] + [d + 1 for d in range(nd) if d not in dims]
    shape = [-1] + [1 if d in dims else x.a.shape[d + 1] for d in range(nd) if keep or d not in dims]
    return _F(False, x.a.permute(perm).reshape(shape) * scale, x.b.permute(perm).reshape(shape), lag)


def _einsum(eq, vals, refuse):
    """One t-dependent operand: a Lin form goes through as is (einsum is linear in it); the dims a
    Modal form's operand contracts become modes, C'[m, k, out] and P'[m, k, out]."""
    fi = [i for i, v in enumerate(vals) if isinstance(v, _F)]
    if "->" not in eq or len(fi) != 1:
        raise refuse("an einsum of two t-dependent values, or with an implicit output")
    f, pool = vals[fi[0]], [ch for ch in string.ascii_letters if ch not in eq]
    nds = [f.a.dim() - (not f.lin) if i == fi[0] else v.dim() for i, v in enumerate(vals)]
    ins, out = eq.split("->")
    subs = ins.split(",")
    ell = max([nd - len(s) + 3 for s, nd in zip(subs, nds) if "..." in s], default=0)
    subs = [s.replace("...", "".join(pool[ell - (nd - len(s) + 3):ell])) for s, nd in zip(subs, nds)]
    out, mode, sub = out.replace("...", "".join(pool[:ell])), pool[ell], subs[fi[0]]
    lag = sub[len(sub) + f.lag]
    if lag not in out or any(lag in s for i, s in enumerate(subs) if i != fi[0]) or len(set(sub)) < len(sub):
        raise refuse("a contraction that sums over t, or meets it in another operand")
    others = [v.to(CPLX) for i, v in enumerate(vals) if i != fi[0]]
    rest = "".join("," + s for i, s in enumerate(subs) if i != fi[0])
    if f.lin:
        A, B = [torch.einsum(f"{sub}{rest}->{out}", T.to(CPLX), *others) for T in (f.a, f.b)]
        return _F(True, A, B, out.index(lag) - len(out))
    kept = "".join(ch for ch in sub if ch not in out)
    C = torch.einsum(f"{mode}{sub}{rest}->{mode}{kept}{out}", f.a, *others)
    P = torch.einsum(f"{mode}{sub}->{mode}{kept}{''.join(ch for ch in out if ch in sub)}", f.b)
    P = P.reshape(list(P.shape[:1 + len(kept)]) + [f.b.shape[1 + sub.index(ch)] if ch in sub else 1 for ch in out])
    C, P = torch.broadcast_tensors(C, P)
    shape = [-1] + list(C.shape[1 + len(kept):])
    return _F(False, C.reshape(shape), P.reshape(shape), out.index(lag) - len(out))


def _cat(d, vals, refuse):
    """A cat along a non-lag dim d: each piece's modes in a block of their own (zero C elsewhere)."""
    lag = {v.lag for v in vals if isinstance(v, _F)}
    if len(lag) > 1 or d in lag:
        raise refuse("joins pieces along t" if d in lag else "two different lag axes meet")
    lag = lag.pop()
    pieces = [_modal(v, lag, refuse) for v in vals]
    total, start, Cs, Ps = sum(p.a.shape[0] for p in pieces), 0, [], []
    for p in pieces:
        C, P = torch.broadcast_tensors(p.a, p.b)
        Cs.append(C.new_zeros((total,) + C.shape[1:]))
        Ps.append(P.new_ones((total,) + P.shape[1:]))
        Cs[-1][start:start + len(C)], Ps[-1][start:start + len(C)] = C, P
        start += len(C)
    return _F(False, torch.cat(Cs, d), torch.cat(Ps, d), lag)


def _move(n, inp, x, forms, shadow, ev, refuse):
    """A view, index, slice, pad or permutation: run on a probe holding each lag's index, it must
    give t + k along one dim j; the coefficients then move with it, packed along the lag dim."""
    if inp not in forms or any(i in forms for i in n.all_input_nodes if i is not inp):
        raise refuse("an index, a shape or a weight computed from t")
    v = shadow[inp]
    pos = v.dim() + x.lag
    probe = torch.arange(v.shape[pos], dtype=CPLX if v.is_complex() else torch.float64)
    try:
        R = ev(n, {inp: probe.reshape([-1] + [1] * (-x.lag - 1)).expand(v.shape).contiguous()}).real
    except RuntimeError as exc:  # an op for integer or boolean values: not a view of the filter
        raise refuse(f"could not follow t through it ({exc})"[:200]) from None
    k = R.flatten()[0]
    j = next((j for j in range(R.dim()) if R.shape[j] > 1 and torch.equal(
        R, (torch.arange(R.shape[j], dtype=R.dtype).reshape([-1] + [1] * (R.dim() - j - 1)) + k).expand(R.shape))), None)
    if j is None:
        raise refuse("moves values across lags (a flip, shift, pad or selection of t, or a reshape that merges t)")
    K, q, k = torch.cat([x.a[None] if x.lin else x.a, x.b[None] if x.lin else x.b]).to(CPLX), R.shape[j], int(k)
    moved = []
    for s in range(0, len(K), q):  # up to q coefficient sets per run, at input lags k .. k + q - 1
        chunk = K[s:s + q]
        X = torch.zeros(v.shape, dtype=CPLX)
        X.narrow(pos, k, len(chunk)).copy_(chunk.squeeze(pos + 1).movedim(0, pos))
        Y = ev(n, {inp: X}) if v.is_complex() else ev(n, {inp: X.real.contiguous()}) + 1j * ev(n, {inp: X.imag.contiguous()})
        moved.append(Y.narrow(j, 0, len(chunk)).movedim(j, 0).unsqueeze(j + 1))
    K, lag, m = torch.cat(moved), j - R.dim(), len(K) // 2
    if x.lin:  # the value at t reads the input at t + k
        return _F(True, K[0], K[1] + K[0] * k, lag)
    return _F(False, K[:m] * K[m:] ** k if k else K[:m], K[m:], lag)


# ---- channels -----------------------------------------------------------------------------------

def _merge(p, r):
    """Distinct poles with their coefficients summed (a real pole's conjugate pair is one mode)."""
    if len(p) == 0:
        return p, r
    rep = ((p[:, None] - p[None]).abs() <= MERGE).int().argmax(1)  # the first pole each one is at (j <= i: i is one)
    while not torch.equal(rep[rep], rep):
        rep = rep[rep]
    keep = rep == torch.arange(len(p))
    return p[keep], torch.zeros_like(r).index_add_(0, rep, r)[keep]


def _fit(conv, elems):
    """Per channel, the modes of the filter element it reads: the proof's coefficients up to a
    scale (the spectral walk may scale by 1/n), else least squares on its poles; checked in float64
    against conv.h over every lag."""
    h = conv.h.double()
    Cn, Lh = h.shape
    t = torch.arange(Lh, dtype=torch.float64)[:, None]
    poles, residues, worst = [], [], 0.0
    for c in range(Cn):
        hc, fit, err = h[c], None, float("nan")
        for rule in (lambda E: c if E == Cn else None, lambda E: c % E, lambda E: c // (Cn // E) if Cn % E == 0 else None):
            es = [rule(C.shape[1]) for C, *_ in elems]
            if None in es:
                continue
            modes = [(C[:, e] != 0, C[:, e], P[:, e]) for (C, P, *_), e in zip(elems, es)]
            p, r = torch.cat([P[m] for m, _, P in modes]), torch.cat([C[m] for m, C, _ in modes])
            # Re(r p^t) = Re(conj(r) conj(p)^t): a conjugate pair is one mode of the recurrence
            lower = p.imag < 0
            p, r = _merge(torch.where(lower, p.conj(), p), torch.where(lower, r.conj(), r))
            if len(p) > conv.max_len // 4:
                raise _Refuse("", "", f"too many modes: {len(p)} > max_len // 4 = {conv.max_len // 4} (a recurrence "
                                      "that large is no cheaper than the tiled convolution)")
            V = torch.pow(p[None], t)
            V[0] = 1  # p**0 = 1, also for p = 0
            f = (V @ r).real
            r = r * (f @ hc / (f @ f) if f.norm() > 0 else 0)
            err = rel_err((V @ r).real, hc)
            if not err <= TOL and len(p):
                r = torch.linalg.lstsq(V, hc.to(CPLX)[:, None]).solution[:, 0]
                err = rel_err((V @ r).real, hc)
            if err <= TOL:
                fit = (p[r != 0], r[r != 0])
                break
        if fit is None:
            raise _Refuse("", "", f"float64 check: the filter of channel {c} is not a sum of the exponentials its "
                                  f"graph computes (rel err {err:.1e} over {Lh} lags)")
        if len(fit[0]) and float(fit[0].abs().max()) > 1 + MERGE:
            raise _Refuse(*elems[0][2:], f"pole |p| = {float(fit[0].abs().max()):.4g} > 1: the recurrence is unstable")
        poles.append(fit[0])
        residues.append(fit[1])
        worst = max(worst, err)
    N = max(len(p) for p in poles)
    pad = lambda xs: torch.stack([torch.cat([x, x.new_zeros(N - len(x))]) for x in xs])  # noqa: E731
    return ModalForm(pad(poles), pad(residues), worst, tuple(len(p) for p in poles))
