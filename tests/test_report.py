"""The Report: verdicts, reasons, provenance of every candidate, JSON and table renderings, the
per-pass dumps, and the 'nothing to decode' case."""

import json

import torch
import torch.nn as nn

import lcsm_compile
from lcsm_compile.pipeline import ANALYSIS_PASSES
from lcsm_compile import Candidate, Reason, Report, Verdict

C, L, LMAX = 4, 16, 32


class ConvThenAttend(nn.Module):
    """One causal short conv, then an attention layer that sees the future: not decodable (NON_CAUSAL_MASK)."""

    def __init__(self):
        super().__init__()
        self.short = nn.Conv1d(C, C, 3, groups=C, padding=2)
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        x = self.short(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)


def test_enums_are_str_valued():
    assert Verdict.ACCEPTED == "ACCEPTED" and Reason.WRAP_AROUND == "WRAP_AROUND"
    needed = {"WRAP_AROUND", "NON_CAUSAL_PADDING", "BIDIRECTIONAL_FILTER", "FILTER_DEPENDS_ON_INPUT",
              "FILTER_DEPENDS_ON_LENGTH", "NONLINEAR", "TIME_MIXING_OP", "CAPTURE_FAILED"}
    assert needed <= {r.name for r in Reason}
    assert all(r.name == r.value for r in Reason)


def test_report_lists_convs_and_time_mixing_ops_with_provenance():
    report = lcsm_compile.analyze(ConvThenAttend(), (torch.randn(2, L, C),), max_len=LMAX)
    assert isinstance(report, Report) and report.decodable is False
    conv = next(c for c in report.candidates if c.spelling == "conv1d")
    attn = next(c for c in report.candidates if c.kind == "attention")
    assert isinstance(conv, Candidate) and conv.verdict is Verdict.ACCEPTED and conv.kind == "short"
    assert conv.module_path == "short" and "test_report.py" in conv.source
    assert conv.channels == C and conv.max_len == LMAX and conv.dtype == "float32"
    assert conv.length and conv.filter_length == "3"
    assert attn.verdict is Verdict.REJECTED and attn.reason is Reason.NON_CAUSAL_MASK and attn.offending
    assert "scaled_dot_product_attention" in attn.explanation and "test_report.py" in attn.source


def test_json_and_table():
    report = lcsm_compile.analyze(ConvThenAttend(), (torch.randn(2, L, C),), max_len=LMAX)
    data = json.loads(report.to_json())
    assert data["decodable"] is False
    assert {c["reason"] for c in data["candidates"]} >= {None, "NON_CAUSAL_MASK"}
    assert data["capture"]["level"] == "export" and data["capture"]["symbolic"] is True
    assert [p["name"] for p in data["passes"]] == list(ANALYSIS_PASSES)
    text = str(report)
    assert text == report.table()
    assert "decodable=False" in text and "NON_CAUSAL_MASK" in text and "conv1d" in text
    widths = {len(line) for line in text.splitlines()[1:3]}
    assert max(widths) <= 140


def test_pass_dumps_are_recorded():
    report = lcsm_compile.analyze(ConvThenAttend(), (torch.randn(2, L, C),), max_len=LMAX)
    dumps = {name: dump for name, dump, seconds in report.passes}
    assert "conv1d" in dumps["canonicalize"] and "attention" in dumps["canonicalize"]
    assert "conv_part" in dumps["time_axis"] and "mixing" in dumps["time_axis"]
    assert "conv1d" in dumps["detect"]
    assert all(seconds >= 0 for _, _, seconds in report.passes)


def test_nothing_to_decode():
    model = nn.Sequential(nn.Linear(C, C), nn.GELU())
    report = lcsm_compile.analyze(model, (torch.randn(2, L, C),))
    assert report.candidates == [] and report.decodable is False
    assert any("NO_CONVOLUTION" in n and "nothing to decode" in n for n in report.notes)
    assert "nothing to decode" in report.table()
