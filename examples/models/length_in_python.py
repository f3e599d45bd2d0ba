"""Hyena blocks written the way public code reads the length in Python (issue 19's third-party set).

- build_table_at_max_len: a learned position table [max_len, d] sliced `self.pos[:L]`, and the
  example as long as max_len, the most natural example to pass. The slice's clamp meets the
  table's size exactly at that length, so export specializes it; the capture takes the example one
  position shorter.
- build_min_cut_heads: the positions cut to `min(L, l_max)` (a filter's reach, as public code guards
  it), then heads split and merged on that Min-sized axis ([B, Min(l_max, L), D] -> [B, Min(l_max, L),
  H, D/H]): a channel split, which Min(l_max, L) = L over the served lengths makes plain.

The rest plan on L in Python, so export specializes it and they are captured at concrete lengths:
- build_planned: an FFT size from next_fast_len(2L - 1), a kernel cut or zero-padded by `if N < L`, an
  output contraction whose order is planned on the shapes (opt_einsum's rule), a branch on L's parity.
- build_cached_kernel: the filter cached in the module by an earlier forward in eval mode.
- build_init_once: a flag buffer set by the first forward (`if not self.initialized`), which export
  cannot branch on: the branch is taken as it stands.
"""

import torch
import torch.nn as nn

from examples.models.common import Block, LM, MAX_LEN, seeded, token_inputs
from examples.models.hyena import HyenaOperator
from lcsm_compile.models.hyena import fft_dtype

D_MODEL, VOCAB, HEADS = 32, 64, 4


class TablePE(nn.Module):
    def __init__(self, d_model, max_len):
        super().__init__()
        self.pos = nn.Parameter(0.1 * torch.randn(max_len, d_model))

    def forward(self, x):
        return x + self.pos[: x.shape[1]]


class MinCutHeads(nn.Module):
    """Per-head gate on positions cut to min(L, l_max)."""

    def __init__(self, d_model, heads, l_max):
        super().__init__()
        self.heads, self.l_max = heads, l_max
        self.scale = nn.Parameter(1 + 0.2 * torch.randn(heads, d_model // heads))

    def forward(self, x):
        L = min(x.shape[1], self.l_max)
        x = x[:, :L]
        h = x.reshape(x.shape[0], L, self.heads, -1)
        return (h * torch.sigmoid(h * self.scale)).reshape(x.shape[0], L, -1)


def build_table_at_max_len():
    with seeded(0):
        blocks = [nn.Sequential(TablePE(D_MODEL, MAX_LEN), Block(D_MODEL, HyenaOperator(D_MODEL, MAX_LEN, order=2)))]
        model = LM(VOCAB, D_MODEL, blocks, MAX_LEN)
    return model.eval(), token_inputs(VOCAB, MAX_LEN)


def build_min_cut_heads():
    with seeded(0):
        blocks = [nn.Sequential(MinCutHeads(D_MODEL, HEADS, MAX_LEN), Block(D_MODEL, HyenaOperator(D_MODEL, MAX_LEN, order=2)))]
        model = LM(VOCAB, D_MODEL, blocks, MAX_LEN)
    return model.eval(), token_inputs(VOCAB, 64)


# ---- the length read in Python: export specializes L, so these are captured at concrete lengths ----

def next_fast_len(n):
    """The smallest 5-smooth integer >= n (scipy.fft.next_fast_len's rule for real FFTs)."""
    best = None
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            m = p35
            while m < n:
                m *= 2
            best = m if best is None else min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def contract(equation, *operands):
    """A two-step einsum whose pair order is planned on the shapes, in Python (opt_einsum's greedy
    rule: contract first the pair with the smallest intermediate)."""
    inputs, out = equation.split("->")
    terms = inputs.split(",")
    sizes = {c: s for t, x in zip(terms, operands) for c, s in zip(t, x.shape)}

    def pair(i, j):
        keep = [c for c in dict.fromkeys(terms[i] + terms[j])
                if c in out or any(c in terms[k] for k in range(len(terms)) if k not in (i, j))]
        cost = 1
        for c in keep:
            cost *= sizes[c]
        return cost, "".join(keep)

    best = None
    for i, j, k in ((0, 1, 2), (0, 2, 1), (1, 2, 0)):
        cost, mid = pair(i, j)
        if best is None or cost < best[0]:
            best = (cost, mid, i, j, k)
    _, mid, i, j, k = best
    first = torch.einsum(f"{terms[i]},{terms[j]}->{mid}", operands[i], operands[j])
    return torch.einsum(f"{mid},{terms[k]}->{out}", first, operands[k])


class PlannedHyena(nn.Module):
    """An order-2 Hyena mixer whose Python code plans on L: the FFT size by next_fast_len(2L - 1),
    the kernel cut or zero-padded by a branch on L against its own length, and the output
    projection as a three-operand contraction planned on the shapes."""

    def __init__(self, d_model, l_kernel):
        super().__init__()
        self.d = d_model
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.short = nn.Conv1d(3 * d_model, 3 * d_model, 3, groups=3 * d_model, padding=2)
        t = torch.arange(l_kernel) / l_kernel
        self.kernel = nn.Parameter(torch.randn(d_model, l_kernel) * torch.exp(-4 * t) / d_model ** 0.5)
        self.skip = nn.Parameter(torch.randn(d_model))
        self.out_w = nn.Parameter(torch.randn(d_model, d_model) / d_model ** 0.5)
        self.out_scale = nn.Parameter(1 + 0.1 * torch.randn(d_model))

    def filter(self):
        return self.kernel

    def forward(self, u):
        L = u.shape[1]
        z = self.short(self.in_proj(u).transpose(1, 2))[..., :L]
        x1, x2, v = z.split(self.d, dim=1)
        k = self.filter()
        N = k.shape[-1]
        if N < L:
            k = nn.functional.pad(k, (0, L - N))
        else:
            k = k[:, :L]
        n = next_fast_len(2 * L - 1)
        f = fft_dtype(u.dtype)  # no half-precision FFT on CPU
        y = torch.fft.irfft(torch.fft.rfft((v * x1).to(f), n=n) * torch.fft.rfft(k.to(f), n=n), n=n)[..., :L]
        y = (y.to(u.dtype) + v * x1 * self.skip[:, None]) * x2
        return contract("bdl,de,e->ble", y, self.out_w, self.out_scale)


class CachedKernelHyena(PlannedHyena):
    """The filter (the kernel times a decay) computed on the first forward in eval mode and kept in
    the module, as public code caches it: after one ordinary forward it is a plain tensor attribute."""

    def __init__(self, d_model, l_kernel):
        super().__init__(d_model, l_kernel)
        self._kernel = None

    def filter(self):
        if self.training or self._kernel is None or self._kernel.dtype != self.kernel.dtype:
            k = self.kernel * torch.exp(-0.01 * torch.arange(self.kernel.shape[-1], dtype=self.kernel.dtype))
            if not self.training:
                self._kernel = k.detach()
            return k
        return self._kernel


class InitOnce(nn.Module):
    """An ActNorm-style affine normaliser initialised from the data of its first forward, guarded by
    a flag buffer (`if not self.initialized`): in a loaded checkpoint the flag is set for good."""

    def __init__(self, d_model):
        super().__init__()
        self.register_buffer("initialized", torch.tensor(False))
        self.loc = nn.Parameter(torch.zeros(d_model))
        self.log_scale = nn.Parameter(torch.zeros(d_model))

    def forward(self, x):
        if not self.initialized:
            with torch.no_grad():
                self.loc.copy_(-x.mean((0, 1)))
                self.log_scale.copy_(-torch.log(x.std((0, 1)) + 1e-6))
                self.initialized.fill_(True)
        return (x + self.loc) * self.log_scale.exp()


class PlannedLM(LM):
    """An LM whose forward also reads the length (a planned chunking of the head that does not
    change the result)."""

    def forward(self, input_ids):
        logits = super().forward(input_ids)
        return logits if input_ids.shape[1] % 2 == 0 else logits.clone()


def build_planned():
    with seeded(0):
        blocks = [Block(D_MODEL, PlannedHyena(D_MODEL, 200)) for _ in range(2)]
        model = PlannedLM(VOCAB, D_MODEL, blocks, MAX_LEN)
    return model.eval(), token_inputs(VOCAB, 64)


def build_cached_kernel(run_first=True):
    """run_first: one ordinary forward before handing the model over (its filters are cached then)."""
    with seeded(0):
        blocks = [Block(D_MODEL, CachedKernelHyena(D_MODEL, 300)) for _ in range(2)]
        model = LM(VOCAB, D_MODEL, blocks, MAX_LEN).eval()
    example = token_inputs(VOCAB, 64)
    if run_first:
        with torch.no_grad():
            model(*example)
    return model, example


def build_init_once():
    """Initialised by one forward on data, as a trained checkpoint is."""
    with seeded(0):
        blocks = [nn.Sequential(InitOnce(D_MODEL), Block(D_MODEL, PlannedHyena(D_MODEL, 200))) for _ in range(2)]
        model = LM(VOCAB, D_MODEL, blocks, MAX_LEN).eval()
        example = token_inputs(VOCAB, 64)
        with torch.no_grad():
            model(*example)
    return model, example
