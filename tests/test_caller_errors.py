"""The caller's mistakes are named as such, before any work (issue 20, items 3-6): bad options, a
model left in training mode, token ids outside the vocabulary, examples the capture cannot use."""

import pytest
import torch
import torch.nn as nn

import lcsm_compile
from lcsm_compile import backend, pipeline
from lcsm_compile.errors import DeviceError, InputError, LcsmError, NotDecodable, ShapeError
from lcsm_compile.models import demo_lm

VOCAB, MAX_LEN = 32, 64


def tiny():
    return demo_lm(n_layer=1, d_model=16, vocab=VOCAB, max_len=MAX_LEN).eval()


def ids(B=1, L=16):
    return torch.randint(0, VOCAB, (B, L))


@pytest.fixture(scope="module")
def model_and_decoder():
    torch.manual_seed(0)
    model = tiny()
    return model, lcsm_compile.optimize(model, (ids(),), max_len=MAX_LEN)


@pytest.fixture
def no_work(monkeypatch):
    """Any pass run fails the test: the mistake must be found before the capture."""

    def run(*args, **kwargs):
        raise AssertionError("the passes ran before the argument was checked")

    monkeypatch.setattr(pipeline, "run", run)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"conv": "bogus"}, ValueError, r"conv: expected one of \['flash', 'floor', 'lazy', 'partitioned'\], got 'bogus'"),
    ({"compile": "yes"}, ValueError, "compile: expected"),
    ({"crossover": -3}, ValueError, "crossover: expected a positive int"),
    ({"validate": "no"}, TypeError, "validate: expected one of"),
    ({"cuda_graph": 1}, TypeError, "cuda_graph: expected"),
    ({"max_len": 0}, ValueError, "max_len: expected a positive int"),
    ({"max_len": "64"}, TypeError, "max_len: expected a positive int"),
])
def test_bad_options_are_plain_errors_before_any_work(no_work, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        lcsm_compile.optimize(tiny(), (ids(),), **kwargs)
    assert not isinstance(info.value, NotDecodable)
    if "max_len" in kwargs:
        with pytest.raises(error, match=match):
            lcsm_compile.analyze(tiny(), (ids(),), **kwargs)


def test_analyze_and_backend_share_the_option_checks(no_work):
    with pytest.raises(ValueError, match=r"capture: expected one of \['export', 'dynamo'\]"):
        lcsm_compile.analyze(tiny(), (ids(),), capture="fx")
    with pytest.raises(backend.BackendOptionError, match="max_len: expected a positive int"):
        backend.parse_options({"max_len": 0})
    with pytest.raises(backend.BackendOptionError, match=r"compile_step: expected one of \[True, False\], got 1"):
        backend.parse_options({"compile_step": 1})  # 1 is not True


class DroppedLM(nn.Module):
    """The tiny LM with dropout on its logits: only decodable in eval mode."""

    def __init__(self):
        super().__init__()
        self.lm, self.drop, self.max_len = tiny(), nn.Dropout(0.5), MAX_LEN

    def forward(self, x):
        return self.drop(self.lm(x))


def test_training_mode_note_reaches_the_exception_and_the_fallback_reason():
    model = DroppedLM().train()
    with pytest.raises(NotDecodable, match=r"call model\.eval\(\) first"):
        lcsm_compile.optimize(model, (ids(),), validate=False)
    torch._dynamo.reset()
    backend.records.clear()
    c = torch.compile(model, backend="lcsm", dynamic=True, options={"fallback": "eager", "compile_step": False})
    with torch.no_grad():
        c(ids(2, 20))
    assert backend.records[-1].kind == "fallback"
    assert "call model.eval() first" in backend.records[-1].reason


def test_ids_outside_the_vocabulary_are_input_errors(model_and_decoder):
    _, decoder = model_and_decoder
    assert decoder.vocab == VOCAB
    session = decoder.session()
    bad = ids()
    bad[0, 5] = VOCAB
    with pytest.raises(InputError, match=rf"token id {VOCAB} is outside the model's vocabulary \[0, {VOCAB}\)"):
        session.prefill(bad)
    session.prefill(ids())
    with pytest.raises(InputError, match=r"token id -1 is outside"):
        session.step(torch.tensor([[-1]]))
    with pytest.raises(InputError, match=r"token id 99 is outside"):
        decoder.generate(torch.tensor([[3, 99]]), 4)
    assert issubclass(InputError, LcsmError) and issubclass(InputError, ValueError)


def test_backend_first_call_with_a_bad_id_does_not_demote_the_graph():
    model = tiny()
    torch._dynamo.reset()
    backend.records.clear()
    c = torch.compile(model, backend="lcsm", dynamic=True, options={"max_len": MAX_LEN, "compile_step": False})
    x = ids(2, 16)
    bad = x.clone()
    bad[1, 3] = 40
    with torch.no_grad():
        with pytest.raises(InputError, match=r"token id 40 is outside the model's vocabulary \[0, 32\)"):
            c(bad)
        assert torch.allclose(c(x), model(x), atol=1e-5)
        assert [r.kind for r in backend.records] == ["decode"]
        longer = torch.cat([x, torch.tensor([[1], [VOCAB + 1]])], 1)
        with pytest.raises(InputError, match=r"token id 33 is outside"):
            c(longer)
        longer[1, -1] = 7
        assert torch.allclose(c(longer), model(longer), atol=1e-5)


def test_bad_examples_are_named_before_any_work(no_work):
    with pytest.raises(ShapeError, match=r"at least 2 positions on dim 1, got \(1, 1\)"):
        lcsm_compile.optimize(tiny(), (ids(1, 1),))
    with torch.device("meta"):
        meta = demo_lm(n_layer=1, d_model=16, vocab=VOCAB, max_len=MAX_LEN)
    with pytest.raises(DeviceError, match="model parameters are on the meta device; load real weights first"):
        lcsm_compile.optimize(meta, (ids(),))
    with pytest.raises(DeviceError, match=r"example_inputs\[0\]: expected the model's device cpu, got meta"):
        lcsm_compile.analyze(tiny(), (ids().to("meta"),))


def test_float_ids_say_token_ids_must_be_integers():
    with pytest.raises(NotDecodable, match=r"the example input is torch.float32 and the model has an nn.Embedding: "
                                           r"token ids must be integers"):
        lcsm_compile.optimize(tiny(), (ids().float(),))


def bf16_lm():
    """A factory for `lcsm-compile verify`: the tiny LM in bfloat16."""
    torch.manual_seed(0)
    return tiny().to(torch.bfloat16), (ids(1, 32),)


def test_verify_holds_a_bfloat16_model_to_its_own_error_and_says_what_it_checked(capsys):
    from lcsm_compile.tools import cli

    rc = cli.main(["verify", f"{__file__}:bf16_lm", "--no-progress", "--prompt-lens", "1,16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "the model itself is off by" in out  # the tolerance follows the model's own bfloat16 error
    assert out.splitlines()[-1].startswith("PASS") and f"checked positions 0..31 of the {MAX_LEN} served" in out


class TupleLM(nn.Module):
    """Returns (logits, aux), as many models do."""

    def __init__(self):
        super().__init__()
        self.lm, self.max_len = tiny(), MAX_LEN

    def forward(self, x):
        logits = self.lm(x)
        return logits, logits.sum(-1)


def test_generate_takes_the_logits_the_hugging_face_way():
    from types import SimpleNamespace

    from lcsm_compile.generation import naive_generate, pick_logits

    torch.manual_seed(0)
    model, prompt = TupleLM().eval(), ids(2, 5)
    with torch.no_grad():
        want = naive_generate(model.lm, prompt, 6)
        decoder = lcsm_compile.optimize(model, (ids(),))
        assert torch.equal(decoder.generate(prompt, 6), want)  # (logits, aux): the first element
        assert torch.equal(naive_generate(lambda x: {"hidden": None, "logits": model.lm(x)}, prompt, 6), want)
        assert pick_logits(SimpleNamespace(logits=want)) is want  # a ModelOutput-like object
        assert torch.equal(naive_generate(lambda x: (x, model.lm(x)), prompt, 6, logits=lambda out: out[1]), want)


def test_ctrl_c_in_the_cli_exits_130_in_one_line(monkeypatch, capsys):
    from lcsm_compile.tools import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)  # before any subcommand runs
    assert cli.main(["detect", "m:f"]) == 130
    assert capsys.readouterr().err == "lcsm-compile: interrupted\n"


def test_optimize_logs_progress_per_pass(caplog):
    with caplog.at_level("INFO", logger="lcsm_compile"):
        lcsm_compile.optimize(tiny(), (ids(),), validate=False)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lcsm_compile.")]
    assert lines[0].startswith("optimize: LM at max_len 64")
    n = len(pipeline.PASSES)
    ran = [name for name in pipeline.PASS_NAMES if name != "validate"]
    assert [ln.split(":")[0] for ln in lines if ln.startswith("pass ")] == \
        [f"pass {pipeline.PASS_NAMES.index(name) + 1}/{n} {name}" for name in ran]


def test_demo_takes_threads_and_says_when_a_busy_machine_makes_timings_unreliable(monkeypatch, capsys):
    import json
    import os

    from lcsm_compile.tools import cli

    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * (os.cpu_count() or 1), 0.0, 0.0))
    try:
        rc = cli.main(["demo", "--layers", "1", "--d-model", "16", "--vocab", "32", "--prompt", "4", "--tokens", "8",
                       "--verify-len", "16", "--no-compile", "--threads", "1", "--json"])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert rc == 0 and data["threads"] == 1
    assert "timings are unreliable" in data["unreliable_timings"] and "timings are unreliable" in captured.err
