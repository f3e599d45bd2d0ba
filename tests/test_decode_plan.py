"""The decode plan (passes/decode_plan.py): each site's strategy, bank channels and dtype, the
served max_len and the bank, in one artifact the Decoder is built from without running a pass."""

import warnings

import pytest
import torch

import lcsm_compile
from examples.models import get
from examples.models.hybrid import hybrid_lm
from lcsm_compile import pipeline
from lcsm_compile.kernels.triton_common import rel_err
from lcsm_compile.runtime.recurrent import RecurrentConvs
from lcsm_compile.runtime.ring import RingConvs
from lcsm_compile.runtime.state import SessionState
from lcsm_compile.runtime.tiled import TiledConvs


def optimize(model, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lcsm_compile.optimize(model, inputs, compile=False, **kw)


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    model = hybrid_lm("sdpa", "haha", max_len=96).eval()
    inputs = (torch.randint(0, 64, (1, 8)),)
    return model, inputs, optimize(model, inputs, max_len=96)


def test_every_site_has_its_strategy_channels_and_dtype(hybrid):
    _, _, decoder = hybrid
    plan = decoder.plan
    assert "decode_plan" in pipeline.PASS_NAMES and any(name == "decode_plan" for name, _, _ in decoder.report.passes)
    assert [s.index for s in plan.sites] == list(range(len(decoder.sites)))
    assert [s.name for s in plan.sites] == [s.name for s in decoder.sites]
    kinds = {s.kind for s in plan.sites}
    assert kinds == {"long", "short"} and len(plan.attention) == 2
    for s in plan.sites:
        assert s.strategy == {"long": "tile", "short": "ring"}[s.kind] and s.dtype == torch.float32
        assert (s.channels is not None) == (s.strategy == "tile")
    assert all(a.strategy == "kv_cache" for a in plan.attention)
    # the tiled sites' channels tile the bank, in site order, each as wide as its site
    tiled = plan.tiled()
    assert [s.channels.start for s in tiled] == [0] + [s.channels.stop for s in tiled[:-1]]
    assert [s.channels.stop - s.channels.start for s in tiled] == [decoder.sites[s.index].width for s in tiled]
    assert tiled[-1].channels.stop == decoder.bank.channels
    assert plan.max_len == decoder.max_len == 96 and plan.bank == "flash" and plan.bank_options["crossover"] >= 1
    state = SessionState(decoder)
    assert [type(c) for c in state.convs] == [TiledConvs if s.strategy == "tile" else RingConvs for s in plan.sites]
    text = plan.table()
    assert f"flash bank of {decoder.bank.channels} channels" in text and text.count(": kv_cache") == 2


def test_a_decoder_built_from_the_plan_alone_decodes_the_same(hybrid):
    model, inputs, decoder = hybrid
    again = lcsm_compile.Decoder(decoder.plan, decoder.report, example_inputs=inputs)
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = []
        for d in (decoder, again):
            s = d.session()
            outs.append(torch.cat([s.prefill(x[:, :5])] + [s.step(x[:, t : t + 1]) for t in range(5, 40)], 1))
        full = model(x)
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[1], full) < 1e-5


def test_recurrent_sites_hold_no_bank_channels():
    model, inputs = get("striped_hyena").build()
    decoder = optimize(model, inputs, strategy="recurrent")
    longs = [s for s in decoder.plan.sites if s.kind == "long"]
    assert longs and all(s.strategy == "recurrent" and s.channels is None for s in longs)
    assert sorted(decoder.recurrent) == [s.index for s in longs]
    assert all(isinstance(SessionState(decoder).convs[s.index], RecurrentConvs) for s in longs)


def test_build_decoder_serves_at_most_the_analysed_length(hybrid):
    model, inputs, decoder = hybrid
    short = lcsm_compile.build_decoder(decoder.report, inputs, max_len=48, compile=False)
    assert short.max_len == short.plan.max_len == 48 and short.bank.max_len == 48
    x = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        s = short.session()
        y = torch.cat([s.prefill(x[:, :3])] + [s.step(x[:, t : t + 1]) for t in range(3, 48)], 1)
        assert rel_err(y, model(x)) < 1e-5
        with pytest.raises(lcsm_compile.MaxLenExceeded):
            s.step(x[:, :1])
    with pytest.raises(ValueError, match="analysed for max_len=96"):
        lcsm_compile.build_decoder(decoder.report, inputs, max_len=97)
