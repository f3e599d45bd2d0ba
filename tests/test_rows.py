"""Rows at their own positions: left-padded prompts (attention_mask), rows that join and leave a
session (continuous batching). Every row must get exactly what it gets decoded alone: checked
teacher-forced against the model in float64, on fresh random inputs."""

import warnings

import pytest
import torch

import lcsm_compile
from examples.models import get
from lcsm_compile import verify
from helpers import random_inputs, rel_err
from lcsm_compile.engine import OnlineConv
from lcsm_compile.errors import LcsmError, MaxLenExceeded, ShapeError
from lcsm_compile.generation import naive_generate
from lcsm_compile.kernels.reference import fft_conv

TOL64 = 1e-12


# -- the engine ---------------------------------------------------------------------------------

def _conv64(h, x):
    return fft_conv(h, x[None])[0]


@pytest.mark.parametrize("crossover", [1, 4, 16])
@pytest.mark.parametrize("shared_steps", [0, 7, 37])
def test_engine_rows_join_and_leave_exactly(crossover, shared_steps):
    """Two rows prefilled together step `shared_steps` at one position (mid-block for most values),
    then row 1 leaves and a new sequence joins it with its own prompt; a third sequence joins the
    row freed later. Every sequence matches its own convolution."""
    g = torch.Generator().manual_seed(crossover * 100 + shared_steps)
    C, L = 5, 300
    h = torch.randn(C, L, dtype=torch.float64, generator=g) / 10
    seqs = [torch.randn(C, L, dtype=torch.float64, generator=g) for _ in range(4)]
    eng = OnlineConv(h, max_len=L, crossover=crossover)
    outs = {0: [], 1: []}
    y = eng.prefill(torch.stack([seqs[0][:, :11], seqs[1][:, :11]]))
    outs[0].append(y[0]), outs[1].append(y[1])
    pos, row_of = {0: 11, 1: 11}, {0: 0, 1: 1}

    def step():
        x = torch.zeros(2, C, dtype=torch.float64)
        for s, r in row_of.items():
            x[r] = seqs[s][:, pos[s]]
        y = eng.step(x)
        for s, r in row_of.items():
            outs[s].append(y[r, :, None])
            pos[s] += 1

    def replace(row, s, P, steps):
        """The sequence in `row` leaves, sequence s joins it with a P-position prompt, then steps."""
        eng.release([row])
        del row_of[next(k for k, r in row_of.items() if r == row)]
        outs[s] = [eng.prefill(seqs[s][None, :, :P], rows=[row])[0]]
        pos[s], row_of[s] = P, row
        for _ in range(steps):
            step()

    for _ in range(shared_steps):
        step()
    replace(1, 2, 3, 90)
    replace(0, 3, 50, 70)
    for s, parts in outs.items():
        got = torch.cat(parts, -1)
        assert rel_err(got, _conv64(h, seqs[s][:, : got.shape[-1]])) < TOL64, s


def test_engine_one_tile_call_per_distinct_tile_size(monkeypatch):
    C, L = 3, 200
    h = torch.randn(C, L, dtype=torch.float64)
    eng = OnlineConv(h, max_len=L, crossover=4)
    eng.bind(4)
    for r, P in enumerate((5, 6, 7, 13)):  # steps taken since each prefill differ from row to row
        eng.prefill(torch.randn(1, C, P, dtype=torch.float64), rows=[r])
    calls = []
    monkeypatch.setattr(eng, "_tile_rows", lambda rows, U: calls.append((U, rows.tolist())))
    for k in range(1, 33):
        calls.clear()
        eng.red_cell(torch.randn(4, C, dtype=torch.float64))
        eng.advance()
        i = eng.row_position - 1 - eng.row_prefill + 1  # the step each row just took
        sizes = (i & -i).tolist()
        assert sorted(U for U, _ in calls) == sorted(set(sizes))
        for U, rows in calls:
            assert rows == [r for r in range(4) if sizes[r] == U]


def test_engine_row_errors():
    h = torch.randn(2, 16, dtype=torch.float64)
    eng = OnlineConv(h, max_len=16)
    eng.bind(2)
    eng.prefill(torch.randn(1, 2, 14, dtype=torch.float64), rows=[1])
    with pytest.raises(LcsmError, match=r"rows \[1\] hold a sequence"):
        eng.prefill(torch.randn(1, 2, 3, dtype=torch.float64), rows=[1])
    with pytest.raises(ShapeError, match="expected 2 rows"):
        eng.prefill(torch.randn(1, 2, 3, dtype=torch.float64), rows=[0, 1])
    eng.step(torch.randn(2, 2, dtype=torch.float64))
    eng.step(torch.randn(2, 2, dtype=torch.float64))
    with pytest.raises(MaxLenExceeded, match="row 1 is at position 16"):
        eng.step(torch.randn(2, 2, dtype=torch.float64))


# -- sessions of a model ------------------------------------------------------------------------

MODELS = ["hyena_order2", "rwkv_token_shift_hyena", "hyena_sinusoidal_pe", "m2_causal", "s4d"]


@pytest.fixture(scope="module")
def decoders64():
    cache = {}

    def build(name):
        if name not in cache:
            model, inputs = get(name).build()
            model = model.double()
            inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name] = (model, inputs, lcsm_compile.optimize(model, inputs, compile=False))
        return cache[name]

    return build


def _inputs(example, length, batch):
    x = random_inputs(example, length, batch)
    return x.double() if x.is_floating_point() else x


@pytest.mark.parametrize("name", MODELS)
def test_ragged_prompts_match_each_row_alone(name, decoders64):
    """Left-padded prompts of real lengths 1, 37 and L/2 in one batch, then steps: every row's
    outputs at its real positions are the model's on that row alone; padding positions are 0."""
    model, inputs, decoder = decoders64(name)
    L = decoder.max_len
    lengths = torch.tensor([1, 37, L // 2])
    P, T = int(lengths.max()), L // 2 + 40
    x = _inputs(inputs[0], T, 3)
    mask = (torch.arange(P) >= P - lengths[:, None]).long()
    prompt = torch.where(mask.bool().view(3, P, *[1] * (x.dim() - 2)), x[:, :P], torch.zeros_like(x[:, :P]))
    with torch.no_grad():
        session = decoder.session()
        out = session.prefill(prompt, attention_mask=mask)
        assert session.positions == lengths.tolist()
        outs = [out] + [session.step(x[:, t : t + 1]) for t in range(P, T)]
        got = torch.cat(outs, 1)
        assert session.positions == (lengths + T - P).tolist()
        for r, n in enumerate(lengths.tolist()):
            alone = model(x[r : r + 1, P - n : T])
            assert rel_err(got[r : r + 1, P - n :], alone) < TOL64, (r, n)
            assert torch.count_nonzero(got[r, : P - n]) == 0  # padding positions


def test_generate_with_attention_mask_equals_each_row_alone(decoders64):
    model, inputs, decoder = decoders64("hyena_order2")
    lengths = [5, 1, 12]
    P = max(lengths)
    ids = _inputs(inputs[0], P, 3)
    mask = (torch.arange(P) >= P - torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    out = decoder.generate(ids, 60, attention_mask=mask)
    assert out.shape == (3, P + 60)
    assert torch.equal(out[:, :P], ids)
    for r, n in enumerate(lengths):
        alone = naive_generate(model, ids[r : r + 1, P - n :], 60)
        assert torch.equal(out[r : r + 1, P - n :], alone), r


@pytest.mark.parametrize("name", ["hyena_order2", "rwkv_token_shift_hyena", "hyena_sinusoidal_pe"])
def test_rows_join_and_leave_between_steps(name, decoders64):
    """A serving loop on 2 rows: sequences join (add) with prompts of 1, 37 and L/2 and leave
    (remove) at different steps, interleaved with steps; each matches the model alone."""
    model, inputs, decoder = decoders64(name)
    L = decoder.max_len
    plan = {"a": (1, 0, 120), "b": (37, 10, 60), "c": (L // 2, 75, 150), "d": (3, 130, 170)}  # prompt, join, leave
    seqs = {k: _inputs(inputs[0], L, 1) for k in plan}

    def positions_follow(pos, row_of):
        assert session.positions == [next((pos[k] for k, r in row_of.items() if r == row), None) for row in range(2)]

    session = decoder.session(rows=2)
    with torch.no_grad():
        outs, _ = verify.serve(session, seqs, plan, 168, after_step=positions_follow)
        for k, parts in outs.items():
            got = torch.cat([leaves[0] for leaves in parts], 1)
            assert rel_err(got, model(seqs[k][:, : got.shape[1]])) < TOL64, k


def test_rows_that_stay_are_untouched_bit_for_bit(decoders64):
    """Removing one row and adding another changes nothing, bit for bit, for the row that stays:
    its outputs and its state equal those of a session where the other row just kept going."""
    model, inputs, decoder = decoders64("rwkv_token_shift_hyena")
    x = _inputs(inputs[0], 120, 3)
    churn, steady = decoder.session(rows=2), decoder.session(rows=2)
    with torch.no_grad():
        for s in (churn, steady):
            s.add(x[0:1, :9])
            s.add(x[1:2, :9])
        for t in range(9, 100):
            if t == 40:
                churn.remove(1)
                churn.add(x[2:3, :23])  # row 1 of churn now decodes sequence 2, at its position 23
            c = x[:2, t : t + 1] if t < 40 else torch.stack([x[0, t : t + 1], x[2, t - 17 : t - 16]])
            a = churn.step(c)
            b = steady.step(x[:2, t : t + 1])
            assert torch.equal(a[0], b[0]), t
    assert torch.equal(churn.state.tiled.bank.S[0], steady.state.tiled.bank.S[0])
    for i in churn.state.ring.rings:
        assert torch.equal(churn.state.ring.rings[i][:, 0], steady.state.ring.rings[i][:, 0])


def test_row_errors_name_what_was_expected(decoders64):
    model, inputs, decoder = decoders64("hyena_order2")
    x = _inputs(inputs[0], decoder.max_len, 2)
    session = decoder.session()
    with pytest.raises(ValueError, match="row 0 is not left-padded"):
        session.prefill(x[:, :4], attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="row 1 has no real token"):
        session.prefill(x[:, :4], attention_mask=torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(ShapeError, match=r"expected shape \(2, 4\)"):
        session.prefill(x[:, :4], attention_mask=torch.ones(2, 5, dtype=torch.long))
    session.prefill(x[:, :4], attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(LcsmError, match="read Session.positions"):
        session.position
    with pytest.raises(LcsmError, match="all 2 rows hold a sequence"):
        session.add(x[:1, :3])
    with pytest.raises(LcsmError, match="a row holding a sequence"):
        session.remove(5)
    session.remove(0)
    with pytest.raises(LcsmError, match="a row holding a sequence"):
        session.remove(0)
    with pytest.raises(ShapeError, match="one sequence"):
        session.add(x[:, :3])
    session.add(x[:1, : decoder.max_len - 1])  # row 0 again, one step from max_len
    session.step(x[:, :1])
    with pytest.raises(MaxLenExceeded, match="row 0 is at position"):
        session.step(x[:, :1])


def test_rows_need_the_flash_bank(decoders64):
    model, inputs, _ = decoders64("hyena_order2")
    lazy = lcsm_compile.optimize(model, inputs, conv="lazy", compile=False)
    with pytest.raises(LcsmError, match="conv='flash'"):
        lazy.session(rows=2)


def test_validation_withholds_rows_that_decode_wrong(monkeypatch):
    """A decoder whose rows path is wrong keeps its shared-position decoding, and row operations
    raise with the validation's finding instead of decoding silently wrong."""
    model, inputs = get("hyena_order2").build()
    monkeypatch.setattr(OnlineConv, "_tile_rows", lambda self, rows, U: None)  # drops every tile
    decoder = lcsm_compile.optimize(model, inputs, compile=False)
    assert "rows at their own positions failed" in decoder.rows_why
    with pytest.raises(LcsmError, match="validation of rows"):
        decoder.session(rows=2)
    x = random_inputs(inputs[0], 40)
    session = decoder.session()  # one shared position still decodes exactly
    got = torch.cat([session.prefill(x[:, :5])] + [session.step(x[:, t : t + 1]) for t in range(5, 40)], 1)
    assert rel_err(got, model(x)) < 1e-5
