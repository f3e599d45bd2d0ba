"""Attention sites: causal attentions the decoder runs on a per-session KV cache.

The time-axis pass declines every contraction that pairs two position axes (q k^T, p v, SDPA).
This pass recognises the ones that form an attention and decides each from the op semantics:

- `F.scaled_dot_product_attention(q, k, v, is_causal=True)`, or with an `attn_mask` proven causal;
- the explicit spelling: a contraction of q and k over their feature dim (matmul / bmm / einsum,
  k transposed or not), a chain of scalings (mul / div by constants), additive masks, masked_fill
  or where, then softmax over the key axis, then a contraction with v over the key axis.

A mask is proven, never assumed: it must be computed from parameters, buffers, positions and shapes
only (else MASK_FROM_INPUT), and evaluated at several lengths it must block exactly the keys after
the query: the causal triangle (else NON_CAUSAL_MASK when some query sees a later key, SLIDING_WINDOW
for a causal band, UNSUPPORTED_ATTENTION for any other pattern or an additive bias). "Blocks" means
-inf, or a finite fill of at most -1e9 (HF's finfo.min, GPT-2's -1e10): softmax weighs such a key
exp(-1e9) = 0 exactly, in every float dtype, unless the scores themselves are ~1e9 apart. A fill in
(-1e9, -1000] (GPT-2's -10000) blocks the same way while the scores stay within |fill| - 746 of each
other (exp underflows to exactly 0 below -745 in float64, -104 in float32): accepted, the report says
so, and the translation validation confirms it on the model's scores. A larger fill (-10, 0) leaks
weight to the future and is NON_CAUSAL_MASK. A band wider than the lengths the
mask is evaluated at (MASK_LENGTHS) would look causal there: the translation validation is the backstop.

Every recognised site claims its nodes (q/k/v to output), as a convolution's Match claims its
region, so the rest of the analysis sees one site with one verdict; its output becomes a time-local
value on the query's time axis (downstream nodes are re-classified when that differs from the guess
the time-axis pass made). Accepted sites carry an AttentionStructure for the decode rewrite.
"""

import math
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from lcsm_compile.passes.capture import NeedsActivation, meta_value, normalized_args, sym_expr
from lcsm_compile.passes.detect import TRANSPARENT, strip
from lcsm_compile.passes.properties import _describe, check_lengths
from lcsm_compile.passes.time_axis import CONTRACTIONS, Axis, TimeInfo, revisit
from lcsm_compile.report import AttentionStructure, Candidate, Reason, Verdict

BLOCKED = -1e9  # a mask value at or below this weighs its key exp(BLOCKED) = 0: the key is masked
UNDERFLOW = -1000.0  # at or below this, exp(fill + score gap) is exactly 0 while the gap stays under |fill| - 746
MASK_LENGTHS = 256  # masks are also evaluated at min(max_len, this): a band narrower than it is seen
_SDPA = {"scaled_dot_product_attention"}
_UNIFORM_FILLS = {torch.ops.aten.full_like.default, torch.ops.aten.full.default, torch.ops.aten.new_full.default}
# ops that read only a tensor's shape, dtype and device: a fill built like the scores leaks nothing
_METADATA_ONLY = {torch.ops.aten.full_like.default, torch.ops.aten.zeros_like.default, torch.ops.aten.ones_like.default,
                  torch.ops.aten.empty_like.default, torch.ops.aten.sym_size.int}


@dataclass
class Site:
    node: torch.fx.Node  # the SDPA call or the softmax (its source line names the site)
    output: torch.fx.Node
    spelling: str
    claimed: set = field(default_factory=set)
    candidate: Candidate = None


class _Declined(Exception):
    def __init__(self, reason, why, at=None):
        super().__init__(why)
        self.reason, self.why, self.at = reason, why, at


def run(canon, ctx):
    """-> [Site] in graph order; accepted sites' candidates carry an AttentionStructure."""
    info, sites = ctx.time_info, []
    for node, c in canon.items():
        if info.get(node) is None or info[node].dep != "activation" or info[node].cls != "mixing" \
                or any(node in s.claimed for s in sites):
            continue
        try:
            found = _recognise(node, c, canon, info)
        except _Declined as exc:  # a structure too odd to even lay out: still one site with a reason
            site = Site(node, node, c.fn or c.op)
            site.claimed = {node}
            site.candidate = _candidate(site, ctx, exc.reason, exc.why, exc.at)
            sites.append(site)
            continue
        if found is None:
            continue
        site, parts = found
        try:
            structure = _decide(site, parts, canon, info, ctx)
            site.candidate = _candidate(site, ctx, None, _accepted_text(structure, parts), None, structure)
        except _Declined as exc:
            site.candidate = _candidate(site, ctx, exc.reason, exc.why, exc.at)
        sites.append(site)
        _retime(site, parts, info, ctx)
    return sites


# ---- structure -----------------------------------------------------------------------------------

def _acts(nodes, info):
    return [n for n in nodes if isinstance(n, torch.fx.Node) and info.get(n) is not None and info[n].dep == "activation"]


def _specs(node):
    """(letters of each operand, output letters) of a contraction (time_axis's tables)."""
    name = node.target._overloadpacket.__name__ if isinstance(node.target, torch._ops.OpOverload) else ""
    if name not in CONTRACTIONS:
        return None
    specs, out = CONTRACTIONS[name](None, node, normalized_args(node))
    return specs, out


def _time_letter(node, letters, info):
    t = info[node]
    if t.axis is None:
        return None
    return letters[t.axis.dim]


def _recognise(node, c, canon, info):
    """(Site, parts) when `node` ends an attention, else None (left to the time-axis verdict)."""
    if c.fn in _SDPA or (isinstance(node.target, torch._ops.OpOverload) and node.target._overloadpacket.__name__ in _SDPA):
        return _recognise_sdpa(node, canon, info)
    if c.op not in ("matmul", "einsum"):
        return None
    spec = _specs(node)
    if spec is None:
        return None
    (specs, lo) = spec
    acts = [(n, s) for n, s in specs if n in info and info[n].dep == "activation"]
    if len(acts) != 2:
        return None
    for (p, lp), (v, lv) in (acts, acts[::-1]):
        sm = strip(p, canon)
        if canon[sm].op == "softmax" and canon[sm].fn in ("softmax", "_softmax") and _acts(canon[sm].inputs, info):
            return _recognise_softmax(node, sm, p, lp, v, lv, lo, canon, info)
    return None


def _recognise_sdpa(node, canon, info):
    args = normalized_args(node)
    q, k, v = args["query"], args["key"], args["value"]
    if any(info[n].axis is None for n in (q, k, v) if n in info) or any(n not in info for n in (q, k, v)):
        raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"{node.name}: q, k or v has no positions axis")
    nd = meta_value(q).dim()
    letters = "abcdefgh"[: nd - 2]
    parts = {
        "kind": "sdpa", "q": q, "k": k, "v": v, "lq": letters + "TF", "lk": letters + "SF", "lv": letters + "SV",
        "ls": letters + "TS", "lo": letters + "TV", "lp": letters + "TS", "tq": "T", "tk": "S", "heads": letters,
        "mask": args.get("attn_mask"), "is_causal": bool(args.get("is_causal")), "dropout": args.get("dropout_p") or 0.0,
        "scale": args.get("scale"), "gqa": bool(args.get("enable_gqa")), "chain": [],
    }
    for name, n, t in (("q", q, nd - 2), ("k", k, nd - 2), ("v", v, nd - 2)):
        if info[n].axis.dim != t:
            raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"{node.name}: {name}'s positions are not on dim -2")
    site = Site(node, node, "sdpa")
    site.claimed = _region({q, k, v}, node, info)
    return site, parts


def _recognise_softmax(out, sm, p, lp, v, lv, lo, canon, info):
    """out = p @ v, p = softmax(chain(q k^T))."""
    chain, n = [], _acts(canon[sm].inputs, info)[0]
    while True:  # back from the softmax input to the score contraction
        c = canon[n]
        if c.op in TRANSPARENT:
            chain.append(("cast", n, None))
            n = c.inputs[0]
        elif c.op in ("matmul", "einsum") and _specs(n) is not None and len(_acts([a for a, _ in _specs(n)[0]], info)) == 2:
            break
        else:
            step = _chain_step(n, c, info)
            if step is None:
                return None
            chain.append(step)
            n = step[3]
        if n not in info or info[n].dep != "activation":
            return None
    qk, (specs, ls) = n, _specs(n)
    (q, lq), (k, lk) = [(a, s) for a, s in specs if a in info and info[a].dep == "activation"]
    tq, tk = _time_letter(q, lq, info), _time_letter(k, lk, info)
    sd = normalized_args(sm).get("dim")  # the schema's int (the canonical params hold a tuple)
    sd = sd % len(ls) if isinstance(sd, int) else sd
    if tq is None or tk is None or tq == tk or tq not in ls or tk not in ls:
        return None
    if sd != ls.index(tk):
        if sd == ls.index(tq):  # softmax over the query axis: q and k swapped
            q, lq, k, lk, tq, tk = k, lk, q, lq, tk, tq
        else:
            return None
    site = Site(sm, out, "softmax")
    site.claimed = _region({q, k, v}, out, info)
    parts = {"kind": "softmax", "q": q, "k": k, "v": v, "lq": lq, "lk": lk, "lv": lv, "ls": ls, "lo": lo, "lp": lp,
             "tq": tq, "tk": tk, "chain": chain[::-1], "qk": qk, "softmax": sm, "p": p}
    return site, parts


def value_operands(node):
    return [a for a in node.all_input_nodes if isinstance(meta_value(a), torch.Tensor)]


def _chain_step(n, c, info):
    """One op between q k^T and softmax: ("scale" | "add" | "fill", node, operand, chain input)."""
    args = normalized_args(n) if isinstance(n.target, torch._ops.OpOverload) else {}
    name = n.target._overloadpacket.__name__ if isinstance(n.target, torch._ops.OpOverload) else ""
    act = lambda a: isinstance(a, torch.fx.Node) and a in info and info[a].dep == "activation"  # noqa: E731
    if name in ("mul", "div"):
        a, b = args.get("self"), args.get("other")
        if act(a) and not act(b):
            return ("mul" if name == "mul" else "div", n, b, a)
        if name == "mul" and act(b) and not act(a):
            return ("mul", n, a, b)
        if act(a) and act(b):
            return ("bias", n, b, a)  # a score scaled by an activation: declined in _decide
        return None
    if name in ("add", "sub"):
        a, b = args.get("self"), args.get("other")
        if name == "add" and act(b) and (not act(a) or _is_score_like(b, info, n)):
            a, b = b, a
        if act(a):
            if args.get("alpha", 1) != 1:
                return None
            return ("add" if name == "add" else "sub", n, b, a)
        return None
    if name == "masked_fill":
        return ("fill", n, (args.get("mask"), args.get("value")), args.get("self", args.get("input")))
    if name == "where":
        cond, a, b = args.get("condition"), args.get("self", args.get("input")), args.get("other")
        if act(a) and not (act(b) and _is_score_like(b, info, n)):
            return ("keep", n, (cond, b), a)  # where(cond, scores, fill): keeps scores where cond
        if act(b):
            return ("fill", n, (cond, a), b)  # where(cond, fill, scores): fills where cond
        return None
    return None


def _is_score_like(node, info, user):
    """Of two activation operands, the score is the one of the user's full shape with two position axes."""
    v, u = meta_value(node), meta_value(user)
    return isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(u.shape)


def _region(inputs, out, info):
    """Activation nodes on paths from `inputs` (excluded) to `out` (included)."""
    anc, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in anc or n in inputs:
            continue
        anc.add(n)
        stack.extend(i for i in n.all_input_nodes if info.get(i) is not None and info[i].dep == "activation")
    down, stack = set(), list(inputs)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in anc and u not in down:
                down.add(u)
                stack.append(u)
    return down | {out}


# ---- verdict -------------------------------------------------------------------------------------

def _decide(site, parts, canon, info, ctx):
    cap = ctx.cap
    q, k, v, out = parts["q"], parts["k"], parts["v"], site.output
    for name, n in (("q", q), ("k", k), ("v", v)):
        a = info[n].axis
        if a is None or not a.aligned or a.inner != 1:
            raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"{name} ({n.name}) of the attention is not a plain per-position "
                                                           f"value (its positions are shifted or merged with other dims)", n)
    leaked = sorted(u.name for r in site.claimed if r is not out for u in r.users
                    if u not in site.claimed and u.op != "call_module" and meta_value(u) is not None  # not export's guards
                    and u.target not in _METADATA_ONLY)
    if leaked:
        raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"the attention's scores or weights are also used by {leaked[0]}: "
                                                       "a KV-cache decoder computes only the attention output", site.node)
    if parts["kind"] == "sdpa":
        if not (isinstance(parts["dropout"], (int, float)) and parts["dropout"] == 0):
            raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"dropout_p={parts['dropout']}: decoding needs a deterministic attention", site.node)
        masks = _sdpa_masks(site, parts, info)
        e = int(meta_value(q).shape[-1])
        scale_ops = [("mul", float(parts["scale"]) if parts["scale"] is not None else 1.0 / math.sqrt(e))]
    else:
        masks, scale_ops = _chain_masks(site, parts, info, ctx)
    _prove_causal(site, parts, masks, ctx)
    return _structure(site, parts, scale_ops, ctx)


def _sdpa_masks(site, parts, info):
    mask = parts["mask"]
    if mask is None:
        if parts["is_causal"]:
            return [("causal", None)]
        raise _Declined(Reason.NON_CAUSAL_MASK, f"{site.node.name}: scaled_dot_product_attention without a mask and with "
                                                 "is_causal=False: every position attends to every later one", site.node)
    if isinstance(mask, torch.fx.Node) and info[mask].dep == "activation":
        raise _Declined(Reason.MASK_FROM_INPUT, f"attn_mask {mask.name} is computed from the input: its causality "
                                                 "cannot be proven for every input", mask)
    dtype = meta_value(mask).dtype
    return [("allow" if dtype == torch.bool else "add", mask)]


def _chain_masks(site, parts, info, ctx):
    masks, scale_ops = [], []
    for step in parts["chain"]:
        kind, n = step[0], step[1]
        if kind == "cast":
            continue
        if kind == "bias":
            raise _Declined(Reason.MASK_FROM_INPUT, f"{n.name} scales the scores by activation {step[2].name}", n)
        if kind in ("mul", "div"):
            value = _constant(step[2], ctx, n)
            if value is None:
                raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"{n.name} scales the scores by a non-scalar", n)
            if not value > 0:
                raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"{n.name} scales the scores by {value}: not a positive "
                                                               "temperature", n)
            scale_ops.append((kind, value))
            continue
        if kind in ("add", "sub"):
            other = step[2]
            if isinstance(other, torch.fx.Node) and info[other].dep == "activation":
                raise _Declined(Reason.MASK_FROM_INPUT, f"{n.name} adds {other.name}, computed from the input, to the "
                                                         "scores: its causality cannot be proven", other)
            if not isinstance(other, torch.fx.Node):
                continue  # a constant offset: softmax ignores it
            masks.append(("add" if kind == "add" else "sub", other))
            continue
        mask, fill = step[2]
        if isinstance(mask, torch.fx.Node) and info[mask].dep == "activation":
            raise _Declined(Reason.MASK_FROM_INPUT, f"{n.name}: mask {mask.name} is computed from the input: its "
                                                     "causality cannot be proven", mask)
        value = _constant(fill, ctx, n) if fill is not None else None
        if value is None:
            raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"{n.name} fills the scores with a non-constant value", n)
        if not value <= UNDERFLOW:
            raise _Declined(Reason.NON_CAUSAL_MASK, f"{n.name} fills masked scores with {value:g}: softmax still gives "
                                                     f"those keys weight (a mask fills -inf, or at most {UNDERFLOW:g})", n)
        _finite_fill(parts, value)
        masks.append(("fill" if kind == "fill" else "allow", mask))
    if not masks:
        raise _Declined(Reason.NON_CAUSAL_MASK, f"{site.node.name}: softmax over every key position with no mask: every "
                                                 "position attends to every later one", site.node)
    sm_dtype = normalized_args(parts["softmax"]).get("dtype")
    parts["softmax_dtype"] = sm_dtype
    return masks, scale_ops


def _constant(a, ctx, at):
    """A scalar constant operand (python number, or a one-element static tensor) as a float."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    if isinstance(a, torch.fx.Node):
        if a.op == "call_function" and a.target in _UNIFORM_FILLS:  # full_like(scores, -inf): one value everywhere
            fill = a.args[1]
            return float(fill) if isinstance(fill, (int, float)) and not isinstance(fill, bool) else None
        if ctx.time_info[a].dep == "activation":
            return None
        val = meta_value(a)
        if isinstance(val, (torch.SymInt, torch.SymFloat)):
            e = sym_expr(val)
            return float(e) if not isinstance(e, sympy.Expr) or not e.free_symbols else None
        if not isinstance(val, torch.Tensor) or val.numel() != 1 or ctx.time_info[a].length_dependent:
            return None
        try:
            return float(ctx.runner.evaluate([a], check_lengths(ctx.cap)[0])[0].reshape(()))
        except Exception:  # noqa: BLE001 - a scale we cannot evaluate is not a constant
            return None
    return None


def _mask_lengths(cap):
    return sorted({*check_lengths(cap), min(cap.max_len, MASK_LENGTHS)})


def _prove_causal(site, parts, masks, ctx):
    """The keys the masks block, at several lengths, must be exactly those after the query."""
    if masks == [("causal", None)]:
        return
    for n in _mask_lengths(ctx.cap):
        blocked = torch.zeros(n, n, dtype=torch.bool)
        for kind, node in masks:
            try:
                m = ctx.runner.evaluate([node], n)[0]
            except NeedsActivation as exc:
                raise _Declined(Reason.MASK_FROM_INPUT, f"mask {node.name} reads input {exc}: its causality cannot be "
                                                         "proven", node) from None
            m2 = _square(m, parts, n, node)
            if kind in ("fill", "allow"):
                if m2.dtype != torch.bool:
                    m2 = m2 != 0
                blocked |= m2 if kind == "fill" else ~m2
            else:
                m2 = m2.double() * (-1 if kind == "sub" else 1)
                bias = (m2 != 0) & (m2 > UNDERFLOW)
                if bias.any():
                    i, j = [int(x) for x in bias.nonzero()[0]]
                    raise _Declined(Reason.UNSUPPORTED_ATTENTION,
                                    f"mask {node.name} adds a finite bias ({float(m2[i, j]):g} at query {i}, key {j}) to "
                                    "the scores: only 0 / -inf masks are decoded (a position bias such as ALiBi is not)", node)
                blocks = m2 <= UNDERFLOW
                blocked |= blocks
                if blocks.any():
                    _finite_fill(parts, float(m2[blocks].max()))
        _check_triangle(blocked, n, site, masks)


def _finite_fill(parts, value):
    """Record the largest finite mask value above BLOCKED: it blocks only while the scores stay close."""
    if BLOCKED < value <= UNDERFLOW:
        parts["finite_fill"] = max(parts.get("finite_fill", value), value)


def _square(m, parts, n, node):
    """The mask as [query, key] (it may broadcast over heads and batch; it must not vary over them)."""
    ls = parts["ls"]
    m = m.reshape(*([1] * (len(ls) - m.dim())), *m.shape)
    m = m.movedim((ls.index(parts["tq"]), ls.index(parts["tk"])), (-2, -1))
    m = m.expand(*m.shape[:-2], n if m.shape[-2] == 1 else m.shape[-2], n if m.shape[-1] == 1 else m.shape[-1])
    if tuple(m.shape[-2:]) != (n, n):
        raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"mask {node.name} of shape {tuple(m.shape)} is not [L, L] at L={n}", node)
    flat = m.reshape(-1, n, n)
    if not all(torch.equal(flat[0], f) for f in flat[1:]):
        raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"mask {node.name} differs between heads or batch rows", node)
    return flat[0]


def _check_triangle(blocked, n, site, masks):
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    if torch.equal(blocked, future):
        return
    node = next((m for _, m in masks if m is not None), site.node)
    seen = ~blocked & future
    if seen.any():
        i, j = [int(x) for x in seen.nonzero()[0]]
        what = "masks nothing" if not blocked.any() else f"lets query {i} attend to the later key {j}"
        raise _Declined(Reason.NON_CAUSAL_MASK, f"mask {node.name} {what} at L={n}: not causal", node)
    allowed = ~blocked
    w = int(allowed[n - 1].sum())
    band = torch.ones(n, n, dtype=torch.bool).tril() & ~torch.ones(n, n, dtype=torch.bool).tril(-w)
    if torch.equal(allowed, band):
        raise _Declined(Reason.SLIDING_WINDOW, f"mask {node.name} is a sliding window of {w} keys at L={n}: a causal band, "
                                                "not the whole prefix a KV cache attends over", node)
    i = int((allowed != torch.ones(n, n, dtype=torch.bool).tril()).any(1).nonzero()[0])
    raise _Declined(Reason.UNSUPPORTED_ATTENTION, f"mask {node.name} blocks some earlier keys of query {i} at L={n}: "
                                                   "not the causal triangle", node)


# ---- layout --------------------------------------------------------------------------------------

def _structure(site, parts, scale_ops, ctx):
    cap = ctx.cap
    q, k, v = parts["q"], parts["k"], parts["v"]
    lq, lk, lv, ls, lo, lp = parts["lq"], parts["lk"], parts["lv"], parts["ls"], parts["lo"], parts["lp"]
    tq, tk = parts["tq"], parts["tk"]
    info = ctx.time_info
    heads = [c for c in ls if c not in (tq, tk)]
    feat = [c for c in lq if c not in ls]
    bad = lambda why: _Declined(Reason.UNSUPPORTED_ATTENTION, why, site.node)  # noqa: E731
    if len(feat) != 1 or feat[0] not in lk or any(c not in ls for c in lk if c != feat[0]):
        raise bad(f"the scores {parts.get('qk', site.node).name} are not q k^T over one feature dim")
    if sorted(lq) != sorted(heads + [tq] + feat) or sorted(lk) != sorted(heads + [tk] + feat):
        raise bad("q and k do not carry the same head dims as the scores (broadcast or grouped heads are not decoded)")
    # value side: P's letters in the p @ v contraction
    pl = {c: lp[ls.index(c)] for c in ls}
    tv = _time_letter(v, lv, info)
    if tv != pl[tk] or pl[tk] in lo or pl[tq] not in lo:
        raise bad("the value contraction is not over the key positions")
    vfeat = [c for c in lv if c not in lp]
    ph = [pl[c] for c in heads]
    if len(vfeat) != 1 or sorted(lv) != sorted(ph + [tv] + vfeat) or sorted(lo) != sorted(ph + [pl[tq]] + vfeat):
        raise bad("v and the output do not carry the scores' head dims (broadcast or grouped heads are not decoded)")
    sizes = lambda n, letters, want: [sym_expr(meta_value(n).shape[letters.index(c)]) for c in want]  # noqa: E731
    hq, hk, hv = sizes(q, lq, heads), sizes(k, lk, heads), sizes(v, lv, ph)
    # k and v may broadcast one head over every query head (multi-query attention): the cache
    # then holds that one head
    if any(not _same(a, b) and not _same(b, 1) or not _same(a, c) and not _same(c, 1) for a, b, c in zip(hq, hk, hv)):
        raise bad(f"q, k and v have different head sizes ({hq}, {hk}, {hv}): grouped-query heads that do not "
                  "broadcast (one k/v head for all) are not decoded")
    # the batch row leads the heads: move the head dim of the batch's size first
    if not heads:
        raise bad("the attention has no batch dim")
    B = cap.batch_symbol if cap.batch_symbol is not None else int(cap.user_inputs[0].shape[0])
    lead = next((i for i, s in enumerate(hq) if _multiple_of(s, B)), None)
    if lead is None:
        raise bad(f"no head dim of q (sizes {hq}) holds the batch rows")
    order = [heads[lead]] + [c for i, c in enumerate(heads) if i != lead]
    perms = {"q": [lq.index(c) for c in order] + [lq.index(tq), lq.index(feat[0])],
             "k": [lk.index(c) for c in order] + [lk.index(tk), lk.index(feat[0])],
             "v": [lv.index(pl[c]) for c in order] + [lv.index(tv), lv.index(vfeat[0])]}
    canon_out = [pl[c] for c in order] + [pl[tq], vfeat[0]]
    out_perm = [canon_out.index(c) for c in lo]
    example = {c: int(cap.size_at(s, cap.example_length)) for c, s in zip(heads, hq)}
    batch = int(cap.user_inputs[0].shape[0])
    g = math.prod(example.values())
    if g % batch:
        raise bad(f"the head dims {list(example.values())} do not split into {batch} batch rows")
    head_dim = int(sym_expr(meta_value(q).shape[lq.index(feat[0])]))
    value_dim = int(sym_expr(meta_value(v).shape[lv.index(vfeat[0])]))
    return AttentionStructure(spelling=parts["kind"], q=q, k=k, v=v, output=site.output, perms=perms,
                              head_dims=tuple(range(len(order))), out_perm=out_perm, scale_ops=scale_ops,
                              heads=g // batch, head_dim=head_dim, value_dim=value_dim, max_len=cap.max_len,
                              softmax_dtype=parts.get("softmax_dtype"))


def _same(a, b):
    return a == b if isinstance(a, int) and isinstance(b, int) else sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def _multiple_of(size, batch):
    if isinstance(batch, int):
        return isinstance(size, int) and size % batch == 0 or (isinstance(size, sympy.Expr) and not size.free_symbols
                                                               and int(size) % batch == 0)
    ratio = sympy.simplify(sympy.sympify(size) / batch)
    return batch not in ratio.free_symbols and ratio.is_integer is not False and sympy.fraction(sympy.cancel(ratio))[1] == 1


def _retime(site, parts, info, ctx):
    """The attention output is a time-local value on the query's time axis."""
    out = site.output
    if "lp" not in parts:
        return
    pl = {c: parts["lp"][parts["ls"].index(c)] for c in parts["ls"]}
    letter = pl[parts["tq"]]
    if letter not in parts["lo"]:
        return
    axis = Axis(parts["lo"].index(letter))
    old = info.get(out)
    info[out] = TimeInfo("activation", axis, "local", "causal attention output (KV cache)")
    if old is None or old.axis != axis:
        revisit(ctx, out)


# ---- report --------------------------------------------------------------------------------------

def _accepted_text(s, parts):
    mask = "is_causal=True" if parts["kind"] == "sdpa" and parts.get("mask") is None else "mask proven the causal triangle"
    scale = " ".join(f"{'x' if op == 'mul' else '/'}{v:.6g}" for op, v in s.scale_ops) or "1"
    fill = parts.get("finite_fill")
    finite = "" if fill is None else (f"; masked keys get a finite {fill:g}, exactly 0 after the softmax while the "
                                      f"scores stay within {-fill - 746:g} of each other (the translation "
                                      "validation confirms it)")
    return (f"causal attention ({mask}), scale {scale}: a KV cache of {s.max_len} positions, {s.heads} heads of "
            f"{s.head_dim} per batch row{finite}")


def _candidate(site, ctx, reason, why, at, structure=None):
    cap = ctx.cap
    path, src = _describe(site.node)
    if reason is not None and isinstance(at, torch.fx.Node) and at is not site.node:
        at_src = _describe(at)[1]
        why = f"{why}; at {at.name}" + (f", {at_src}" if at_src and at_src != src else "")
    val = meta_value(site.output)
    return Candidate(name=site.output.name, spelling=f"attention:{site.spelling}", kind="attention",
                     verdict=Verdict.ACCEPTED if reason is None else Verdict.REJECTED, reason=reason,
                     explanation=why if reason is None else f"{why} ({src or site.node.name})",
                     module_path=path, source=src, offending=None if reason is None else getattr(at, "name", site.node.name),
                     length=str(cap.length_symbol if cap.symbolic else cap.example_length), max_len=cap.max_len,
                     channels=structure.heads * structure.head_dim if structure is not None else None,
                     dtype=str(getattr(val, "dtype", "")).replace("torch.", ""), attention=structure,
                     input=",".join(n.name for n in (structure.q, structure.k, structure.v)) if structure else None,
                     output=site.output.name)


def claimed(sites):
    return set().union(*(s.claimed for s in sites)) if sites else set()


def dump(sites):
    return "\n".join(f"{s.candidate.name}: {s.spelling} {s.candidate.verdict.value} "
                     f"{s.candidate.reason.value if s.candidate.reason else ''} {s.candidate.explanation}" for s in sites)
