"""The analysis on the model zoo: decodable models are accepted with the expected number of long and
short convolutions; each look-alike is declined with its typed reason. Both capture paths."""

import pytest

import lcsm_compile
from examples.models import ZOO


@pytest.mark.parametrize("capture", ["export", "dynamo"])
@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_analysis_on_zoo(entry, capture):
    model, example_inputs = entry.build()
    report = lcsm_compile.analyze(model, example_inputs, capture=capture)
    assert report.decodable == entry.decodable
    if not entry.decodable:
        rejected = {c.reason.name for c in report.candidates if c.verdict.name == "REJECTED"}
        assert entry.reason in rejected
    else:
        accepted = [c for c in report.candidates if c.verdict.name == "ACCEPTED"]
        assert sum(c.kind == "long" for c in accepted) == entry.n_long
        assert sum(c.kind == "short" for c in accepted) == entry.n_short
