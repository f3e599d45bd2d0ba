"""Modal long convolutions decoded by their recurrence (lcsm_compile/recurrence.py): the engine against
the float64 convolution, and whole models (the modal proof's zoo of test_modal.py, StripedHyena)
teacher-forced against the model in float64, alone and as ragged rows, on fresh random inputs."""

import warnings

import pytest
import torch

import lcsm_compile
from examples.models import get
from helpers import rel_err, teacher_forced
from lcsm_compile import tuning, verify
from lcsm_compile.costs import Costs
from lcsm_compile.kernels.reference import fft_conv
from lcsm_compile.recurrence import Recurrence
from test_modal import (D_MODEL, MAX_LEN, VOCAB, ComplexModal, CrossCorrelation, DSSKernel, LongConv, MultiHeadEMA,
                        RealModal, RunningSum, S4DKernel, lm)

TOL64 = 1e-11


def _poles(W, N, g):
    """Random complex poles, one per channel within 1e-4 of the unit circle, one exactly 1, one 0."""
    p = torch.polar(0.5 + 0.49 * torch.rand(W, N, dtype=torch.float64, generator=g),
                    torch.pi * torch.rand(W, N, dtype=torch.float64, generator=g))
    p[:, 0] = torch.polar(torch.full((W,), 1 - 1e-4, dtype=torch.float64), p[:, 0].angle())
    p[0, 1], p[1, 1] = 1.0, 0.0
    return p


def _reference(p, r, D, x):
    t = torch.arange(x.shape[-1], dtype=torch.float64)
    h = (r[..., None] * p[..., None] ** t).real.sum(1)
    h[1] = (r[1, :, None] * torch.where(p[1, :, None] == 0, (t == 0).to(p.dtype), p[1, :, None] ** t)).real.sum(0)
    return fft_conv(h, x) + D[:, None] * x


@pytest.mark.parametrize("P", [1, 37, 64, 65, 200])
def test_the_recurrence_is_the_convolution(P):
    g = torch.Generator().manual_seed(P)
    W, N, L = 6, 5, 300
    p, r = _poles(W, N, g), torch.randn(W, N, dtype=torch.complex128, generator=g)
    D = torch.randn(W, dtype=torch.float64, generator=g)
    x = torch.randn(3, W, L, dtype=torch.float64, generator=g)
    rec = Recurrence(p, r, D, "cpu")
    y, state = rec.prefill(x[..., :P])
    got = torch.cat([y] + [rec.step(state, x[..., t])[..., None] for t in range(P, L)], -1)
    assert rel_err(got, _reference(p, r, D, x)) < TOL64


def test_no_drift_over_a_long_decode_from_float32_inputs():
    """16384 steps with a pole 1e-4 from the unit circle: the complex128 state keeps float32 inputs
    exactly (their float64 values), so the outputs stay at float64 accuracy."""
    g = torch.Generator().manual_seed(7)
    W, N, L = 4, 3, 16384
    p, r = _poles(W, N, g), torch.randn(W, N, dtype=torch.complex128, generator=g)
    x = torch.randn(1, W, L, generator=g)  # float32
    rec = Recurrence(p, r, None, "cpu")
    y, state = rec.prefill(x[..., :10])
    got = torch.cat([y] + [rec.step(state, x[..., t])[..., None] for t in range(10, L)], -1)
    assert rel_err(got, _reference(p, r, torch.zeros(W, dtype=torch.float64), x.double())) < 1e-10


def test_a_non_finite_input_spoils_only_what_follows_it():
    g = torch.Generator().manual_seed(3)
    p, r = _poles(4, 3, g), torch.randn(4, 3, dtype=torch.complex128, generator=g)
    x = torch.randn(2, 4, 100, dtype=torch.float64, generator=g)
    x[1, 2, 50] = float("nan")
    y, state = Recurrence(p, r, None, "cpu").prefill(x)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :, :50]).all() and torch.isfinite(y[1, [0, 1, 3]]).all()
    assert y[1, 2, 50:].isnan().all() and state[1, 2].isnan().all() and torch.isfinite(state[0]).all()


# -- whole models ---------------------------------------------------------------------------------

MIXERS = {
    "real_poles": lambda: LongConv(D_MODEL, RealModal(D_MODEL, 4)),
    "complex_poles": lambda: LongConv(D_MODEL, ComplexModal(D_MODEL, 4)),
    "s4d_zoh": lambda: LongConv(D_MODEL, S4DKernel(D_MODEL, 4, "zoh")),
    "dss": lambda: LongConv(D_MODEL, DSSKernel(D_MODEL, 4)),
    "mega_ema": lambda: MultiHeadEMA(D_MODEL, 2, 3),
    "running_sum": lambda: RunningSum(D_MODEL),
    "cross_correlation": lambda: CrossCorrelation(D_MODEL, 4),
}


def _decoder(model, strategy="recurrent", validate=False, max_len=MAX_LEN):
    ids = torch.randint(0, VOCAB, (2, 48))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lcsm_compile.optimize(model, (ids,), max_len=max_len, strategy=strategy, validate=validate, compile=False)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_modal_models_decode_by_their_recurrence_exactly(name):
    """float64, validate=False: the proof alone makes the recurrence exact; every long conv runs it."""
    model = lm(MIXERS[name], seed=len(name)).double()
    decoder = _decoder(model)
    longs = [i for i, s in enumerate(decoder.sites) if s.kind == "long"]
    assert longs and sorted(decoder.recurrent) == longs and decoder.bank is None
    assert "form: modal" in decoder.report.table()
    x = torch.randint(0, VOCAB, (2, MAX_LEN))
    with torch.no_grad():
        want = model(x)
    for P in (1, 37, MAX_LEN // 2):
        assert rel_err(teacher_forced(decoder, x, P), want) < TOL64, P


@pytest.mark.parametrize("cuda_graph", [False, "emulate"])
def test_striped_hyena_float32_within_the_models_precision_and_validated(cuda_graph):
    """float32 against the float64 model; "emulate" replays the step the way a CUDA graph does (the
    recurrent state is updated in place, so a replayed step keeps stepping it)."""
    model, example = get("striped_hyena").build()
    decoder = lcsm_compile.optimize(model, example, max_len=256, strategy="recurrent", compile=False,
                                    cuda_graph=cuda_graph)  # validated
    assert decoder.recurrent and not any("withheld" in n for n in decoder.report.notes)
    x = torch.randint(0, int(example[0].max()) + 1, (2, 256))
    with torch.no_grad():
        want = model.double()(x)
        model.float()
        assert rel_err(teacher_forced(decoder, x, 37), want) < 1e-4


def test_ragged_rows_join_and_leave_on_the_recurrence():
    model = lm(MIXERS["complex_poles"], seed=5).double()
    decoder = _decoder(model)
    plan = {"a": (1, 0, 90), "b": (37, 10, 60), "c": (20, 65, 120)}  # prompt, join, leave
    seqs = {k: torch.randint(0, VOCAB, (1, MAX_LEN)) for k in plan}
    session = decoder.session(rows=2)
    with torch.no_grad():
        outs, _ = verify.serve(session, seqs, plan, 118)
        for k, parts in outs.items():
            got = torch.cat([leaves[0] for leaves in parts], 1)
            assert rel_err(got, model(seqs[k][:, : got.shape[1]])) < TOL64, k


def test_the_recurrent_state_does_not_grow_with_max_len():
    sizes = {}
    for max_len in (256, 4096):
        decoder = _decoder(lm(MIXERS["real_poles"], seed=1), max_len=max_len)
        session = decoder.session()
        session.prefill(torch.randint(0, VOCAB, (2, 16)))
        sizes[max_len] = session.memory_bytes()
        assert session.memory_breakdown()["recurrent"] == 2 * D_MODEL * 4 * 16  # rows x channels x modes x complex128
    assert sizes[4096] == sizes[256]
    tiled = _decoder(lm(MIXERS["real_poles"], seed=1), strategy="tile", max_len=4096).session()
    tiled.prefill(torch.randint(0, VOCAB, (2, 16)))
    assert tiled.memory_bytes() > 50 * sizes[4096]


def test_the_strategy_is_chosen_per_convolution_and_can_be_forced(monkeypatch):
    """"auto" follows the device's costs (tuning.costs_for, what lcsm-compile tune measured): a
    recurrence dearer than the red cell and tiles keeps the tiling, a cheap one is taken."""
    model = lm(MIXERS["real_poles"], seed=2)
    assert not _decoder(model, strategy="tile").recurrent
    monkeypatch.setattr(tuning, "costs_for", lambda device: Costs(recurrent_s=1.0))
    assert not _decoder(model, strategy="auto", max_len=4096).recurrent
    assert _decoder(model, strategy="recurrent", max_len=4096).recurrent
    monkeypatch.setattr(tuning, "costs_for", lambda device: Costs(recurrent_s=1e-7, mode_s=1e-12))
    assert _decoder(model, strategy="auto", max_len=4096).recurrent
    hyena, example = get("hyena_order2").build()
    decoder = lcsm_compile.optimize(hyena, example, max_len=256, strategy="recurrent", compile=False, validate=False)
    assert not decoder.recurrent and "form: not modal" in decoder.report.table()  # an implicit MLP filter keeps the tiling
    with pytest.raises(ValueError, match="strategy"):
        lcsm_compile.optimize(model, (torch.randint(0, VOCAB, (2, 8)),), max_len=64, strategy="fast")


def test_the_strategy_can_be_set_per_site_by_name_or_module(monkeypatch):
    """A dict picks each long convolution's strategy by its site name or its module path (the site's
    own entry first); the others take "auto" (here costs where it takes the recurrence). Both mixes
    decode exactly; an unknown key is refused."""
    monkeypatch.setattr(tuning, "costs_for", lambda device: Costs(recurrent_s=1e-7, mode_s=1e-12))
    model, example = get("striped_hyena").build()
    model = model.double()
    longs = lambda d: [s for s in d.schedule.sites if s["kind"] == "long"]  # noqa: E731
    first, second = longs(lcsm_compile.optimize(model, example, max_len=128, validate=False, compile=False))
    x = torch.randint(0, int(example[0].max()) + 1, (2, 128))
    with torch.no_grad():
        want = model(x)
    for strategy, recurrent in (({first["name"]: "tile"}, [second["name"]]),
                                ({second["module"]: "tile", first["name"]: "recurrent"}, [first["name"]]),
                                ({second["module"]: "tile", second["name"]: "recurrent"}, [first["name"], second["name"]])):
        decoder = lcsm_compile.optimize(model, example, max_len=128, validate=False, compile=False, strategy=strategy)
        assert [decoder.sites[i].name for i in decoder.recurrent] == recurrent, strategy
        assert rel_err(teacher_forced(decoder, x, 9), want) < TOL64, strategy
    with pytest.raises(ValueError, match=r"\['blocks.7'\] name no long convolution.*" + first["name"]):
        lcsm_compile.optimize(model, example, max_len=128, validate=False, strategy={"blocks.7": "tile"})
    with pytest.raises(ValueError, match=r"strategy\['blocks.0'\]: expected one of"):
        lcsm_compile.optimize(model, example, max_len=128, validate=False, strategy={"blocks.0": "fast"})
