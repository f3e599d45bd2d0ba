"""Canonicalize: map the ATen spellings of an op (as exported, or decomposed to core ATen) to one op
vocabulary. Both capture levels hand over an exported ATen graph (the dynamo graph is exported too).

The FX graph is kept as captured; canonicalize annotates every node with a `COp`: the canonical op
name, its tensor inputs and normalized arguments (dims as non-negative ints, sizes as sympy/int).
Later passes read only COps, never raw targets. The spelling table below is declarative: each row
maps spellings to a canonical op and names the positional arguments.
"""

import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from lcsm_compile.passes.capture import meta_value, sym_expr


@dataclass
class COp:
    node: torch.fx.Node
    op: str
    inputs: list  # tensor-valued input nodes
    params: dict = field(default_factory=dict)
    fn: str = ""  # the spelling it came from

    @property
    def shape(self):
        val = meta_value(self.node)
        return tuple(sym_expr(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


# (canonical op, spellings, positional argument names). Spellings are aten overload-packet names,
# torch function __name__s and Tensor method names, which coincide for most ops.
_TABLE = [
    ("rfft", ["fft_rfft"], ["x", "n", "dim", "norm"]),
    ("irfft", ["fft_irfft"], ["x", "n", "dim", "norm"]),
    ("fft", ["fft_fft"], ["x", "n", "dim", "norm"]),
    ("ifft", ["fft_ifft"], ["x", "n", "dim", "norm"]),
    ("fft_r2c", ["_fft_r2c"], ["x", "dim", "normalization", "onesided"]),
    ("fft_c2r", ["_fft_c2r"], ["x", "dim", "normalization", "last_dim_size"]),
    ("fft_c2c", ["_fft_c2c"], ["x", "dim", "normalization", "forward"]),
    ("conv1d", ["conv1d"], ["x", "weight", "bias", "stride", "padding", "dilation", "groups"]),
    ("convolution", ["convolution", "_convolution"],
     ["x", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"]),
    ("pad", ["pad"], ["x", "pad", "mode", "value"]),
    ("pad", ["constant_pad_nd"], ["x", "pad", "value"]),
    ("slice", ["slice"], ["x", "dim", "start", "end", "step"]),
    ("select", ["select"], ["x", "dim", "index"]),
    ("gather", ["index_select", "gather"], ["x", "dim", "index"]),
    ("cast", ["to", "_to_copy", "type_as", "float", "double", "half", "bfloat16", "type", "_to_dtype"], ["x"]),
    ("identity", ["contiguous", "clone", "detach", "alias", "lift_fresh_copy", "dropout", "lift_fresh",
                  "feature_dropout", "_assert_tensor_metadata", "resolve_conj", "resolve_neg"], ["x"]),
    ("transpose", ["transpose", "swapaxes", "swapdims"], ["x", "dim0", "dim1"]),
    ("transpose", ["t", "numpy_T"], ["x"]),
    ("permute", ["permute"], ["x", "dims"]),
    ("movedim", ["movedim", "moveaxis"], ["x", "source", "destination"]),
    ("reshape", ["view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as"], ["x"]),
    ("unsqueeze", ["unsqueeze"], ["x", "dim"]),
    ("squeeze", ["squeeze"], ["x", "dim"]),
    ("expand", ["expand", "expand_as", "broadcast_to"], ["x"]),
    ("complex_view", ["view_as_real", "view_as_complex", "real", "imag", "conj", "_conj", "conj_physical"], ["x"]),
    ("split", ["split", "split_with_sizes", "tensor_split"], ["x", "size", "dim"]),
    ("split", ["chunk"], ["x", "chunks", "dim"]),
    ("split", ["unbind"], ["x", "dim"]),
    ("mul", ["mul", "multiply"], ["x", "y"]),
    ("div", ["div", "truediv", "divide"], ["x", "y"]),
    ("add", ["add", "iadd"], ["x", "y"]),
    ("sub", ["sub", "rsub", "subtract"], ["x", "y"]),
    ("reduce", ["sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "norm", "logsumexp",
                "argmax", "argmin", "any", "all", "var_mean", "std_mean", "nansum", "nanmean", "median"],
     ["x", "dim", "keepdim"]),
    ("softmax", ["softmax", "_softmax", "log_softmax", "_log_softmax"], ["x", "dim"]),
    ("scan", ["cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"], ["x", "dim"]),
    ("layer_norm", ["layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"], ["x", "normalized_shape"]),
    ("group_norm", ["group_norm", "native_group_norm", "instance_norm"], ["x"]),
    ("batch_norm", ["batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training"], ["x"]),
    ("matmul", ["matmul", "mm", "bmm", "__matmul__"], ["x", "y"]),
    ("linear", ["linear"], ["x", "weight", "bias"]),
    ("addmm", ["addmm", "baddbmm", "addbmm"], ["bias", "x", "y"]),
    ("einsum", ["einsum"], ["equation"]),
    ("attention", ["scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                   "multi_head_attention_forward"], ["q", "k", "v"]),
    ("flip", ["flip", "fliplr"], ["x", "dims"]),
    ("roll", ["roll"], ["x", "shifts", "dims"]),
    ("cat", ["cat", "concat", "concatenate", "stack", "hstack"], ["tensors", "dim"]),
    ("embedding", ["embedding"], ["a", "b"]),
    ("band", ["tril", "triu"], ["x", "diagonal"]),
    ("factory", ["arange", "linspace", "logspace", "zeros", "ones", "full", "empty", "randn", "rand",
                 "tensor", "scalar_tensor", "eye", "zeros_like", "ones_like", "full_like", "empty_like",
                 "randn_like", "rand_like", "new_zeros", "new_ones", "new_full", "new_empty", "polar"], []),
]
_SPELLINGS = {s: (op, names) for op, spellings, names in _TABLE for s in spellings}
_NORM_FWD = {0: "backward", 1: "ortho", 2: "forward"}  # aten normalization int of a forward FFT
_NORM_INV = {2: "backward", 1: "ortho", 0: "forward"}  # ... and of an inverse FFT


def spelling(node):
    t = node.target
    if node.op == "call_method":
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    return getattr(t, "__name__", str(t))


def _pointwise(name):
    """Torch-level names map to the aten op of the same name; its tags say if it is pointwise."""
    packet = getattr(torch.ops.aten, name.strip("_") if name.startswith("__") else name, None)
    try:
        return packet is not None and torch.Tag.pointwise in packet.default.tags
    except AttributeError:
        return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


def _val(a):
    """Argument value: nodes holding SymInts become sympy/int, other nodes stay nodes."""
    if isinstance(a, torch.fx.Node):
        v = meta_value(a)
        if isinstance(v, (torch.SymInt, int)) and not isinstance(v, bool):
            return sym_expr(v)
        return a
    if isinstance(a, (list, tuple)):
        return type(a)(_val(x) for x in a)
    if isinstance(a, slice):
        return slice(_val(a.start), _val(a.stop), _val(a.step))
    return a


def _bind(node, names):
    args = list(node.args)
    bound = dict(zip(names, args))
    bound.update(node.kwargs)
    if names and names[-1] in ("dims",) and len(args) > len(names):  # x.permute(0, 2, 1), x.flip(1, 2)
        bound[names[-1]] = args[len(names) - 1:]
    return {k: _val(v) for k, v in bound.items()}


def _ndim(node):
    v = meta_value(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _dim(d, ndim):
    if d is None or ndim is None:
        return d
    if isinstance(d, (list, tuple)):
        return tuple(_dim(x, ndim) for x in d)
    return int(d) % ndim if ndim else int(d)


def _is_tensorish(v):
    return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v))


def _tensor_inputs(node):
    return [n for n in node.all_input_nodes if _is_tensorish(meta_value(n))]


def canonical(node, roles=None):
    """The COp of one FX node."""
    inputs = _tensor_inputs(node)
    val = meta_value(node)
    if node.op == "placeholder":
        return COp(node, (roles or {}).get(node, "input"), [], {})
    if node.op == "get_attr":
        return COp(node, "param", [], {})
    if node.op == "output":
        return COp(node, "output", inputs, {})
    name = spelling(node)
    if val is None:  # runtime asserts and guards: no value
        return COp(node, "none", inputs, {}, name)
    if not isinstance(val, (torch.Tensor, list, tuple)) or (
            isinstance(val, (list, tuple)) and not any(isinstance(v, torch.Tensor) for v in val)):
        return COp(node, "sym", inputs, {}, name)
    if name == "getitem":
        return _getitem(node, inputs, name)
    if name in _SPELLINGS:
        op, names = _SPELLINGS[name]
        p = _bind(node, names)
        return _normalize(COp(node, op, inputs, p, name))
    if node.target is operator.neg or (name in ("neg", "pow", "abs", "exp") and len(inputs) <= 2) or _pointwise(name):
        return COp(node, "pointwise", inputs, {"fn": name}, name)
    return COp(node, "unknown", inputs, {"target": node.target}, name)


def _normalize(c):
    p = c.params
    nd = _ndim(p["x"]) if isinstance(p.get("x"), torch.fx.Node) else None
    if c.op in ("rfft", "irfft", "fft", "ifft"):
        c.params = {"n": p.get("n"), "dim": _dim(p.get("dim", -1), nd), "norm": p.get("norm") or "backward"}
    elif c.op == "fft_r2c":
        (d,) = p["dim"]
        c.op = "rfft" if p.get("onesided", True) else "fft"
        c.params = {"n": None, "dim": _dim(d, nd), "norm": _NORM_FWD[p["normalization"]]}
    elif c.op == "fft_c2r":
        (d,) = p["dim"]
        c.op = "irfft"
        c.params = {"n": p["last_dim_size"], "dim": _dim(d, nd), "norm": _NORM_INV[p["normalization"]]}
    elif c.op == "fft_c2c":
        (d,) = p["dim"]
        fwd = p["forward"]
        c.op = "fft" if fwd else "ifft"
        c.params = {"n": None, "dim": _dim(d, nd), "norm": (_NORM_FWD if fwd else _NORM_INV)[p["normalization"]]}
    elif c.op in ("conv1d", "convolution"):
        if c.op == "convolution" and (p.get("transposed") or _ndim(p["weight"]) != 3):
            return COp(c.node, "unknown", c.inputs, {"target": c.node.target}, c.fn)
        pad = p.get("padding", 0)
        pad = pad if isinstance(pad, str) else (pad[0] if isinstance(pad, (list, tuple)) else pad)
        one = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731
        c.op = "conv1d"
        c.params = {"x": p["x"], "weight": p["weight"], "bias": p.get("bias"), "stride": one(p.get("stride", 1)),
                    "padding": pad, "dilation": one(p.get("dilation", 1)), "groups": p.get("groups", 1)}
    elif c.op == "pad":
        c.params = {"pad": tuple(p["pad"]), "mode": p.get("mode", "constant"), "value": p.get("value") or 0}
    elif c.op == "slice":
        c.params = {"dim": _dim(p.get("dim", 0), nd), "start": p.get("start") or 0, "end": p.get("end"),
                    "step": p.get("step") or 1}
        if _whole_slice(c):  # x[:, :] (export spells every x[..., i] with one per leading dim)
            c.op, c.params = "identity", {}
    elif c.op in ("select", "gather"):
        c.params = {"dim": _dim(p.get("dim", 0), nd)}
    elif c.op == "cast":
        dtypes = [a for a in list(c.node.args) + list(c.node.kwargs.values()) if isinstance(a, torch.dtype)]
        c.params = {"dtype": dtypes[0] if dtypes else None}
    elif c.op in ("transpose",):
        if "dim0" in p:
            c.params = {"dims": _dim((p["dim0"], p["dim1"]), nd)}
        else:
            c.params = {"dims": (0, 1)}
    elif c.op in ("permute",):
        dims = p["dims"]
        c.params = {"dims": _dim(tuple(dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims), nd)}
    elif c.op in ("reduce", "softmax", "scan", "split"):
        d = p.get("dim", None if c.op == "reduce" else 0)
        c.params = {"dim": None if d is None else _dim(tuple(d) if isinstance(d, (list, tuple)) else (d,), nd),
                    "fn": c.fn}
    elif c.op == "layer_norm":
        k = len(p["normalized_shape"]) if isinstance(p.get("normalized_shape"), (list, tuple)) else 1
        c.params = {"dim": tuple(range(nd - k, nd)) if nd else None}
    elif c.op == "flip":
        dims = p.get("dims", (-1,) if c.fn == "fliplr" else ())
        dims = (dims,) if isinstance(dims, int) else dims
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        c.params = {"dim": _dim(tuple(dims) if isinstance(dims, (list, tuple)) else (dims,), nd)}
    elif c.op == "roll":
        d = p.get("dims")
        c.params = {"dim": None if d is None else _dim(tuple(d) if isinstance(d, (list, tuple)) else (d,), nd)}
    elif c.op == "cat":
        out_nd = _ndim(c.node)
        c.params = {"dim": _dim(p.get("dim", 0), out_nd), "stack": c.fn == "stack"}
    elif c.op == "einsum":
        eq = p["equation"]
        ops = [a for a in c.node.args[1:]]
        ops = ops[0] if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops
        c.params = {"equation": eq.replace(" ", ""), "operands": list(ops)}
    elif c.op == "embedding":
        a, b = p.get("a"), p.get("b")
        ids = a if isinstance(a, torch.fx.Node) and not meta_value(a).is_floating_point() else b
        c.params = {"indices": ids}
    elif c.op in ("mul", "div", "add", "sub"):
        c.params = {"operands": [p.get("x"), p.get("y")]}
    elif c.op == "unsqueeze":
        c.params = {"dim": p.get("dim")}
    else:
        c.params = {k: v for k, v in p.items() if k != "x"}
    return c


def _whole_slice(c):
    p = c.params
    if p["start"] != 0 or p["step"] != 1:
        return False
    end, size = p["end"], meta_value(c.inputs[0]).shape[p["dim"]] if c.inputs else None
    return end is None or (isinstance(end, int) and end >= 2 ** 62) or (size is not None and sym_expr(size) == end)


def _getitem(node, inputs, name):
    src, idx = node.args
    sval = meta_value(src)
    if not isinstance(sval, torch.Tensor):  # an item of a split / chunk result
        return COp(node, "item", inputs, {"index": idx}, name)
    idx = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis and not _is_bool_tensor(i))
    entries, dim = [], 0
    for i in idx:
        if i is Ellipsis:
            dim += sval.dim() - n_real
        elif i is None:
            entries.append(("new", None))
        elif isinstance(i, slice):
            s = _val(i)
            if not (s.start in (None, 0) and s.stop is None and s.step in (None, 1)):
                entries.append(("slice", dim, s.start or 0, s.stop, s.step or 1))
            dim += 1
        elif isinstance(i, torch.fx.Node) and isinstance(meta_value(i), torch.Tensor):
            entries.append(("tensor", dim))
            dim += 1
        else:
            entries.append(("select", dim))
            dim += 1
    real = [e for e in entries if e[0] != "new"]
    if len(real) == 1 and real[0][0] == "slice" and len(entries) == 1:
        _, d, start, stop, step = real[0]
        return COp(node, "slice", inputs, {"dim": d, "start": start, "end": stop, "step": step}, name)
    return COp(node, "index", inputs, {"entries": entries}, name)


def _is_bool_tensor(i):
    return isinstance(i, torch.fx.Node) and isinstance(meta_value(i), torch.Tensor) and meta_value(i).dtype == torch.bool


def dump(canon):
    lines = []
    for c in canon.values():
        if c.op in ("sym",):
            continue
        shp = c.shape
        args = ", ".join(i.name for i in c.inputs)
        ps = {k: v for k, v in c.params.items() if not isinstance(v, torch.fx.Node) and k not in ("operands", "target", "x", "weight", "bias")}
        lines.append(f"{c.node.name} = {c.op}({args}) {ps if ps else ''} :: {list(shp) if shp else ''}".rstrip())
    return "\n".join(lines)


def run(cap, ctx):
    """Canonicalize pass: Captured -> {fx node: COp} in graph order."""
    return {n: canonical(n, cap.roles) for n in cap.gm.graph.nodes}
