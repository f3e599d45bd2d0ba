"""Model zoo: small LCSMs written after public designs, plus look-alikes the analysis must decline.

Each entry's build() returns (model in eval mode, example_inputs); the first input has the sequence
on dim 1, and the model runs at every length up to `model.max_len`. For decodable entries, n_long /
n_short count the convolutions the analysis should accept; for the others, `reason` names the
Reason it should give.
"""

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from examples.models import conv1d_long, continuous, h3, hyena, hyenadna, m2, multihead_hyena, negatives, s4d
from examples.models import cross_correlation, length_in_python, multiquery_conv, positional, s4d_glu, striped_hyena, token_shift, wavenet, zoology


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], tuple[nn.Module, tuple]]
    decodable: bool
    reason: str | None
    n_long: int
    n_short: int
    one_graph: bool = True  # torch.compile(dynamic=True) traces one graph for every length


def _pos(name, build, n_long, n_short, one_graph=True):
    return ZooEntry(name, build, True, None, n_long, n_short, one_graph)


def _neg(name, build, reason):
    return ZooEntry(name, build, False, reason, 0, 0)


ZOO: list[ZooEntry] = [
    _pos("hyena_order2", hyena.build_order2, n_long=2, n_short=2),  # 2 layers x (1 long, 1 short)
    _pos("hyena_order3", hyena.build_order3, n_long=2, n_short=1),  # 1 layer, 2 long convs in series
    _pos("hyenadna", hyenadna.build, n_long=3, n_short=3),  # 3 layers
    _pos("striped_hyena", striped_hyena.build, n_long=2, n_short=2),  # 2 blocks
    _pos("s4d", s4d.build, n_long=2, n_short=0),  # 2 layers; kernel-size-1 Conv1d is pointwise
    _pos("h3", h3.build, n_long=4, n_short=0),  # 2 layers x (shift SSM by FFT = long, diag SSM)
    _pos("m2_causal", m2.build, n_long=4, n_short=2),  # 2 layers x (2 long, 1 short)
    _pos("multihead_hyena", multihead_hyena.build, n_long=2, n_short=2),  # 2 layers
    _pos("conv1d_long", conv1d_long.build, n_long=1, n_short=1),
    _pos("hyena_regressor", continuous.build, n_long=1, n_short=1),
    # Glue that real code writes around the convolutions (issue 11). A token shift is a causal delay:
    # it counts as a short convolution.
    _pos("zoology_short_conv", zoology.build_short, n_long=0, n_short=2),  # only short convs; RMSNorm by torch.norm
    _pos("zoology_implicit_conv", zoology.build_implicit, n_long=1, n_short=1),  # einops; filter normed over channels
    _pos("s4d_glu", s4d_glu.build, n_long=2, n_short=0),  # float features; nn.GLU(dim=-2) channels-first
    _pos("rwkv_token_shift_hyena", token_shift.build, n_long=1, n_short=3),  # 2 F.pad token shifts + 1 short; where, glu
    _pos("hyena_sinusoidal_pe", positional.build_sinusoidal, n_long=2, n_short=2),  # pe[:, 0::2] = sin in forward
    # forward assigns self.weights, and grows it past its size: dynamo traces that branch anew
    _pos("hyena_cached_pe", positional.build_cached, n_long=2, n_short=2, one_graph=False),
    _pos("hyena_alternating_sign", positional.build_alternating, n_long=2, n_short=2),  # s[:, 1::2] *= -1
    _pos("multiquery_long_conv", multiquery_conv.build, n_long=2, n_short=0),  # B, L = x.shape; repeat; normalize; tensordot
    # Third-party styles (issue 19): reach read from the op; the length read in Python
    _pos("wavenet_dilated", wavenet.build, n_long=4, n_short=4),  # kernel 4, dilations 1..64: 2 rings + 2 long, x2 (filter, gate)
    _pos("hyena_table_example_at_max_len", length_in_python.build_table_at_max_len, n_long=1, n_short=1),  # pos[:L], example L = max_len
    _pos("hyena_min_cut_heads", length_in_python.build_min_cut_heads, n_long=1, n_short=1),  # min(L, l_max) cut, heads split
    # the length planned in Python: captured at concrete lengths, dynamo guards on each length anew
    _pos("hyena_planned_lengths", length_in_python.build_planned, n_long=2, n_short=2, one_graph=False),
    _pos("hyena_cached_kernel", length_in_python.build_cached_kernel, n_long=2, n_short=2, one_graph=False),
    _pos("hyena_init_once", length_in_python.build_init_once, n_long=2, n_short=2, one_graph=False),
    # conjugated spectrum of a reversed kernel, rolled by -1, tail taken by index_select; next_fast_len
    _pos("cross_correlation", cross_correlation.build, n_long=2, n_short=0, one_graph=False),
    _neg("neg_bidirectional", negatives.build_bidirectional, "BIDIRECTIONAL_FILTER"),
    _neg("neg_wrap_around", negatives.build_wrap_around, "WRAP_AROUND"),
    _neg("neg_length_dependent_filter", negatives.build_length_dependent, "FILTER_DEPENDS_ON_LENGTH"),
    _neg("neg_length_dependent_arange", negatives.build_length_dependent_arange, "FILTER_DEPENDS_ON_LENGTH"),
    _neg("neg_same_padding", negatives.build_same_padding, "NON_CAUSAL_PADDING"),
    _neg("neg_input_filter", negatives.build_input_filter, "FILTER_DEPENDS_ON_INPUT"),
    _neg("neg_attention", negatives.build_attention, "SLIDING_WINDOW"),  # causal attention is decoded (hybrid.py)
    _neg("neg_mean_pool", negatives.build_mean_pool, "TIME_MIXING_OP"),
    _neg("neg_conj_rev_filter", zoology.build_conj_rev, "BIDIRECTIONAL_FILTER"),  # k_f + rfft(k_rev).conj()
    _neg("neg_filter_normalized_over_lags", zoology.build_normalized_over_lags, "FILTER_DEPENDS_ON_LENGTH"),
    _neg("neg_future_token_shift", token_shift.build_future_shift, "TIME_MIXING_OP"),  # F.pad(x, (0, 0, -1, 1))
]


def get(name: str) -> ZooEntry:
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise KeyError(f"no zoo entry named {name!r}; known: {[e.name for e in ZOO]}")
