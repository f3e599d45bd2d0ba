"""Mixer detection: recognise every spelling of a causal convolution in the canonical graph.

Three recognisers, each yielding `Match`es (structure only; numbers come in properties):
- FFT convolutions: an irfft whose spectrum is a product (mul / div / einsum, with casts, slices
  of bins and broadcasts in between) of exactly one FFT of an activation and static spectra;
  any scaling convention and FFT size; a complex fft sliced to n//2+1 bins; multi-output einsum.
  The output slice [..., :L] and a lag-0 skip term `+ x * D` (mul or einsum) are folded in.
- conv1d / nn.Conv1d / F.conv1d with padding (or an explicit F.pad) then a slice along time.
- registered mixers: opaque ops the user declared with `register_mixer`.
A Match may carry a structural `problem` (reason, node, text) found while matching; properties
turns matches into verdicts.
"""

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from lcsm_compile.passes.capture import meta_value, sym_expr

SHORT_MAX = 32  # conv1d kernels reaching up to this many lags are "short" (ring buffer); longer are "long"
_SPECTRAL_WALK = {"mul", "div", "einsum", "cast", "identity", "slice", "index", "unsqueeze", "expand", "reshape",
                  "permute", "transpose", "complex_view", "squeeze", "pointwise", "add", "sub"}
TRANSPARENT = {"cast", "identity"}  # ops that pass a value through unchanged (strip, attention)


@dataclass
class Match:
    spelling: str
    conv_node: torch.fx.Node
    input: torch.fx.Node
    output: torch.fx.Node
    kind: str = "long"
    region: list = field(default_factory=list)  # activation nodes from input (excl.) to output (incl.)
    claimed: set = field(default_factory=set)
    filter_nodes: list = field(default_factory=list)
    skip_node: torch.fx.Node | None = None
    fft_size: object = None
    filter_length: object = None  # lags carried by the filter (sympy/int)
    out_slice: tuple | None = None  # (start, end) along time of the conv output
    padding: tuple | None = None
    input_map: str = ""
    reversed_node: torch.fx.Node | None = None  # a flip / left pad on the filter's lag axis
    conj_node: torch.fx.Node | None = None  # a conjugated filter spectrum (the filter reversed in time)
    filter_support: tuple | None = None  # FFT convolutions: (first, last) circular lag the filter occupies
    problem: tuple | None = None  # (Reason name, node, explanation)
    mixer: object = None  # registered Mixer


@dataclass
class Mixer:
    """An opaque op the user declared a causal convolution.

    op: the torch.library custom op (or its OpOverload / OpOverloadPacket / qualified name).
    filter_fn(*args, **kwargs) -> h [C, Lh] or (h, skip [C]): the causal filter from the op's
    evaluated arguments (y_t = sum_s h[t-s] x_s). input_arg: which positional argument is the input.
    """

    op: object
    filter_fn: object
    input_arg: int = 0
    name: str = ""
    kind: str = "long"

    @property
    def qualname(self):
        return _qualname(self.op)


_REGISTRY: dict[str, Mixer] = {}


def _qualname(op):
    if isinstance(op, str):
        return op.split(".default")[0].replace("::", ".")
    if isinstance(op, torch._ops.OpOverload):
        op = op._overloadpacket
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name.replace("::", ".")
    name = getattr(op, "_qualname", None)  # torch.library.custom_op's CustomOpDef
    if name:
        return name.replace("::", ".")
    raise TypeError(f"register_mixer: expected a torch.library custom op, OpOverload(Packet) or its "
                    f"qualified name 'ns::name', got {type(op).__name__}")


def register_mixer(op, filter_fn, *, input_arg=0, name=None, kind="long"):
    """Declare an opaque op (e.g. a CUDA FFT-conv custom op) a causal convolution.

    A plain Python function is traced through by both capture levels; wrap it with
    torch.library.custom_op first. Returns the Mixer; analysis then treats each call of `op` as an
    ACCEPTED candidate once the filter from `filter_fn` reproduces the op numerically.
    """
    if not callable(filter_fn):
        raise TypeError(f"register_mixer: filter_fn must be callable, got {type(filter_fn).__name__}")
    if kind not in ("long", "short"):
        raise ValueError(f"register_mixer: kind must be 'long' or 'short', got {kind!r}")
    mixer = Mixer(op, filter_fn, input_arg, name or _qualname(op), kind)
    _REGISTRY[mixer.qualname] = mixer
    return mixer


def unregister_mixer(op):
    """Forget a registration (returns the Mixer, or None if `op` was not registered)."""
    return _REGISTRY.pop(_qualname(op), None)


def registered(node):
    t = node.target
    try:
        return _REGISTRY.get(_qualname(t)) if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else None
    except TypeError:
        return None


# ---- helpers ------------------------------------------------------------------------------------

def strip(node, canon):
    """The value behind casts and identities."""
    while canon[node].op in TRANSPARENT and canon[node].inputs:
        node = canon[node].inputs[0]
    return node


def _users_through(node, canon):
    """Follow a single-user chain of casts/identities downstream."""
    while len(node.users) == 1 and canon[next(iter(node.users))].op in TRANSPARENT:
        node = next(iter(node.users))
    return node


def _size(node, dim):
    return sym_expr(meta_value(node).shape[dim])


def _static_closure(leaves, info):
    seen, stack = [], list(leaves)
    while stack:
        n = stack.pop()
        if n in seen or info[n].dep != "static":
            continue
        seen.append(n)
        stack.extend(n.all_input_nodes)
    return seen


def _region(x, out, info):
    """Activation nodes on paths x -> out (out included, x excluded)."""
    anc, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in anc or n is x:
            continue
        anc.add(n)
        stack.extend(i for i in n.all_input_nodes if info[i].dep == "activation")
    down, stack = set(), [x]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in down and u in anc:
                down.add(u)
                stack.append(u)
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    return sorted(down | ({out} if out is not x else set()), key=order.__getitem__)


def _fold_skip(m, canon, info):
    """out + x * D (mul or einsum with a static operand) becomes part of the convolution."""
    users = list(m.output.users)
    if len(users) != 1 or canon[users[0]].op != "add":
        return
    add = users[0]
    other = next((i for i in canon[add].inputs if i is not m.output), None)
    if other is None or canon[other].op not in ("mul", "einsum"):
        return
    ops = [i for i in canon[other].inputs]
    acts = [i for i in ops if info[i].dep == "activation"]
    if len(acts) == 1 and strip(acts[0], canon) is m.input and all(info[i].dep == "static" for i in ops if i not in acts):
        m.skip_node = other
        m.filter_nodes += [n for n in _static_closure([i for i in ops if i not in acts], info) if n not in m.filter_nodes]
        m.output = add


def _finish(m, canon, info, extra=()):
    _fold_skip(m, canon, info)
    m.region = _region(m.input, m.output, info)
    m.claimed = set(m.region) | set(extra) | {m.conv_node}
    for n in m.region:
        others = [i for i in n.all_input_nodes if info[i].dep == "activation" and i not in m.region and i is not m.input]
        if others and m.problem is None:
            m.problem = ("NONLINEAR", n, f"{n.name} also reads activation {others[0].name}: not a function of the input alone")
    return m


# ---- FFT convolutions ---------------------------------------------------------------------------

def _spectral_leaves(start, canon, info):
    """Walk back from the irfft's spectrum: (activation FFT leaves, static leaves, other leaves, einsums)."""
    acts, statics, bad, einsums, seen, stack = [], [], [], [], set(), [start]
    while stack:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.add(n)
        c = canon[n]
        if info[n].dep == "static":
            statics.append(n)
        elif c.op in ("rfft", "fft"):
            acts.append(n)
        elif c.op in _SPECTRAL_WALK:
            if c.op == "einsum":
                einsums.append(n)
            stack.extend(i for i in c.inputs if info[i].dep != "sym")
        else:
            bad.append(n)
    return acts, statics, bad, einsums


def _input_map(x, out, einsums, act_leaf, canon):
    nx, ny = meta_value(x).dim(), meta_value(out).dim()
    letters = "abcdefghijk"
    for e in einsums:
        eq = canon[e].params["equation"]
        lhs, rhs = eq.split("->")
        for sub, o in zip(lhs.split(","), canon[e].params["operands"]):
            if isinstance(o, torch.fx.Node) and _derives(o, act_leaf):
                return f"{sub}->{rhs}"
    ys = letters[:ny]
    return f"{ys[ny - nx:]}->{ys}"


def _derives(node, leaf):
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is leaf:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


_CONJ = {"conj", "_conj", "conj_physical", "resolve_conj"}


def _filter_ffts(static_leaves, canon, info):
    """(FFT, conjugation or None) for each static FFT that produced the filter spectra (walking
    back through scaling / broadcasts): the conjugate spectrum of a real filter is the filter
    reversed in time, its lags at -(Lk-1) .. 0 of the circular convolution."""
    found, stack, seen = [], [(n, None) for n in static_leaves], set()
    while stack:
        n, conj = stack.pop(0)
        if (n, conj) in seen:
            continue
        seen.add((n, conj))
        if canon[n].op in ("rfft", "fft"):
            found.append((n, conj))
        elif canon[n].op in _SPECTRAL_WALK:
            flip = canon[n].fn in _CONJ
            here = (None if conj is not None else n) if flip else conj  # two conjugations cancel
            stack.extend((i, here) for i in canon[n].inputs if info[i].dep == "static")
    return found


def _output_window(out, dim, canon, info):
    """Follow the convolution's output on its FFT dim through rolls to the window of positions
    taken from it (a slice, a narrow, or an index_select of an arange):
    (output node, (start, end) or None, the static nodes of the window's index). Output t reads
    the circular convolution at (start + t) mod n: a roll by s moves the window by -s."""
    shift, statics = 0, []
    while len(out.users) == 1:
        u = next(iter(out.users))
        c = canon[u]
        if c.op in TRANSPARENT:
            out = u
        elif c.op == "roll" and c.params["dim"] == (dim,) and _roll_shift(u) is not None:
            shift, out = shift - _roll_shift(u), u
        elif c.op == "slice" and c.params["dim"] == dim and c.params["step"] == 1:
            return u, (shift + _size_value(c.params["start"]), shift + _slice_end(c.params["end"], u, dim)), statics
        elif c.op == "gather" and c.fn == "index_select" and c.params["dim"] == dim and _arange(u.args[2]) is not None:
            start, end = _arange(u.args[2])
            return u, (shift + start, shift + end), _static_closure([u.args[2]], info)
        else:
            break
    return out, ((shift, None) if shift else None), statics


def _roll_shift(node):
    shifts = node.args[1] if len(node.args) > 1 else node.kwargs.get("shifts")
    shifts = shifts[0] if isinstance(shifts, (list, tuple)) and len(shifts) == 1 else shifts
    return _size_value(shifts)


def _size_value(v):
    """An int argument, or a symbolic size node's expression; None for anything else."""
    if isinstance(v, torch.fx.Node):
        val = meta_value(v)
        return sym_expr(val) if isinstance(val, (int, torch.SymInt)) else None
    return v if type(v) is int else (v if isinstance(v, sympy.Expr) else None)


def _slice_end(end, node, dim):
    """A slice's end, clamped by the size it cuts (x[..., :L] of an n-long axis)."""
    size = _size(node.args[0], dim)
    end = size if end is None else _size_value(end)
    return end if isinstance(end, int) and isinstance(size, int) and end <= size else sympy.Min(end, size)


def _arange(node):
    """(start, end) of an index made by arange(start, end) with step 1, else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and "arange" in str(node.target)):
        return None
    args = [_size_value(a) for a in node.args]
    if any(a is None for a in args) or not 1 <= len(args) <= 3:
        return None
    start, end, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) == 3 else 1)
    return (start, end) if step == 1 else None


def _strip_right_pad(node, dim, canon):
    while True:
        c = canon[node]
        last = meta_value(node).dim() - 1 if isinstance(meta_value(node), torch.Tensor) else None
        if c.op != "pad" or dim != last or c.params["mode"] != "constant" or c.params["value"] != 0:
            return node
        if c.params["pad"][0] != 0 or any(v != 0 for v in c.params["pad"][2:]):
            return node
        node = c.inputs[0]


def _reversed_term(filter_nodes, canon, info):
    """A flip or a left zero-pad on the filter's lag axis: a reversed (anti-causal) filter term."""
    for n in filter_nodes:
        c = canon[n]
        if not info[n].dims:
            continue
        if c.op == "flip" and set(c.params["dim"] or ()) & set(info[n].dims):
            return n
        if c.op == "pad" and len(c.params["pad"]) >= 2 and c.params["pad"][0] != 0:
            return n
    return None


def _real_part(node, canon):
    """The real part taken of a complex ifft's output (`.real`, or view_as_real then [..., 0])."""
    users = list(node.users)
    if len(users) != 1:
        return None
    u = users[0]
    if canon[u].op == "complex_view" and canon[u].fn == "real":
        return u
    if canon[u].op == "complex_view" and canon[u].fn == "view_as_real" and len(u.users) == 1:
        s = next(iter(u.users))
        if canon[s].op == "select" and canon[s].params["dim"] == meta_value(u).dim() - 1 and s.args[2] == 0:
            return s
    return None


def match_fft(r, canon, info):
    c = canon[r]
    dim = c.params["dim"]
    acts, statics, bad, einsums = _spectral_leaves(c.inputs[0], canon, info)
    if bad or not acts:
        return None
    if c.op == "ifft":  # a complex convolution: its real part is the output
        real = _real_part(r, canon)
        if real is None:
            return None
        r_out = real
    else:
        r_out = r
    leaf = acts[0]
    fft_arg = canon[leaf].inputs[0]
    x = strip(fft_arg, canon)
    extra = set(acts) | {fft_arg} | ({r} if r_out is not r else set())
    if canon[x].op == "pad" and info[x].dep == "activation":  # explicit zero padding to the FFT size
        extra.add(x)
        x = strip(canon[x].inputs[0], canon)
    extra.discard(x)  # the input is the layer before's value (rfft(x) reads it directly), not the convolution's
    spelling = "complex_fft_conv" if canon[leaf].op == "fft" else ("einsum_fft_conv" if einsums else "fft_conv")
    out, out_slice, window_statics = _output_window(_users_through(r_out, canon), dim, canon, info)
    extra |= set(window_statics)
    m = Match(spelling, r, x, out, "long", out_slice=out_slice)
    m.filter_nodes = _static_closure(statics, info)
    n = c.params["n"]
    m.fft_size = n if n is not None else (_size(c.inputs[0], dim) if c.op == "ifft" else 2 * (_size(c.inputs[0], dim) - 1))
    lengths, firsts, lasts = [], [], []
    for kfft, conj in _filter_ffts(statics, canon, info):  # the filter carries the lag ranges fed to its FFTs
        k, kdim, nk = canon[kfft].inputs[0], canon[kfft].params["dim"], canon[kfft].params["n"]
        nk = _size(k, kdim) if nk is None else nk
        k = _strip_right_pad(k, kdim, canon)  # rfft(k, n) lowers to rfft(pad(k, (0, n - Lk)))
        lk = _size(k, kdim)
        lk = lk if isinstance(lk, int) and isinstance(nk, int) and lk <= nk else sympy.Min(lk, nk)
        lengths.append(lk)
        # the circular lags it occupies: 0 .. lk-1, or conjugated (reversed in time) -(lk-1) .. 0
        firsts.append(-(lk - 1) if conj is not None else 0)
        lasts.append(0 if conj is not None else lk - 1)
        m.conj_node = m.conj_node or conj
        m.reversed_node = m.reversed_node or _reversed_term(_static_closure([k], info), canon, info)
    # a filter given directly as a spectrum carries all n lags
    m.filter_length = (lengths[0] if len(lengths) == 1 else sympy.Max(*lengths)) if lengths else m.fft_size
    if lengths:
        m.filter_support = (firsts[0] if len(firsts) == 1 else sympy.Min(*firsts),
                            lasts[0] if len(lasts) == 1 else sympy.Max(*lasts))
    if len(acts) > 1:
        other = acts[1]
        same = strip(canon[other].inputs[0], canon) is x
        m.problem = ("NONLINEAR", other, "the input is multiplied with its own spectrum") if same else (
            "FILTER_DEPENDS_ON_INPUT", other,
            f"the filter spectrum {other.name} is computed from activations ({canon[other].inputs[0].name})")
        m.filter_nodes = []
    m.input_map = _input_map(x, m.output, einsums, leaf, canon)
    return _finish(m, canon, info, extra)


def _same_layout(x):
    """The input map of an op whose output has its input's layout: "abc->abc"."""
    letters = "abcdefghijk"[: meta_value(x).dim()]
    return f"{letters}->{letters}"


def _positive(expr):
    """True when `expr` (int or sympy) is provably > 0."""
    return bool(expr > 0) if isinstance(expr, int) else bool(sympy.ask(sympy.Q.positive(expr)))


# ---- conv1d -------------------------------------------------------------------------------------

def match_conv1d(cnode, canon, info):
    p = canon[cnode].params
    x0, w = p["x"], p["weight"]
    x = strip(x0, canon)
    extra, left_extra, right_extra = {x0}, 0, 0
    if canon[x].op == "pad" and canon[x].params["mode"] == "constant" and len(canon[x].params["pad"]) == 2:
        left_extra, right_extra = canon[x].params["pad"]
        extra.add(x)
        x = strip(canon[x].inputs[0], canon)
    wv = meta_value(w)
    K = sym_expr(wv.shape[-1])
    dil = p["dilation"]
    pad = p["padding"]
    if pad == "same":
        pad = (dil * (K - 1)) // 2
    elif pad == "valid":
        pad = 0
    left = pad + left_extra
    out = _users_through(cnode, canon)
    users = list(out.users)
    start = 0
    nd = meta_value(cnode).dim()
    if len(users) == 1 and canon[users[0]].op == "slice" and canon[users[0]].params["dim"] == nd - 1:
        start = canon[users[0]].params["start"]
        out = users[0]
    # output t reads inputs t - (left - start) .. t - (left - start) + dil*(K-1): the filter's lags
    # reach left - start (a dilated kernel of 2 taps can reach far), read from the op, never sampled
    reach = left - start + 1 if _positive(left - start + 1) else dil * (K - 1) + 1
    short = isinstance(reach, int) and reach <= SHORT_MAX
    m = Match("conv1d", cnode, x, out, "short" if short else "long", out_slice=(start, None),
              padding=(left, pad + right_extra))
    m.filter_nodes = _static_closure([w] + ([p["bias"]] if isinstance(p["bias"], torch.fx.Node) else []), info)
    m.filter_length = reach
    cin = sym_expr(meta_value(x).shape[1]) if meta_value(x).dim() == 3 else 1
    cout = sym_expr(wv.shape[0])
    nd_in = meta_value(x).dim()
    m.input_map = "abc->abc" if nd_in == 3 else "ac->ac"
    if info[w].dep == "activation":
        m.problem = ("FILTER_DEPENDS_ON_INPUT", w, f"the conv1d weight {w.name} is computed from activations")
        m.filter_nodes = []
    elif p["stride"] != 1:
        m.problem = ("NONLINEAR", cnode, f"stride {p['stride']}: not shift-invariant")
    elif sym_expr(wv.shape[1]) != 1 or cout != cin:
        if not (cin == 1 and cout == 1):
            m.problem = ("CHANNEL_MIXING", cnode,
                         f"conv1d with groups={p['groups']} sums over input channels (weight {list(wv.shape)})")
    elif _positive(start + dil * (K - 1) - left):
        m.problem = ("NON_CAUSAL_PADDING", cnode,
                     f"left padding {left} < kernel reach {dil * (K - 1)} (+ slice start {start}): "
                     f"output t reads inputs up to t+{start + dil * (K - 1) - left}")
    return _finish(m, canon, info, extra)


# ---- running sums -------------------------------------------------------------------------------

def match_scan(node, canon, info):
    """cumsum over positions: y_t = sum_{s<=t} x_s, a long causal convolution with the all-ones filter
    (a running-sum normaliser, a running mean before its division by t + 1)."""
    x = strip(canon[node].inputs[0], canon)
    m = Match("cumsum", node, x, node, "long")
    m.input_map = _same_layout(x)
    return _finish(m, canon, info)


# ---- matrices over positions --------------------------------------------------------------------

def match_position_matrix(node, canon, info):
    """A table over positions applied by a contraction (einsum('ij,bjd->bid', T[:L, :L], x), T @ x):
    a long convolution when the table is lower-triangular Toeplitz, which the numeric checks prove
    (shift-invariance on random inputs, causality by the impulse response, prefix-stability)."""
    x, input_map = info[node].matrix
    m = Match("position_matrix", node, strip(x, canon), node, "long")
    m.input_map = input_map
    m.filter_nodes = _static_closure([n for n in node.all_input_nodes if info[n].dep == "static"], info)
    return _finish(m, canon, info)


# ---- causal delays ------------------------------------------------------------------------------

def match_delay(end, canon, info):
    """A value shifted toward the future with zero fill (F.pad(x, (0, 0, 1, -1)), a cat of zeros and
    x[:, :-1], zeros with x written at [1:]) whose positions axis is whole again at `end`: a short
    causal convolution of its one input, with the filter measured like any other."""
    sources, seen, stack = [], set(), [end]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i in seen or info[i].dep != "activation":
                continue
            seen.add(i)
            (stack if info[i].cls == "delay_part" else sources).append(i)
    x = strip(sources[0], canon)
    m = Match("delay", end, x, end, "short")
    m.filter_length = info[end].delay + 1
    m.region = _region(x, end, info)
    m.filter_nodes = _static_closure([i for n in m.region for i in n.all_input_nodes if info[i].dep == "static"], info)
    m.input_map = _same_layout(x)
    m.claimed = set(m.region)
    if len({strip(s, canon) for s in sources}) > 1:
        m.problem = ("NONLINEAR", end, f"the shifted value {end.name} combines several activations")
    if meta_value(x).shape != meta_value(end).shape:
        m.problem = m.problem or ("NONLINEAR", end, f"the shift changes the value's shape ({list(meta_value(x).shape)} -> "
                                                    f"{list(meta_value(end).shape)})")
    return m


# ---- registered mixers --------------------------------------------------------------------------

def match_registered(node, mixer, canon, info):
    x = node.args[mixer.input_arg]
    m = Match(f"registered:{mixer.name}", node, x, node, mixer.kind, mixer=mixer)
    statics = [a for a in node.all_input_nodes if a is not x]
    bad = [a for a in statics if info[a].dep == "activation"]
    m.filter_nodes = _static_closure(statics, info)
    m.input_map = _same_layout(x)  # the op keeps the input's layout
    if bad:
        m.problem = ("FILTER_DEPENDS_ON_INPUT", bad[0], f"argument {bad[0].name} of {mixer.name} depends on activations")
    m.region = [node]
    m.claimed = {node}
    return m


def run(canon, ctx):
    """Detect pass: -> list of Match, in graph order."""
    info = ctx.time_info
    matches = []
    for node, c in canon.items():
        mixer = registered(node) if node.op == "call_function" else None
        if mixer is not None:
            matches.append(match_registered(node, mixer, canon, info))
        elif info[node].dep != "activation" or info[node].cls != "conv_part":
            continue
        elif c.op in ("irfft", "ifft"):
            m = match_fft(node, canon, info)
            if m is not None:
                matches.append(m)
        elif c.op == "conv1d":
            matches.append(match_conv1d(node, canon, info))
        elif c.op == "scan" and c.fn == "cumsum":
            matches.append(match_scan(node, canon, info))
        elif info[node].matrix:
            matches.append(match_position_matrix(node, canon, info))
    for node in canon:
        if info[node].cls == "delay":
            matches.append(match_delay(node, canon, info))
    order = {n: i for i, n in enumerate(canon)}
    matches.sort(key=lambda m: order[m.conv_node])
    return matches


def dump(matches):
    lines = []
    for m in matches:
        prob = f"  problem={m.problem[0]} at {m.problem[1].name}" if m.problem else ""
        lines.append(f"{m.spelling:18s} {m.kind:5s} in={m.input.name} out={m.output.name} conv={m.conv_node.name} "
                     f"n={m.fft_size} Lh={m.filter_length} slice={m.out_slice} skip={m.skip_node.name if m.skip_node else None} "
                     f"map={m.input_map}{prob}")
    return "\n".join(lines)
