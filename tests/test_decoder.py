"""optimize(): teacher-forced exactness of prefill + steps on every accepted zoo model, generate()
against the naive loop, and typed errors for bad input."""

import logging
import time
import warnings

import pytest
import torch

import lcsm_compile
from examples.models import ZOO, get
from helpers import random_inputs, rel_err
from lcsm_compile import generation
from lcsm_compile.errors import DeviceError, DTypeError, MaxLenExceeded, NotDecodable, SessionNotStarted, ShapeError

POSITIVES = [e for e in ZOO if e.decodable]


@pytest.fixture(scope="module")
def decoders():
    cache = {}

    def get_decoder(name):
        if name not in cache:
            model, inputs = get(name).build()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name] = (model, inputs, lcsm_compile.optimize(model, inputs))
        return cache[name]

    return get_decoder


@pytest.mark.parametrize("entry", POSITIVES, ids=[e.name for e in POSITIVES])
def test_teacher_forced_exactness(entry, decoders):
    model, inputs, decoder = decoders(entry.name)
    L = decoder.max_len
    x = random_inputs(inputs[0], L)
    with torch.no_grad():
        full = model(x)
        for P in (1, 37, L - 256):  # N = L - P >= 256 steps each
            session = decoder.session()
            outs = [session.prefill(x[:, :P])]
            outs += [session.step(x[:, t : t + 1]) for t in range(P, L)]
            assert session.position == L
            y = torch.cat(outs, 1)
            assert y.shape == full.shape
            assert rel_err(y, full) < 1e-5, (entry.name, P)


def test_interleaved_sessions_are_independent(decoders):
    model, inputs, decoder = decoders("hyena_order2")
    a, b = random_inputs(inputs[0], 60), random_inputs(inputs[0], 60)
    with torch.no_grad():
        sa, sb = decoder.session(), decoder.session()
        ya, yb = [sa.prefill(a[:, :5])], [sb.prefill(b[:, :9])]
        for t in range(5, 60):
            ya.append(sa.step(a[:, t : t + 1]))
            if t >= 9:
                yb.append(sb.step(b[:, t : t + 1]))
        assert rel_err(torch.cat(ya, 1), model(a)) < 1e-5
        assert rel_err(torch.cat(yb, 1), model(b)) < 1e-5


def test_lazy_and_floor_banks(decoders):
    model, inputs, _ = decoders("hyena_order2")
    x = random_inputs(inputs[0], 80)
    report = lcsm_compile.analyze(model, inputs)
    with torch.no_grad():
        full = model(x)
        lazy = lcsm_compile.build_decoder(report, inputs, conv="lazy").session()
        y = torch.cat([lazy.prefill(x[:, :3])] + [lazy.step(x[:, t : t + 1]) for t in range(3, 80)], 1)
        assert rel_err(y, full) < 1e-5
        floor = lcsm_compile.build_decoder(report, inputs, conv="floor").session()
        y = torch.cat([floor.prefill(x[:, :3])] + [floor.step(x[:, t : t + 1]) for t in range(3, 80)], 1)
        assert rel_err(y, full) > 1e-3  # the floor drops every lag > 0: it is a timing bound, not the model


@pytest.mark.parametrize("name", ["hyena_order2", "multihead_hyena"])
def test_greedy_generate_equals_naive_loop(name, decoders):
    model, inputs, decoder = decoders(name)
    prompt = random_inputs(inputs[0], 7)
    with torch.no_grad():
        fast = decoder.generate(prompt, 40)
        naive = generation.naive_generate(model, prompt, 40)
    assert fast.shape == (2, 47)
    assert torch.equal(fast, naive)


def test_sampled_generate_equals_naive_loop_with_same_generator(decoders):
    model, inputs, decoder = decoders("hyena_order2")
    prompt = random_inputs(inputs[0], 5)
    opts = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    with torch.no_grad():
        fast = decoder.generate(prompt, 30, generator=torch.Generator().manual_seed(3), **opts)
        naive = generation.naive_generate(model, prompt, 30, generator=torch.Generator().manual_seed(3), **opts)
    assert torch.equal(fast, naive)


def test_memory_bytes_counts_bank_and_rings(decoders):
    _, inputs, decoder = decoders("hyena_order2")
    session = decoder.session()
    session.prefill(random_inputs(inputs[0], 10))
    bank = session.state.tiled.bank
    state = sum(t.numel() * t.element_size() for t in (bank.S, bank.Xb, bank.Ab))
    spectra = sum(t.numel() * t.element_size() for t in bank.spectra.values())
    rings = sum(r.numel() * r.element_size() for r in session.state.ring.rings.values())
    assert state > 0 and spectra > 0 and rings > 0
    expected = state + spectra + rings
    assert expected <= session.memory_bytes() <= 1.1 * expected + bank.h.numel() * bank.h.element_size() + sum(
        t.numel() * t.element_size() for t in bank.toeplitz.values()
    )


def test_bad_inputs(decoders):
    _, inputs, decoder = decoders("hyena_order2")
    session = decoder.session()
    with pytest.raises(SessionNotStarted, match="prefill"):
        session.step(random_inputs(inputs[0], 1))
    L = decoder.max_len
    with pytest.raises(MaxLenExceeded, match=f"max_len = {L}"):
        session.prefill(random_inputs(inputs[0], L + 1))
    with pytest.raises(DTypeError, match="int64"):
        session.prefill(torch.zeros(2, 4))
    with pytest.raises(ShapeError, match="sequence on dim 1"):
        session.prefill(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DeviceError, match="expected device cpu"):
        session.prefill(random_inputs(inputs[0], 4).to("meta"))
    session.prefill(random_inputs(inputs[0], L - 1))
    with pytest.raises(ShapeError, match="batch 2"):
        session.step(random_inputs(inputs[0], 1, batch=3))
    with pytest.raises(ShapeError, match="length 1"):
        session.step(random_inputs(inputs[0], 2))
    with pytest.raises(DeviceError, match="expected device cpu"):
        session.step(random_inputs(inputs[0], 1).to("meta"))
    session.step(random_inputs(inputs[0], 1))
    with pytest.raises(MaxLenExceeded, match="past max_len"):
        session.step(random_inputs(inputs[0], 1))
    with pytest.raises(MaxLenExceeded, match=str(L)):
        decoder.generate(random_inputs(inputs[0], L - 6), 10)
    with pytest.warns(UserWarning):
        out = decoder.generate(random_inputs(inputs[0], L - 6), 10, on_max_len="truncate")
    assert out.shape == (2, L)


@pytest.mark.parametrize("name", ["neg_attention", "neg_same_padding"])
def test_not_decodable_carries_the_report(name):
    model, inputs = get(name).build()
    with pytest.raises(NotDecodable) as info:
        lcsm_compile.optimize(model, inputs)
    assert info.value.report.decodable is False
    assert get(name).reason in str(info.value)


def test_compiled_step_is_exact_and_compiles_once_per_batch_size(decoders):
    model, inputs, _ = decoders("hyena_order2")
    decoder = lcsm_compile.optimize(model, inputs, compile=True)
    L = decoder.max_len
    a, b = random_inputs(inputs[0], L), random_inputs(inputs[0], L)
    with torch.no_grad():
        sa, sb = decoder.session(), decoder.session()
        ya, yb = [sa.prefill(a[:, :3])], [sb.prefill(b[:, :40])]
        for t in range(3, L):
            ya.append(sa.step(a[:, t : t + 1]))
            if t >= 40:  # a second session, interleaved, at other positions
                yb.append(sb.step(b[:, t : t + 1]))
        assert decoder.step_fn.compilations == 1  # every position of both sessions
        assert rel_err(torch.cat(ya, 1), model(a)) < 1e-5
        assert rel_err(torch.cat(yb, 1), model(b)) < 1e-5
        c = random_inputs(inputs[0], 20, batch=3)  # another batch size: one more compilation
        sc = decoder.session()
        yc = [sc.prefill(c[:, :10])] + [sc.step(c[:, t : t + 1]) for t in range(10, 20)]
        assert decoder.step_fn.compilations == 2 and rel_err(torch.cat(yc, 1), model(c)) < 1e-5


def test_auto_compile_switches_after_enough_steps_and_stays_exact(decoders, monkeypatch, caplog):
    """compile="auto" (the default): eager until a batch size has taken AUTO_COMPILE_CALLS steps,
    then compiled and timed against the eager steps, logged, with the decode exact throughout."""
    from lcsm_compile.runtime import program as runtime

    monkeypatch.setattr(runtime, "AUTO_COMPILE_CALLS", 30)
    model, inputs, _ = decoders("hyena_order2")
    decoder = lcsm_compile.optimize(model, inputs, validate=False)
    assert decoder.step_fn.compile == "auto"
    x = random_inputs(inputs[0], 90)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="lcsm_compile.runtime"):
        session = decoder.session()
        ys = [session.prefill(x[:, :5])]
        for t in range(5, 90):
            ys.append(session.step(x[:, t : t + 1]))
            assert decoder.step_fn.compilations == (1 if t - 5 + 1 > 30 else 0), t  # the 31st step compiles
        assert rel_err(torch.cat(ys, 1), model(x)) < 1e-5
    lines = [r.getMessage() for r in caplog.records if r.name == "lcsm_compile.runtime"]
    assert len(lines) == 3 and lines[0].startswith("compiling the step program with inductor"), lines  # before the wait
    assert "compiled the step program" in lines[1] and "30 steps taken" in lines[1], lines
    assert "ms compiled vs" in lines[2] and lines[2].endswith(("keeping compiled", "keeping eager")), lines


def test_auto_compile_keeps_the_eager_program_when_the_compiled_one_is_slower(decoders, monkeypatch, caplog):
    from lcsm_compile.runtime import program as runtime

    monkeypatch.setattr(runtime, "AUTO_COMPILE_CALLS", 20)
    model, inputs, _ = decoders("hyena_order2")
    decoder = lcsm_compile.optimize(model, inputs, validate=False)
    program, runs = decoder.step_fn, []

    def slow_compile(key, args):  # a "compiled" program 20 ms slower per call than the eager one
        def fn(*a):
            runs.append(1)
            time.sleep(0.02)
            return program.gm(*a)

        program.compiled[key] = fn
        return fn

    monkeypatch.setattr(program, "_compile", slow_compile)
    x = random_inputs(inputs[0], 80)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="lcsm_compile.runtime"):
        session = decoder.session()
        y = torch.cat([session.prefill(x[:, :3])] + [session.step(x[:, t : t + 1]) for t in range(3, 80)], 1)
    assert rel_err(y, model(x)) < 1e-5
    assert len(runs) == 1 + runtime.AUTO_TRIAL_CALLS  # its first call and the timed trial, then eager again
    assert caplog.records[-1].getMessage().endswith("keeping eager")


def test_auto_compile_compiles_a_long_generation_early(decoders, monkeypatch):
    """generate announces its length: a generation of AUTO_COMPILE_CALLS steps or more is compiled
    once AUTO_TRIAL_CALLS eager steps were timed, a shorter one never; tokens equal the naive
    loop's either way."""
    from lcsm_compile.runtime import program as runtime

    monkeypatch.setattr(runtime, "AUTO_COMPILE_CALLS", 40)
    model, inputs, _ = decoders("hyena_order2")
    prompt = inputs[0][:, :4]
    for new_tokens, compiled in ((30, 0), (41, 1)):
        decoder = lcsm_compile.optimize(model, inputs, validate=False)
        calls = []  # how many eager calls its signature had made when it was compiled

        def spy(key, args, _compile=decoder.step_fn._compile, _fn=decoder.step_fn):
            calls.append(_fn.auto[key].calls)
            return _compile(key, args)

        monkeypatch.setattr(decoder.step_fn, "_compile", spy)
        ours = decoder.generate(prompt, new_tokens)
        assert decoder.step_fn.compilations == compiled and calls == [runtime.AUTO_TRIAL_CALLS] * compiled
        assert torch.equal(ours, generation.naive_generate(model, prompt, new_tokens))
        assert decoder.step_fn.expected == 0  # the announcement ends with the generation


def test_auto_compile_that_fails_stays_eager_with_a_warning(decoders, monkeypatch, caplog):
    from lcsm_compile.runtime import program as runtime

    monkeypatch.setattr(runtime, "AUTO_COMPILE_CALLS", 3)
    model, inputs, _ = decoders("hyena_order2")
    decoder = lcsm_compile.optimize(model, inputs, validate=False)

    def no_compiler(key, args):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(decoder.step_fn, "_compile", no_compiler)
    x = random_inputs(inputs[0], 30)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="lcsm_compile.runtime"):
        session = decoder.session()
        y = torch.cat([session.prefill(x[:, :2])] + [session.step(x[:, t : t + 1]) for t in range(2, 30)], 1)
    assert rel_err(y, model(x)) < 1e-5 and decoder.step_fn.compile is False
    lines = [r.getMessage() for r in caplog.records if r.name == "lcsm_compile.runtime"]
    assert len(lines) == 1 and "no C++ compiler found" in lines[0] and "stays eager" in lines[0]


def test_custom_ops_pass_opcheck(decoders):
    _, inputs, decoder = decoders("hyena_order2")
    session = decoder.session()
    # the session's own methods run in inference mode, whose state opcheck could not update outside
    # it: prefill without that wrapper, as a caller of the ops would
    type(session).prefill.__wrapped__(session, random_inputs(inputs[0], 10))
    ops = torch.ops.lcsm
    for i, site in enumerate(decoder.sites):
        prefill, step = (ops.conv_prefill, ops.conv_step) if site.kind == "long" else (ops.short_conv_prefill, ops.short_conv_step)
        torch.library.opcheck(prefill.default, (session.handle, torch.randn(2, site.width, 10), i))
        torch.library.opcheck(step.default, (session.handle, torch.randn(2, site.width, 1), i))
    torch.library.opcheck(ops.advance.default, (session.handle, [torch.randn(2, 3, 1)]))


def test_memory_bytes_matches_the_state_it_should_hold():
    """state (inputs and accumulators in one buffer) + ring buffers + spectra (+ the filters and
    Toeplitz blocks the prefill and direct tiles use), computed from the sizes alone, within 10%;
    per channel and position the state is 4 bytes in float32."""
    from lcsm_compile.models import demo_lm

    L, B, d, layers = 1024, 3, 32, 2
    model = demo_lm(n_layer=layers, d_model=d, vocab=64, max_len=L)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder = lcsm_compile.optimize(model, (torch.randint(0, 64, (B, 32)),), max_len=L)
    session = decoder.session()
    with pytest.raises(SessionNotStarted, match="prefill"):
        session.memory_breakdown(per_channel_position=True)
    session.prefill(torch.randint(0, 64, (B, 7)))
    C, f32 = layers * d, 4  # order 2: one long conv of width d per layer
    block = decoder.bank.block
    fft_sizes = [U for U in (2**k for k in range(20)) if block <= U < L]
    expected = {
        "state": B * C * L * f32,
        "block": 2 * block * B * C * f32,
        "spectra": sum((U + 1) * C * 2 * f32 for U in fft_sizes),
        "toeplitz": sum(U * U * C * f32 for U in (2**k for k in range(20)) if U < block),
        "filters": (L + 1) * C * f32,
        "rings": layers * 2 * B * (3 * d) * f32,  # the K-1 = 2 last inputs of 3d channels per layer
        "recurrent": 0,  # Hyena's implicit filters are not modal: no recurrent state
        "kv_cache": 0,  # no attention layer
    }
    got = session.memory_breakdown()
    assert set(got) == set(expected)
    total = sum(expected.values())
    assert abs(session.memory_bytes() - total) <= 0.1 * total, (got, expected)
    for part in ("state", "spectra", "rings"):
        assert abs(got[part] - expected[part]) <= 0.1 * expected[part], part
    per = session.memory_breakdown(per_channel_position=True)
    assert per["state"] == f32 and per["block"] == pytest.approx(expected["block"] / (B * C * L))
    with torch.no_grad():
        session.step(torch.randint(0, 64, (B, 1)))
    assert session.memory_breakdown()["rings"] == expected["rings"]  # written in place: a step keeps no window


@pytest.mark.parametrize("mode", ["inference_mode", "enable_grad"])
def test_compiled_step_under_inference_mode_and_grad(mode):
    """The compiled step runs its inference graph whatever the caller's autograd mode."""
    from lcsm_compile.models import demo_lm

    model = demo_lm(n_layer=1, d_model=16, vocab=32, max_len=48)
    ids = torch.randint(0, 32, (1, 48))
    decoder = lcsm_compile.optimize(model, (ids[:, :16],), compile=True)
    with getattr(torch, mode)():
        session = decoder.session()
        ys = [session.prefill(ids[:, :8])] + [session.step(ids[:, t : t + 1]) for t in range(8, 48)]
    with torch.no_grad():
        assert rel_err(torch.cat(ys, 1).detach(), model(ids)) < 1e-5
    assert decoder.step_fn.compilations == 1


def test_decoder_conv_must_name_a_bank(decoders):
    _, inputs, decoder = decoders("hyena_order2")
    with pytest.raises(ValueError, match=r"conv: expected one of \['flash', 'floor', 'lazy', 'partitioned'\], got 'bad'"):
        lcsm_compile.build_decoder(decoder.report, inputs, conv="bad")


@pytest.mark.parametrize("crossover", [1, 8, 48])
def test_optimize_crossover_sets_the_direct_tiles(crossover, decoders, monkeypatch):
    """crossover: the largest tile computed directly. The kernel the bank runs for each tile size is
    the kernel the schedule prints (48 is not a power of two: U = 32 direct, 64 FFT), and the
    decode stays exact."""
    from lcsm_compile.kernels import reference

    model, inputs, _ = decoders("hyena_order2")
    decoder = lcsm_compile.optimize(model, inputs, crossover=crossover)
    assert decoder.bank.crossover == crossover
    printed = {g["size"]: g["kernel"] for g in decoder.schedule.to_json()["tile_groups"]}
    assert printed == {U: "direct" if U <= crossover else "fft" for U in printed}
    ran = {}
    # every tile kernel takes U last, but for the direct tile run on the engine's prebuilt views
    # (one Toeplitz column and input row per input)
    size_of = {"run_direct_tile": lambda args: len(args[0][1])}
    for name, kind in (("fft_tile", "fft"), ("direct_tile_from_toeplitz", "direct"), ("run_direct_tile", "direct")):
        def record(*args, _kind=kind, _run=getattr(reference, name), _size=size_of.get(name, lambda a: a[-1])):
            ran.setdefault(_size(args), set()).add(_kind)
            return _run(*args)
        monkeypatch.setattr(reference, name, record)
    x = random_inputs(inputs[0], 200)
    with torch.no_grad():
        session = decoder.session()
        y = torch.cat([session.prefill(x[:, :3])] + [session.step(x[:, t : t + 1]) for t in range(3, 200)], 1)
        assert rel_err(y, model(x)) < 1e-5
    assert {1, 8, 32, 64, 128} <= set(ran)  # both sides of every crossover tested ran
    assert ran == {U: {printed[U]} for U in ran}
