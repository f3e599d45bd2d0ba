"""State integrity: a decoder whose model's weights changed raises StaleDecoder; a prefill, step or
backend call that is interrupted halfway (KeyboardInterrupt included) is followed by calls that are
exact or raise a typed error. The stateful fuzzer is tests/api_fuzz.py."""

import pytest
import torch
import torch.nn as nn

import lcsm_compile
from helpers import rel_err
from lcsm_compile import backend
from lcsm_compile.errors import SessionBroken, StaleDecoder
from lcsm_compile.models import demo_lm
from lcsm_compile.runtime import SessionState

VOCAB, MAX_LEN = 32, 64


def tiny(seed=0):
    return demo_lm(n_layer=2, d_model=16, vocab=VOCAB, max_len=MAX_LEN, seed=seed)


def ids(batch, length):
    return torch.randint(0, VOCAB, (batch, length))


def build(model):
    return lcsm_compile.optimize(model, (ids(1, 16),), max_len=MAX_LEN, compile=False)


def inject(monkeypatch, method, k, exc=KeyboardInterrupt):
    """SessionState.<method> raises `exc` at its k-th call (1-based), after doing its work: the
    state is left half updated."""
    original, calls = getattr(SessionState, method), [0]

    def faulty(self, *args):
        out = original(self, *args)
        calls[0] += 1
        if calls[0] == k:
            raise exc("injected")
        return out

    monkeypatch.setattr(SessionState, method, faulty)
    return calls


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def replace(model):
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() + 0.05)


@pytest.mark.parametrize("change, name", [(perturb, "embedding.weight"),
                                          (lambda m: m.load_state_dict(tiny(seed=1).state_dict()), "embedding.weight"),
                                          (replace, "lm_head.weight")])
def test_a_weight_change_after_optimize_raises_stale_decoder_naming_it(change, name):
    model = tiny()
    decoder = build(model)
    prompt = ids(2, 9)
    session = decoder.session()
    with torch.no_grad():
        assert rel_err(session.prefill(prompt), model(prompt)) < 1e-5
        change(model)
        for call in (lambda: session.prefill(prompt), decoder.session, lambda: decoder.generate(prompt, 4)):
            with pytest.raises(StaleDecoder, match=f"'{name}'.*optimize"):
                call()
        # the advice works: a new optimize decodes the changed weights
        server = lcsm_compile.optimize(model, (ids(1, 16),), max_len=MAX_LEN, validate=False).session(rows=2)
        _, out = server.add(prompt[:1])
        assert rel_err(out, model(prompt[:1])) < 1e-5


@pytest.mark.parametrize("method, k", [("advance", 2), ("conv_step", 3), ("conv_prefill", 2), ("short_prefill", 1)])
def test_an_interrupted_prefill_or_step_breaks_the_session_until_a_prefill(monkeypatch, method, k):
    model = tiny()
    decoder = build(model)
    x = ids(2, 20)
    session = decoder.session()
    calls = inject(monkeypatch, method, k)
    with torch.no_grad():
        with pytest.raises(KeyboardInterrupt):
            session.prefill(x[:, :10])
            for t in range(10, 14):
                session.step(x[:, t : t + 1])
        assert calls[0] == k
        with pytest.raises(SessionBroken, match="prefill"):  # never a step from a half-updated state
            session.step(x[:, 14:15])
        monkeypatch.undo()
        assert rel_err(session.prefill(x[:, :12]), model(x[:, :12])) < 1e-5  # a prefill restarts it exactly
        for t in range(12, 16):
            assert rel_err(session.step(x[:, t : t + 1]), model(x[:, : t + 1])[:, -1:]) < 1e-5


def test_an_interrupted_add_or_remove_breaks_the_session(monkeypatch):
    model = tiny()
    decoder = build(model)
    server = decoder.session(rows=2)
    with torch.no_grad():
        row, _ = server.add(ids(1, 5))
        inject(monkeypatch, "conv_prefill", 2)
        with pytest.raises(KeyboardInterrupt):
            server.add(ids(1, 7))
        for call in (lambda: server.add(ids(1, 3)), lambda: server.remove(row), lambda: server.step(ids(2, 1))):
            with pytest.raises(SessionBroken, match="add"):
                call()


def test_an_interrupted_extend_breaks_the_session_until_a_prefill(monkeypatch):
    model = tiny()
    decoder = build(model)
    x = ids(2, 30)
    session = decoder.session()
    with torch.no_grad():
        session.prefill(x[:, :10])
        inject(monkeypatch, "conv_prefill", 2)  # the second long convolution of the extend program
        with pytest.raises(KeyboardInterrupt):
            session.extend(x[:, 10:20])
        for call in (lambda: session.step(x[:, 10:11]), lambda: session.extend(x[:, 10:12])):
            with pytest.raises(SessionBroken, match="extend"):
                call()
        monkeypatch.undo()
        assert rel_err(session.prefill(x[:, :12]), model(x[:, :12])) < 1e-5
        assert rel_err(session.extend(x[:, 12:30]), model(x)[:, 12:]) < 1e-5


# the interrupted call prefills (20 -> 50), extends (31 -> 50) or steps (31 -> 32)
@pytest.mark.parametrize("first, method, k, upto", [(20, "conv_prefill", 2, 50), (30, "conv_prefill", 2, 50),
                                                    (30, "advance", 1, 32)])
def test_an_interrupted_backend_call_is_followed_by_exact_calls(monkeypatch, first, method, k, upto):
    torch._dynamo.reset()
    model = tiny()
    x = ids(2, 60)
    c = torch.compile(model, backend="lcsm", dynamic=True, options={"max_len": MAX_LEN, "compile_step": False})
    try:
        with torch.no_grad():
            c(x[:, :first])
            c(x[:, : first + 1])
            calls = inject(monkeypatch, method, k)
            with pytest.raises(KeyboardInterrupt):
                c(x[:, :upto])
            assert calls[0] > 0
            monkeypatch.undo()
            for t in (first + 2, 50, 50, 51):
                assert rel_err(c(x[:, :t]), model(x[:, :t])) < 1e-5, t
            assert backend.records[-1].kind == "decode"
    finally:
        torch._dynamo.reset()


def test_the_backend_rebuilds_after_load_state_dict_and_a_replaced_parameter():
    torch._dynamo.reset()
    model = tiny()
    x = ids(2, 40)
    c = torch.compile(model, backend="lcsm", dynamic=True, options={"max_len": MAX_LEN, "compile_step": False})
    try:
        with torch.no_grad():
            c(x[:, :20])
            model.load_state_dict(tiny(seed=1).state_dict())
            assert rel_err(c(x[:, :21]), model(x[:, :21])) < 1e-5
            replace(model)
            assert rel_err(c(x[:, :22]), model(x[:, :22])) < 1e-5
    finally:
        torch._dynamo.reset()
