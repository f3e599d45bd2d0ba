"""`lcsm-compile` subcommands, each run as a subprocess on zoo models; JSON parsed and checked on
real content. The subprocesses of the selected tests start together on first use (a few at a
time, one torch thread each) so the file stays quick on a small machine.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lcsm_compile import cli, loading, logs, tuning
from lcsm_compile.pipeline import ANALYSIS_PASSES

ROOT = Path(__file__).resolve().parents[1]
ORDER2 = "examples.models.hyena:build_order2"
ATTENTION = "examples.models.negatives:build_attention"
WRAP = "examples.models.negatives:build_wrap_around"
WORKDIR = ROOT / "build" / "test_cli"  # a fixed place: the commands are built before tmp_path exists

FACTORIES = '''
import torch
from lcsm_compile.models.hyena import demo_lm


def bare(n_layer=2):
    return demo_lm(n_layer=n_layer, d_model=16, vocab=32, max_len=64)


def wrong():
    return 42


def boom():
    raise ValueError("bad config")
'''

BARE = str(WORKDIR / "factories.py") + ":bare"  # a 1-layer Hyena LM from a file, inputs described by options
BARE_OPTS = ["--input-shape", "1,32", "--vocab", "32", "--arg", "n_layer=1"]

# name -> (argv after `lcsm-compile`, extra env)
COMMANDS = {
    "detect_order2": (["detect", ORDER2, "--json"], {"LCSM_LOGS": "detect"}),
    "detect_attention": (["detect", ATTENTION, "--json"], {}),
    "detect_bare_file": (["detect", BARE, *BARE_OPTS, "--json"], {}),
    "explain_accepted": (["explain", ORDER2, "fft_irfft", "--json"], {}),
    "explain_rejected": (["explain", WRAP, "fft_irfft"], {}),
    "passes_json": (["passes", ORDER2, "--json", "--timing", "--diff", "--print-after", "layer_schedule"], {"LCSM_LOGS": "passes"}),
    "passes_stop": (["passes", BARE, *BARE_OPTS, "--stop-after", "detect", "--print-after-all", "--timing"], {}),
    "schedule_json": (["schedule", ORDER2, "--format", "json"], {}),
    "schedule_dot": (["schedule", BARE, *BARE_OPTS, "--format", "dot"], {}),
    "kernels_model": (["kernels", ORDER2, "--check", "--dump", str(WORKDIR / "kernels"), "--json"], {}),
    "kernels_bank": (["kernels", "--channels", "37", "--max-len", "64", "--crossover", "4"], {}),
    "verify": (["verify", ORDER2, "--json", "--prompt-lens", "1,20,63"], {}),
    "verify_fail": (["verify", BARE, *BARE_OPTS, "--tol", "0", "--prompt-lens", "30", "--no-progress"], {}),
    "bench": (["bench", ORDER2, "--length", "40", "--prompt", "8", "--json", "--plot", str(WORKDIR / "bench.png")], {}),
    "bench_compiled": (["bench", BARE, *BARE_OPTS, "--length", "24", "--prompt", "4", "--compile", "--json"], {}),
    "tune": (["tune", "--channels", "64", "--max-size", "16", "--json"], {"LCSM_CACHE_DIR": str(WORKDIR / "cache")}),
    "demo": (["demo", "--layers", "1", "--d-model", "16", "--vocab", "32", "--prompt", "8", "--tokens", "40",
              "--verify-len", "48", "--json"], {}),
    "bad_spec": (["detect", "no_colon_here"], {}),
}


def _run(argv, env):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if "LCSM_LOGS" not in env:
        full.pop("LCSM_LOGS", None)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [full.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "lcsm_compile.cli", *argv], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=600)


class Runs:
    """Starts the commands every selected test declared (@uses) on first use."""

    def __init__(self, names):
        WORKDIR.mkdir(parents=True, exist_ok=True)
        (WORKDIR / "factories.py").write_text(FACTORIES)
        shutil.rmtree(WORKDIR / "cache", ignore_errors=True)  # `tune` must write the cache itself
        self.pool = ThreadPoolExecutor(max_workers=3)
        self.futures = {n: self.pool.submit(_run, *COMMANDS[n]) for n in names}

    def __getitem__(self, name):
        if name not in self.futures:
            self.futures[name] = self.pool.submit(_run, *COMMANDS[name])
        return self.futures[name].result()


def uses(*names):
    """Declare the commands a test reads: the fixture starts those of every selected test at once."""
    def mark(fn):
        fn.cli_runs = names
        return fn
    return mark


@pytest.fixture(scope="module")
def runs(request):
    names = []
    for item in request.session.items:
        names += [n for n in getattr(getattr(item, "function", None), "cli_runs", ()) if n not in names]
    r = Runs(names)
    yield r
    r.pool.shutdown(wait=True)


def _json(proc):
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _one_error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("lcsm-compile: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- detect -------------------------------------------------------------------------------------

@uses("detect_order2")
def test_detect_json_accepts_hyena(runs):
    proc = runs["detect_order2"]
    data = _json(proc)
    assert proc.returncode == 0 and data["decodable"] is True and data["model"] == ORDER2
    verdicts = {c["name"]: (c["kind"], c["verdict"]) for c in data["candidates"]}
    assert verdicts == {"conv1d": ("short", "ACCEPTED"), "fft_irfft": ("long", "ACCEPTED"),
                        "conv1d_1": ("short", "ACCEPTED"), "fft_irfft_1": ("long", "ACCEPTED")}
    assert [p["name"] for p in data["passes"]] == list(ANALYSIS_PASSES)


@uses("detect_order2")
def test_lcsm_logs_detect_writes_log_lines(runs):
    err = runs["detect_order2"].stderr
    lines = [ln for ln in err.splitlines() if ln.startswith("[lcsm detect]")]
    assert any("fft_irfft: fft_conv long ACCEPTED" in ln for ln in lines), err[-2000:]
    assert any("decodable=True" in ln for ln in lines)
    assert "[lcsm passes]" not in err  # only the areas asked for


@uses("detect_attention")
def test_detect_non_decodable_is_a_result_not_an_error(runs):
    proc = runs["detect_attention"]
    data = _json(proc)
    assert proc.returncode == 0 and data["decodable"] is False
    sdpa = [c for c in data["candidates"] if c["verdict"] == "REJECTED"]
    assert [(c["name"], c["reason"]) for c in sdpa] == [("scaled_dot_product_attention", "TIME_MIXING_OP")]


def _stub_pipeline(monkeypatch):
    """cli with the analysis replaced by a fixed non-decodable Report (for exit-code logic)."""
    from lcsm_compile.report import Candidate, CaptureInfo, Reason, Report, Verdict

    cand = Candidate(name="fft_irfft", spelling="fft_conv", kind="long", verdict=Verdict.REJECTED,
                     reason=Reason.WRAP_AROUND, explanation="circular convolution")
    report = Report(False, [cand], CaptureInfo("export", True, "s0", 64, 256))
    monkeypatch.setattr(cli, "_load", lambda args: None)
    monkeypatch.setattr(cli, "_analyze", lambda loaded, capture="export": report)


def test_detect_strict_exit_code(monkeypatch, capsys):
    _stub_pipeline(monkeypatch)
    assert cli.main(["detect", "m:f"]) == 0
    assert cli.main(["detect", "m:f", "--strict"]) == 1
    assert "decodable=False" in capsys.readouterr().out


def test_explain_unknown_name_lists_valid_names(monkeypatch, capsys):
    _stub_pipeline(monkeypatch)
    assert cli.main(["explain", "m:f", "no_such_op"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lcsm-compile: error: no candidate named 'no_such_op'; valid names: fft_irfft"]


@uses("detect_bare_file")
def test_detect_bare_model_from_a_file_with_input_options(runs):
    data = _json(runs["detect_bare_file"])
    assert data["decodable"] is True
    assert data["capture"]["example_length"] == 32 and data["capture"]["max_len"] == 64
    assert sorted(c["kind"] for c in data["candidates"]) == ["long", "short"]


# -- explain ------------------------------------------------------------------------------------

@uses("explain_accepted")
def test_explain_accepted_candidate(runs):
    data = _json(runs["explain_accepted"])
    assert data["name"] == "fft_irfft" and data["verdict"] == "ACCEPTED"
    assert [m["path"] for m in data["module_stack"]][-1] == "blocks.0.mixer.filter_fn"
    assert any(s["file"].endswith("hyena.py") and "fftconv_ref" in s["code"] for s in data["source_lines"])
    roles = {n["name"]: n["role"] for n in data["subgraph"]}
    assert roles["fft_irfft"] == "conv" and "input" in roles.values() and "output" in roles.values()
    assert "filter" in roles.values()  # the implicit filter MLP behind the verdict
    assert "fft_irfft_1" not in roles  # the other layer's convolution is not part of this one
    assert "stack_trace" in data and "hyena.py" in data["stack_trace"]


@uses("explain_rejected")
def test_explain_rejected_candidate(runs):
    proc = runs["explain_rejected"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REJECTED WRAP_AROUND" in proc.stdout and "circular convolution" in proc.stdout
    assert "examples/models/negatives.py:68 in forward" in proc.stdout  # the irfft line of FixedSizeFFTConv
    assert "! %fft_irfft" in proc.stdout and "> %getitem_1" in proc.stdout and "f %fft_rfft " in proc.stdout
    assert "torch/" not in proc.stdout.split("subgraph:")[0]  # source lines are the user's, not torch's


# -- passes -------------------------------------------------------------------------------------

@uses("passes_json", "passes_stop")
def test_passes_json_timing_diff_and_stop_after(runs):
    proc = runs["passes_json"]
    data = _json(proc)
    names = [p["name"] for p in data["passes"]]
    assert names[: len(ANALYSIS_PASSES)] == list(ANALYSIS_PASSES)
    assert "decode_rewrite" in names
    assert all(p["seconds"] >= 0 for p in data["passes"]) and data["passes"][0]["seconds"] > 0
    assert data["total_seconds"] == pytest.approx(sum(p["seconds"] for p in data["passes"]), abs=1e-2)
    rewrite = data["passes"][names.index("decode_rewrite")]
    assert rewrite["diff"].startswith("--- after safety_net") and "lcsm.conv_step" in rewrite["diff"]
    if "layer_schedule" in names:
        assert "critical path" in data["passes"][names.index("layer_schedule")]["dump"]
    assert "[lcsm passes] pass capture" in proc.stderr

    stop = runs["passes_stop"]  # the 1-layer model from a file
    assert stop.returncode == 0, stop.stderr[-2000:]
    out = stop.stdout
    assert "=== after detect" in out and "=== after capture" in out
    assert "properties" not in out.split("=== after detect")[1] and "decode_rewrite" not in out
    assert "seconds" in out and "total" in out


# -- schedule -----------------------------------------------------------------------------------

@uses("schedule_json", "schedule_dot")
def test_schedule_json_and_dot(runs):
    proc = runs["schedule_json"]
    if proc.returncode == 2 and "no layer schedule" in proc.stderr:
        pytest.skip("decoder.schedule is not in this build yet")
    data = _json(proc)
    assert data["levels"] == [["conv1d"], ["fft_irfft"], ["conv1d_1"], ["fft_irfft_1"]]
    assert data["critical_path"] == ["conv1d", "fft_irfft", "conv1d_1", "fft_irfft_1"]
    groups = data["tile_groups"]
    assert [g["size"] for g in groups][:3] == [1, 2, 4]
    assert all(g["sites"] == ["fft_irfft", "fft_irfft_1"] and g["channels"] == 64 for g in groups)
    dot = runs["schedule_dot"]  # the 1-layer model from a file
    assert dot.returncode == 0, dot.stderr[-2000:]
    assert dot.stdout.startswith("digraph") and '"conv1d" -> "fft_irfft"' in dot.stdout


# -- kernels ------------------------------------------------------------------------------------

@uses("kernels_model", "kernels_bank")
def test_kernels_check_and_dump(runs):
    proc = runs["kernels_model"]
    data = _json(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ks = data["kernels"]
    update = [k for k in ks if k["kernel"] == "update"]
    assert len(update) == 1 and update[0]["constexprs"] == {"BLOCK_C": 32} and update[0]["sites"] == ["fft_irfft", "fft_irfft_1"]
    sizes = [k["constexprs"]["U"] for k in ks if k["kernel"] == "direct_tile"]
    assert sizes == [U for U in (1, 2, 4, 8, 16, 32, 64) if U <= data["crossover"]]
    for k in ks:  # each specialisation against its torch reference (TRITON_INTERPRET=1 here)
        assert k["passed"] and k["rel_err"] is not None and k["rel_err"] <= k["tol"] <= 1e-6, k
    launched = {(k["kernel"], tuple(sorted(k["constexprs"].items()))) for k in data["launched"]}
    assert launched == {(k["kernel"], tuple(sorted(k["constexprs"].items()))) for k in ks}
    files = sorted(Path(p).name for p in data["dumped"])
    assert len(files) == len(ks) and "update_BLOCK_C32_float32_io-float32.py" in files
    src = (WORKDIR / "kernels" / "direct_tile_U4_BLOCK_C64_float32.py").read_text()
    compile(src, "dumped", "exec")
    assert "@triton.jit" in src and "def _direct_tile_kernel(" in src and '"U": 4' in src

    bank = runs["kernels_bank"]
    assert bank.returncode == 0, bank.stderr[-2000:]
    assert "update       BLOCK_C=64" in bank.stdout and "U=4, BLOCK_C=64" in bank.stdout and "U=8" not in bank.stdout
    assert "FFT tiles U in [8, 16, 32]" in bank.stdout


# -- verify -------------------------------------------------------------------------------------

@uses("verify", "verify_fail")
def test_verify_teacher_forced(runs):
    proc = runs["verify"]
    data = _json(proc)
    assert proc.returncode == 0 and data["passed"] is True and data["length"] == 64
    assert [r["prompt_len"] for r in data["runs"]] == [1, 20, 63]
    assert all(r["max_rel_err"] < 1e-5 and r["steps"] == 64 - r["prompt_len"] for r in data["runs"])
    assert 0 < data["max_rel_err"] < 1e-5
    fail = runs["verify_fail"]  # tol 0: no float32 decode is bit-exact with the float64 model
    assert fail.returncode == 1, fail.stderr[-2000:]
    assert "FAIL: max relative error" in fail.stdout and "     30      2" in fail.stdout


# -- bench --------------------------------------------------------------------------------------

@uses("bench")
def test_bench_greedy(runs):
    proc = runs["bench"]
    data = _json(proc)
    assert proc.returncode == 0 and data["mode"] == "greedy" and data["steps"] == 40 - 8 - 1
    assert data["tokens_match"] is True  # the decoder generates what the eager model generates
    assert data["lcsm"]["tokens_per_s"] > 0 and data["eager_recompute"]["tokens_per_s"] > 0
    assert (WORKDIR / "bench.png").stat().st_size > 1000 and data["compiled_step"] is False


@uses("bench_compiled")
def test_bench_compiled_step(runs):
    data = _json(runs["bench_compiled"])
    assert data["compiled_step"] is True and data["compile_s"] > 0 and data["steps"] == 24 - 4 - 1
    assert data["tokens_match"] is True


@pytest.mark.parametrize("argv,usage", [(["bench", "mixer", "--help"], "usage: lcsm-compile bench mixer"),
                                        (["bench", "generate", "--help"], "usage: lcsm-compile bench generate")])
def test_bench_mixer_and_generate_are_wired(argv, usage, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0 and capsys.readouterr().out.startswith(usage)


# -- tune, demo ---------------------------------------------------------------------------------

@uses("tune")
def test_tune_measures_chooses_and_caches(runs):
    data = _json(runs["tune"])
    assert [r[0] for r in data["rows"]] == [1, 2, 4, 8, 16]
    assert all(direct > 0 and fft > 0 for _, direct, fft in data["rows"])
    assert data["crossover"] == tuning.choose_crossover(data["rows"])
    cache = json.loads((WORKDIR / "cache" / "tuning.json").read_text())
    (entry,) = cache.values()
    assert entry["crossover"] == data["crossover"] and entry["channels"] == 64


@uses("demo")
def test_demo_is_exact_and_matches_the_naive_loop(runs):
    data = _json(runs["demo"])
    assert data["exactness"]["passed"] is True and data["long_convs"] == 1
    assert [r["prompt_len"] for r in data["exactness"]["runs"]] == [1, 37]
    assert all(0 < r["max_rel_err"] < 1e-5 for r in data["exactness"]["runs"])
    assert data["tokens_identical"] == 40 and data["lcsm_s"] > 0 and data["state_bytes"] > 0


# -- errors -------------------------------------------------------------------------------------

@uses("bad_spec")
def test_errors_are_one_line_exit_2(runs):
    assert "expected module:factory or path.py:factory" in _one_error_line(runs["bad_spec"])


@pytest.mark.parametrize("argv,expect", [
    (["detect", "{dir}/factories.py:wrong"], "returned an int: expected an nn.Module or a (model, example_inputs) pair"),
    (["detect", "{dir}/factories.py:boom"], "raised ValueError: bad config"),
    (["detect", "{dir}/factories.py:bare"], "returned a bare model: describe its example inputs with --input-shape"),
    (["detect", "{dir}/missing.py:f"], "no such file"),
    (["detect", "no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
    (["detect", "examples.models.hyena:no_such_factory"], "no factory 'no_such_factory' (callables defined there: build_order2"),
    (["passes", "{dir}/factories.py:bare", "--input-shape", "1,8", "--stop-after", "nope"], "unknown pass 'nope'"),
    (["detect", "{dir}/factories.py:bare", "--input-shape", "8"], "--input-shape: expected positive sizes"),
])
def test_error_messages_in_process(argv, expect, tmp_path, capsys):
    (tmp_path / "factories.py").write_text(FACTORIES)
    rc = cli.main([a.replace("{dir}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expect in err[0], err


def test_lcsm_logs_parsing():
    levels, unknown = logs.parse("detect, passes+debug, bogus")
    assert levels == {"detect": 20, "passes": 10} and unknown == ["bogus"]
    assert logs.parse("all")[0] == {a: 20 for a in logs.AREAS}
    assert logs.parse("all+debug")[0] == {a: 10 for a in logs.AREAS}
    assert logs.parse("schedule,+debug")[0] == {"schedule": 10}
    assert logs.parse("")[0] == {}


def test_path_form_imports_a_package_file_under_its_dotted_name(tmp_path, monkeypatch):
    """examples/models/hyena.py imports `examples.models.common`: loading it by path from another
    directory works because the folder above its outermost package goes on sys.path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    loaded = loading.load(f"{ROOT}/examples/models/hyena.py:build_order2")
    module = sys.modules["examples.models.hyena"]
    assert Path(module.__file__) == ROOT / "examples" / "models" / "hyena.py" and loaded.length > 1
    clash = tmp_path / "examples" / "models"  # a different file under an already-imported dotted name
    clash.mkdir(parents=True)
    for init in (tmp_path / "examples" / "__init__.py", clash / "__init__.py"):
        init.write_text("")
    (clash / "hyena.py").write_text(FACTORIES)
    with pytest.raises(loading.LoadError, match="imports as 'examples.models.hyena', but that name is already"):
        loading.load(f"{clash}/hyena.py:bare")


def test_bare_embedding_model_gets_token_ids_without_vocab(tmp_path):
    (tmp_path / "factories.py").write_text(FACTORIES)
    loaded = loading.load(f"{tmp_path}/factories.py:bare", input_shape="1,8")
    assert loaded.tokens and loaded.vocab == 32 and loaded.inputs[0].dtype == torch.int64
    assert 0 <= int(loaded.inputs[0].min()) and int(loaded.inputs[0].max()) < 32
    floats = loading.load(f"{tmp_path}/factories.py:bare", input_shape="1,8,4", dtype="float32")
    assert not floats.tokens and floats.inputs[0].shape == (1, 8, 4)
