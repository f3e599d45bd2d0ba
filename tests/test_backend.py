"""torch.compile(model, backend="lcsm"): the naive generation loop stays exact, reuses one buffer,
restarts on a changed prefix, never recompiles while the sequence grows, and falls back (logged)
on graphs it cannot decode."""

import logging
import warnings

import pytest
import torch
import torch.nn as nn

import lcsm_compile
from examples.models import ZOO, get
from helpers import random_inputs, rel_err
from lcsm_compile import backend
from lcsm_compile.errors import MaxLenExceeded, NotDecodable

LOGGER = "lcsm_compile.backend"


def compiled(model, **options):
    torch._dynamo.reset()
    backend.records.clear()
    return torch.compile(model, backend="lcsm", dynamic=True, options=options or None)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    yield
    torch._dynamo.reset()


def test_registered_by_name():
    assert torch._dynamo.lookup_backend("lcsm") is backend.lcsm_backend
    assert "lcsm" in torch._dynamo.list_backends()


# every decodable zoo model: the naive loop under the backend equals the model at every length
@pytest.mark.parametrize("name", [e.name for e in ZOO if e.decodable and e.one_graph])
def test_naive_loop_is_exact_and_compiles_once(name):
    model, inputs = get(name).build()
    P, L = 10, 72  # P is not a size of any weight: dynamo's duck sizing would make it static
    x = random_inputs(inputs[0], L + 1)  # every call is a view x[:, :t] of one longer tensor
    c = compiled(model, max_len=128)
    outs = []
    with torch.no_grad():
        first = c(x[:, :P])
        assert rel_err(first, model(x[:, :P])) < 1e-5
        (record,) = backend.records
        assert record.kind == "decode", record.reason
        with torch.compiler.set_stance("fail_on_recompile"):
            for t in range(P, L):
                out = c(x[:, : t + 1])
                assert out.shape[1] == t + 1
                assert rel_err(out, model(x[:, : t + 1])) < 1e-5, (name, t)
                outs.append(out)
    assert len(backend.records) == 1  # the backend ran once for 60+ lengths
    runner = record.runner
    assert runner.stats["prefill"] == 1 and runner.stats["step"] == L - P
    assert runner.decoder.step_fn.compilations == 1  # inductor compiled the step program once
    # every result is a view of the one [B, max_len, ...] buffer
    ptr = runner.out_bufs[0].untyped_storage().data_ptr()
    assert all(o._base is not None and o.untyped_storage().data_ptr() == ptr for o in outs + [first])
    assert runner.out_bufs[0].shape[1] == 128


def test_a_model_that_writes_state_back_decodes_exactly():
    """fairseq's position table: forward assigns `self.weights` (dynamo returns it as an extra graph
    output, which the backend recomputes instead of decoding) and grows it past 16 positions
    (a second graph: dynamo guards on the table's size)."""
    model, inputs = get("hyena_cached_pe").build()
    x = random_inputs(inputs[0], 41)
    c = compiled(model, max_len=128)
    with torch.no_grad():
        for t in range(10, 40):
            out = c(x[:, : t + 1])
            assert rel_err(out, model(x[:, : t + 1])) < 1e-5, t
    assert [r.kind for r in backend.records] == ["decode", "decode"]


def test_prefix_change_shorter_input_and_new_batch_restart_exactly():
    model, inputs = get("hyena_order2").build()
    x = random_inputs(inputs[0], 64)
    c = compiled(model, max_len=128, compile_step=False)  # the eager step program, same semantics
    with torch.no_grad():
        for t in range(10, 20):
            c(x[:, : t + 1])
        runner = backend.records[-1].runner
        x2 = x.clone()
        x2[:, 5] = (x2[:, 5] + 1) % int(inputs[0].max() + 1)  # an earlier position changes
        out = c(x2[:, :21])
        assert runner.stats["restart"] == 1
        assert rel_err(out, model(x2[:, :21])) < 1e-5
        out = c(x2[:, :22])  # and it keeps stepping from the new prefix
        assert rel_err(out, model(x2[:, :22])) < 1e-5 and runner.stats["restart"] == 1
        out = c(x2[:, :15])  # shorter: start over
        assert runner.stats["restart"] == 2 and rel_err(out, model(x2[:, :15])) < 1e-5
        x3 = random_inputs(inputs[0], 30, batch=3)  # another batch size: new buffers
        out = c(x3[:, :17])
        assert out.shape[0] == 3 and rel_err(out, model(x3[:, :17])) < 1e-5
        out = c(x3[:, :18])
        assert rel_err(out, model(x3[:, :18])) < 1e-5
        assert out.shape == runner.out_bufs[0][:, :18].shape
    assert runner.decoder.step_fn.compilations == 0
    assert len(backend.records) == 1


def test_in_place_growing_ids_and_verify_last():
    """The caller writes each new token into a preallocated ids tensor: the backend's own copy of
    the inputs keeps the comparison right; verify="last" checks only the last old position."""
    model, inputs = get("hyena_order2").build()
    ids = random_inputs(inputs[0], 40)
    c = compiled(model, max_len=64, verify="last")
    with torch.no_grad():
        buf = torch.zeros_like(ids)
        buf[:, :10] = ids[:, :10]
        for t in range(10, 30):
            out = c(buf[:, :t])
            assert rel_err(out, model(ids[:, :t])) < 1e-5
            buf[:, t] = ids[:, t]
        runner = backend.records[-1].runner
        assert runner.stats["restart"] == 0
        buf[:, 28] = (buf[:, 28] + 1) % int(inputs[0].max() + 1)  # the last old position (t = 29 seen)
        out = c(buf[:, :31])
        assert runner.stats["restart"] == 1 and rel_err(out, model(buf[:, :31])) < 1e-5


def test_parameter_change_rebuilds_the_decoder():
    model, inputs = get("s4d").build()
    x = random_inputs(inputs[0], 40)
    c = compiled(model, max_len=64)
    with torch.no_grad():
        c(x[:, :20])
        model.blocks[0].mixer.D.mul_(2.0)  # weights updated in place: no recompile, a new decoder
        out = c(x[:, :21])
        assert rel_err(out, model(x[:, :21])) < 1e-5


def test_non_decodable_graph_runs_through_inductor_with_the_reason_logged(caplog):
    model, inputs = get("neg_attention").build()
    x = random_inputs(inputs[0], 40)
    c = compiled(model)
    with caplog.at_level(logging.WARNING, logger=LOGGER), torch.no_grad():
        outs = [(c(x[:, :t]), model(x[:, :t])) for t in (20, 21)]
    for got, want in outs:
        assert rel_err(got, want) < 1e-5
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1 and "SLIDING_WINDOW" in messages[0] and "inductor" in messages[0], messages  # once
    assert backend.records[0].kind == "fallback" and not backend.records[0].report.decodable


class GraphBreak(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.max_len = inner, inner.max_len

    def forward(self, ids):
        torch._dynamo.graph_break()
        return self.inner(ids) * 1.0


def test_graph_breaks_fall_back(caplog):
    model, inputs = get("hyena_order2").build()
    model = GraphBreak(model)
    x = random_inputs(inputs[0], 30)
    c = compiled(model, fallback="eager")
    with caplog.at_level(logging.WARNING, logger=LOGGER), torch.no_grad():
        assert rel_err(c(x[:, :12]), model(x[:, :12])) < 1e-6
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("graph break" in m for m in messages), messages
    assert all(r.kind == "fallback" for r in backend.records)


def test_fallback_error_raises_not_decodable():
    model, inputs = get("neg_mean_pool").build()
    c = compiled(model, fallback="error")
    with pytest.raises(NotDecodable) as info, torch.no_grad():
        c(random_inputs(inputs[0], 20))
    assert info.value.report.rejected


def test_unknown_or_bad_options_are_errors():
    model, inputs = get("hyena_order2").build()
    x = random_inputs(inputs[0], 20)
    for options, match in (({"max_length": 64}, "allowed keys"), ({"verify": "some"}, "verify"),
                           ({"compile_step": "yes"}, "compile_step")):
        c = compiled(model, **options)
        with pytest.raises(backend.BackendOptionError, match=match) as info, torch.no_grad():
            c(x)  # raised as itself at the first call, not wrapped in dynamo's BackendCompilerFailed
        assert isinstance(info.value, ValueError) and not isinstance(info.value, torch._dynamo.exc.BackendCompilerFailed)
    with pytest.raises(ValueError, match="allowed keys"):
        backend.parse_options({"max_length": 64})


def test_static_length_graph_runs_eagerly_until_dynamo_makes_it_dynamic():
    model, inputs = get("hyena_order2").build()
    x = random_inputs(inputs[0], 40)
    torch._dynamo.reset()
    backend.records.clear()
    c = torch.compile(model, backend="lcsm", options={"max_len": 64})  # dynamic=None: static first
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in (10, 11, 12):
            assert rel_err(c(x[:, :t]), model(x[:, :t])) < 1e-5
    kinds = [r.kind for r in backend.records]
    assert kinds[0] == "static" and kinds[-1] == "decode"


def test_the_entry_point_registers_the_backend_without_importing_the_package():
    """torch finds "lcsm" through the torch_dynamo_backends entry point, in a process that never
    imported lcsm_compile itself."""
    import subprocess
    import sys

    code = ("import sys, torch; fn = torch._dynamo.lookup_backend('lcsm'); "
            "print(fn.__module__, fn.__name__, 'lcsm_compile' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["lcsm_compile.backend", "lcsm_backend", "True"]  # imported by torch, on demand


class TableSliced(nn.Module):
    """No `max_len` attribute: the filter table k [C, 48] sliced k[:, :L] is what bounds the length."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb, self.head = nn.Embedding(16, 4), nn.Linear(4, 16)
        self.k = nn.Parameter(torch.randn(4, 48, generator=g) * torch.exp(-torch.arange(48) / 8.0))

    def forward(self, ids):
        u = self.emb(ids).transpose(1, 2)
        n = 2 * u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.k[:, : u.shape[-1]], n=n), n=n)
        return self.head(y[..., : u.shape[-1]].transpose(1, 2))


def test_max_len_is_inferred_from_the_model_or_the_table_it_slices():
    """Without the option: the model's `max_len` attribute, else the length of the parameter table
    the graph slices by the sequence length."""
    hyena, inputs = get("hyena_order2").build()
    cases = [(hyena, random_inputs(inputs[0], 30), hyena.max_len), (TableSliced().eval(), torch.randint(0, 16, (2, 30)), 48)]
    for model, x, expected in cases:
        c = compiled(model, compile_step=False)
        with torch.no_grad():
            for t in (12, 13):
                assert rel_err(c(x[:, :t]), model(x[:, :t])) < 1e-5
        record = backend.records[-1]
        assert record.kind == "decode", record.reason
        assert record.runner.max_len == expected


def test_verify_none_trusts_the_caller():
    """verify="none" never compares the prefix: a changed earlier position is not seen, the call
    extends the sequence the backend holds (documented: the caller promises prefixes match)."""
    model, inputs = get("hyena_order2").build()
    x = random_inputs(inputs[0], 40)
    c = compiled(model, max_len=64, verify="none", compile_step=False)
    with torch.no_grad():
        c(x[:, :20])
        x2 = x.clone()
        x2[:, 3] = (x2[:, 3] + 1) % int(inputs[0].max() + 1)
        out = c(x2[:, :21])
        runner = backend.records[-1].runner
        assert runner.stats["restart"] == 0 and runner.stats["step"] == 1
        held = torch.cat([x[:, :20], x2[:, 20:21]], 1)  # what the backend decoded
        assert rel_err(out, model(held)) < 1e-5 and rel_err(out, model(x2[:, :21])) > 1e-3


def test_a_call_adding_several_positions_extends_once_and_past_max_len_is_an_error():
    model, inputs = get("hyena_order2").build()
    x = random_inputs(inputs[0], 50)
    c = compiled(model, max_len=40, compile_step=False)
    with torch.no_grad():
        c(x[:, :20])
        out = c(x[:, :27])  # seven new positions: one extend, no restart
        runner = backend.records[-1].runner
        assert runner.stats["extend"] == 1 and runner.stats["step"] == 0 and runner.stats["restart"] == 0
        assert runner.stats["prefill"] == 1
        assert rel_err(out, model(x[:, :27])) < 1e-5
        assert rel_err(c(x[:, :40]), model(x[:, :40])) < 1e-5  # up to max_len exactly
        with pytest.raises(MaxLenExceeded, match="max_len=40"):
            c(x[:, :41])


def test_conv_lazy_runs_the_baseline_bank_exactly():
    from lcsm_compile.baselines import LazyConv

    model, inputs = get("hyena_order2").build()
    x = random_inputs(inputs[0], 40)
    c = compiled(model, max_len=64, conv="lazy", compile_step=False)
    with torch.no_grad():
        outs = [(c(x[:, :t]), model(x[:, :t])) for t in range(12, 18)]
    assert all(rel_err(got, want) < 1e-5 for got, want in outs)
    runner = backend.records[-1].runner
    assert isinstance(runner.decoder.bank, LazyConv) and runner.stats["step"] == 5


def test_loop_benchmark_smoke():
    from lcsm_compile.tools.bench import loop
    from lcsm_compile.models.hyena import demo_lm

    model = demo_lm(n_layer=1, d_model=16, vocab=32, max_len=64)
    prompt = torch.randint(0, 32, (1, 8))
    out = loop.compare(model, prompt, 40, ("eager", "lcsm", "lcsm_eager_step"), progress=False, full_len=16, max_len=64)
    eager, uncompiled = out["methods"]["eager"], out["methods"]["lcsm_eager_step"]
    assert out["checkpoints"] == [16, 32, 40]
    assert eager["tokens_agree"] and eager["tokens_checked"] == 8  # run in full to 16 ...
    assert eager["estimated"] == {16: False, 32: True, 40: True}  # ... and estimated beyond,
    assert eager["cum"][16] <= eager["cum"][32] <= eager["cum"][40]  # never below what was measured
    assert uncompiled["tokens_agree"] and uncompiled["tokens_checked"] == 32 and not any(uncompiled["estimated"].values())
    assert out["methods"]["lcsm"]["backend"]["kind"] == "decode"
    assert set(eager["over_lcsm"]) == set(out["checkpoints"]) and "lcsm_eager_step/lcsm" in loop.table(out)
