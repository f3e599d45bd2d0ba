"""The legality Report: every convolution candidate, every attention site and every time-mixing op,
each with a verdict.

A model is decodable iff every op that mixes positions is an ACCEPTED convolution or an ACCEPTED
causal attention (decoded on a KV cache, passes/attention.py) and the
whole-model safety net (causality + prefix stability on random inputs) passed. A model with no
time mixing at all is trivially position-wise: it is reported NOT decodable with a NO_CONVOLUTION
note, because there is nothing for the decoder to speed up.
"""

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


class Verdict(str, Enum):
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"


class Reason(str, Enum):
    WRAP_AROUND = "WRAP_AROUND"  # FFT size n < L + Lh - 1 for some served L: circular, not causal
    NON_CAUSAL_PADDING = "NON_CAUSAL_PADDING"  # conv1d padding lets output t read inputs after t
    BIDIRECTIONAL_FILTER = "BIDIRECTIONAL_FILTER"  # a reversed filter term feeds negative lags
    NOT_CAUSAL_SLICE = "NOT_CAUSAL_SLICE"  # the output is not the slice [0, L) of the full conv
    FILTER_DEPENDS_ON_INPUT = "FILTER_DEPENDS_ON_INPUT"  # the filter is computed from activations
    FILTER_DEPENDS_ON_LENGTH = "FILTER_DEPENDS_ON_LENGTH"  # the filter changes with L beyond slicing
    NONLINEAR = "NONLINEAR"  # the map input -> output is not linear and shift-invariant
    CHANNEL_MIXING = "CHANNEL_MIXING"  # a conv that sums over input channels (not depthwise)
    NUMERIC_MISMATCH = "NUMERIC_MISMATCH"  # extracted filter + skip do not reproduce the subgraph
    TIME_MIXING_OP = "TIME_MIXING_OP"  # mixes positions and is not an accepted convolution
    CAUSALITY_CHECK_FAILED = "CAUSALITY_CHECK_FAILED"  # whole-model safety net failed
    LENGTH_DEPENDENT = "LENGTH_DEPENDENT"  # a value computed from the length L changes with L beyond slicing
    CAPTURE_FAILED = "CAPTURE_FAILED"  # the model could not be captured / a pass failed on it
    DECODE_MISMATCH = "DECODE_MISMATCH"  # the built decoder does not reproduce the model (translation validation)
    # attention sites (passes/attention.py)
    NON_CAUSAL_MASK = "NON_CAUSAL_MASK"  # the attention lets a position see later ones (no mask, full or reversed mask)
    MASK_FROM_INPUT = "MASK_FROM_INPUT"  # the mask (or bias) is computed from activations: not provable
    SLIDING_WINDOW = "SLIDING_WINDOW"  # a causal band: older keys are dropped, which a full KV cache does not do
    UNSUPPORTED_ATTENTION = "UNSUPPORTED_ATTENTION"  # causal-looking, but a structure the KV-cache decoder does not run


@dataclass(frozen=True)
class ModalForm:
    """A long convolution's filter proved a sum of exponentials (passes/modal.py): h = Re sum r p^t."""

    poles: torch.Tensor  # [C, N] complex128, |p| <= 1 (zero where a channel has fewer modes)
    residues: torch.Tensor  # [C, N] complex128 (zero where a channel has fewer modes)
    rel_err: float  # max over channels of ||Re sum r p^t - h|| / ||h|| over t in [0, Lh)
    modes: tuple  # modes per channel (N is their max)

    def __str__(self):
        return (f"modal: {self.poles.shape[1]} poles per channel, |p| <= {float(self.poles.abs().max()):.4g}, "
                f"float64 rel err {self.rel_err:.1e} over every lag")


@dataclass(frozen=True)
class NotModal:
    """Why a long convolution's filter is not proved modal (passes/modal.py)."""

    node: str  # fx name of the op that broke the proof ("" when the final float64 check failed)
    op: str  # its canonical op (or the pointwise function)
    why: str

    def __str__(self):
        return f"not modal: {self.why}" + (f" (at {self.node}, {self.op})" if self.node else "")


@dataclass
class ConvStructure:
    """A recognised convolution, as the decoder needs it (all tensors float64, lag axis last).

    y = conv(x_b, h) + skip * x_b + bias, with x_b the input broadcast to the output layout by
    `input_map` (an einsum-style spec over the non-time dims + time), y_t = sum_s h[t-s] x_s.
    """

    input: Any  # fx.Node: the activation entering the convolution (after casts are stripped)
    output: Any  # fx.Node: the value equal to the convolution output (skip included when folded)
    conv_node: Any  # fx.Node: the irfft / conv1d node
    filter_nodes: list  # fx.Nodes computing the filter (parameters, buffers, positions only)
    filter_at: Any  # callable(length) -> [C, length] causal filter (impulse response, skip removed)
    max_len: int
    skip: Any  # torch.Tensor [C] lag-0 skip D, or None
    bias: Any  # torch.Tensor [C] constant offset (conv1d bias), or None
    channel_shape: tuple  # output shape without batch and time
    input_map: str  # e.g. "bcl->bcl", "bhl->bchl"
    time_axis: int  # time axis of the output value
    fft_size: Any  # sympy expr or int (FFT convs), None for conv1d
    filter_length: Any  # sympy expr or int: lags the filter can carry
    padding: tuple | None = None  # conv1d (left, right) padding, None for FFT convs
    taps: int | None = None  # short convs: the filter's length (its kernel reach)
    modal: Any = None  # long convs: ModalForm (h = Re sum r p^t, proved by passes/modal.py) or NotModal (why not)
    _h: Any = field(default=None, repr=False)

    @property
    def h(self):
        """The causal filter [C, Lh] (float64) over the served range: Lh = max_len, or the taps of a
        short conv. Evaluated on first use (one impulse response at max_len)."""
        if self._h is None:
            h = self.filter_at(self.max_len if self.taps is None else max(self.taps, 1))
            self._h = h if self.taps is None else h[:, : self.taps]
        return self._h


@dataclass
class AttentionStructure:
    """A recognised causal attention, as the decode rewrite needs it.

    out = softmax(scale(q k^T) + causal mask) v over the key axis. Each of q, k, v is brought to the
    canonical [B, G, T, D] layout by `perms[name]` (its dims in the order heads..., time, feature),
    then a reshape to [batch, -1, T, D] (the batch row leads the heads). The output is
    [B, G, T, Dv] reshaped to the head sizes and permuted by `out_perm` to the model's layout.
    """

    spelling: str  # "sdpa" (F.scaled_dot_product_attention) | "softmax" (explicit scores, mask, softmax, @ v)
    q: Any  # fx.Nodes: the operands of the score and value contractions, as the model feeds them
    k: Any
    v: Any
    output: Any  # fx.Node: the attention output (the p @ v contraction, or the SDPA call)
    perms: dict  # "q" / "k" / "v" -> permutation to (heads..., time, feature)
    head_dims: tuple  # dims of q (after its permutation) that hold heads, batch row first
    out_perm: list  # permutation of the canonical (heads..., time, value) output to the model's layout
    scale_ops: list  # [("mul" | "div", float)], applied to q k^T in the model's order
    heads: int  # G: heads per batch row
    head_dim: int  # D of q and k
    value_dim: int  # Dv
    max_len: int
    softmax_dtype: Any = None  # the dtype= of an explicit softmax (None: the scores' dtype)

    def cache_bytes_per_row(self, element_size):
        return 2 * self.heads * self.max_len * max(self.head_dim, self.value_dim) * element_size

    @property
    def cache(self):
        return f"KV {self.heads}x{self.max_len}x{self.head_dim}"


@dataclass
class Candidate:
    name: str
    spelling: str  # "fft_conv", "complex_fft_conv", "einsum_fft_conv", "conv1d", "registered:<n>", op name
    kind: str  # "long", "short", "time_mixing", "capture"
    verdict: Verdict
    reason: Reason | None = None
    explanation: str = ""
    module_path: str = ""
    source: str = ""
    offending: str | None = None  # fx node name
    length: str = ""  # symbolic sequence length served
    max_len: int | None = None
    channels: int | None = None
    filter_length: str = ""
    dtype: str = ""
    conv: ConvStructure | None = None
    attention: AttentionStructure | None = None  # kind "attention": accepted sites decode on a KV cache
    input: str | None = None  # convolution candidates: the fx node names of the match's input and output
    output: str | None = None

    def to_dict(self):
        return {
            "name": self.name, "spelling": self.spelling, "kind": self.kind, "verdict": self.verdict.value,
            "reason": self.reason.value if self.reason else None, "explanation": self.explanation,
            "module_path": self.module_path, "source": self.source, "offending": self.offending,
            "length": self.length, "max_len": self.max_len, "channels": self.channels,
            "filter_length": self.filter_length, "dtype": self.dtype, "input": self.input, "output": self.output,
            **({"form": str(self.conv.modal)} if self.conv is not None and self.conv.modal is not None else {}),
            **({"cache": {"heads": self.attention.heads, "max_len": self.attention.max_len, "head_dim": self.attention.head_dim,
                          "value_dim": self.attention.value_dim}} if self.attention is not None else {}),
        }


@dataclass
class CaptureInfo:
    level: str  # "export" or "dynamo"
    symbolic: bool  # the sequence length is a symbol (else a concrete re-capture)
    length: str = ""  # the length symbol or value
    example_length: int | None = None
    max_len: int | None = None
    note: str = ""


@dataclass
class Report:
    decodable: bool
    candidates: list[Candidate]
    capture: CaptureInfo
    passes: list = field(default_factory=list)  # (pass name, text dump, seconds)
    safety: dict = field(default_factory=dict)  # whole-model checks: name -> {passed, rel_err}
    notes: list[str] = field(default_factory=list)
    captured: Any = field(default=None, repr=False)  # the Captured graph the candidates' nodes live in
    position_constants: list = field(default_factory=list, repr=False)  # PositionConstants the step indexes
    time_info: Any = field(default=None, repr=False)  # node -> TimeInfo of the captured graph
    # concrete captures: each convolution's match with its counterpart's at the second length
    site_pairs: list = field(default_factory=list, repr=False)
    # long convolutions: how each decodes (strategy, state, crossover), from the layer schedule
    strategies: dict = field(default_factory=dict)

    @property
    def accepted(self):
        return [c for c in self.candidates if c.verdict is Verdict.ACCEPTED]

    @property
    def sites(self):
        """The accepted convolutions the decoder runs on state (long, short and delays)."""
        return [c for c in self.accepted if c.kind in ("long", "short")]

    @property
    def attention(self):
        """The accepted causal attentions the decoder runs on KV caches."""
        return [c for c in self.accepted if c.kind == "attention"]

    @property
    def rejected(self):
        return [c for c in self.candidates if c.verdict is Verdict.REJECTED]

    def refusal(self) -> str:
        """Why the model is refused, in one line: each rejection's reason, then the notes that add to
        them (e.g. "call model.eval() first"). NotDecodable and the backend's fallback say this."""
        reasons = [f"{c.name}: {c.reason.value if c.reason else '?'} ({c.explanation})" for c in self.rejected]
        text = "; ".join(reasons)
        notes = [n for n in self.notes if (n.partition(": ")[2] or n) not in text]  # "capture failed: <reason>" repeats one
        return "; ".join(reasons + notes) or "no convolution to decode"

    def to_json(self, indent=2):
        return json.dumps({
            "decodable": bool(self.decodable),
            "capture": vars(self.capture),
            "candidates": [c.to_dict() for c in self.candidates],
            "strategies": self.strategies,
            "safety": self.safety,
            "notes": self.notes,
            "position_constants": [{"name": c.name, "axis": c.axis, "table": list(c.table.shape)} for c in self.position_constants],
            "passes": [{"name": n, "seconds": round(s, 4)} for n, _, s in self.passes],
        }, indent=indent, default=str)

    def table(self):
        cols = [("name", 22), ("spelling", 16), ("kind", 11), ("verdict", 8), ("reason", 24), ("C", 5),
                ("Lh", 14), ("module", 30)]
        line = lambda vals: " ".join(str(v)[:w].ljust(w) for v, (_, w) in zip(vals, cols)).rstrip()
        cap = self.capture
        out = [f"lcsm_compile analysis: decodable={self.decodable}  capture={cap.level} "
               f"({'symbolic L=' + cap.length if cap.symbolic else 'concrete L=' + cap.length}, max_len={cap.max_len})"]
        out.append(line([c for c, _ in cols]))
        out.append(line(["-" * w for _, w in cols]))
        for c in self.candidates:
            out.append(line([c.name, c.spelling, c.kind, c.verdict.value, c.reason.value if c.reason else "-",
                             c.channels if c.channels is not None else "-",
                             c.attention.cache if c.attention is not None else c.filter_length or "-", c.module_path]))
            if c.explanation:
                out.append("    " + c.explanation)
            if c.conv is not None and c.conv.modal is not None:
                out.append("    form: " + str(c.conv.modal))
            if c.name in self.strategies:
                out.append("    decodes: " + self.strategies[c.name])
        for name, res in self.safety.items():
            out.append(f"safety {name}: {'passed' if res['passed'] else 'FAILED'} (rel_err {res['rel_err']:.2e})")
        out.extend("note: " + n for n in self.notes)
        return "\n".join(out)

    __str__ = table
