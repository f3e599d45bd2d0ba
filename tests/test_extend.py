"""Prefill that continues a session: Session.extend(x) appends k positions at once, prefill(chunk=K)
feeds a prompt in pieces. Any mix of prefill, extend and step must give what one prefill of the
whole sequence gives: checked against the model in float64 on fresh random inputs, and for the
engine against its own convolution."""

import random

import pytest
import torch

import lcsm_compile
from examples.models import get
from examples.models.hybrid import build as build_hybrid
from helpers import random_inputs, rel_err
from lcsm_compile.engine import OnlineConv
from lcsm_compile.errors import LcsmError, MaxLenExceeded, SessionNotStarted, ShapeError
from lcsm_compile.kernels.reference import fft_conv

TOL64 = 1e-12


def _pieces(total, start, seed, steps=True):
    """Random (kind, length) pieces covering positions start .. total: "extend" or "step" runs."""
    rng, t, out = random.Random(seed), start, []
    while t < total:
        k = min(total - t, rng.choice([1, 2, 3, 7, 16, 33, 100]))
        out.append(("step" if steps and rng.random() < 0.35 else "extend", k))
        t += k
    return out


# -- the engine ---------------------------------------------------------------------------------

def _bank(seed, C, L, batch=2):
    """Fresh float64 filters h [C, L], inputs x [batch, C, L] and their convolution."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(C, L, dtype=torch.float64, generator=g) / 10
    x = torch.randn(batch, C, L, dtype=torch.float64, generator=g)
    return h, x, fft_conv(h, x)


@pytest.mark.parametrize("crossover", [1, 4, 16])
@pytest.mark.parametrize("prefill_len", [0, 5, 64])
def test_engine_extend_mixed_with_steps_is_the_convolution(crossover, prefill_len):
    """Extends of random lengths between runs of steps (mid-block, across blocks, up to max_len),
    from a prefill or from a fresh state, in float64 against the convolution."""
    g = torch.Generator().manual_seed(crossover + 10 * prefill_len)
    C, L = 6, 300
    h, skip = torch.randn(C, L, dtype=torch.float64, generator=g) / 10, torch.randn(C, dtype=torch.float64, generator=g)
    x = torch.randn(2, C, L, dtype=torch.float64, generator=g)
    want = fft_conv(h, x) + skip[:, None] * x
    eng = OnlineConv(h, skip, max_len=L, crossover=crossover)
    ys = [eng.prefill(x[..., :prefill_len])] if prefill_len else []
    t = prefill_len
    for kind, k in _pieces(L, prefill_len, seed=crossover + prefill_len):
        if kind == "step":
            ys += [eng.step(x[..., t + j])[..., None] for j in range(k)]
        else:
            ys.append(eng.extend(x[..., t : t + k]))
        t += k
    assert eng.position == L
    assert rel_err(torch.cat(ys, -1), want) < TOL64
    with pytest.raises(MaxLenExceeded):
        eng.extend(x[..., :1])


def test_engine_extend_in_channel_chunks(monkeypatch):
    """With transforms in chunks of one or two channels (kernels.reference.FFT_CHUNK), an extend's
    tiles of every size are still the convolution, on a slice of the bank too."""
    from lcsm_compile.kernels import reference as kernels

    monkeypatch.setattr(kernels, "FFT_CHUNK", 256)
    h, x, want = _bank(2, C=7, L=300)
    eng = OnlineConv(h, crossover=2)
    sl = slice(2, 7)
    y = torch.cat([eng.extend(x[:, sl, :3], channels=sl), eng.extend(x[:, sl, 3:200], channels=sl),
                   eng.extend(x[:, sl, 200:], channels=sl)], -1)
    assert rel_err(y, want[:, sl]) < TOL64


def test_engine_extend_by_channel_slices_from_one_start():
    """A bank shared by two convolutions extends each one's slice from the same start; the steps
    after see both."""
    L = 200
    h, x, want = _bank(3, C=8, L=L, batch=1)
    eng = OnlineConv(h, crossover=4)
    ys = [eng.prefill(x[..., :10])] + [eng.step(x[..., t])[..., None] for t in range(10, 21)]
    a, b = slice(0, 3), slice(3, 8)
    ya = eng.extend(x[:, a, 21:90], channels=a, start=21)
    yb = eng.extend(x[:, b, 21:90], channels=b, start=21)
    ys.append(torch.cat([ya, yb], 1))
    ys += [eng.step(x[..., t])[..., None] for t in range(90, L)]
    assert rel_err(torch.cat(ys, -1), want) < TOL64


def test_engine_extend_rows_while_others_step():
    """Rows at their own positions: row 1 extends while row 0 steps; each is its own convolution."""
    L = 256
    h, x, want = _bank(4, C=5, L=L)
    eng = OnlineConv(h, crossover=4)
    eng.bind(2)
    ys = {0: [eng.prefill(x[:1, :, :9], rows=[0])[0]], 1: [eng.prefill(x[1:, :, :30], rows=[1])[0]]}
    pos = {0: 9, 1: 30}
    while pos[1] + 17 + 5 <= L:
        k = 17
        ys[1].append(eng.extend(x[1:, :, pos[1] : pos[1] + k], rows=[1])[0])
        pos[1] += k
        for _ in range(5):  # both rows step; row 1's input is its next position
            y = eng.step(torch.stack([x[0, :, pos[0]], x[1, :, pos[1]]]))
            for r in (0, 1):
                ys[r].append(y[r, :, None])
                pos[r] += 1
    for r in (0, 1):
        got = torch.cat(ys[r], -1)
        assert rel_err(got, want[r, :, : got.shape[-1]]) < TOL64


def test_engine_extend_keeps_a_nan_causal():
    """A non-finite input poisons its own output and the later ones, never an earlier one."""
    h, x, _ = _bank(5, C=3, L=128, batch=1)
    x[0, 1, 50] = float("nan")
    eng = OnlineConv(h, crossover=4)
    y = torch.cat([eng.prefill(x[..., :20]), eng.extend(x[..., 20:80]), eng.extend(x[..., 80:])], -1)
    assert torch.isfinite(y[0, :, :50]).all()
    assert torch.isnan(y[0, 1, 50:]).all()


# -- sessions of optimized models ---------------------------------------------------------------

ZOO_CASES = ["striped_hyena", "hyena_sinusoidal_pe", "rwkv_token_shift_hyena", "hyena_planned_lengths", "s4d"]


def _optimized(model, example, max_len, **kw):
    return lcsm_compile.optimize(model, example, max_len=max_len, validate=False, **kw)


@pytest.fixture(scope="module", params=ZOO_CASES + ["striped_hyena_recurrent", "hybrid_sdpa", "hybrid_rotary",
                                                     "hybrid_masked_fill"])
def case(request):
    """(model in float64, its decoder at max_len 160, fresh inputs [2, 160]); "_recurrent": every
    proved modal filter on its recurrence."""
    name = request.param
    strategy = "recurrent" if name.endswith("_recurrent") else "auto"
    if name.startswith("hybrid"):
        model, example = build_hybrid(name[len("hybrid_") :])
    else:
        model, example = get(name.removesuffix("_recurrent")).build()
    model = model.double()
    example = tuple(e.double() if e.is_floating_point() else e for e in example)
    torch.manual_seed(7)
    x = random_inputs(example[0], 160)
    x = x.double() if x.is_floating_point() else x
    return name, model, _optimized(model, example, 160, strategy=strategy), x


def test_extend_mixed_with_steps_decodes_the_model(case):
    """Prefill, then random extends and steps up to max_len: the model's outputs over the whole
    sequence, with validate=False (the decoder's own exactness, not the safety net's)."""
    name, model, decoder, x = case
    with torch.no_grad():
        want = model(x)
        session = decoder.session()
        outs, t = [session.prefill(x[:, :5])], 5
        for kind, k in _pieces(x.shape[1], 5, seed=len(name)):
            outs += [session.step(x[:, t + j : t + j + 1]) for j in range(k)] if kind == "step" else [session.extend(x[:, t : t + k])]
            t += k
    assert session.position == x.shape[1]
    assert rel_err(torch.cat(outs, 1), want) < TOL64, name


def test_chunked_prefill_returns_what_prefill_returns(case):
    name, model, decoder, x = case
    with torch.no_grad():
        whole = decoder.session().prefill(x[:, :150])
        session = decoder.session()
        chunked = session.prefill(x[:, :150], chunk=32)
        assert rel_err(chunked, whole) < TOL64, name
        # and the session goes on from there
        assert rel_err(session.step(x[:, 150:151]), model(x[:, :151])[:, 150:]) < TOL64, name


def test_keep_last_returns_only_the_last_positions():
    """prefill(..., keep_last=n), chunked or not, is the last n positions of prefill(...): a kept
    span that starts inside one piece and ends in another, the last position alone, every position."""
    model, example = get("hyena_order2").build()
    decoder = _optimized(model.double(), example, 64)
    x = random_inputs(example[0], 40)
    with torch.no_grad():
        whole = decoder.session().prefill(x)
        for chunk in (None, 7, 40):
            for n in (1, 5, 40):
                got = decoder.session().prefill(x, chunk=chunk, keep_last=n)
                assert got.shape[1] == n and rel_err(got, whole[:, 40 - n :]) < TOL64, (chunk, n)
        with pytest.raises(ValueError, match="keep_last"):
            decoder.session().prefill(x, keep_last=41)


def test_extend_some_rows_while_the_others_step():
    """Continuous batching: row 1 extends (a chunked prefill of its own) while rows 0 and 2 step;
    every row is what it is decoded alone."""
    model, example = get("hyena_sinusoidal_pe").build()
    model = model.double()
    decoder = _optimized(model, example, 128)
    torch.manual_seed(3)
    x = random_inputs(example[0], 128, batch=3)
    with torch.no_grad():
        want = model(x)
        session = decoder.session()
        got = {r: [] for r in range(3)}
        y = session.prefill(x[:, :10])
        for r in range(3):
            got[r].append(y[r : r + 1])
        pos = [10, 10, 10]
        for _ in range(4):
            y = session.extend(x[1:2, pos[1] : pos[1] + 20], rows=[1])
            got[1].append(y)
            pos[1] += 20
            y = session.step(torch.stack([x[r, pos[r] : pos[r] + 1] for r in range(3)]))
            for r in range(3):
                got[r].append(y[r : r + 1])
                pos[r] += 1
        assert session.positions == pos
        y = session.extend(torch.stack([x[r, pos[r] : pos[r] + 5] for r in range(3)]))  # every row, each at its own position
        for r in range(3):
            got[r].append(y[r : r + 1])
            pos[r] += 5
    for r in range(3):
        row = torch.cat(got[r], 1)
        assert rel_err(row, want[r : r + 1, : pos[r]]) < TOL64, r


def test_generate_with_a_chunked_prompt_is_generate():
    model, example = get("hyena_order2").build()
    decoder = _optimized(model.double(), example, 96)  # float64: no near-tie between logits flips a token
    torch.manual_seed(11)
    prompt = random_inputs(example[0], 40)
    assert torch.equal(decoder.generate(prompt, 20, prefill_chunk=7), decoder.generate(prompt, 20))


@pytest.mark.parametrize("strategy", ["tile", "recurrent"])
def test_float32_extend_within_the_models_precision(strategy):
    model, example = get("striped_hyena").build()
    model64 = get("striped_hyena").build()[0].double()
    decoder = _optimized(model, example, 256, strategy=strategy)
    torch.manual_seed(5)
    x = random_inputs(example[0], 256)
    with torch.no_grad():
        want = model64(x)
        session = decoder.session()
        outs = [session.prefill(x[:, :7], chunk=3)]
        for t in range(7, 256, 41):
            outs.append(session.extend(x[:, t : min(t + 41, 256)]))
    assert rel_err(torch.cat(outs, 1), want) < 1e-5


def test_extend_between_captured_steps():
    """A session whose steps replay a captured graph (cuda_graph="emulate"): an extend changes the
    state under it; the next steps capture again and stay exact."""
    model, example = get("hyena_order2").build()
    model = model.double()
    decoder = _optimized(model, example, 128, compile=False, cuda_graph="emulate")
    torch.manual_seed(9)
    x = random_inputs(example[0], 128)
    with torch.no_grad():
        want = model(x)
        session = decoder.session()
        outs = [session.prefill(x[:, :4])] + [session.step(x[:, t : t + 1]) for t in range(4, 20)]
        outs.append(session.extend(x[:, 20:61]))
        outs += [session.step(x[:, t : t + 1]) for t in range(61, 128)]
    assert rel_err(torch.cat(outs, 1), want) < TOL64


# -- bad calls: typed errors that name what was expected -------------------------------------------

@pytest.fixture(scope="module")
def small():
    model, example = get("hyena_order2").build()
    return model, example, _optimized(model, example, 64)


def test_extend_errors(small):
    model, example, decoder = small
    x = random_inputs(example[0], 64)
    session = decoder.session()
    with pytest.raises(SessionNotStarted, match="prefill"):
        session.extend(x[:, :3])
    session.prefill(x[:, :60])
    with pytest.raises(MaxLenExceeded, match="max_len = 64"):
        session.extend(x[:, :5])
    with pytest.raises(ShapeError, match="expected batch 2"):
        session.extend(x[:1, :2])
    with pytest.raises(LcsmError, match="rows"):
        session.extend(x[:1, :2], rows=[5])
    with pytest.raises(ShapeError, match="at least one position"):
        session.extend(x[:, :0])
    with pytest.raises(ValueError, match="chunk"):
        decoder.session().prefill(x[:, :10], chunk=0)
    with pytest.raises(ValueError, match="attention_mask"):
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[0, 0] = 0  # row 0 left-padded
        decoder.session().prefill(x[:, :10], chunk=4, attention_mask=mask)
    # the session is intact after every refusal
    y = session.extend(x[:, 60:64])
    assert y.shape[:2] == (2, 4)


def test_extend_needs_the_flash_bank(small):
    model, example, _ = small
    decoder = _optimized(model, example, 64, conv="lazy")
    session = decoder.session()
    x = random_inputs(example[0], 64)
    session.prefill(x[:, :10])
    with pytest.raises(LcsmError, match="conv='flash'"):
        session.extend(x[:, 10:12])


def test_the_validation_withholds_a_wrong_extend_and_keeps_the_rest(monkeypatch):
    """The translation validation decodes extends too: a decoder whose extends are wrong (here an
    engine made to miscount) keeps prefill and step, and extend raises with the finding."""
    from lcsm_compile.engine import OnlineConv as Engine

    right = Engine._extend_on
    monkeypatch.setattr(Engine, "_extend_on", lambda self, *a: right(self, *a) * 1.01)
    model, example = get("hyena_order2").build()
    decoder = lcsm_compile.optimize(model, example, max_len=96)  # validated
    assert "translation validation of extends failed" in decoder.extend_why
    assert not decoder.can("extend") and decoder.can("rows")
    x = random_inputs(example[0], 96)
    session = decoder.session()
    with torch.no_grad():
        session.prefill(x[:, :10])
        with pytest.raises(LcsmError, match="translation validation of extends"):
            session.extend(x[:, 10:20])
        assert rel_err(session.step(x[:, 10:11]), model(x[:, :11])[:, 10:]) < 1e-5
    monkeypatch.setattr(Engine, "_extend_on", right)
    assert lcsm_compile.optimize(model, example, max_len=96).extend_why is None
