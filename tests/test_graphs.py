"""The step as a captured graph (lcsm_compile.runtime.graphs): the part without advance replayed, the tile
call launched eagerly. On CPU the "emulate" backend records the aten ops one call issues and
replays them without running Python, which is what a CUDA graph does: decoding through it must be
exact, and a step that is not graph-safe must visibly fail it."""

import warnings

import pytest
import torch

import lcsm_compile
from examples.models import get, hybrid
from lcsm_compile import verify
from helpers import rel_err
from lcsm_compile.engine import OnlineConv
from lcsm_compile.errors import DeviceError
from lcsm_compile.runtime.graphs import GraphCaptureError, core_program
from lcsm_compile.runtime import SessionState

TOL64 = 1e-12


def _build(name, **kw):
    model, inputs = hybrid.build(name[len("hybrid_"):]) if name.startswith("hybrid_") else get(name).build()
    model = model.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, lcsm_compile.optimize(model, inputs, max_len=256, compile=False, cuda_graph="emulate", **kw)


def _decode(session, x, P, **kw):
    with torch.no_grad():
        return torch.cat([session.prefill(x[:, :P], **kw)] + [session.step(x[:, t : t + 1]) for t in range(P, x.shape[1])], 1)


@pytest.mark.parametrize("name", ["hyena_order2", "rwkv_token_shift_hyena", "hyena_sinusoidal_pe", "hybrid_masked_fill",
                                  "hybrid_sdpa"])
def test_replayed_steps_decode_exactly(name):
    """Convolutions across block boundaries and tile sizes, ring buffers, position tables and KV
    caches, replayed from one recording: one eager warm-up step, then every step replayed."""
    model, decoder = _build(name)
    x = torch.randint(1, 30, (2, 150))
    with torch.no_grad():
        ref = model(x)
    for P in (1, 37):
        session = decoder.session()
        assert rel_err(_decode(session, x, P), ref) < TOL64, P
        assert session._captured.graph is not None and session._captured.eager_steps == 1
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :29] = 0  # rows at their own positions: graph-safe by their device positions
    y = _decode(decoder.session(), x[:, :120], 40, attention_mask=mask)
    with torch.no_grad():
        assert rel_err(y[:1, 29:], model(x[:1, 29:120])) < TOL64
        assert rel_err(y[1:], ref[1:, :120]) < TOL64


def test_rows_joining_and_leaving_recapture_and_stay_exact():
    model, decoder = _build("rwkv_token_shift_hyena")
    seqs = {k: torch.randint(1, 30, (1, 120)) for k in range(3)}
    plan = {0: (5, 0, None), 1: (30, 20, 60), 2: (2, 60, None)}  # prompt, join, leave
    with torch.no_grad():
        outs, _ = verify.serve(decoder.session(rows=2), seqs, plan, 90)
        for s, parts in outs.items():
            got = torch.cat([leaves[0] for leaves in parts], 1)
            assert rel_err(got, model(seqs[s][:, : got.shape[1]])) < TOL64, s


def test_a_step_that_is_not_graph_safe_fails_the_replay(monkeypatch):
    """Without graph-safe red cells the recording bakes one block row in and the block loads that
    the red cell decides in Python never happen again: the emulated replay decodes wrong or breaks
    (and the translation validation refuses such a decoder)."""
    monkeypatch.setattr(OnlineConv, "graph_safe", lambda self: None)
    model, decoder = _build("hyena_order2", validate=False)
    x = torch.randint(1, 30, (2, 60))
    try:
        err = rel_err(_decode(decoder.session(), x, 3), model(x))
    except RuntimeError:  # the advance outside the graph found the block state out of step
        err = float("inf")
    assert err > 1e-3
    with pytest.raises(lcsm_compile.NotDecodable, match="DECODE_MISMATCH"):
        _build("hyena_order2")


def test_a_host_read_inside_the_captured_step_is_refused(monkeypatch):
    step = SessionState.conv_step

    def reads_the_device(self, index, u):
        if bool(u.abs().sum() >= 0):  # a Python decision on a device value: a graph cannot replay it
            return step(self, index, u)
        return step(self, index, u)

    monkeypatch.setattr(SessionState, "conv_step", reads_the_device)
    model, decoder = _build("hyena_order2", validate=False)
    x = torch.randint(1, 30, (2, 20))
    with pytest.raises(GraphCaptureError, match="reads a device value on the host"):
        _decode(decoder.session(), x, 3)


def test_core_program_is_the_step_without_advance(monkeypatch):
    _, decoder = _build("hyena_order2")
    advance = torch.ops.lcsm.advance.default
    assert any(n.target is advance for n in decoder.programs.step.graph.nodes)
    assert not any(n.target is advance for n in core_program(decoder.programs.step).graph.nodes)


def test_cuda_graph_needs_a_cuda_model_and_the_flash_bank():
    model, inputs = get("hyena_order2").build()
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="expected a model on a CUDA device"):
            lcsm_compile.optimize(model, inputs, cuda_graph=True)
    with pytest.raises(lcsm_compile.NotDecodable, match="not graph-safe"):
        lcsm_compile.optimize(model, inputs, conv="lazy", cuda_graph="emulate")
    with pytest.raises(ValueError, match="cuda_graph: expected"):
        lcsm_compile.build_decoder(lcsm_compile.analyze(model, inputs), inputs, cuda_graph="yes")
