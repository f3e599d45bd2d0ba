"""The pass manager: one list of passes for analyze / optimize / the backend, translation
validation of what the rewrite built, and typed verdicts instead of crashes."""

import pytest
import torch
import torch.nn as nn

import lcsm_compile
from helpers import rel_err
from lcsm_compile import NotDecodable, Reason, pipeline
from lcsm_compile.passes import capture, detect

L, C = 24, 4


class Conv(nn.Module):
    """A causal FFT convolution between two linear maps."""

    def __init__(self, op=None):
        super().__init__()
        self.k = nn.Parameter(torch.randn(C, 64) * torch.exp(-torch.arange(64) / 6.0))
        self.inp, self.out = nn.Linear(C, C), nn.Linear(C, C)
        self.op = op

    def forward(self, x):
        u = self.inp(x)
        if self.op is not None:
            u = self.op(u)
        u = u.transpose(1, 2)
        n = 2 * u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.k[:, : u.shape[-1]], n=n), n=n)[..., : u.shape[-1]]
        return self.out(y.transpose(1, 2))


# A position-dependent op the rules cannot see into: an opaque custom op whose output at t is
# x[t] * t. The probe sees each position move alone (it is time-local), but at one position the
# step program computes t = 0: only validation can catch it.
@torch.library.custom_op("lcsm_test::times_position", mutates_args=())
def times_position(x: torch.Tensor) -> torch.Tensor:
    return x * torch.arange(x.shape[1], dtype=x.dtype)[None, :, None]


times_position.register_fake(lambda x: torch.empty_like(x))


def test_every_entry_point_runs_the_same_passes():
    decoder = lcsm_compile.optimize(Conv(), (torch.randn(2, L, C),), max_len=64)
    assert [name for name, _, _ in decoder.report.passes] == list(pipeline.PASS_NAMES)
    report = lcsm_compile.analyze(Conv(), (torch.randn(2, L, C),), max_len=64)
    assert [name for name, _, _ in report.passes] == list(pipeline.ANALYSIS_PASSES)


def test_validation_refuses_a_wrong_decoder():
    model = Conv(times_position)
    report = lcsm_compile.analyze(model, (torch.randn(2, L, C),), max_len=64)
    assert report.decodable, report.table()  # the analysis alone is fooled ...
    with pytest.raises(NotDecodable) as err:
        lcsm_compile.optimize(model, (torch.randn(2, L, C),), max_len=64)
    (cand,) = err.value.report.rejected  # ... translation validation is not
    assert cand.reason is Reason.DECODE_MISMATCH and "position 1" in cand.explanation
    # validate=False hands the wrong decoder out: the check is what stands between it and the user
    decoder = lcsm_compile.optimize(model, (torch.randn(2, L, C),), max_len=64, validate=False)
    x = torch.randn(2, 40, C)
    session = decoder.session()
    y = torch.cat([session.prefill(x[:, :1])] + [session.step(x[:, t : t + 1]) for t in range(1, 40)], 1)
    assert rel_err(y, model(x)) > 1e-2
    assert "validate" not in [name for name, _, _ in decoder.report.passes]


def test_validation_passes_and_reports_its_time():
    decoder = lcsm_compile.optimize(Conv(), (torch.randn(2, L, C),), max_len=64)
    (dump, seconds), = [(d, s) for name, d, s in decoder.report.passes if name == "validate"]
    assert "passed" in dump and "64 positions" in dump and seconds > 0


def test_a_failing_pass_is_a_typed_verdict_with_its_source_line(monkeypatch):
    def broken(cnode, canon, info):
        node = cnode  # noqa: F841 - the pipeline reports the node a failing pass was working on
        raise RuntimeError("boom")

    monkeypatch.setattr(detect, "match_fft", broken)
    report = lcsm_compile.analyze(Conv(), (torch.randn(2, L, C),), max_len=64)
    assert not report.decodable
    (cand,) = report.rejected
    assert cand.reason is Reason.CAPTURE_FAILED and cand.spelling == "detect"
    assert "RuntimeError: boom" in cand.explanation and "test_pipeline.py" in cand.explanation
    with pytest.raises(NotDecodable):
        lcsm_compile.optimize(Conv(), (torch.randn(2, L, C),), max_len=64)


def test_export_failure_falls_back_to_the_dynamo_capture(monkeypatch):
    export = capture._export

    def export_fails_on_the_model(model, *args, **kwargs):  # the dynamo graph, wrapped, still exports
        if not isinstance(model, capture.GraphAsModule):
            raise RuntimeError("export is unavailable")
        return export(model, *args, **kwargs)

    monkeypatch.setattr(capture, "_export", export_fails_on_the_model)
    report = lcsm_compile.analyze(Conv(), (torch.randn(2, L, C),), max_len=64)
    assert report.capture.level == "dynamo" and report.capture.symbolic
    assert "export is unavailable" in report.capture.note and report.decodable


def test_a_model_that_caches_a_table_in_forward_is_analysed_and_left_untouched():
    class Cached(Conv):
        def __init__(self):
            super().__init__()
            self.table = None

        def forward(self, x):
            if self.table is None or self.table.shape[0] < x.shape[1]:
                self.table = torch.sin(torch.arange(x.shape[1], dtype=x.dtype)[:, None] * torch.arange(1, C + 1))
            return super().forward(x + self.table[: x.shape[1]])

    model = Cached()
    decoder = lcsm_compile.optimize(model, (torch.randn(2, L, C),), max_len=64)
    assert model.table is None  # capture ran forward on fake tensors: nothing of that is left behind
    x = torch.randn(3, 50, C)  # another batch size than the example's
    session = decoder.session()
    y = torch.cat([session.prefill(x[:, :5])] + [session.step(x[:, t : t + 1]) for t in range(5, 50)], 1)
    with torch.no_grad():
        assert rel_err(y, model(x)) < 1e-5
