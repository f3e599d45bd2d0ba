"""Time-axis analysis: position axes follow transposes / reshapes / merges, and each op on activations
is classified local, conv_part or mixing (with position-indexed constants recognised)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm_compile.analysis import Context
from lcsm_compile.passes import canonicalize, capture, time_axis

L = 16


def analyse(fn, capture_level="export", d=4, params=None):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d, d))
            self.pos = nn.Parameter(torch.randn(64, d))

        def forward(self, x):
            return fn(self, x)

    x = torch.randn(2, L, d)
    ctx = Context((x,), 64, capture_level)
    cap = capture.capture(M(), (x,), capture_level, 64)
    ctx.cap = cap
    canon = canonicalize.run(cap, ctx)
    info = time_axis.run(canon, ctx)
    return canon, info


def ops(canon, info, cls):
    return {c.op for n, c in canon.items() if info[n].cls == cls and info[n].dep == "activation"}


@pytest.mark.parametrize("capture_level", ["export", "dynamo"])
def test_axis_follows_layout_changes(capture_level):
    def f(self, x):
        u = x.transpose(1, 2)  # b d l
        v = u.reshape(2, 2, 2, -1)  # b h d l
        w = v.permute(0, 3, 1, 2)  # b l h d
        merged = x.reshape(-1, 4)  # (b l) d
        return w.flatten(2) + (merged @ self.w).reshape(2, -1, 4)

    canon, info = analyse(f, capture_level)
    axes = {c.op: info[n].dims for n, c in canon.items() if info[n].dep == "activation" and c.op != "output"}
    assert axes["transpose"] == (2,)
    assert axes["permute"] == (1,)
    assert axes["matmul"] == (0,)  # the merged (b l) axis carries positions
    assert ops(canon, info, "mixing") == set()


@pytest.mark.parametrize("fn,op", [
    (lambda s, x: x.mean(dim=1), "reduce"),
    (lambda s, x: torch.softmax(x, dim=1), "softmax"),
    (lambda s, x: torch.cumsum(x, dim=1), "scan"),
    (lambda s, x: x.flip(1), "flip"),
    (lambda s, x: x[:, 1:], "slice"),
    (lambda s, x: x[:, -1], "select"),
    (lambda s, x: x @ x.transpose(1, 2), "matmul"),
    (lambda s, x: F.scaled_dot_product_attention(x, x, x, is_causal=True), "attention"),
    (lambda s, x: torch.einsum("bld,bmd->blm", x, x), "einsum"),
    (lambda s, x: F.layer_norm(x.transpose(1, 2), (L,)), "layer_norm"),
])
def test_time_mixing_ops(fn, op):
    canon, info = analyse(fn)
    assert op in ops(canon, info, "mixing")


@pytest.mark.parametrize("fn", [
    lambda s, x: x.mean(dim=-1),
    lambda s, x: torch.softmax(x, dim=-1),
    lambda s, x: F.layer_norm(x, (4,)),
    lambda s, x: F.gelu(x @ s.w) * x,
    lambda s, x: x[:, :8],  # a prefix slice keeps positions [0, 8)
    lambda s, x: torch.einsum("bld,de->ble", x, s.w),
])
def test_time_local_ops(fn):
    canon, info = analyse(fn)
    assert ops(canon, info, "mixing") == set()


def test_position_indexed_constants():
    def f(self, x):
        n = x.shape[1]
        t = torch.arange(n, dtype=x.dtype)[None, :, None]
        return x + self.pos[:n] + t

    canon, info = analyse(f)
    consts = {c.op for n, c in canon.items() if info[n].cls == "position_constant"}
    assert {"slice", "factory"} <= consts
    static_lag = [info[n] for n, c in canon.items() if c.op == "slice" and info[n].dep == "static"]
    assert static_lag and static_lag[0].kind == "lag"
    assert ops(canon, info, "mixing") == set()


def test_convolution_pieces_are_conv_parts():
    def f(self, x):
        u = x.transpose(1, 2)
        n = 2 * u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.pos.t()[:, : u.shape[-1]], n=n), n=n)
        return F.conv1d(F.pad(y[..., : u.shape[-1]], (2, 0)), self.w[:, None, :3], groups=4)

    canon, info = analyse(f)
    assert ops(canon, info, "conv_part") == {"rfft", "irfft", "pad", "conv1d"}
    static_fft = [info[n] for n, c in canon.items() if c.op == "rfft" and info[n].dep == "static"]
    assert static_fft and static_fft[0].cls == "static"
