"""Time-axis analysis: positions are followed through every op by what the op does (pointwise tags,
schema dims, symbolic shapes, contractions, decompositions, a probe), never by a list of models'
ops. Each op on activations is local, a convolution part, a causal delay, or mixing (with a reason)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm_compile import pipeline

L, D = 16, 8


def analyse(fn, capture_level="export", d=D):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d, d))
            self.pos = nn.Parameter(torch.randn(64, d))
            self.register_buffer("idx", torch.tensor([3, 1, 0, 2]))

        def forward(self, x):
            return fn(self, x)

    x = torch.randn(2, L, d)
    ctx = pipeline.run(pipeline.Context(M(), (x,), 64, capture_level), stop_after="time_axis")
    assert ctx.time_info is not None, ctx.report.table()
    return ctx.canon, ctx.time_info


def by_cls(canon, info, cls):
    return {c.fn or c.op for n, c in canon.items() if info[n].cls == cls and info[n].dep == "activation"}


def mixing(canon, info):
    return by_cls(canon, info, "mixing")


@pytest.mark.parametrize("capture_level", ["export", "dynamo"])
def test_axis_follows_layout_changes(capture_level):
    def f(self, x):
        u = x.transpose(1, 2)  # b d l
        v = u.reshape(2, 2, 4, -1)  # b h d l
        w = v.permute(0, 3, 1, 2)  # b l h d
        merged = x.reshape(-1, D)  # (b l) d
        return w.flatten(2) + (merged @ self.w).reshape(2, -1, D)

    canon, info = analyse(f, capture_level)
    axes = {c.fn: info[n].axis for n, c in canon.items() if info[n].dep == "activation" and info[n].axis is not None}
    assert axes["transpose"].dim == 2
    assert axes["permute"].dim == 1
    mm = next(a for name, a in axes.items() if name in ("mm", "matmul"))
    assert mm.dim == 0 and mm.inner == 1  # the merged (b l) axis carries positions
    assert mixing(canon, info) == set()


@pytest.mark.parametrize("fn,op", [
    (lambda s, x: x.mean(dim=1), "mean"),
    (lambda s, x: torch.softmax(x, dim=1), "softmax"),
    (lambda s, x: torch.cumprod(x, dim=1), "cumprod"),
    (lambda s, x: x.sort(dim=1).values, "sort"),
    (lambda s, x: x.flip(1), "flip"),
    (lambda s, x: x.roll(1, dims=1), "roll"),
    (lambda s, x: x[:, 1:], "slice"),
    (lambda s, x: x[:, ::2], "slice"),
    (lambda s, x: x[:, -1], "select"),
    (lambda s, x: x * x[:, -1:], "slice"),
    (lambda s, x: F.pad(x, (0, 0, -1, 1)), "pad"),  # a shift toward the past
    (lambda s, x: F.pad(x.transpose(1, 2), (1, 1), mode="reflect"), "pad"),
    (lambda s, x: x.repeat(1, 2, 1), "repeat"),
    (lambda s, x: x.repeat_interleave(2, dim=1), "repeat_interleave"),
    (lambda s, x: x.reshape(2, 2, -1, D).sum(2), "reshape"),  # splits the positions axis
    (lambda s, x: x @ x.transpose(1, 2), "matmul"),
    (lambda s, x: F.scaled_dot_product_attention(x, x, x, is_causal=True), "scaled_dot_product_attention"),
    (lambda s, x: torch.einsum("bld,bmd->blm", x, x), "einsum"),
    (lambda s, x: F.layer_norm(x.transpose(1, 2), (x.shape[1],)), "layer_norm"),
    (lambda s, x: x.transpose(1, 2) @ s.pos[: x.shape[1]], "matmul"),  # contracts over positions
])
def test_time_mixing_ops(fn, op):
    canon, info = analyse(fn)
    # a roll is a delay with wrapped rows (delay_part) until they are zeroed: never whole, so declined
    assert op in mixing(canon, info) | by_cls(canon, info, "delay_part"), \
        {c.fn: info[n].why for n, c in canon.items() if info[n].cls == "mixing"}


def test_cumsum_over_positions_is_a_convolution():
    """y_t = sum_{s<=t} x_s: the all-ones causal convolution, for detect; over channels it is local."""
    canon, info = analyse(lambda s, x: torch.cumsum(x, dim=1) + x.cumsum(-1))
    by_dim = {canon[n].params["dim"]: info[n] for n, c in canon.items() if c.fn == "cumsum"}
    assert by_dim[(1,)].cls == "conv_part" and by_dim[(1,)].axis.dim == 1
    assert by_dim[(2,)].cls == "local"
    assert mixing(canon, info) == set()


def test_length_used_as_a_number_is_length_dependent():
    canon, info = analyse(lambda s, x: x / x.shape[1])
    (reason,) = {info[n].reason for n in canon if info[n].cls == "mixing"}
    assert reason == "LENGTH_DEPENDENT"


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("fn", [
    lambda s, x: x.mean(dim=-1),
    lambda s, x: torch.softmax(x, dim=-1),
    lambda s, x: F.layer_norm(x, (D,)),
    lambda s, x: F.gelu(x @ s.w) * x,
    lambda s, x: torch.einsum("bld,de->ble", x, s.w),
    lambda s, x: F.glu(x, dim=-1),
    lambda s, x: F.glu(x.transpose(1, 2), dim=-2),  # channels-first, as S4D does after a kernel-1 conv
    lambda s, x: x.repeat(1, 1, 2).reshape(2, -1, 2, D).sum(2),
    lambda s, x: x.repeat_interleave(2, dim=-1),
    lambda s, x: x.tile((1, 1, 3)),
    lambda s, x: x / torch.linalg.vector_norm(x, dim=-1, keepdim=True),
    lambda s, x: F.normalize(x, dim=-1),
    lambda s, x: _rms(x),
    lambda s, x: torch.tensordot(x, s.w, dims=([2], [0])),
    lambda s, x: torch.where(x > 0, x, 0.1 * x),
    lambda s, x: x.clamp(-1, 1).masked_fill(torch.arange(D) % 2 == 0, 0.0),
    lambda s, x: x.view(x.shape[0], x.shape[1], 2, D // 2).transpose(1, 2).reshape(x.shape[0], 2, x.shape[1], -1).transpose(1, 2),
    lambda s, x: torch.stack(x.chunk(2, dim=-1), dim=-1).sum(-1) + torch.stack(x.unbind(-1)[:2], -1).sum(-1, keepdim=True),
    lambda s, x: x.sort(dim=-1).values + x.topk(2, dim=-1).values.sum(-1, keepdim=True) + x.cumsum(-1) + x.flip(-1) + x.roll(1, -1),
    lambda s, x: x.index_select(-1, s.idx) + x[..., :4].gather(-1, s.idx.expand(2, x.shape[1], 4)),
    lambda s, x: F.pad(x, (1, 1))[..., 1:-1],
    lambda s, x: x[..., ::2].repeat_interleave(2, -1),
    lambda s, x: F.hardswish(x) + F.silu(x) + torch.erf(x) + F.mish(x),
    lambda s, x: x.unsqueeze(2).squeeze(2).movedim(1, 2).movedim(2, 1),
])
def test_time_local_ops(fn):
    canon, info = analyse(fn)
    assert mixing(canon, info) == set(), {c.fn: info[n].why for n, c in canon.items() if info[n].cls == "mixing"}


def test_in_place_ops_on_activations_are_local():
    def f(self, x):
        y = x.clone()
        y.mul_(2.0)
        y += x
        y[..., :2] = 0
        return y

    canon, info = analyse(f)
    assert mixing(canon, info) == set()


@pytest.mark.parametrize("fn,delay", [
    (lambda s, x: F.pad(x, (0, 0, 1, -1)), 1),
    (lambda s, x: nn.ZeroPad2d((0, 0, 2, -2))(x), 2),
    (lambda s, x: torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1), 1),
    (lambda s, x: F.pad(x.transpose(1, 2), (3, 0))[..., : x.shape[1]].transpose(1, 2), 3),
])
def test_causal_delays(fn, delay):
    canon, info = analyse(fn)
    delays = [info[n] for n in canon if info[n].cls == "delay"]
    assert [t.delay for t in delays] == [delay]
    assert mixing(canon, info) == set()


def test_roll_with_the_wrapped_row_zeroed_is_a_delay():
    def f(self, x):
        y = x.roll(1, dims=1)
        y[:, 0] = 0
        return y

    canon, info = analyse(f)
    assert [info[n].delay for n in canon if info[n].cls == "delay"] == [1]


def test_zeros_with_a_shifted_write_is_a_delay():
    def f(self, x):
        y = torch.zeros_like(x)
        y[:, 1:] = x[:, :-1]
        return y

    canon, info = analyse(f)
    assert [info[n].delay for n in canon if info[n].cls == "delay"] == [1]


def test_position_constants_are_static_and_length_dependent():
    def f(self, x):
        n = x.shape[1]
        t = torch.arange(n, dtype=x.dtype)[None, :, None]
        return x + self.pos[:n] + t

    canon, info = analyse(f)
    consts = {c.op for n, c in canon.items() if info[n].dep == "static" and info[n].length_dependent}
    assert {"slice", "factory"} <= consts
    sliced = [info[n] for n, c in canon.items() if c.op == "slice" and info[n].dep == "static"]
    assert sliced and sliced[0].kind == "lag"
    params = [info[n] for n, c in canon.items() if c.op == "param"]
    assert params and not any(t.length_dependent for t in params)
    assert mixing(canon, info) == set()


def test_convolution_pieces_are_conv_parts():
    def f(self, x):
        u = x.transpose(1, 2)
        n = 2 * u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.pos.t()[:, : u.shape[-1]], n=n), n=n)
        return F.conv1d(F.pad(y[..., : u.shape[-1]], (2, 0)), self.w[:, None, :3], groups=D).transpose(1, 2)

    canon, info = analyse(f)
    assert {"fft_rfft", "fft_irfft", "conv1d"} <= by_cls(canon, info, "conv_part")
    assert "pad" in by_cls(canon, info, "delay_part")  # the conv's causal padding: claimed by the conv1d match
    static_fft = [info[n] for n, c in canon.items() if c.op == "rfft" and info[n].dep == "static"]
    assert static_fft and static_fft[0].cls == "static"
    assert mixing(canon, info) == set()


# An op no rule knows: opaque custom ops are probed numerically on the captured example.
@torch.library.custom_op("lcsm_test::scale_channels", mutates_args=())
def scale_channels(x: torch.Tensor) -> torch.Tensor:
    return x * torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)


scale_channels.register_fake(lambda x: torch.empty_like(x))


@torch.library.custom_op("lcsm_test::running_sum", mutates_args=())
def running_sum(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(1)


running_sum.register_fake(lambda x: torch.empty_like(x))


def test_probe_accepts_a_local_opaque_op_and_declines_a_mixing_one():
    canon, info = analyse(lambda s, x: scale_channels(x))
    (t,) = [info[n] for n, c in canon.items() if c.fn == "scale_channels"]
    assert t.cls == "local" and t.axis.dim == 1 and "probed" in t.why
    canon, info = analyse(lambda s, x: running_sum(x))
    (t,) = [info[n] for n, c in canon.items() if c.fn == "running_sum"]
    assert t.cls == "mixing" and "probed" in t.why
