"""Randomized differential fuzzer for lcsm_compile: random models from a grammar, decoded against
the model itself.

Each generated model is ordinary PyTorch (small nn.Modules composed at random) and knows whether it
is LEGAL: every op that mixes positions is a causal, query-independent, prefix-stable linear
convolution or a causal delay. An illegal model holds exactly one illegal construct, named in its
description. The runner calls `lcsm_compile.optimize` and classifies each model:

    ok               legal, accepted, teacher-forced decode exact (prefill + steps at two prompt
                     lengths, and a chunked prefill continued by extends and steps)
    legal_refused    legal, NotDecodable (the report's rejected candidates are recorded)
    illegal_refused  illegal, NotDecodable (what should happen)
    illegal_accepted illegal, accepted, and its decode is exact anyway
    silent_error     accepted and the decode is not exact (legal or not): the worst outcome
    crash            anything raised that is not NotDecodable from optimize, or any error while decoding

    python tests/fuzz.py --models 200 --seed 0 [--dtype float32] [--json out.json]
    python tests/fuzz.py --seed 0 --index 17        # one model, with its analysis report

`check_labels` validates the generator without lcsm_compile: legal models are causal and
prefix-stable in float64; each illegal model shows its violation.
"""

import argparse
import copy
import json
import math
import random
import re
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

import lcsm_compile
from lcsm_compile.models.hyena import Sin  # Hyena's periodic activation

# Relative error allowed between the teacher-forced decode and the reference: the float64 model for
# float32 / float64 models, the float32 model on the same weights for bfloat16 ones.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}
REF_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float64, torch.bfloat16: torch.float32}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Generator self-check (float64): a legal model's prefix / past moves by less than SAME; an illegal
# model's violation is at least SEEN, large enough for the decode tolerances above to notice.
SAME, SEEN = 1e-10, 1e-6
BATCH = 2
P_ILLEGAL = 0.3


def fp(dtype):
    """FFTs and complex filters run in float32 at least: the CPU has no bfloat16 FFT."""
    return torch.promote_types(dtype, torch.float32)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------
# Time-local glue: [B, L, D] -> [B, L, D], each position alone.


class GLU(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, 2 * d)

    def forward(self, x):
        return F.glu(self.proj(x), dim=-1)


class ConvGLU(nn.Module):
    """S4D's output transform: a kernel-1 Conv1d to 2d channels, then GLU over channels (dim=-2)."""

    def __init__(self, d):
        super().__init__()
        self.conv = nn.Conv1d(d, 2 * d, kernel_size=1)
        self.act = nn.GLU(dim=-2)

    def forward(self, x):
        return self.act(self.conv(x.transpose(-1, -2))).transpose(-1, -2)


class RepeatChannels(nn.Module):
    def __init__(self, d, how):
        super().__init__()
        self.how = how
        self.proj = nn.Linear(2 * d, d)

    def forward(self, x):
        if self.how == "repeat":
            x = x.repeat(1, 1, 2)
        elif self.how == "repeat_interleave":
            x = x.repeat_interleave(2, dim=-1)
        else:
            x = torch.tile(x, (1, 1, 2))
        return self.proj(torch.tanh(x) * torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype))


class VectorNormRMS(nn.Module):
    """Hand-written RMSNorm through linalg.vector_norm."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = d ** -0.5
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.scale
        return self.weight * x / (norm + self.eps)


class RsqrtRMS(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Normalize(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(d ** 0.5 * (1 + 0.1 * torch.randn(d)))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.gain


class TensorDot(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return torch.tensordot(x, self.weight, dims=([2], [0]))


class LeakyWhere(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, 0.1 * x)


class Clamp(nn.Module):
    def forward(self, x):
        return x.clamp(min=-1.5, max=1.5)


class MaskedFill(nn.Module):
    def __init__(self, d):
        super().__init__()
        mask = torch.zeros(d, dtype=torch.bool)
        mask[torch.randperm(d)[: d // 4]] = True
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x.masked_fill(self.mask, 0.0)


class ChannelSoftmax(nn.Module):
    def __init__(self, d, log):
        super().__init__()
        self.log = log
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        x = self.proj(x)
        return F.log_softmax(x, dim=-1) if self.log else x.softmax(dim=-1) * x.shape[-1]


class HeadsView(nn.Module):
    """Per-head projection, heads split with B and L read from x.shape."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.weight = nn.Parameter(torch.randn(heads, d // heads, d // heads) / (d // heads) ** 0.5)

    def forward(self, x):
        B, L, D = x.shape
        h = x.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # B H L Dh
        h = torch.einsum("bhld,hde->bhle", h, self.weight)
        return h.transpose(1, 2).reshape(B, L, D)


class RunningMean(nn.Module):
    """A running mean over positions, cumsum / (t + 1): a convolution with the all-ones filter, scaled
    by a position constant."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        t = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        return x + self.proj(x.cumsum(dim=1) / t)


class MinCutHeads(nn.Module):
    """The positions cut to min(L, l_max) (a table's reach, as public code guards it), then heads split
    and merged on that Min-sized axis: channels split, never positions."""

    def __init__(self, d, heads, l_max):
        super().__init__()
        self.heads, self.l_max = heads, l_max
        self.scale = nn.Parameter(1 + 0.2 * torch.randn(heads, d // heads))

    def forward(self, x):
        L = min(x.shape[1], self.l_max)
        x = x[:, :L]
        h = x.reshape(x.shape[0], L, self.heads, -1)
        return (h * torch.sigmoid(h * self.scale)).reshape(x.shape[0], L, -1)


class HeadsPermute(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.scale = nn.Parameter(1 + 0.2 * torch.randn(heads, 1, d // heads))

    def forward(self, x):
        B, L, D = x.shape
        h = x.reshape(B, L, self.heads, -1).permute(0, 2, 1, 3)
        h = F.silu(h) * self.scale
        return h.permute(0, 2, 1, 3).contiguous().view(B, L, D)


class Rearrange(HeadsView):
    """The same per-head map, heads split and merged with einops."""

    def forward(self, x):
        h = einops.rearrange(x, "b l (h d) -> b h l d", h=self.heads)
        h = torch.tanh(h @ self.weight)
        return einops.rearrange(h, "b h l d -> b l (h d)")


class ChannelsFirstAffine(nn.Module):
    """An affine map over channels done channels-first (permute or movedim there and back)."""

    def __init__(self, d, movedim):
        super().__init__()
        self.movedim = movedim
        self.scale = nn.Parameter(1 + 0.2 * torch.randn(d))
        self.shift = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        y = x.movedim(-1, 1) if self.movedim else x.permute(0, 2, 1)
        y = y * self.scale[:, None] + self.shift[:, None]
        return y.movedim(1, -1) if self.movedim else y.permute(0, 2, 1)


class EinsumChannels(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return torch.einsum("bld,de->ble", x, self.weight)


class ChunkGate(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * torch.sigmoid(b), b], dim=-1)


class SplitSwap(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.k = d // 4

    def forward(self, x):
        a, b = x.split([self.k, x.shape[-1] - self.k], dim=-1)
        return torch.cat([b, torch.tanh(a)], dim=-1)


class UnbindPairs(nn.Module):
    def forward(self, x):
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a - b, a * b], dim=-1).flatten(-2)


class StackMix(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.proj(torch.stack([x, torch.tanh(x)], dim=2).flatten(2))


class UnsqueezeMax(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, d))

    def forward(self, x):
        y = x.unsqueeze(2) * self.weight  # B L 2 D
        return y.amax(dim=2) + y[:, :, 1:].squeeze(2)


class InPlace(nn.Module):
    """In-place ops on a fresh activation: mul_, +=, a zeroed channel slice."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.k = max(1, d // 8)

    def forward(self, x):
        y = self.proj(x)
        y.mul_(0.5)
        y += x
        y[..., : self.k] = 0
        return y


class StridedChannels(nn.Module):
    def forward(self, x):
        return torch.cat([x[..., ::2], 0.5 * x[..., 1::2]], dim=-1)


class ChannelScan(nn.Module):
    """sort / topk / cumsum / flip / roll over the channel axis."""

    def __init__(self, d, how):
        super().__init__()
        self.how = how
        self.proj = nn.Linear(d // 2 if how == "topk" else d, d)

    def forward(self, x):
        if self.how == "sort":
            y = x.sort(dim=-1).values
        elif self.how == "topk":
            y = x.topk(x.shape[-1] // 2, dim=-1).values
        elif self.how == "cumsum":
            y = x.cumsum(dim=-1) / x.shape[-1]
        elif self.how == "flip":
            y = x.flip(-1)
        else:
            y = x.roll(1, dims=-1)
        return x + self.proj(y)


class ChannelIndex(nn.Module):
    def __init__(self, d, gather):
        super().__init__()
        self.gather = gather
        self.register_buffer("perm", torch.randperm(d))

    def forward(self, x):
        if self.gather:
            B, L, D = x.shape
            return x.gather(-1, self.perm.expand(B, L, D))
        return x.index_select(-1, self.perm)


class PadChannels(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d + 3, d)

    def forward(self, x):
        return self.proj(F.pad(x, (1, 2), value=0.5))


class CastUp(nn.Module):
    """Compute in at least float32 and cast back (llama's `self._norm(x.float()).type_as(x)`)."""

    def forward(self, x):
        return F.silu(x.to(fp(x.dtype))).type_as(x)


class CastDouble(nn.Module):
    def forward(self, x):
        return torch.tanh(x.double()).to(x.dtype)


class BatchNormEval(nn.Module):
    """BatchNorm1d on channels-first activations: in eval it uses running statistics, so it is local."""

    def __init__(self, d):
        super().__init__()
        self.bn = nn.BatchNorm1d(d)
        self.bn.running_mean.normal_(0, 0.3)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class ChannelStats(nn.Module):
    """Reductions over channels broadcast back: a hand-written LayerNorm with var, and logsumexp."""

    def __init__(self, d, how):
        super().__init__()
        self.how = how
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        if self.how == "var":
            mu = x.mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * self.weight
        return (x - torch.logsumexp(x, dim=-1, keepdim=True)) * self.weight


class SignedSqrt(nn.Module):
    def forward(self, x):
        return torch.sign(x) * torch.sqrt(x.abs() + 1e-3) + torch.square(x) * 0.1


class Erf(nn.Module):
    def forward(self, x):
        return torch.erf(x)


class Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


# ----------------------------------------------------------------------------------------------
# Position constants (legal): built from positions only, added or multiplied pointwise.


def sinusoid_table(L, d, dtype=torch.float32):
    """The Transformer's position code, written the way tutorials write it (strided in-place writes).
    Position constants are built in at least float32: bf16 angles are meaningless."""
    pe = torch.zeros(L, d, dtype=dtype)
    position = torch.arange(0, L, dtype=dtype).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d, 2, dtype=dtype) * (-math.log(10000.0) / d))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


class SinusoidalPE(nn.Module):
    def forward(self, x):
        L, d = x.shape[1], x.shape[2]
        return x + sinusoid_table(L, d, fp(x.dtype)).to(device=x.device, dtype=x.dtype)


class AlternatingSign(nn.Module):
    def forward(self, x):
        L = x.size(1)
        s = torch.full((1, L, 1), 1.0, dtype=x.dtype, device=x.device)
        s[:, 1::2] *= -1
        return x * s


class ArangeFeatures(nn.Module):
    def __init__(self, d, max_len):
        super().__init__()
        self.max_len = max_len
        self.proj = nn.Linear(2, d)

    def forward(self, x):
        t = torch.arange(x.shape[1], device=x.device, dtype=fp(x.dtype))[:, None] / self.max_len
        return x + self.proj(torch.cat([t, torch.sin(8 * t)], dim=-1).to(x.dtype))


class LearnedPE(nn.Module):
    def __init__(self, d, max_len):
        super().__init__()
        self.pos = nn.Parameter(0.5 * torch.randn(max_len, d))

    def forward(self, x):
        return x + self.pos[: x.shape[1]]


class EmbeddingPE(nn.Module):
    """GPT-2's wpe: an nn.Embedding looked up at torch.arange(L)."""

    def __init__(self, d, max_len):
        super().__init__()
        self.wpe = nn.Embedding(max_len, d)

    def forward(self, x):
        pos = torch.arange(0, x.shape[1], dtype=torch.long, device=x.device)
        return x + self.wpe(pos)


class BufferPE(nn.Module):
    def __init__(self, d, max_len):
        super().__init__()
        self.register_buffer("table", sinusoid_table(max_len, d)[None], persistent=False)

    def forward(self, x):
        return x + self.table[:, : x.shape[1]]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding over the whole channel axis, cos / sin of positions built in forward."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), persistent=False)

    def forward(self, x):
        # in at least float32, as real rotary code does (bf16 angles are meaningless)
        t = torch.arange(x.shape[1], device=x.device, dtype=fp(x.dtype))
        freqs = torch.outer(t, self.inv_freq.to(t.dtype))
        emb = torch.cat((freqs, freqs), dim=-1)
        return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)


class CachedPE(nn.Module):
    """A position table cached as a plain tensor attribute, (re)built in forward when too short."""

    def __init__(self, d):
        super().__init__()
        self.d = d
        self.cache = None

    def forward(self, x):
        L = x.shape[1]
        if self.cache is None or self.cache.shape[0] < L:
            self.cache = sinusoid_table(L, self.d, fp(x.dtype)).to(x.device)
        return x + self.cache[:L].to(x.dtype)


class FirstUseScale(nn.Module):
    """A per-channel scale set from the data by the first forward, behind a flag buffer, in the state
    a loaded checkpoint has it (set): export cannot branch on the flag's value."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("initialized", torch.tensor(True))
        self.register_buffer("scale", 0.5 + torch.rand(d))

    def forward(self, x):
        if not self.initialized:
            self.scale.copy_(1.0 / x.detach().std(dim=(0, 1)).clamp_min(1e-3))
            self.initialized.fill_(True)
        return x * self.scale.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Causal delays (legal): a shift by k >= 1 positions toward later outputs with zero fill.


class TokenShift(nn.Module):
    """RWKV's time-mix: lerp between x and x shifted by one position."""

    def __init__(self, d, how):
        super().__init__()
        self.how = how
        self.mix = nn.Parameter(torch.rand(d))
        self.pad = nn.ZeroPad2d((0, 0, 1, -1))

    def forward(self, x):
        if self.how == "pad":
            shifted = F.pad(x, (0, 0, 1, -1))
        elif self.how == "zeropad2d":
            shifted = self.pad(x)
        elif self.how == "roll":  # roll forward, then zero the row that wrapped around
            shifted = x.roll(1, dims=1)
            shifted[:, 0] = 0
        else:
            shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        if self.how == "cat":
            return torch.lerp(shifted, x, self.mix)
        return x * self.mix + shifted * (1 - self.mix)


class ShiftK(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        L = x.shape[1]
        return x + self.proj(F.pad(x, (0, 0, self.k, 0))[:, :L])


# ----------------------------------------------------------------------------------------------
# Filters: forward(L) -> [C, L], computed from parameters, buffers and positions only.


def decay_window(n, max_len):
    """exp(-t / tau) scaled so lags reach ~1e-2 at max_len: long enough for leaks to show."""
    return torch.exp(-torch.arange(n) * (4.6 / max_len))


class PlainFilter(nn.Module):
    def __init__(self, c, max_len):
        super().__init__()
        self.h = nn.Parameter(torch.randn(c, max_len) * decay_window(max_len, max_len) / 4)

    def forward(self, L):
        return self.h[:, :L]


class ImplicitFilter(nn.Module):
    """Hyena's implicit filter: Sin-MLP over positional features precomputed at max_len, sliced, times
    an exponential decay window."""

    def __init__(self, c, max_len, order=16, bands=2):
        super().__init__()
        t = torch.linspace(0, 1, max_len)[:, None]
        w = 2 * math.pi * torch.arange(max_len)[:, None] / max_len
        f = torch.linspace(1e-4, bands - 1, bands)[None]
        self.register_buffer("z", torch.cat([t, torch.cos(f * w), torch.sin(f * w)], dim=-1))
        self.register_buffer("t", t)
        self.register_buffer("deltas", torch.linspace(0.5, 4.0, c)[None])
        act = Sin(order, w=1)
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * bands, order), act, nn.Linear(order, order), act,
                                 nn.Linear(order, c, bias=False))

    def forward(self, L):
        h = self.mlp(self.z[:L]) * torch.exp(-self.t[:L] * self.deltas)
        return h.transpose(0, 1)


class SSMFilter(nn.Module):
    """S4D's Vandermonde kernel 2 Re(C (exp(dt A) - 1) / A . exp(dt A arange(L))), computed at L."""

    def __init__(self, c, max_len, n=8):
        super().__init__()
        self.log_dt = nn.Parameter(torch.rand(c) * (math.log(0.1) - math.log(0.005)) + math.log(0.005))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(c, n // 2, dtype=torch.cfloat)))
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(c, n // 2)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(n // 2).float().repeat(c, 1))

    def forward(self, L):
        f = fp(self.log_dt.dtype)
        dt = torch.exp(self.log_dt.to(f))
        C = torch.view_as_complex(self.C.to(f))
        A = -torch.exp(self.log_A_real.to(f)) + 1j * self.A_imag.to(f)
        dtA = A * dt.unsqueeze(-1)
        K = dtA.unsqueeze(-1) * torch.arange(L, device=dt.device, dtype=f)
        C = C * (torch.exp(dtA) - 1.0) / A
        return 2 * torch.einsum("hn,hnl->hl", C, torch.exp(K)).real


class ModalFilter(nn.Module):
    """StripedHyena's modal filter Re(sum_n r_n p_n^t), t = arange(max_len) sliced."""

    def __init__(self, c, max_len, n=4):
        super().__init__()
        magnitude = 0.95 + 0.045 * torch.rand(c, n, 1)
        angle = math.pi * torch.rand(c, n, 1)
        self.poles = nn.Parameter(torch.view_as_real(torch.polar(magnitude, angle)).contiguous())
        self.residues = nn.Parameter(0.5 * torch.randn(c, n, 1, 2))
        self.register_buffer("t", torch.arange(max_len)[None, None], persistent=False)

    def forward(self, L):
        f = fp(self.poles.dtype)
        residues = torch.view_as_complex(self.residues.to(f))
        log_poles = torch.view_as_complex(self.poles.to(f)).log()
        return (residues * (log_poles * self.t[..., :L]).exp()).real.sum(1)


class DecayFilter(nn.Module):
    """Damped cosines w exp(-r t) cos(f t), t = arange(L) built in forward."""

    def __init__(self, c, max_len):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c))
        self.rate = nn.Parameter((0.5 + 3 * torch.rand(c)) / max_len)
        self.freq = nn.Parameter(0.5 * torch.rand(c))

    def positions(self, L, f):
        return torch.arange(L, device=self.w.device, dtype=f)

    def forward(self, L):
        f = fp(self.w.dtype)
        t = self.positions(L, f)
        w, rate, freq = (p.to(f)[:, None] for p in (self.w, self.rate, self.freq))
        return w * torch.exp(-t * rate) * torch.cos(freq * t)


class LinspaceFilter(DecayFilter):
    """ILLEGAL: positions rebuilt from linspace(0, 1, L) at each call, so a prefix's filter changes with L."""

    def positions(self, L, f):
        return torch.linspace(0, 1, L, device=self.w.device, dtype=f) * 64


FILTERS = {"plain": PlainFilter, "implicit": ImplicitFilter, "ssm": SSMFilter, "modal": ModalFilter,
           "decay": DecayFilter}


# ----------------------------------------------------------------------------------------------
# Depthwise causal convolutions over C channels: [B, L, C] -> [B, L, C] (lag-0 skip u * D in most).


class FFTConv(nn.Module):
    """safari's fftconv_ref, channels-first: rfft(k, n=2L)/n * rfft(u, n=2L) -> irfft(norm='forward')."""

    def __init__(self, c, filt):
        super().__init__()
        self.filter = filt
        self.D = nn.Parameter(torch.randn(c))

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        u = x.transpose(1, 2).to(f)
        n = 2 * L
        k_f = torch.fft.rfft(self.filter(L).to(f), n=n) / n
        u_f = torch.fft.rfft(u, n=n)
        y = torch.fft.irfft(u_f * k_f, n=n, norm="forward")[..., :L]
        y = y + u * self.D.to(f).unsqueeze(-1)
        return y.transpose(1, 2).to(x.dtype)


def fast_len(n):
    """The smallest 2^a 3^b >= n: an FFT size planned in Python on the length, as FFT planners do."""
    return min(2 ** a * 3 ** b for a in range(n.bit_length() + 1) for b in range(8) if 2 ** a * 3 ** b >= n)


class CrossCorrelationFFTConv(FFTConv):
    """A cross-correlation: the filter stored time-reversed (indexed by arange(L-1, ..., 0)), its
    spectrum conjugated, an FFT size of 3L, the result rolled by -1 and the last L positions taken
    by index_select. Its net filter is the causal, L-independent one."""

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        k_rev = self.filter(L)[:, torch.arange(L - 1, -1, -1, device=x.device)].to(f)
        n, u = 3 * L, x.transpose(1, 2).to(f)
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k_rev, n=n).conj(), n=n)
        y = torch.roll(y, -1, dims=-1).index_select(-1, torch.arange(n - L, n, device=x.device))
        return (y + u * self.D.to(f)[:, None]).transpose(1, 2).to(x.dtype)


class DefaultNormFFTConv(FFTConv):
    """No /n and the default irfft norm (most small re-implementations)."""

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        u = x.transpose(1, 2).to(f)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(self.filter(L).to(f), n=2 * L), n=2 * L)
        return (y[..., :L] + u * self.D.to(f)[:, None]).transpose(1, 2).to(x.dtype)


class FullFilterFFTConv(FFTConv):
    """The filter at its full max_len and an FFT of size L + Lk."""

    def __init__(self, c, filt, max_len):
        super().__init__(c, filt)
        self.max_len = max_len

    def sized_filter(self, L, f):
        """(the filter as the convolution uses it, the FFT size) at length L, in dtype f."""
        k = self.filter(self.max_len).to(f)
        return k, L + k.shape[-1]

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        k, n = self.sized_filter(L, f)
        u = x.transpose(1, 2).to(f)
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
        return (y + u * self.D.to(f)[:, None]).transpose(1, 2).to(x.dtype)


class PlannedFFTConv(FullFilterFFTConv):
    """Python planning on L (export specializes it): a filter of its own length N (max_len here) cut
    or zero-padded by `if N < L`, and the FFT size fast_len(2L - 1)."""

    def sized_filter(self, L, f):
        k = self.filter(self.max_len).to(f)
        if self.max_len < L:
            k = F.pad(k, (0, L - self.max_len))
        else:
            k = k[:, :L]
        return k, fast_len(2 * L - 1)


class ToeplitzConv(FFTConv):
    """The filter as a causal Toeplitz table [C, L, L] (T[c, t, s] = h[c, t - s], zero above the
    diagonal) applied by einsum, or by matmul on channels-first values (Toeplitz-network style)."""

    def __init__(self, c, filt, matmul):
        super().__init__(c, filt)
        self.matmul = matmul

    def forward(self, x):
        L = x.shape[1]
        lags = torch.arange(L, device=x.device)[:, None] - torch.arange(L, device=x.device)[None, :]
        T = torch.tril(self.filter(L)[:, lags.clamp(min=0)]).to(x.dtype)  # [C, L, L]
        if self.matmul:
            y = (T @ x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # [B, C, L, 1] -> [B, L, C]
        else:
            y = torch.einsum("cts,bsc->btc", T, x)
        return y + x * self.D.to(x.dtype)


class ChannelsLastFFTConv(FFTConv):
    """FFT along dim=1 of [B, L, C], filter [L, C]."""

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        u = x.to(f)
        k = self.filter(L).to(f).t()
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L, dim=1) * torch.fft.rfft(k, n=2 * L, dim=0), n=2 * L, dim=1)
        return (y[:, :L] + u * self.D.to(f)).to(x.dtype)


class ComplexFFTConv(FFTConv):
    """StripedHyena: a complex fft of the input sliced to n//2+1 bins times rfft(h)/n, then irfft."""

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        u = x.transpose(1, 2).to(f)
        fft_size = 2 * L
        H = torch.fft.rfft(self.filter(L).to(f), n=fft_size) / fft_size
        X = torch.fft.fft(u, n=fft_size)[..., : H.shape[-1]]
        y = torch.fft.irfft(X * H, n=fft_size, norm="forward")[..., :L]
        return (y + u * self.D.to(f).unsqueeze(-1)).transpose(1, 2).to(x.dtype)


class FullComplexFFTConv(FFTConv):
    """Complex fft on both sides, ifft, real part."""

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        u = x.transpose(1, 2).to(f)
        n = 2 * L
        y = torch.fft.ifft(torch.fft.fft(u, n=n) * torch.fft.fft(self.filter(L).to(f), n=n), n=n).real[..., :L]
        return (y + u * self.D.to(f)[:, None]).transpose(1, 2).to(x.dtype)


class EinsumFFTConv(nn.Module):
    """S4D's multi-output filters: 'bhl,chl->bchl' between the spectra, a kernel-1 Conv1d back to C."""

    def __init__(self, c, filt, channels=2):
        super().__init__()
        self.channels = channels
        self.filter = filt  # channels * c filters
        self.D = nn.Parameter(torch.randn(channels, c))
        self.output_linear = nn.Conv1d(channels * c, c, kernel_size=1)

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        u = x.transpose(-1, -2).to(f)
        k = self.filter(L).to(f).reshape(self.channels, -1, L)
        y_f = torch.einsum("bhl,chl->bchl", torch.fft.rfft(u, n=2 * L), torch.fft.rfft(k, n=2 * L))
        y = torch.fft.irfft(y_f, n=2 * L)[..., :L]
        y = y + torch.einsum("bhl,ch->bchl", u, self.D.to(f))
        y = y.reshape(y.shape[0], -1, L).to(x.dtype)
        return self.output_linear(F.gelu(y)).transpose(-1, -2)


class PerHeadFFTConv(nn.Module):
    """One filter per head, broadcast over the head's channels."""

    def __init__(self, c, filt, heads):
        super().__init__()
        self.heads = heads
        self.filter = filt  # heads filters
        self.D = nn.Parameter(torch.randn(heads, 1, 1))

    def forward(self, x):
        B, L, C = x.shape
        f = fp(x.dtype)
        u = x.to(f).transpose(1, 2).reshape(B, self.heads, C // self.heads, L)
        h = self.filter(L).to(f)  # heads, L
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(h, n=2 * L)[None, :, None, :], n=2 * L)
        y = y[..., :L] + u * self.D.to(f)
        return y.reshape(B, C, L).transpose(1, 2).to(x.dtype)


class LongConv1d(nn.Module):
    """F.conv1d with the flipped filter (a cross-correlation), padding K-1, output [..., :L]. K is
    max_len (StripedHyena's long FIR path) or L (the filter sliced at each call); `pad` spells the
    left padding as F.pad instead."""

    def __init__(self, c, filt, max_len, full, pad):
        super().__init__()
        self.filter = filt
        self.max_len, self.full, self.pad = max_len, full, pad

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        w = self.filter(self.max_len if self.full else L).to(f).flip(-1).unsqueeze(1)
        K = w.shape[-1]
        u = x.transpose(1, 2).to(f)
        if self.pad:
            y = F.conv1d(F.pad(u, (K - 1, 0)), w, groups=u.shape[1])
        else:
            y = F.conv1d(u, w, padding=K - 1, groups=u.shape[1])[..., :L]
        return y.transpose(1, 2).to(x.dtype)


class ShortConv(nn.Module):
    """A short depthwise causal conv, K = 3..7: nn.Conv1d(padding=K-1)[..., :L], F.conv1d with the
    causal taps flipped, or F.pad(x, (K-1, 0)) then conv1d."""

    def __init__(self, c, k, how, dilation=1):
        super().__init__()
        self.how, self.k = how, k
        if how == "module":
            self.conv = nn.Conv1d(c, c, kernel_size=k, groups=c, padding=k - 1)
        elif how == "dilated":  # WaveNet: dilation 2, left reach 2 (K - 1)
            self.conv = nn.Conv1d(c, c, kernel_size=k, groups=c, dilation=2, padding=2 * (k - 1))
        elif how == "dilated_wide":  # a WaveNet tree's upper levels: few taps reaching far back
            self.conv = nn.Conv1d(c, c, kernel_size=k, groups=c, dilation=dilation, padding=dilation * (k - 1))
        else:
            self.taps = nn.Parameter(torch.randn(c, k) / k ** 0.5)  # taps[:, j] = lag j

    def forward(self, x):
        L, K = x.shape[1], self.k
        u = x.transpose(1, 2)
        if self.how in ("module", "dilated", "dilated_wide"):
            y = self.conv(u)[..., :L]
        elif self.how == "flipped":
            y = F.conv1d(u, self.taps.flip(-1).unsqueeze(1), padding=K - 1, groups=u.shape[1])[..., :L]
        else:
            y = F.conv1d(F.pad(u, (K - 1, 0)), self.taps.flip(-1).unsqueeze(1), groups=u.shape[1])
        return y.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Mixers: projections and gates around the convolutions. [B, L, D] -> [B, L, D].


class HyenaMixer(nn.Module):
    """in_proj -> optional short conv -> x1, x2, v -> x2 * conv(x1 * v) -> out_proj."""

    def __init__(self, d, conv, short):
        super().__init__()
        self.d = d
        self.in_proj = nn.Linear(d, 3 * d)
        self.short = short  # over 3d channels, or None
        self.conv = conv
        self.out_proj = nn.Linear(d, d)

    def forward(self, u):
        z = self.in_proj(u)
        if self.short is not None:
            z = self.short(z)
        x1, x2, v = z.split(self.d, dim=-1)
        return self.out_proj(self.conv(x1 * v) * x2)


class GatedConv(nn.Module):
    """zoology's BaseConv / H3 style: conv(proj(u)) * gate(u)."""

    def __init__(self, d, conv):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.gate = nn.Linear(d, d)
        self.conv = conv

    def forward(self, u):
        return self.conv(self.proj(u)) * self.gate(u)


class ConvLayer(nn.Module):
    """S4D's layer: conv, GELU, output linear."""

    def __init__(self, d, conv):
        super().__init__()
        self.conv = conv
        self.out = nn.Linear(d, d)

    def forward(self, u):
        return self.out(F.gelu(self.conv(u)))


# ----------------------------------------------------------------------------------------------
# Illegal constructs.


class Attention(nn.Module):
    """Multi-head softmax attention over time, in one of several spellings of its mask. Legal (a
    causal triangle the analysis can prove): "sdpa" (is_causal=True), "sdpa_mask" (a bool tril
    attn_mask), "masked_fill" (tril built in forward), "additive" (a -inf triu buffer sliced to L),
    "where" (torch.where on a tril), "finite_additive" (GPT-2's triu * -10000 added). Illegal: "no_mask" (every query sees the future), "window"
    (a causal band of 4 keys: causal and prefix-stable, declined as a sliding window)."""

    LEGAL = ("sdpa", "sdpa_mask", "masked_fill", "additive", "where", "finite_additive")

    def __init__(self, d, heads, spelling, max_len):
        super().__init__()
        self.heads, self.spelling = heads, spelling
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        if spelling == "additive":
            self.register_buffer("bias", torch.full((max_len, max_len), float("-inf")).triu(1), persistent=False)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = [t.reshape(B, L, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1)]
        tril = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if self.spelling == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.spelling == "sdpa_mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=tril)
        else:
            att = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
            if self.spelling == "masked_fill":
                att = att.masked_fill(~tril, float("-inf"))
            elif self.spelling == "additive":
                att = att + self.bias[:L, :L].to(att.dtype)
            elif self.spelling == "where":
                att = torch.where(tril, att, torch.full_like(att, float("-inf")))
            elif self.spelling == "finite_additive":
                att = att + torch.ones(L, L, dtype=att.dtype, device=x.device).triu(1) * -10000.0
            elif self.spelling == "window":
                band = tril & ~torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-4)
                att = att.masked_fill(~band, float("-inf"))
            y = att.softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class TimeMix(nn.Module):
    """One op that mixes positions illegally, on the time axis (dim 1)."""

    def __init__(self, d, how):
        super().__init__()
        self.how = how
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        how, L = self.how, x.shape[1]
        if how == "mean_time":
            return x + self.proj(x.mean(dim=1, keepdim=True))
        if how == "max_time":
            return x + self.proj(x.amax(dim=1, keepdim=True))
        if how == "softmax_time":
            return x + self.proj(x.softmax(dim=1))
        if how == "layernorm_time":
            return x + self.proj(F.layer_norm(x.transpose(1, 2), (L,)).transpose(1, 2))
        if how == "flip_time":
            return x + self.proj(x.flip(1))
        if how == "roll_time":
            return x + self.proj(x.roll(1, dims=1))
        if how == "future_shift_pad":
            return x + self.proj(F.pad(x, (0, 0, -1, 1)))
        if how == "future_shift_cat":
            return x + self.proj(torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1))
        if how == "last_position":
            return x * x[:, -1:]
        if how == "divide_by_L":
            return x + self.proj(x) / L
        raise ValueError(how)


class SamePaddingConv(nn.Module):
    def __init__(self, c, k=3):
        super().__init__()
        self.conv = nn.Conv1d(c, c, kernel_size=k, groups=c, padding=k // 2)

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class TailSliceConv(nn.Module):
    """Conv1d(padding=K-1) with the LAST L outputs kept ([..., -L:]): output t reads inputs up to t+K-1."""

    def __init__(self, c, k=3):
        super().__init__()
        self.conv = nn.Conv1d(c, c, kernel_size=k, groups=c, padding=k - 1)

    def forward(self, x):
        L = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., -L:].transpose(1, 2)


class GroupNormChannelsFirst(nn.Module):
    """nn.GroupNorm on [B, C, L]: its statistics run over the group's channels AND all positions."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.GroupNorm(2, d)

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class BidirectionalFFTConv(FFTConv):
    """M2-BERT's bidirectional filter: k = pad(k_fwd, (0, L)) + pad(k_rev.flip(-1), (L, 0))."""

    def __init__(self, c, filt, filt_rev):
        super().__init__(c, filt)
        self.filter_rev = filt_rev

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        k = F.pad(self.filter(L), (0, L)) + F.pad(self.filter_rev(L).flip(-1), (L, 0))
        u = x.transpose(1, 2).to(f)
        n = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k.to(f), n=n) / n, n=n, norm="forward")[..., :L]
        return (y + u * self.D.to(f)[:, None]).transpose(1, 2).to(x.dtype)


class WrapAroundFFTConv(FFTConv):
    """FFT size L + L // 2 < L + Lk - 1 for a length-L filter: late inputs wrap onto early outputs."""

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        n = L + L // 2
        u = x.transpose(1, 2).to(f)
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.filter(L).to(f), n=n), n=n)[..., :L]
        return (y + u * self.D.to(f)[:, None]).transpose(1, 2).to(x.dtype)


class InputFilterFFTConv(nn.Module):
    """A "data-controlled" long filter k = Linear(u), convolved by FFT."""

    def __init__(self, c):
        super().__init__()
        self.filter_proj = nn.Linear(c, c)

    def forward(self, x):
        L, f = x.shape[1], fp(x.dtype)
        u = x.transpose(1, 2).to(f)
        k = self.filter_proj(x).transpose(1, 2).to(f)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
        return y.transpose(1, 2).to(x.dtype)


# What each illegal construct breaks, checked by check_labels: "future" (an output reads a later
# input), "prefix" (a prefix's outputs change with L), "nonlinear" (causal and prefix-stable, but
# the module is not affine in its input), "rule" (causal, prefix-stable and linear, but outside the
# legality rule: a scan over time is no convolution spelling the rule lists).
ILLEGAL = {
    "attention_no_mask": "future", "attention_window": "nonlinear", "mean_time": "future", "max_time": "future",
    "softmax_time": "future", "layernorm_time": "future", "flip_time": "future", "roll_time": "future",
    "future_shift_pad": "future", "future_shift_cat": "future", "last_position": "future",
    "divide_by_L": "prefix", "same_padding": "future", "bidirectional": "future", "wrap_around": "future",
    "input_filter": "nonlinear", "linspace_filter": "prefix", "tail_slice": "future", "groupnorm_time": "future",
}
ILLEGAL_CONVS = {"same_padding", "bidirectional", "wrap_around", "input_filter", "linspace_filter", "tail_slice"}


# ----------------------------------------------------------------------------------------------
# The model shell and blocks.


class Residual(nn.Module):
    def __init__(self, norm, *layers):
        super().__init__()
        self.norm = norm
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.layers(self.norm(x))


class FuzzNet(nn.Module):
    """ids [B, L] (or features [B, L, d_in]) -> encoder -> blocks -> norm -> head."""

    def __init__(self, encoder, blocks, norm, head, max_len):
        super().__init__()
        self.max_len = max_len
        self.encoder = encoder
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head

    def forward(self, x):
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


# ----------------------------------------------------------------------------------------------
# The grammar.


@dataclass
class Case:
    seed: int
    index: int
    desc: str
    model: nn.Module
    example_inputs: tuple
    dtype: torch.dtype
    max_len: int
    tokens: bool
    vocab: int
    d_in: int
    illegal: str | None = None  # the illegal construct's name, None when legal
    illegal_path: str | None = None  # its module inside the model (for the nonlinearity check)
    productions: set = field(default_factory=set)

    @property
    def legal(self):
        return self.illegal is None

    @property
    def length(self):
        return self.example_inputs[0].shape[1]

    def inputs(self, length, generator, dtype=None, batch=BATCH):
        """Fresh random inputs of `length` positions (token ids, or features in `dtype`)."""
        if self.tokens:
            return torch.randint(0, self.vocab, (batch, length), generator=generator)
        return torch.randn(batch, length, self.d_in, generator=generator).to(dtype or self.dtype)


class _Builder:
    """Draws productions from one rng and names each in the description."""

    def __init__(self, rng, d, heads, max_len, dtype):
        self.rng, self.d, self.heads, self.max_len, self.dtype = rng, d, heads, max_len, dtype
        self.used = set()

    def pick(self, table):
        name = self.rng.choice(sorted(table))
        return name, table[name]

    def note(self, name):
        self.used.add(name.split("(")[0])
        return name

    def glue(self):
        d, h, r = self.d, self.heads, self.rng
        table = {
            "linear": lambda: nn.Linear(d, d), "glu": lambda: GLU(d), "conv_glu": lambda: ConvGLU(d),
            "repeat": lambda: RepeatChannels(d, "repeat"),
            "repeat_interleave": lambda: RepeatChannels(d, "repeat_interleave"),
            "tile": lambda: RepeatChannels(d, "tile"), "rms_vector_norm": lambda: VectorNormRMS(d),
            "rms_rsqrt": lambda: RsqrtRMS(d), "normalize": lambda: Normalize(d),
            "layernorm": lambda: nn.LayerNorm(d), "tensordot": lambda: TensorDot(d),
            "gt_where": LeakyWhere, "clamp": Clamp, "masked_fill": lambda: MaskedFill(d),
            "softmax_channels": lambda: ChannelSoftmax(d, log=False),
            "log_softmax_channels": lambda: ChannelSoftmax(d, log=True),
            "heads_view": lambda: HeadsView(d, h), "heads_permute": lambda: HeadsPermute(d, h),
            "einops_rearrange": lambda: Rearrange(d, h), "min_cut_heads": lambda: MinCutHeads(d, h, self.max_len),
            "running_mean": lambda: RunningMean(d),
            "permute": lambda: ChannelsFirstAffine(d, movedim=False),
            "movedim": lambda: ChannelsFirstAffine(d, movedim=True), "einsum": lambda: EinsumChannels(d),
            "chunk_gate": ChunkGate, "split_swap": lambda: SplitSwap(d), "unbind_stack": UnbindPairs,
            "stack_flatten": lambda: StackMix(d), "unsqueeze_amax": lambda: UnsqueezeMax(d),
            "inplace": lambda: InPlace(d), "strided_slice": StridedChannels,
            "sort": lambda: ChannelScan(d, "sort"), "topk": lambda: ChannelScan(d, "topk"),
            "cumsum_channels": lambda: ChannelScan(d, "cumsum"), "flip_channels": lambda: ChannelScan(d, "flip"),
            "roll_channels": lambda: ChannelScan(d, "roll"), "index_select": lambda: ChannelIndex(d, False),
            "gather": lambda: ChannelIndex(d, True), "pad_channels": lambda: PadChannels(d),
            "cast_up": CastUp, "cast_double": CastDouble, "batchnorm_eval": lambda: BatchNormEval(d),
            "var_norm": lambda: ChannelStats(d, "var"), "logsumexp": lambda: ChannelStats(d, "logsumexp"),
            "signed_sqrt": SignedSqrt, "dropout": lambda: nn.Dropout(0.1), "mlp": lambda: Mlp(d),
            "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU, "tanh": nn.Tanh,
            "sigmoid": nn.Sigmoid, "erf": Erf, "softplus": nn.Softplus, "mish": nn.Mish, "elu": nn.ELU,
            "hardswish": nn.Hardswish, "first_use_scale": lambda: FirstUseScale(d),
        }
        name, make = self.pick(table)
        return self.note(name), make()

    def position(self):
        d, m = self.d, self.max_len
        table = {"sinusoidal_pe": SinusoidalPE, "alternating_sign": AlternatingSign,
                 "arange_features": lambda: ArangeFeatures(d, m), "learned_pe": lambda: LearnedPE(d, m),
                 "buffer_pe": lambda: BufferPE(d, m), "embedding_pe": lambda: EmbeddingPE(d, m), "rotary": lambda: Rotary(d), "cached_pe": lambda: CachedPE(d)}
        name, make = self.pick(table)
        return self.note(name), make()

    def attention(self):
        spelling = self.rng.choice(Attention.LEGAL)
        return self.note(f"attention_{spelling}"), Attention(self.d, self.heads, spelling, self.max_len)

    def delay(self):
        how = self.rng.choice(["pad", "zeropad2d", "cat", "roll", "k"])
        if how == "k":
            k = self.rng.randint(2, 4)
            return self.note(f"shift_k({k})"), ShiftK(self.d, k)
        return self.note(f"token_shift_{how}"), TokenShift(self.d, how)

    def filter(self, c):
        name, cls = self.pick(FILTERS)
        return self.note(name), cls(c, self.max_len)

    def short_conv(self, c):
        k, how = self.rng.randint(3, 7), self.rng.choice(["module", "flipped", "pad", "dilated", "dilated_wide"])
        if how == "dilated_wide":  # reach (k-1) * dilation + 1: past the analysis' short check lengths, or max_len
            k, dilation = self.rng.randint(2, 4), self.rng.choice([8, 16, 32, 64])
            return self.note(f"short_{how}(k={k}, dilation={dilation})"), ShortConv(c, k, how, dilation)
        return self.note(f"short_{how}(k={k})"), ShortConv(c, k, how)

    def conv(self, c, illegal=None):
        """A depthwise causal conv over c channels, or the named illegal one."""
        if illegal is not None:
            return self.illegal_conv(c, illegal)
        spelling = self.rng.choice(["fft", "fft_default_norm", "fft_full_filter", "fft_channels_last",
                                    "fft_complex", "fft_full_complex", "fft_einsum", "fft_per_head", "conv1d_long_max",
                                    "conv1d_long_L", "conv1d_long_pad", "toeplitz_einsum", "toeplitz_matmul", "fft_planned", "fft_xcorr", "short"])
        if spelling == "short":
            return self.short_conv(c)
        if spelling == "fft_einsum":
            fname, filt = self.filter(2 * c)
            return self.note(spelling) + f"/{fname}", EinsumFFTConv(c, filt)
        if spelling == "fft_per_head":
            fname, filt = self.filter(self.heads)
            return self.note(spelling) + f"/{fname}", PerHeadFFTConv(c, filt, self.heads)
        fname, filt = self.filter(c)
        cls = {"fft": FFTConv, "fft_default_norm": DefaultNormFFTConv, "fft_channels_last": ChannelsLastFFTConv,
               "fft_xcorr": CrossCorrelationFFTConv,
               "fft_complex": ComplexFFTConv, "fft_full_complex": FullComplexFFTConv}.get(spelling)
        if cls is not None:
            module = cls(c, filt)
        elif spelling.startswith("toeplitz"):
            module = ToeplitzConv(c, filt, matmul=spelling == "toeplitz_matmul")
        elif spelling == "fft_full_filter":
            module = FullFilterFFTConv(c, filt, self.max_len)
        elif spelling == "fft_planned":
            module = PlannedFFTConv(c, filt, self.rng.randint(self.max_len // 2, self.max_len))
        else:
            module = LongConv1d(c, filt, self.max_len, full=spelling == "conv1d_long_max",
                                pad=spelling == "conv1d_long_pad")
        return self.note(spelling) + f"/{fname}", module

    def illegal_conv(self, c, name):
        if name == "same_padding":
            return name, SamePaddingConv(c)
        if name == "tail_slice":
            return name, TailSliceConv(c)
        if name == "input_filter":
            return name, InputFilterFFTConv(c)
        if name == "linspace_filter":
            return name, FFTConv(c, LinspaceFilter(c, self.max_len))
        fname, filt = self.filter(c)
        if name == "bidirectional":
            return f"{name}/{fname}", BidirectionalFFTConv(c, filt, FILTERS[fname](c, self.max_len))
        return f"{name}/{fname}", WrapAroundFFTConv(c, filt)

    def mixer(self, illegal=None):
        d = self.d
        kind = self.rng.choice(["hyena", "gated", "layer"])
        cname, conv = self.conv(d, illegal)
        if kind == "hyena":
            short = None
            if self.rng.random() < 0.6:
                sname, short = self.short_conv(3 * d)
                cname = f"{cname}, {sname}"
            return self.note("hyena") + f"({cname})", HyenaMixer(d, conv, short)
        if kind == "gated":
            return self.note("gated") + f"({cname})", GatedConv(d, conv)
        return self.note("conv_layer") + f"({cname})", ConvLayer(d, conv)

    def norm(self):
        name = self.rng.choice(["layernorm", "rms_vector_norm", "rms_rsqrt", "none"])
        self.note(name)
        return name, {"layernorm": lambda: nn.LayerNorm(self.d), "rms_vector_norm": lambda: VectorNormRMS(self.d),
                      "rms_rsqrt": lambda: RsqrtRMS(self.d), "none": nn.Identity}[name]()


def generate(seed, index, dtype=None, illegal=None):
    """Model `index` of the run with `seed`: the same (seed, index, dtype) always gives the same model.
    illegal: force this illegal construct (a key of ILLEGAL), or "" to force a legal model."""
    rng = random.Random(f"lcsm-fuzz:{seed}:{index}")
    drawn = rng.choices(list(DTYPES.values()), weights=[0.4, 0.3, 0.3])[0]
    dtype = drawn if dtype is None else dtype
    torch_seed = rng.getrandbits(62)
    d = rng.choice([8, 12, 16])
    heads = rng.choice([2, 4])
    max_len = rng.randrange(64, 161)
    # the example's length: short, typical, or as long as max_len (or one below), as users pass it
    length = rng.choice([rng.randrange(8, 24), rng.randrange(24, 49), max_len - 1, max_len])
    batch = rng.choice([1, BATCH])
    tokens = rng.random() < 0.6
    vocab, d_in = rng.randint(16, 64), rng.randint(2, 8)
    n_blocks = rng.choice([1, 2])
    if illegal is None:
        illegal = rng.choice(sorted(ILLEGAL)) if rng.random() < P_ILLEGAL else None
    illegal = illegal or None
    bad_block = rng.randrange(n_blocks)

    b = _Builder(rng, d, heads, max_len, dtype)
    parts, blocks, illegal_path = [], [], None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        encoder = nn.Embedding(vocab, d) if tokens else nn.Linear(d_in, d)
        for i in range(n_blocks):
            items = [rng.choices([b.glue, b.position, b.delay, b.attention], weights=[6, 2.5, 1.5, 1])[0]()
                     for _ in range(rng.randint(0, 3))]
            here = illegal if i == bad_block else None
            conv_illegal = here if here in ILLEGAL_CONVS else None
            at = rng.randint(0, len(items))
            mixer = b.mixer(conv_illegal)
            items.insert(at, mixer)
            bad = mixer if conv_illegal else None  # the (name, module) holding the illegal construct
            if here and not conv_illegal:
                at = rng.randint(0, len(items))
                module = {"attention_no_mask": lambda: Attention(d, heads, "no_mask", max_len),
                          "attention_window": lambda: Attention(d, heads, "window", max_len),
                          "groupnorm_time": lambda: GroupNormChannelsFirst(d)}.get(here, lambda: TimeMix(d, here))()
                bad = (here, module)
                items.insert(at, bad)
            if bad is not None:
                pos = next(j for j, item in enumerate(items) if item is bad)
                illegal_path = f"blocks.{i}.layers.{pos}" + (".conv" if conv_illegal else "")
            norm_name, norm = b.norm()
            blocks.append(Residual(norm, *[m for _, m in items]))
            marked = [f"{n}!" if item is bad else n for item in items for n in [item[0]]]
            parts.append(f"{norm_name} -> [{', '.join(marked)}]")
        final_name, final = b.norm()
        head = nn.Linear(d, vocab if tokens else rng.randint(2, 8))
        model = FuzzNet(encoder, blocks, final, head, max_len).eval().to(dtype)
        g = torch.Generator().manual_seed(torch_seed)
        example = torch.randint(0, vocab, (batch, length), generator=g) if tokens else (
            torch.randn(batch, length, d_in, generator=g).to(dtype))
    dname = {v: k for k, v in DTYPES.items()}[dtype]
    desc = (f"seed={seed} index={index} {dname} {'tokens' if tokens else 'features'} d={d} heads={heads} "
            f"B={batch} L={length} max_len={max_len} | " + " | ".join(parts) + f" | {final_name} -> head"
            + (f" | ILLEGAL {illegal} ({ILLEGAL[illegal]})" if illegal else ""))
    return Case(seed, index, desc, model, (example,), dtype, max_len, tokens, vocab, d_in, illegal,
                illegal_path, b.used | ({illegal} if illegal else set()))


def all_productions():
    """Every production name the grammar can draw (what a long enough run must cover)."""
    glue = {"linear", "glu", "conv_glu", "repeat", "repeat_interleave", "tile", "rms_vector_norm", "rms_rsqrt",
            "normalize", "layernorm", "tensordot", "gt_where", "clamp", "masked_fill", "softmax_channels",
            "log_softmax_channels", "heads_view", "heads_permute", "einops_rearrange", "min_cut_heads", "running_mean", "permute", "movedim",
            "einsum", "chunk_gate", "split_swap", "unbind_stack", "stack_flatten", "unsqueeze_amax", "inplace",
            "strided_slice", "sort", "topk", "cumsum_channels", "flip_channels", "roll_channels", "index_select",
            "gather", "pad_channels", "cast_up", "cast_double", "batchnorm_eval", "var_norm", "logsumexp",
            "signed_sqrt", "dropout", "mlp", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid",
            "erf", "softplus", "mish", "elu", "hardswish", "first_use_scale"}
    position = {"sinusoidal_pe", "alternating_sign", "arange_features", "learned_pe", "buffer_pe", "embedding_pe", "rotary",
                "cached_pe"}
    attention = {f"attention_{s}" for s in Attention.LEGAL}
    delays = {"shift_k", "token_shift_pad", "token_shift_zeropad2d", "token_shift_cat", "token_shift_roll"}
    convs = {"fft", "fft_default_norm", "fft_full_filter", "fft_channels_last", "fft_complex", "fft_einsum",
             "fft_per_head", "conv1d_long_max", "conv1d_long_L", "conv1d_long_pad", "toeplitz_einsum", "toeplitz_matmul", "fft_planned", "fft_xcorr", "short_module",
             "short_flipped", "short_pad", "short_dilated", "short_dilated_wide", "fft_full_complex"}
    return glue | position | attention | delays | convs | set(FILTERS) | {"hyena", "gated", "conv_layer", "none"} | set(ILLEGAL)


# ----------------------------------------------------------------------------------------------
# Generator self-check (no lcsm_compile).


def _perturb_from(case, x, t, g):
    """x with every position >= t replaced by fresh values (token ids all changed)."""
    fresh = case.inputs(x.shape[1] - t, g, dtype=x.dtype)
    if case.tokens:
        fresh = (x[:, t:] + 1 + fresh % (case.vocab - 1)) % case.vocab
    return torch.cat([x[:, :t], fresh], dim=1)


@torch.no_grad()
def violations(case):
    """{'future': err, 'prefix': err}: the largest change, in float64, of outputs before t when the
    inputs from t on change ('future') or are cut off ('prefix'), over a few t and two lengths."""
    model = copy.deepcopy(case.model).double()
    g = torch.Generator().manual_seed(case.index + 7)
    worst = {"future": 0.0, "prefix": 0.0}
    for L in (case.length, case.max_len):
        x = case.inputs(L, g, dtype=torch.float64)
        y = model(x)
        for t in (1, L // 3, L // 2 + 1, L - 1):
            worst["prefix"] = max(worst["prefix"], rel_err(model(x[:, :t]), y[:, :t]))
            worst["future"] = max(worst["future"], rel_err(model(_perturb_from(case, x, t, g))[:, :t], y[:, :t]))
    return worst


@torch.no_grad()
def nonaffinity(case):
    """How far the illegal module is from an affine map of its input: m(a+b) - m(a) - m(b) + m(0)."""
    module = copy.deepcopy(case.model).double().get_submodule(case.illegal_path)
    g = torch.Generator().manual_seed(case.index + 11)
    d = case.model.encoder.embedding_dim if case.tokens else case.model.encoder.out_features
    a, b = (torch.randn(BATCH, case.length, d, generator=g, dtype=torch.float64) for _ in range(2))
    residual = module(a + b) - module(a) - module(b) + module(torch.zeros_like(a))
    return rel_err(residual, module(a + b))


def check_labels(case):
    """None when the label holds numerically, else a message saying what does not."""
    v = violations(case)
    if case.legal:
        bad = {k: e for k, e in v.items() if e >= SAME}
        return f"labelled legal but {bad}" if bad else None
    kind = ILLEGAL[case.illegal]
    if kind in ("future", "prefix"):
        return None if v[kind] >= SEEN else f"{case.illegal}: expected a visible {kind} violation, got {v}"
    if any(e >= SAME for e in v.values()):
        return f"{case.illegal}: expected causal and prefix-stable, got {v}"
    if kind == "nonlinear":
        n = nonaffinity(case)
        return None if n > 1e-3 else f"{case.illegal}: the module looks affine (residual {n:.1e})"
    return None  # "rule": causal, prefix-stable, excluded by the legality rule itself


@torch.no_grad()
def own_error(case):
    """The model's own error in its dtype against the reference, on fresh inputs at max_len: the
    rounding floor the decode tolerance must sit well above."""
    ref = copy.deepcopy(case.model).to(REF_DTYPE[case.dtype])
    x = case.inputs(case.max_len, torch.Generator().manual_seed(case.index + 13))
    return rel_err(case.model(x), ref(x if case.tokens else x.to(REF_DTYPE[case.dtype])))


# ----------------------------------------------------------------------------------------------
# Runner.


@dataclass
class Result:
    seed: int
    index: int
    desc: str
    dtype: str
    legal: bool
    illegal: str | None
    outcome: str  # ok | legal_refused | illegal_refused | illegal_accepted | silent_error | crash
    repro: str = ""  # the command line that runs this model alone
    detail: str = ""  # the refusal reasons, the error, or the exception
    names_illegal: bool | None = None  # illegal_refused: a rejected candidate lies in the illegal module
    signature: str = ""  # the failure class: outcome + op/reason (no numbers, no node names)
    report: str = ""  # the analysis report's table, when optimize returned one
    err: float | None = None  # teacher-forced relative error (accepted models)
    rows: str = ""  # accepted models, rows at their own positions: exact | wrong | withheld | unsupported
    rows_detail: str = ""
    recurrent: int = 0  # accepted models: long convolutions decoded by their recurrence (modal filters)
    seconds: float = 0.0

    def line(self):
        return f"[{self.outcome}] {self.repro}: {self.detail}\n    {self.desc}"


def _norm(text):
    """An exception or explanation with numbers and node names dropped, to group failures by class."""
    text = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "N", text)
    return re.sub(r"\s+", " ", text)[:160]


def _refusal(report):
    rejected = [c for c in report.candidates if c.verdict.name == "REJECTED"]
    detail = "; ".join(f"{c.reason.name if c.reason else '?'} {c.spelling} [{c.offending}] {c.explanation}"
                       f"{' @ ' + c.source if c.source else ''}" for c in rejected)
    signature = ", ".join(sorted({f"{c.reason.name if c.reason else '?'}:{c.spelling}" for c in rejected}))
    if not rejected:
        detail = signature = "no rejected candidate: " + "; ".join(report.notes)[:200]
    return detail, signature


def _mixed(session, x, total):
    """A chunked prefill of 3 positions, then extends of 1 to 7 positions, each followed by a step."""
    outs, t = [session.prefill(x[:, :3], chunk=2)], 3
    while t < total:
        k = min(total - t, 1 + t % 7)
        outs.append(session.extend(x[:, t : t + k]))
        t += k
        if t < total:
            outs.append(session.step(x[:, t : t + 1]))
            t += 1
    return outs


def teacher_forced(case, decoder, total=None):
    """Relative error of prefill(P) + steps against the reference, worst over P in {1, total/2}
    and over a mix of chunked prefill, extends and steps (P "mixed", where the decoder extends), and (P, the first position
    whose error exceeds the tolerance), None when exact. Outputs of the wrong shape are a wrong
    answer too: (P, -1) and an infinite error."""
    total = total or case.max_len
    g = torch.Generator().manual_seed(10_000 + case.index)
    # a decoder whose capture fixed the batch serves the example's batch only (a typed ShapeError otherwise)
    x = case.inputs(total, g, batch=BATCH if decoder.batch_dynamic else case.example_inputs[0].shape[0])
    ref_model = copy.deepcopy(case.model).to(REF_DTYPE[case.dtype])
    with torch.no_grad():
        ref = ref_model(x if case.tokens else x.to(REF_DTYPE[case.dtype])).double()
        worst, first_bad = 0.0, None
        for P in (1, total // 2) + (("mixed",) if decoder.can("extend") else ()):
            session = decoder.session()
            if P == "mixed":
                outs = _mixed(session, x, total)
            else:
                outs = [session.prefill(x[:, :P])] + [session.step(x[:, t:t + 1]) for t in range(P, total)]
            y = torch.cat(outs, dim=1).double()
            if y.shape != ref.shape:
                return math.inf, (P, -1, f"decoded shape {tuple(y.shape)} != model output {tuple(ref.shape)}")
            err = rel_err(y, ref)
            worst = max(worst, err)
            if err > TOL[case.dtype] and first_bad is None:
                # error at each position, relative to the RMS position norm of the reference
                per_pos = (y - ref).norm(dim=(0, 2)) / ref.norm() * total ** 0.5
                bad = (per_pos > TOL[case.dtype]).nonzero()
                first_bad = (P, int(bad[0]) if len(bad) else int(per_pos.argmax()), "")
    return worst, first_bad


def rows_check(case, decoder, total=None):
    """Rows at their own positions, checked independently of the decoder's own validation:
    left-padded prompts of real lengths total/2 and 1 in one batch, stepped to `total`, each row
    against the reference model on that row alone. -> (exact | wrong | withheld | unsupported, detail)."""
    if decoder.rows_why:
        return "withheld", decoder.rows_why
    try:
        decoder.session()._rows_supported("rows")
    except lcsm_compile.LcsmError as exc:
        return "unsupported", str(exc)
    total = total or case.max_len
    P = total // 2
    lengths = [P, 1]
    g = torch.Generator().manual_seed(20_000 + case.index)
    x = case.inputs(total, g)[:2]
    mask = (torch.arange(P) >= P - torch.tensor(lengths)[:, None]).long()
    ref_model = copy.deepcopy(case.model).to(REF_DTYPE[case.dtype])
    with torch.no_grad():
        session = decoder.session()
        outs = [session.prefill(x[:, :P], attention_mask=mask)] + [session.step(x[:, t:t + 1]) for t in range(P, total)]
        y = torch.cat(outs, dim=1).double()
        for r, n in enumerate(lengths):
            own = x[r:r + 1, P - n:]
            ref = ref_model(own if case.tokens else own.to(REF_DTYPE[case.dtype])).double()
            err = rel_err(y[r:r + 1, P - n:], ref)
            if not err <= TOL[case.dtype]:
                return "wrong", f"row {r} (prompt {n} of {P}): rel err {err:.2e} > {TOL[case.dtype]:.0e}"
    return "exact", ""


def run_case(case, total=None, forced_dtype=False, validate=True, conv="flash", latency=False):
    """Optimize, decode teacher-forced over `total` positions (default max_len), classify. Never raises.
    validate=False: the analysis alone decides (accepted must then be exact on its own). conv,
    latency: optimize()'s, the long convolutions' bank and its mode."""
    start = time.perf_counter()
    dname = str(case.dtype).replace("torch.", "")
    repro = (f"python tests/fuzz.py --seed {case.seed} --index {case.index}" + (f" --dtype {dname}" if forced_dtype else "")
             + ("" if validate else " --no-validate") + ("" if conv == "flash" else f" --conv {conv}")
             + (" --latency" if latency else ""))
    res = Result(case.seed, case.index, case.desc, dname, case.legal, case.illegal, "", repro)
    stage = "optimize"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # odd models take every proved modal filter's recurrence, even ones the cost model's choice
            decoder = lcsm_compile.optimize(case.model, case.example_inputs, max_len=case.max_len, validate=validate,
                                            conv=conv, latency=latency, strategy="recurrent" if case.index % 2 else "auto")
            stage = "decode"
            err, first_bad = teacher_forced(case, decoder, total)
    except lcsm_compile.NotDecodable as exc:
        if stage == "optimize":
            res.outcome = "legal_refused" if case.legal else "illegal_refused"
            res.detail, res.signature = _refusal(exc.report)
            res.report = str(exc.report)
            if not case.legal:
                res.names_illegal = any(c.module_path == case.illegal_path or c.module_path.startswith(case.illegal_path + ".")
                                        for c in exc.report.rejected)
        else:
            res.outcome, res.detail = "crash", f"NotDecodable while decoding: {exc}"
            res.signature = f"decode: NotDecodable {_norm(str(exc))}"
    except Exception as exc:  # noqa: BLE001  a crash is a result here, not an error of the fuzzer
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reversed(tb) if "lcsm_compile" in f.filename
                      or "/passes/" in f.filename or "/kernels/" in f.filename), "?")
        res.outcome = "crash"
        res.detail = f"{stage}: {type(exc).__name__}: {str(exc)[:300]} (at {where})"
        res.signature = f"{stage}: {type(exc).__name__} at {where}: {_norm(str(exc).splitlines()[0] if str(exc) else '')}"
    else:
        res.err = err
        res.report = str(getattr(decoder, "report", ""))
        res.recurrent = len(decoder.recurrent)
        if first_bad is not None:
            P, pos, shape = first_bad
            res.outcome = "silent_error"
            res.detail = shape or f"rel err {err:.2e} > {TOL[case.dtype]:.0e}; first bad position {pos} with prefill {P}"
            res.signature = ("wrong output shape" if shape else "inexact") + f" ({res.dtype}{', ' + case.illegal if case.illegal else ''})"
        else:
            res.outcome = "ok" if case.legal else "illegal_accepted"
            res.detail = f"rel err {err:.2e}"
            res.signature = "" if case.legal else f"illegal_accepted ({case.illegal})"
            try:
                res.rows, res.rows_detail = rows_check(case, decoder, total)
            except Exception as exc:  # noqa: BLE001  a crash of the rows path is a result too
                res.rows, res.rows_detail = "wrong", f"{type(exc).__name__}: {str(exc)[:300]}"
    res.seconds = time.perf_counter() - start
    return res


FAILURES = ("legal_refused", "silent_error", "crash")


def failure_classes(results):
    """{(outcome, signature): [results]}. A legal refusal joins one class per rejected (reason:op) it
    names, so each unknown op is one class; illegal models refused without naming their construct are
    'refused_elsewhere'."""
    classes = defaultdict(list)
    for r in results:
        if r.outcome == "legal_refused":
            for sig in r.signature.split(", "):
                classes[("legal_refused", sig)].append(r)
        elif r.outcome in ("silent_error", "crash", "illegal_accepted"):
            classes[(r.outcome, r.signature)].append(r)
        elif r.names_illegal is False:
            classes[("refused_elsewhere", f"{r.illegal}: {r.signature}")].append(r)
        if r.rows in ("wrong", "withheld", "unsupported"):
            classes[(f"rows_{r.rows}", _norm(r.rows_detail))].append(r)
    return classes


def summarize(results):
    """The counts table, counts per dtype, then one line per failure class with a reproducing model
    (one where that class is the only problem, when there is one)."""
    def counts(rs):
        c = Counter(r.outcome for r in rs)
        rows = Counter(r.rows for r in rs)
        return [len(rs), sum(r.legal for r in rs), c["ok"] + c["illegal_accepted"] + c["silent_error"], c["ok"],
                c["legal_refused"], c["illegal_refused"], sum(r.names_illegal is False for r in rs),
                c["illegal_accepted"], c["silent_error"], c["crash"], rows["exact"], rows["withheld"],
                rows["unsupported"], rows["wrong"], sum(r.recurrent > 0 for r in rs)]

    names = ["models", "legal", "accepted", "ok (legal, exact)", "legal refused", "illegal refused",
             "  ...not naming it", "illegal accepted (exact)", "silent errors", "crashes", "rows: exact",
             "rows: withheld (validation)", "rows: unsupported", "rows: WRONG", "with recurrent convs"]
    dtypes = sorted({r.dtype for r in results})
    cols = [counts(results)] + [counts([r for r in results if r.dtype == d]) for d in dtypes]
    out = [f"{'':<26}{'all':>6}" + "".join(f"{d:>10}" for d in dtypes)]
    out += [f"{name:<26}{col[0][i]:>6}" + "".join(f"{c[i]:>10}" for c in col[1:])
            for i, name in enumerate(names) for col in [cols]]
    classes = failure_classes(results)
    order = FAILURES + ("rows_wrong", "illegal_accepted", "refused_elsewhere", "rows_withheld", "rows_unsupported")
    if classes:
        out.append("\nclasses (count, outcome, signature; a reproducing model; more indices):")
        for (outcome, sig), rs in sorted(classes.items(), key=lambda kv: (order.index(kv[0][0]), -len(kv[1]))):
            rs = sorted(rs, key=lambda r: (r.signature.count(",") if outcome == "legal_refused" else 0, len(r.desc)))
            more = "" if len(rs) == 1 else "  (also " + ", ".join(str(r.index) for r in rs[1:6]) + (", ..." if len(rs) > 6 else "") + ")"
            out.append(f"{len(rs):>4}  {outcome:<16} {sig}\n        {rs[0].repro}{more}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", type=int, help="run only this model of the seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="force one dtype (default: drawn per model)")
    p.add_argument("--no-validate", action="store_true", help="optimize(validate=False): the analysis alone decides")
    p.add_argument("--conv", choices=["flash", "partitioned"], default="flash", help="the long convolutions' bank")
    p.add_argument("--latency", action="store_true", help="with --conv partitioned: its bounded-latency plan")
    p.add_argument("--json", help="write every result here")
    p.add_argument("-v", "--verbose", action="store_true", help="print each model's result in full")
    args = p.parse_args(argv)
    if args.conv == "partitioned":
        # the generated models are short, where this machine's costs plan direct lags only: plan with
        # dear direct lags and a small spike budget, so that the plans have levels (and, with
        # --latency, spread ones in pieces) to exercise
        from lcsm_compile import costs, partition, tuning

        tuning.costs_for = lambda device: costs.Costs(direct_flops_s=1e6, fft_flops_s=1e8, mac_flops_s=1e8, call_s=1e-9)
        partition.SPIKE = 0.25
    dtype = DTYPES.get(args.dtype)
    indices = [args.index] if args.index is not None else range(args.models)
    results = []
    for i in indices:
        case = generate(args.seed, i, dtype)
        res = run_case(case, forced_dtype=dtype is not None, validate=not args.no_validate, conv=args.conv,
                       latency=args.latency)
        results.append(res)
        if args.verbose or args.index is not None:
            print(res.line(), f"({res.seconds:.1f} s)", flush=True)
            if args.index is not None:
                print(res.report)
        else:
            print(f"{i:>4} {res.outcome:<16} {('rows ' + res.rows) if res.rows else '':<18} {res.seconds:5.1f}s", flush=True)
    print()
    print(summarize(results))
    failures = [r for r in results if r.outcome in FAILURES or r.rows == "wrong"]
    if failures:
        print("\nfailures:")
        print("\n".join(r.line() for r in failures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in vars(r).items() if k != "report"} for r in results], f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
