"""Time-axis analysis: which axes of each value carry positions, and what each op does to them.

A value's position axes are the dims whose (symbolic) size depends on the sequence length L: the
time axis itself, a merged (batch x time) axis, an FFT-padded 2L axis or an L+1 frequency axis. For
values computed from user inputs they are 'time' axes; for values computed from parameters,
buffers and positions only ('static'), they are a filter's 'lag' axes.

Each op on activations is then classified:
- local: acts on each position alone (pointwise, casts, reshapes that keep positions, channel
  contractions, prefix slices);
- conv_part: an FFT, pad or conv1d along a position axis: legal only inside a recognised
  convolution (decided by detect);
- mixing: mixes positions (attention, reductions/softmax/cumsum over positions, flips, shifts,
  selects of one position, an unrecognised op) -- illegal unless part of a convolution.
Static ops are 'static', except where L first enters a static value ('position_constant': a table
sliced by L, arange(L), linspace(0, 1, L)).
"""

from dataclasses import dataclass

import sympy
import torch

from lcsm_compile.passes.capture import meta_value, sym_expr

LOCAL_OPS = {"pointwise", "mul", "div", "add", "sub", "cast", "identity", "complex_view", "reshape", "transpose",
             "permute", "movedim", "unsqueeze", "squeeze", "expand", "item", "embedding", "batch_norm", "band",
             "factory", "none"}
FFT_OPS = {"rfft", "irfft", "fft", "ifft"}


@dataclass
class TimeInfo:
    dep: str  # "activation" | "static" | "sym"
    dims: tuple  # position axes (time for activations, lag for static values)
    cls: str  # local | conv_part | mixing | static | position_constant | sym | input | param
    why: str = ""

    @property
    def kind(self):
        return None if not self.dims else ("time" if self.dep == "activation" else "lag")


def length_dims(node, cap):
    val = meta_value(node)
    if not isinstance(val, torch.Tensor):
        return ()
    if not cap.symbolic and node.name in cap.alt_shapes and len(cap.alt_shapes[node.name]) == val.dim():
        return tuple(d for d, (a, b) in enumerate(zip(val.shape, cap.alt_shapes[node.name])) if a != b)
    out = []
    for d, s in enumerate(val.shape):
        e = sym_expr(s)
        if cap.symbolic:
            hit = isinstance(e, sympy.Expr) and cap.length_symbol in e.free_symbols
        else:
            hit = e == cap.example_length
        if hit:
            out.append(d)
    return tuple(out)


def _dims(d):
    return () if d is None else (tuple(d) if isinstance(d, (list, tuple)) else (d,))


def classify(c, info_of, cap):
    """(cls, why) for an op whose output depends on activations."""
    op, p = c.op, c.params
    x = c.inputs[0] if c.inputs else None
    tx = info_of[x].dims if x is not None and info_of[x].dep == "activation" else ()
    if op in LOCAL_OPS or op == "output":
        return "local", ""
    if op == "split":
        return ("mixing", "split along positions") if set(_dims(p["dim"])) & set(tx) else ("local", "")
    if op == "slice":
        if p["dim"] in tx and p["start"] != 0:
            return "mixing", f"slice starting at position {p['start']} (a shift)"
        return "local", ""
    if op == "index":
        for e in p["entries"]:
            if e[0] in ("select", "tensor") and e[1] in tx:
                return "mixing", "indexes single positions"
            if e[0] == "slice" and e[1] in tx and e[2] != 0:
                return "mixing", f"slice starting at position {e[2]} (a shift)"
        return "local", ""
    if op in ("select", "gather"):
        return ("mixing", f"{c.fn} along positions") if p["dim"] in tx else ("local", "")
    if op in ("reduce", "softmax", "scan", "layer_norm", "flip", "roll"):
        dims = p.get("dim")
        if (dims is None and tx) or set(_dims(dims)) & set(tx):
            return "mixing", f"{c.fn} over positions"
        return "local", ""
    if op == "group_norm":
        return ("mixing", f"{c.fn} normalizes over positions") if tx else ("local", "")
    if op == "cat":
        return ("mixing", f"{c.fn} along positions") if p["dim"] in length_dims(c.node, cap) else ("local", "")
    if op == "pad":
        nd = meta_value(x).dim()
        padded = [nd - 1 - i // 2 for i, v in enumerate(p["pad"]) if v != 0]
        return ("conv_part", "pad along positions") if set(padded) & set(tx) else ("local", "")
    if op in ("irfft", "ifft"):  # back from a spectrum of activations: positions, whatever its size
        return "conv_part", f"{op} of an activation spectrum"
    if op in FFT_OPS:
        return ("conv_part", f"{op} along positions") if p["dim"] in tx else ("local", "")
    if op == "conv1d":
        w = meta_value(p["weight"]) if isinstance(p["weight"], torch.fx.Node) else None
        if w is not None and sym_expr(w.shape[-1]) == 1 and p["padding"] in (0, "valid", "same"):
            return "local", ""
        return "conv_part", "conv1d along positions"
    if op in ("matmul", "addmm"):
        a, b = (c.inputs + [None, None])[:2] if op == "matmul" else (p.get("x"), p.get("y"))
        ta = info_of[a].dims if isinstance(a, torch.fx.Node) and info_of[a].dep == "activation" else ()
        tb = info_of[b].dims if isinstance(b, torch.fx.Node) and info_of[b].dep == "activation" else ()
        na = meta_value(a).dim() if isinstance(a, torch.fx.Node) else 0
        nb = meta_value(b).dim() if isinstance(b, torch.fx.Node) else 0
        if (na - 1) in ta or (max(nb - 2, 0) in tb and nb >= 1):
            return "mixing", "matmul contracts over positions"
        if ta and tb:
            return "mixing", "matmul of two activations over positions (attention-like)"
        return "local", ""
    if op == "linear":
        return ("mixing", "linear over positions") if x is not None and meta_value(x).dim() - 1 in tx else ("local", "")
    if op == "einsum":
        return _einsum(c, info_of)
    if op == "attention":
        return "mixing", f"{c.fn} (attention over positions)"
    return "mixing", f"unrecognised op {c.fn} on activations"


def _einsum_letter(sub, ndim, d):
    """The subscript letter of dim d; dims under '...' are named '.k' (k counted from the right)."""
    explicit = sub.replace("...", "")
    first = ndim - len(explicit)
    if "..." not in sub or d >= first:
        return explicit[d - first] if "..." in sub else sub[d]
    return f".{ndim - d}"


def _einsum(c, info_of):
    eq = c.params["equation"]
    lhs, out = eq.split("->") if "->" in eq else (eq, None)
    letters = set()
    for sub, o in zip(lhs.split(","), c.params["operands"]):
        if isinstance(o, torch.fx.Node) and info_of[o].dep == "activation":
            letters |= {_einsum_letter(sub, meta_value(o).dim(), d) for d in info_of[o].dims}
    if out is None:
        return "local", ""
    kept = {x for x in letters if x in out or (x.startswith(".") and "..." in out)}
    if letters - kept:
        return "mixing", f"einsum '{eq}' contracts over positions"
    if len(letters) > 1:
        return "mixing", f"einsum '{eq}' pairs positions (attention-like)"
    return "local", ""


def run(canon, ctx):
    """Time-axis pass: {node: COp} -> {node: TimeInfo}."""
    cap = ctx.cap
    info = {}
    for node, c in canon.items():
        if c.op in ("input", "param", "sym"):
            dep = {"input": "activation", "param": "static", "sym": "sym"}[c.op]
            info[node] = TimeInfo(dep, length_dims(node, cap), c.op)
            continue
        deps = {info[i].dep for i in c.inputs}
        dims = length_dims(node, cap)
        if "activation" in deps:
            cls, why = classify(c, info, cap)
            info[node] = TimeInfo("activation", dims, cls, why)
        elif c.op == "output":
            info[node] = TimeInfo("static", (), "local")
        else:
            enters = dims and not any(info[i].dims for i in c.inputs)
            info[node] = TimeInfo("static", dims, "position_constant" if enters else "static")
    return info


def dump(canon, info):
    lines = []
    for node, c in canon.items():
        t = info[node]
        if t.cls in ("sym", "none") or c.op == "none":
            continue
        axes = f"{t.kind}{list(t.dims)}" if t.dims else "-"
        lines.append(f"{node.name:28s} {c.op:12s} {t.dep:10s} {axes:14s} {t.cls}{(' (' + t.why + ')') if t.why else ''}")
    return "\n".join(lines)
