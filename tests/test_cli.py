"""`lcsm-compile` subcommands on zoo models, run as `python -m lcsm_compile` subprocesses (JSON parsed
and checked on its structure: candidate names come from `detect`, never from a pasted run) or in
process where a stub or a monkeypatch is needed. The subprocesses of the selected tests start
together on first use (a few at a time, one torch thread each) so the file stays quick on a small
machine. Everything is written under a temporary folder.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import reference_crossover
from lcsm_compile import logs, tuning
from lcsm_compile.tools import tune
from lcsm_compile.tools import cli, loading
from lcsm_compile.pipeline import ANALYSIS_PASSES, PASS_NAMES
from lcsm_compile.costs import Costs

ROOT = Path(__file__).resolve().parents[1]
ORDER2 = "examples.models.hyena:build_order2"
ATTENTION = "examples.models.negatives:build_attention"
WRAP = "examples.models.negatives:build_wrap_around"

FACTORIES = '''
import torch
from examples.models.continuous import HyenaRegressor
from lcsm_compile.models.hyena import demo_lm

print("factories: imported (a configuration banner)")


def bare(n_layer=2):
    return demo_lm(n_layer=n_layer, d_model=16, vocab=32, max_len=64)


def regressor():  # float inputs [B, L, 4]
    return HyenaRegressor(d_input=4, d_model=16, d_output=2, max_len=48).eval()


class Chatty(torch.nn.Module):
    """Prints while it is built and at every forward, as some public models do."""

    def __init__(self):
        super().__init__()
        print("chatty: building")
        self.inner, self.max_len = demo_lm(n_layer=1, d_model=16, vocab=32, max_len=32), 32

    def forward(self, ids):
        print("chatty: forward")
        return self.inner(ids)


def chatty():
    return Chatty().eval()


def wrong():
    return 42


def boom():
    raise ValueError("bad config")
'''

# {dir} is the run's temporary folder (it holds factories.py, the dumps, the plot and the cache)
BARE = "{dir}/factories.py:bare"  # a 1-layer Hyena LM from a file, inputs described by options
BARE_OPTS = ["--input-shape", "1,32", "--vocab", "32", "--arg", "n_layer=1"]

# name -> (argv after `lcsm-compile`, extra env)
COMMANDS = {
    "detect_order2": (["detect", ORDER2, "--json"], {"LCSM_LOGS": "detect"}),
    "detect_order2_dynamo": (["detect", ORDER2, "--capture", "dynamo", "--json"], {}),
    "detect_attention": (["detect", ATTENTION, "--json"], {}),
    "detect_wrap": (["detect", WRAP, "--json"], {}),
    "detect_bare_file": (["detect", BARE, *BARE_OPTS, "--json"], {}),
    "passes_json": (["passes", ORDER2, "--json", "--timing", "--diff", "--print-after", "layer_schedule",
                     "--print-after", "time_axis", "--print-before", "attention"], {"LCSM_LOGS": "passes"}),
    "passes_stop": (["passes", BARE, *BARE_OPTS, "--stop-after", "detect", "--print-after-all", "--timing"], {}),
    "schedule_json": (["schedule", ORDER2, "--format", "json"], {}),
    "schedule_dot": (["schedule", BARE, *BARE_OPTS, "--format", "dot"], {}),
    "kernels_model": (["kernels", ORDER2, "--check", "--dump", "{dir}/kernels", "--json"], {}),
    "kernels_bank": (["kernels", "--channels", "37", "--max-len", "64", "--crossover", "4", "--json"], {}),
    "verify": (["verify", ORDER2, "--json", "--length", "48", "--prompt-lens", "1,20,47"], {}),
    "verify_fail": (["verify", BARE, *BARE_OPTS, "--tol", "0", "--prompt-lens", "30", "--no-progress"], {}),
    "verify_floats": (["verify", "{dir}/factories.py:regressor", "--input-shape", "2,24,4", "--dtype", "float32",
                       "--json"], {}),
    "verify_chatty": (["verify", "{dir}/factories.py:chatty", "--input-shape", "1,16", "--vocab", "32",
                       "--prompt-lens", "1,15", "--json"], {}),
    "bench": (["bench", ORDER2, "--length", "40", "--prompt", "8", "--json", "--plot", "{dir}/bench.png"], {}),
    "bench_compiled": (["bench", BARE, *BARE_OPTS, "--length", "24", "--prompt", "4", "--compile", "--json"], {}),
    "tune": (["tune", "--channels", "64", "--max-size", "16", "--json"], {"LCSM_CACHE_DIR": "{dir}/cache"}),
    "demo": (["demo", "--layers", "1", "--d-model", "16", "--vocab", "32", "--prompt", "8", "--tokens", "40",
              "--verify-len", "48", "--json"], {}),
    "bad_spec": (["detect", "no_colon_here"], {}),
}


def _run(argv, env, folder):
    sub = lambda s: s.replace("{dir}", str(folder))  # noqa: E731
    full = {**os.environ, "OMP_NUM_THREADS": "1", **{k: sub(v) for k, v in env.items()}}
    if "LCSM_LOGS" not in env:
        full.pop("LCSM_LOGS", None)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [full.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "lcsm_compile", *map(sub, argv)], cwd=folder, env=full,
                          capture_output=True, text=True, timeout=600)


class Runs:
    """Starts the commands every selected test declared (@uses) on first use."""

    def __init__(self, names, folder):
        self.dir = folder
        (folder / "factories.py").write_text(FACTORIES)
        self.pool = ThreadPoolExecutor(max_workers=3)
        self.futures = {n: self.pool.submit(_run, *COMMANDS[n], folder) for n in names}

    def __getitem__(self, name):
        if name not in self.futures:
            self.futures[name] = self.pool.submit(_run, *COMMANDS[name], self.dir)
        return self.futures[name].result()


def uses(*names):
    """Declare the commands a test reads: the fixture starts those of every selected test at once."""
    def mark(fn):
        fn.cli_runs = names
        return fn
    return mark


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    names = []
    for item in request.session.items:
        names += [n for n in getattr(getattr(item, "function", None), "cli_runs", ()) if n not in names]
    r = Runs(names, tmp_path_factory.mktemp("cli"))
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


def _layer(c):
    """blocks.N of a candidate's module path."""
    return ".".join(c["module_path"].split(".")[:2])


def _sites(detect):
    """(short, long) candidate names per layer of a Hyena LM, in layer order, from `detect --json`."""
    by_layer = {}
    for c in detect["candidates"]:
        by_layer.setdefault(_layer(c), {})[c["kind"]] = c["name"]
    return [(by_layer[k]["short"], by_layer[k]["long"]) for k in sorted(by_layer)]


# -- detect -------------------------------------------------------------------------------------

@uses("detect_order2", "detect_order2_dynamo")
def test_detect_json_accepts_hyena_at_both_capture_levels(runs):
    for name, level in (("detect_order2", "export"), ("detect_order2_dynamo", "dynamo")):
        proc = runs[name]
        data = _json(proc)
        assert proc.returncode == 0 and data["decodable"] is True and data["model"] == ORDER2
        assert data["capture"]["level"] == level
        # two layers, each one short and one long convolution, all accepted
        assert sorted((_layer(c), c["kind"], c["verdict"]) for c in data["candidates"]) == [
            ("blocks.0", "long", "ACCEPTED"), ("blocks.0", "short", "ACCEPTED"),
            ("blocks.1", "long", "ACCEPTED"), ("blocks.1", "short", "ACCEPTED")]
        assert {c["channels"] for c in data["candidates"] if c["kind"] == "long"} == {32}
        assert [p["name"] for p in data["passes"]] == list(ANALYSIS_PASSES)


@uses("detect_order2")
def test_lcsm_logs_detect_writes_log_lines(runs):
    proc = runs["detect_order2"]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[lcsm detect]")]
    for c in _json(proc)["candidates"]:  # one line per candidate, with its verdict
        assert any(c["name"] in ln and "ACCEPTED" in ln for ln in lines), (c["name"], proc.stderr[-2000:])
    assert any("decodable=True" in ln for ln in lines)
    assert "[lcsm passes]" not in proc.stderr  # only the areas asked for


@uses("detect_attention")
def test_detect_non_decodable_is_a_result_not_an_error(runs):
    proc = runs["detect_attention"]
    data = _json(proc)
    assert proc.returncode == 0 and data["decodable"] is False
    rejected = [c for c in data["candidates"] if c["verdict"] == "REJECTED"]
    assert [c["reason"] for c in rejected] == ["SLIDING_WINDOW"]
    assert "attention" in (rejected[0]["spelling"] + rejected[0]["explanation"]).lower()


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


# -- --json: only JSON on stdout ----------------------------------------------------------------

@uses("verify_chatty")
def test_json_stdout_holds_only_json_while_the_model_prints(runs):
    """The factory file prints when imported, the model when built and at every forward (capture,
    the float64 reference): all of it goes to stderr, stdout parses as one JSON document."""
    proc = runs["verify_chatty"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["passed"] is True and [r["prompt_len"] for r in data["runs"]] == [1, 15]
    for banner in ("factories: imported", "chatty: building", "chatty: forward"):
        assert banner in proc.stderr and banner not in proc.stdout


def test_without_json_the_users_prints_stay_on_stdout(tmp_path, capsys):
    """The redirection is for --json only; a table run prints what the model prints where it did."""
    (tmp_path / "factories.py").write_text(FACTORIES)
    spec = f"{tmp_path}/factories.py:chatty"
    args = cli.build_parser().parse_args(["detect", spec, "--input-shape", "1,8", "--vocab", "32"])
    args.stdout = sys.stdout
    with cli._stdout_to_stderr(False):
        cli._load(args)
    assert "chatty: building" in capsys.readouterr().out
    with cli._stdout_to_stderr(True):
        cli._load(args)
    out, err = capsys.readouterr()
    assert "chatty: building" in err and out == ""


# -- explain (in process: the candidate's name comes from the detect run) ------------------------

def _explain(capsys, spec, name, *flags):
    assert cli.main(["explain", spec, name, *flags]) == 0
    return capsys.readouterr().out


def _resolve(file):
    path = Path(file)
    return path if path.is_absolute() else Path.cwd() / path


@uses("detect_order2")
def test_explain_accepted_candidate(runs, capsys):
    (_, long0), (_, long1) = _sites(_json(runs["detect_order2"]))
    data = json.loads(_explain(capsys, ORDER2, long0, "--json"))
    assert data["name"] == long0 and data["verdict"] == "ACCEPTED"
    assert [m["path"] for m in data["module_stack"]][-1] == "blocks.0.mixer.filter_fn"
    assert any(_resolve(s["file"]).parts[-2:] == ("models", "hyena.py") and "fftconv_ref" in s["code"]
               for s in data["source_lines"])
    roles = {n["name"]: n["role"] for n in data["subgraph"]}
    assert roles[long0] == "conv" and {"input", "output", "filter"} <= set(roles.values())
    assert long1 not in roles  # the other layer's convolution is not part of this one
    assert "hyena.py" in data["stack_trace"]


@uses("detect_wrap")
def test_explain_rejected_candidate_text_matches_its_json(runs, capsys):
    (cand,) = [c for c in _json(runs["detect_wrap"])["candidates"] if c["reason"] == "WRAP_AROUND"]
    data = json.loads(_explain(capsys, WRAP, cand["name"], "--json"))
    assert data["verdict"] == "REJECTED" and data["reason"] == "WRAP_AROUND" and data["offending"]
    # the source line of the offending irfft, found in the file itself rather than pasted from a run
    src = ROOT / "examples" / "models" / "negatives.py"
    lines = src.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("class FixedSizeFFTConv"))
    irfft = next(i + 1 for i in range(start, len(lines)) if "torch.fft.irfft" in lines[i])
    assert any(_resolve(s["file"]) == src and s["line"] == irfft and s["function"] == "forward"
               for s in data["source_lines"])
    assert all("torch" + os.sep not in s["file"] for s in data["source_lines"])  # the user's frames, not torch's

    text = _explain(capsys, WRAP, cand["name"])  # the text rendering shows the same pieces
    assert text.splitlines()[0] == f"{cand['name']}: {data['spelling']} ({data['kind']}) REJECTED WRAP_AROUND"
    for s in data["source_lines"]:
        assert f"{s['file']}:{s['line']} in {s['function']}" in text
    marks = {"offending": "!", "input": ">", "output": "<", "filter": "f"}
    for n in data["subgraph"]:
        if n["role"] in marks and len(n["name"]) <= 24:
            assert f"{marks[n['role']]} %{n['name']}" in text, n


# -- passes -------------------------------------------------------------------------------------

@uses("passes_json", "passes_stop")
def test_passes_json_timing_diff_print_before_and_stop_after(runs):
    proc = runs["passes_json"]
    data = _json(proc)
    names = [p["name"] for p in data["passes"]]
    assert names == list(PASS_NAMES)
    by = {p["name"]: p for p in data["passes"]}
    assert data["total_seconds"] == pytest.approx(sum(p["seconds"] for p in data["passes"]), abs=1e-2)
    assert by["attention"]["before"] == by["time_axis"]["dump"]  # --print-before: the previous pass's output
    assert "before" not in by["time_axis"] and "dump" not in by["attention"]  # only what was asked for
    assert by["decode_rewrite"]["diff"].startswith("--- after modal") and "lcsm.conv_step" in by["decode_rewrite"]["diff"]
    assert "critical path" in by["layer_schedule"]["dump"]
    assert "[lcsm passes] pass capture" in proc.stderr

    stop = runs["passes_stop"]  # the 1-layer model from a file
    assert stop.returncode == 0, stop.stderr[-2000:]
    out = stop.stdout
    assert "=== after detect" in out and "=== after capture" in out
    assert "properties" not in out.split("=== after detect")[1] and "decode_rewrite" not in out
    assert "seconds" in out and "total" in out


# -- schedule -----------------------------------------------------------------------------------

@uses("schedule_json", "schedule_dot", "detect_order2", "detect_bare_file")
def test_schedule_json_and_dot(runs):
    data = _json(runs["schedule_json"])
    sites = _sites(_json(runs["detect_order2"]))
    chain = [name for pair in sites for name in pair]  # short0 -> long0 -> short1 -> long1
    assert data["levels"] == [[n] for n in chain] and data["critical_path"] == chain
    groups = data["tile_groups"]
    assert [g["size"] for g in groups] == [2**k for k in range(9)]  # every tile size below max_len 320
    longs = [long for _, long in sites]
    assert all(g["sites"] == longs and g["channels"] == 64 and g["every"] == 2 * g["size"] for g in groups)
    dot = runs["schedule_dot"]  # the 1-layer model from a file
    assert dot.returncode == 0, dot.stderr[-2000:]
    ((short, long),) = _sites(_json(runs["detect_bare_file"]))
    assert dot.stdout.startswith("digraph") and f'"{short}" -> "{long}"' in dot.stdout


# -- kernels ------------------------------------------------------------------------------------

@uses("kernels_model", "kernels_bank", "detect_order2")
def test_kernels_check_and_dump(runs):
    proc = runs["kernels_model"]
    data = _json(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ks = data["kernels"]
    update = [k for k in ks if k["kernel"] == "update"]
    longs = [long for _, long in _sites(_json(runs["detect_order2"]))]
    assert len(update) == 1 and update[0]["constexprs"] == {"BLOCK_C": 32} and update[0]["sites"] == longs
    sizes = [k["constexprs"]["U"] for k in ks if k["kernel"] == "direct_tile"]
    assert sizes == [U for U in (1, 2, 4, 8, 16, 32, 64) if U <= data["crossover"]]
    for k in ks:  # each specialisation against its torch reference (TRITON_INTERPRET=1 here)
        assert k["passed"] and k["rel_err"] is not None and k["rel_err"] <= k["tol"] <= 1e-6, k
    launched = {(k["kernel"], tuple(sorted(k["constexprs"].items()))) for k in data["launched"]}
    assert launched == {(k["kernel"], tuple(sorted(k["constexprs"].items()))) for k in ks}
    files = sorted(Path(p).name for p in data["dumped"])
    assert len(files) == len(ks) and "update_BLOCK_C32_float32_io-float32.py" in files
    src = (runs.dir / "kernels" / "direct_tile_U4_BLOCK_C64_float32.py").read_text()
    compile(src, "dumped", "exec")
    assert "@triton.jit" in src and "def _direct_tile_kernel(" in src and '"U": 4' in src

    bank = _json(runs["kernels_bank"])  # 37 channels, max_len 64, crossover 4: tiles 1, 2, 4 direct
    assert [(k["kernel"], k["constexprs"]) for k in bank["kernels"]] == [
        ("update", {"BLOCK_C": 64}), ("direct_tile", {"U": 1, "BLOCK_C": 64}),
        ("direct_tile", {"U": 2, "BLOCK_C": 64}), ("direct_tile", {"U": 4, "BLOCK_C": 64})]
    assert bank["fft_tile_sizes"] == [8, 16, 32] and bank["channels"] == 37


def test_kernels_check_without_triton_names_the_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("checked after loading the model"))
    assert cli.main(["kernels", "m:f", "--check"]) == 2
    assert "lcsm-compile[gpu]" in capsys.readouterr().err


# -- verify -------------------------------------------------------------------------------------

@uses("verify", "verify_fail", "verify_floats")
def test_verify_teacher_forced(runs):
    proc = runs["verify"]
    data = _json(proc)
    assert proc.returncode == 0 and data["passed"] is True and data["length"] == 48  # --length
    assert [r["prompt_len"] for r in data["runs"]] == [1, 20, 47]
    assert all(r["max_rel_err"] < 1e-5 and r["steps"] == 48 - r["prompt_len"] for r in data["runs"])
    assert data["max_rel_err"] == max(r["max_rel_err"] for r in data["runs"])

    fail = runs["verify_fail"]  # tol 0: no float32 decode is bit-exact with the float64 model
    assert fail.returncode == 1, fail.stderr[-2000:]
    lines = fail.stdout.splitlines()
    row = next(ln.split() for ln in lines if ln.split()[:1] == ["30"])
    assert row[1] == "2" and float(row[2]) > 0  # prompt 30, 2 steps to the example length 32
    assert lines[-1].startswith("FAIL: max relative error")

    floats = _json(runs["verify_floats"])  # a bare model on float inputs described by --input-shape/--dtype
    assert floats["passed"] is True and floats["length"] == 24 and floats["max_rel_err"] < 1e-5


# -- bench --------------------------------------------------------------------------------------

def _check_timings(data):
    """The figures of one bench run agree with each other (they are derived from the same times)."""
    n = data["steps"]
    for k in ("eager_recompute", "lcsm"):
        d = data[k]
        assert d["total_s"] == pytest.approx(d["prefill_s"] + d["steps_s"], abs=2e-5)
        assert d["ms_per_token"] == pytest.approx(1e3 * d["steps_s"] / n, rel=1e-3, abs=1e-3)
        assert d["tokens_per_s"] == pytest.approx(n / d["steps_s"], rel=5e-3)
        assert d["last_token_ms"] <= 1e3 * d["steps_s"] + 1e-3
    speedup = data["eager_recompute"]["steps_s"] / data["lcsm"]["steps_s"]
    assert data["speedup_steps"] == pytest.approx(speedup, rel=1e-2)


@uses("bench")
def test_bench_greedy(runs):
    proc = runs["bench"]
    data = _json(proc)
    assert proc.returncode == 0 and data["mode"] == "greedy" and data["steps"] == 40 - 8 - 1
    assert data["tokens_match"] is True  # the decoder generates what the eager model generates
    _check_timings(data)
    png = runs.dir / "bench.png"
    assert data["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["compiled_step"] is False and data["compile_s"] is None


@uses("bench_compiled")
def test_bench_compiled_step(runs):
    data = _json(runs["bench_compiled"])
    assert data["compiled_step"] is True and isinstance(data["compile_s"], float) and data["steps"] == 24 - 4 - 1
    assert data["tokens_match"] is True
    _check_timings(data)


def test_bench_plot_without_matplotlib_fails_before_the_run(monkeypatch, capsys):
    monkeypatch.setattr(cli, "have_matplotlib", lambda: False)
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded before the check"))
    assert cli.main(["bench", "m:f", "--plot", "out.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plot" in err[0] and "lcsm-compile[bench]" in err[0]


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_bench_results_survive_a_failing_plot(as_json, monkeypatch, capsys, tmp_path):
    """The plot is written after the run: if that fails, the finished results are still printed."""
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cli, "_plot", broken)
    (tmp_path / "factories.py").write_text(FACTORIES)
    argv = ["bench", f"{tmp_path}/factories.py:bare", *BARE_OPTS, "--length", "12", "--prompt", "4", "--no-progress",
            "--plot", str(tmp_path / "p.png")] + (["--json"] if as_json else [])
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert "OSError: disk full" in err and "the results above are complete" in err
    if as_json:
        data = json.loads(out)
        assert data["plot"] is None and data["steps"] == 12 - 4 - 1 and data["tokens_match"] is True
    else:
        assert "speedup (steps):" in out and "plot written" not in out


@pytest.mark.parametrize("argv,usage", [(["bench", "mixer", "--help"], "usage: lcsm-compile bench mixer"),
                                        (["bench", "generate", "--help"], "usage: lcsm-compile bench generate"),
                                        (["bench", "serve", "--help"], "usage: lcsm-compile bench serve")])
def test_bench_mixer_and_generate_are_wired(argv, usage, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0 and capsys.readouterr().out.startswith(usage)


# -- tune, demo ---------------------------------------------------------------------------------

@uses("tune")
def test_tune_measures_chooses_and_caches(runs):
    data = _json(runs["tune"])
    assert [r[0] for r in data["rows"]] == [1, 2, 4, 8, 16]
    assert data["crossover"] == reference_crossover(data["rows"])
    cache = json.loads((runs.dir / "cache" / "tuning.json").read_text())
    (entry,) = cache.values()
    assert entry["crossover"] == data["crossover"] and entry["channels"] == 64 and entry["rows"] == data["rows"]


def test_tune_no_save_prints_without_caching(monkeypatch, capsys, tmp_path):
    rows = [(1, 1e-6, 5e-6), (2, 2e-6, 5e-6), (4, 9e-6, 5e-6), (8, 1e-6, 9e-6)]  # direct wins to 2, then 4 breaks it
    monkeypatch.setenv("LCSM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tune, "measure", lambda device, channels, max_size: rows)
    costs = Costs(fft_flops_s=2e10, mac_flops_s=1e10, direct_flops_s=5e9, call_s=4e-6, red_cell_s=9e-6, advance_s=2.5e-5, recurrent_s=3e-5,
                  recurrent_channel_s=2e-8, mode_s=1.5e-9)
    monkeypatch.setattr(tune, "measure_costs", lambda device, channels, crossover: costs)
    assert cli.main(["tune", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-3:] == ["crossover = 2 (largest tile computed directly; not saved)",
                                     "costs: transforms 20.0 GFlop/s, multiply-adds 10.0 GFlop/s, direct lags 5.0 "
                                     "GFlop/s, 4.0 us per call",
                                     "per step: a red cell 9.0 us, the tile engine 25.0 us besides its tiles, a recurrent step 30.0 us "
                                     "+ 20.00 ns per channel + 1.50 ns per mode and channel"]
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["tune"]) == 0  # and without --no-save it is written
    assert json.loads((tmp_path / "tuning.json").read_text())[tuning.device_key("cpu")]["crossover"] == 2
    assert tuning.costs_for("cpu") == costs


def test_tune_on_a_device_that_is_not_here_is_a_device_error(capsys):
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    for dev, expect in ((device, "expected a"), ("gpu", "expected 'cpu' or 'cuda[:N]'")):
        assert cli.main(["tune", "--device", dev]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lcsm-compile: error: device") and expect in err[0], err


@uses("demo")
def test_demo_is_exact_and_matches_the_naive_loop(runs):
    data = _json(runs["demo"])
    assert data["exactness"]["passed"] is True and data["long_convs"] == 1
    assert [r["prompt_len"] for r in data["exactness"]["runs"]] == [1, 37]
    assert all(r["max_rel_err"] < 1e-5 for r in data["exactness"]["runs"])
    assert data["tokens_identical"] == 40 and isinstance(data["compile_s"], float)
    assert data["speedup"] == pytest.approx(data["naive_s"] / data["lcsm_s"], rel=1e-2)


def test_demo_help_describes_every_option(capsys):
    import argparse

    from lcsm_compile.tools import demo

    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    for action in parser._actions:
        assert action.help, action.option_strings  # argparse prints nothing for an option without help
        assert action.option_strings[-1] in out


# -- errors and exit codes ----------------------------------------------------------------------

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


@pytest.mark.parametrize("raised,rc,expect", [
    (RuntimeError("inside the pipeline"), 1, "lcsm-compile: error: RuntimeError: inside the pipeline (rerun with --traceback"),
    (KeyboardInterrupt(), 130, "lcsm-compile: interrupted"),
])
def test_unexpected_error_and_interrupt_exit_codes(raised, rc, expect, monkeypatch, capsys):
    def run(args):
        raise raised

    monkeypatch.setattr(cli, "_tune", run)
    assert cli.main(["tune"]) == rc
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expect), err
    if rc == 1:  # --traceback shows the real exception instead
        with pytest.raises(RuntimeError, match="inside the pipeline"):
            cli.main(["--traceback", "tune"])


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_a_closed_stdout_pipe_ends_quietly(json_flag):
    """`lcsm-compile ... | head`: the reader is gone before the output is written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lcsm_compile", "tune", "--channels", "4", "--max-size", "2",
                             "--no-save", *json_flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == ""


# -- loading ------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "int32"])
def test_dtype_and_seed_options_shape_the_example_inputs(dtype, tmp_path):
    """--dtype sets the example's dtype, --seed its values: the same seed gives the same inputs,
    another seed others, matching torch's generator seeded by hand."""
    (tmp_path / "factories.py").write_text(FACTORIES)
    opts = ["--input-shape", "2,16"] + (["--vocab", "32"] if dtype == "int32" else [])

    def example(seed):
        args = cli.build_parser().parse_args(["detect", f"{tmp_path}/factories.py:bare", *opts, "--dtype", dtype,
                                              "--seed", str(seed)])
        return cli._load(args).inputs[0]

    a, b, c = example(3), example(3), example(4)
    assert a.dtype == getattr(torch, dtype) and a.shape == (2, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(3)
    want = torch.randint(0, 32, (2, 16), generator=g, dtype=torch.int32) if dtype == "int32" else \
        torch.randn(2, 16, generator=g).to(getattr(torch, dtype))
    assert torch.equal(a, want)
