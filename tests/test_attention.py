"""Causal attention on a KV cache (passes/attention.py): hybrids of Hyena layers and attention layers
in each causal spelling decode exactly, teacher-forced against the float64 model on fresh inputs;
every look-alike whose attention is not provably causal is declined with its reason, op and line."""

import json

import pytest
import torch

import lcsm_compile
from examples.models import hybrid, public_attention
from lcsm_compile.errors import NotDecodable
from tests.helpers import rel_err

L = 96  # decoded positions per check (the models serve 256)


def _decode(decoder, x, P):
    s = decoder.session()
    with torch.no_grad():
        ys = [s.prefill(x[:, :P])] + [s.step(x[:, t : t + 1]) for t in range(P, x.shape[1])]
    return torch.cat(ys, 1), s


def _fresh_ids(batch=2, length=L, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    return torch.randint(1, hybrid.VOCAB, (batch, length), generator=g)


@pytest.fixture(scope="module")
def decoders():
    cache = {}

    def get(spelling, layers="haha"):
        if (spelling, layers) not in cache:
            model, example = hybrid.build(spelling, layers)
            model = model.double()
            cache[spelling, layers] = (model, lcsm_compile.optimize(model, example, max_len=hybrid.MAX_LEN, compile=False))
        return cache[spelling, layers]

    return get


@pytest.mark.parametrize("spelling", hybrid.CAUSAL)
def test_hybrid_decodes_exactly_in_float64(decoders, spelling):
    model, decoder = decoders(spelling)
    report = decoder.report
    assert [c.kind for c in report.accepted].count("attention") == 2
    assert sum(c.kind == "long" for c in report.accepted) == 2
    x = _fresh_ids()
    with torch.no_grad():
        ref = model(x)
    for P in (1, 37, L // 2):
        y, session = _decode(decoder, x, P)
        assert rel_err(y, ref) < 1e-10, (spelling, P)
    kv = session.memory_breakdown()["kv_cache"]
    heads, d = hybrid.HEADS, hybrid.D_MODEL // hybrid.HEADS
    assert kv == 2 * 2 * x.shape[0] * heads * hybrid.MAX_LEN * d * 8  # 2 sites x (k, v), float64


@pytest.mark.parametrize("spelling", ["sdpa", "masked_fill"])
def test_attention_only_model_is_a_kv_cache_decoder(decoders, spelling):
    model, decoder = decoders(spelling, "aa")
    assert decoder.bank is None and len(decoder.attention) == 2 and not decoder.sites
    x = _fresh_ids()
    with torch.no_grad():
        ref = model(x)
    for P in (1, 37, L // 2):
        assert rel_err(_decode(decoder, x, P)[0], ref) < 1e-10


def test_float32_hybrid_and_generate():
    model, example = hybrid.build("rotary")
    decoder = lcsm_compile.optimize(model, example, max_len=hybrid.MAX_LEN, compile=False)
    x = _fresh_ids()
    with torch.no_grad():
        ref = model(x)
    assert rel_err(_decode(decoder, x, 37)[0], ref) < 1e-5
    out = decoder.generate(x[:, :5], 20)
    assert out.shape == (2, 25) and torch.equal(out[:, :5], x[:, :5])


@pytest.mark.parametrize("spelling", sorted(hybrid.DECLINED))
def test_illegal_attention_is_declined_with_its_reason(spelling):
    model, example = hybrid.build(spelling)
    report = lcsm_compile.analyze(model, example, max_len=hybrid.MAX_LEN)
    assert report.decodable is False
    sites = [c for c in report.candidates if c.kind == "attention"]
    assert len(sites) == 2 and all(c.verdict.name == "REJECTED" for c in sites)
    want = hybrid.DECLINED[spelling]
    for c in sites:
        assert c.reason.name == want, (c.reason, c.explanation)
        assert "hybrid.py" in c.source and "line" in c.source  # the site's source line
        assert "hybrid.py" in c.explanation  # ... and the explanation names it, with the op
        assert c.offending
    with pytest.raises(NotDecodable, match=want):
        lcsm_compile.optimize(model, example, max_len=hybrid.MAX_LEN)


def test_report_lists_attention_sites_with_their_cache(decoders):
    _, decoder = decoders("sdpa")
    report = decoder.report
    sites = report.attention
    assert len(sites) == 2
    text = report.table()
    assert text.count("attention:sdpa") == 2 and "KV 4x256x8" in text
    data = json.loads(report.to_json())
    cache = [c["cache"] for c in data["candidates"] if c["kind"] == "attention"]
    assert cache == [{"heads": 4, "max_len": 256, "head_dim": 8, "value_dim": 8}] * 2


def test_layer_schedule_shows_attention_next_to_convolutions(decoders):
    _, decoder = decoders("masked_fill")
    sched = decoder.schedule
    kinds = [s["kind"] for s in sched.sites]
    assert kinds.count("attention") == 2 and kinds.count("long") == 2
    assert len(sched.critical_path) == len(sched.sites)  # hyena -> attention -> hyena -> attention
    table = sched.table()
    assert "2 attention sites" in table and "(attention, blocks.1.mixer)" in table
    assert all(g["sites"] == [s["name"] for s in sched.sites if s["kind"] == "long"] for g in sched.tile_groups)


@pytest.mark.parametrize("spelling,layers", [("sdpa", "aa"), ("masked_fill", "haha")])
def test_rows_at_their_own_positions_attend_over_their_own_prefix(decoders, spelling, layers):
    """Left-padded prompts: each row's KV cache is written and read at the row's own position
    (state.positions), so every row decodes as it would alone; a row removed and added again
    restarts from its new prompt."""
    model, decoder = decoders(spelling, layers)
    x = _fresh_ids()
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    s = decoder.session()
    with torch.no_grad():
        out = s.prefill(x[:, :20], attention_mask=mask)
        y = torch.cat([out] + [s.step(x[:, t : t + 1]) for t in range(20, 40)], 1)
        ref0, ref1 = model(x[:1, :40]), model(x[1:, 7:40])
        assert s.positions == [40, 33]
        s.remove(1)
        row, fresh = s.add(x[1:, 50:55])
        z = [s.step(torch.stack([x[0, 40 + i : 41 + i], x[1, 55 + i : 56 + i]])) for i in range(5)]
        ref_new, ref_old = model(x[1:, 50:60]), model(x[:1, :45])
    assert rel_err(y[0], ref0[0]) < 1e-10 and rel_err(y[1, 7:], ref1[0]) < 1e-10
    assert row == 1 and rel_err(fresh[0], ref_new[0, :5]) < 1e-10
    z = torch.cat(z, 1)
    assert rel_err(z[1], ref_new[0, 5:]) < 1e-10 and rel_err(z[0], ref_old[0, 40:]) < 1e-10


@pytest.mark.parametrize("spelling", sorted(public_attention.SPELLINGS))
def test_attention_as_public_code_writes_it(spelling):
    """GPT-2's eager attention, Llama's (rotary from position_ids, grouped-query heads by repeat_kv,
    SDPA or eager with a float32 softmax) and multi-query attention by broadcasting: each decodes
    exactly in float64, alone and as rows at their own positions (left-padded prompts)."""
    model, example = public_attention.build(spelling)
    model = model.double()
    decoder = lcsm_compile.optimize(model, example, max_len=public_attention.MAX_LEN, compile=False)
    assert [c.kind for c in decoder.report.accepted].count("attention") == 1
    x = _fresh_ids(length=80).clamp(max=public_attention.VOCAB - 1)
    tol = 1e-7 if spelling == "llama_gqa_eager" else 1e-10  # its softmax runs in float32, as the model's
    with torch.no_grad():
        ref = model(x)
        for P in (1, 37):
            y, _ = _decode(decoder, x, P)
            assert rel_err(y, ref) < tol, (spelling, P)
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[0, :25] = 0
        s = decoder.session()
        y = torch.cat([s.prefill(x[:, :40], attention_mask=mask)] + [s.step(x[:, t : t + 1]) for t in range(40, 80)], 1)
        assert rel_err(y[:1, 25:], model(x[:1, 25:])) < tol
        assert rel_err(y[1:], ref[1:]) < tol


def test_a_finite_additive_mask_is_accepted_and_said_so(decoders):
    """GPT-2's -10000: exactly 0 after the softmax while scores stay close, which the report names."""
    _, decoder = decoders("finite_additive")
    texts = [c.explanation for c in decoder.report.accepted if c.kind == "attention"]
    assert len(texts) == 2 and all("finite -10000" in t and "within 9254" in t for t in texts), texts
