"""Capture: torch.export with a symbolic length, the dynamo graph, concrete fallbacks, failures,
and the float64 evaluator the numeric checks run on."""

import pytest
import sympy
import torch
import torch.nn as nn

import lcsm_compile
from lcsm_compile import Reason, Verdict
from lcsm_compile.analysis import analyze_graph
from lcsm_compile.passes import capture as cap_mod

C, L = 4, 16


class Tiny(nn.Module):
    """A causal FFT conv with a float32 cast inside (the evaluator must widen it)."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.randn(C, 32) * torch.exp(-torch.arange(32) / 4.0))

    def forward(self, x):
        u = x.transpose(1, 2).to(torch.float32)
        n = 2 * u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.k[:, : u.shape[-1]], n=n), n=n)
        return y[..., : u.shape[-1]].transpose(1, 2)


def test_export_capture_is_symbolic():
    cap = cap_mod.capture(Tiny(), (torch.randn(2, L, C),), "export", 32)
    assert cap.symbolic and isinstance(cap.length_symbol, sympy.Symbol)
    assert cap.level == "export" and (cap.min_len, cap.max_len) == (2, 32)
    assert cap.size_at(cap.length_symbol * 2 + 1, 10) == 21


@pytest.mark.parametrize("batch", [1, 3])
def test_the_batch_is_dynamic_with_one_export_whatever_the_example_batch(batch, monkeypatch):
    """export specializes a size-1 dim, so a batch-1 example is exported as two copies of itself:
    one export either way, and the batch stays symbolic (sessions of any batch, rows that join)."""
    calls = []
    export = cap_mod._export
    monkeypatch.setattr(cap_mod, "_export", lambda *a: calls.append(a) or export(*a))
    cap = cap_mod.capture(Tiny(), (torch.randn(batch, L, C),), "export", 32)
    assert cap.symbolic and len(calls) == 1
    assert cap.batch_symbol is not None and 0 in calls[0][2][0]
    assert calls[0][1][0].shape[0] == max(batch, 2)


def test_a_model_that_runs_only_at_batch_one_is_exported_at_batch_one(monkeypatch):
    class BatchOne(Tiny):
        def forward(self, x):
            torch._check(x.shape[0] == 1)
            return super().forward(x)

    cap = cap_mod.capture(BatchOne(), (torch.randn(1, L, C),), "export", 32)
    assert cap.symbolic and cap.batch_symbol is None


def test_dynamo_capture_and_analyze_graph():
    model, x = Tiny(), torch.randn(2, L, C)
    gm, backend_inputs, _ = cap_mod.capture_dynamo(model, (x,))
    assert isinstance(gm, torch.fx.GraphModule)
    assert any(isinstance(t, torch.nn.Parameter) for t in backend_inputs)
    report = analyze_graph(gm, backend_inputs, max_len=32)
    assert report.capture.level == "dynamo" and report.capture.symbolic
    assert report.decodable, report.table()
    (cand,) = report.accepted
    ref = model.k.detach().double()
    assert float((cand.conv.h - ref).norm() / ref.norm()) < 1e-6


def test_evaluator_runs_in_float64():
    model, x = Tiny(), torch.randn(2, L, C)
    cap = cap_mod.capture(model, (x,), "export", 32)
    runner = cap_mod.Runner(cap)
    x64 = cap_mod.random_inputs(cap, 10)
    out = runner.run_full(x64)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert out.dtype == torch.float64 and out.shape == (2, 10, C)
    # the float32 cast is widened: compare with the same convolution computed in float64
    u = x64[0].double().transpose(1, 2)
    k = model.k.detach().double()[:, :10]
    want = torch.fft.irfft(torch.fft.rfft(u, n=20) * torch.fft.rfft(k, n=20), n=20)[..., :10].transpose(1, 2)
    assert float((out - want).norm() / want.norm()) < 1e-12


def test_conv1d_f64_matches_torch():
    x, w, b = torch.randn(2, 6, 11, dtype=torch.float64), torch.randn(6, 2, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    for kw in ({"padding": 2, "groups": 3}, {"padding": 1, "dilation": 2, "groups": 1 * 3}, {"padding": "same", "groups": 3}):
        want = torch.nn.functional.conv1d(x, w, b, **kw)
        got = cap_mod.conv1d_f64(x, w, b, **kw)
        assert float((got - want).norm() / want.norm()) < 1e-12


class SpecializesL(nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[1] == L else x


@pytest.mark.parametrize("capture", ["export", "dynamo"])
def test_concrete_fallback_is_recorded_and_checked_at_other_lengths(capture):
    report = lcsm_compile.analyze(SpecializesL(), (torch.randn(2, L, C),), capture=capture)
    assert not report.capture.symbolic
    # the model behaves differently below L: the safety net at a shorter prefix sees it
    assert not report.decodable
    assert Reason.CAUSALITY_CHECK_FAILED in {c.reason for c in report.candidates}


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


@pytest.mark.parametrize("capture", ["export", "dynamo"])
def test_capture_failure_is_reported_not_raised(capture):
    report = lcsm_compile.analyze(DataDependent(), (torch.randn(2, L, C),), capture=capture)
    assert report.decodable is False
    (cand,) = report.candidates
    assert cand.verdict is Verdict.REJECTED and cand.reason is Reason.CAPTURE_FAILED
    assert cand.explanation and "Traceback" not in cand.explanation and len(cand.explanation) <= 400
    assert '"decodable": false' in report.to_json()


def test_bad_arguments_raise_typed_errors():
    x = (torch.randn(2, L, C),)
    with pytest.raises(ValueError, match="'export', 'dynamo'"):
        lcsm_compile.analyze(Tiny(), x, capture="jit")
    with pytest.raises(ValueError, match="max_len"):
        lcsm_compile.analyze(Tiny(), x, max_len=L - 1)
    with pytest.raises(TypeError, match="example_inputs"):
        lcsm_compile.analyze(Tiny(), [[1.0]])
    assert lcsm_compile.analyze(Tiny(), torch.randn(2, L, C)).decodable  # a single tensor is the only input
    with pytest.raises(ValueError, match="sequence on dim 1"):
        lcsm_compile.analyze(Tiny(), (torch.randn(L),))


def test_analyze_graph_inside_a_torch_compile_backend():
    """What the future `lcsm` backend does: analyze the graph dynamo hands it."""
    reports = []

    def backend(gm, example_inputs):
        reports.append(analyze_graph(gm, example_inputs, max_len=32))
        return gm.forward

    model, x = Tiny(), torch.randn(2, L, C)
    torch._dynamo.reset()
    out = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)(x)
    torch._dynamo.reset()
    assert out.shape == x.shape
    (report,) = reports
    assert report.decodable and [c.spelling for c in report.accepted] == ["fft_conv"]


def test_training_mode_is_noted():
    model = nn.Sequential(nn.Linear(C, C), nn.Dropout(0.5)).train()
    report = lcsm_compile.analyze(model, (torch.randn(2, L, C),))
    assert any("training mode" in n for n in report.notes)
