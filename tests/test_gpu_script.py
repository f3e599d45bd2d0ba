"""benchmarks/gpu.py: --dry-run runs the script's whole code path (kernel and decoder checks, the mixer
and generation timings) on the CPU at tiny sizes, so CI catches a broken GPU script before a GPU
run does; without CUDA and without --dry-run it refuses in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lcsm_compile.kernels.registry import KERNELS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def run_script(args, folder, **env):
    full = {**os.environ, **env}
    full.pop("TRITON_INTERPRET", None)  # the script sets it itself for a dry run
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=folder, env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu")
    proc = run_script(["--dry-run", "--out", str(folder / "out")], folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((folder / "out" / "gpu.json").read_text())


def test_dry_run_checks_every_triton_kernel_and_the_decoder(dry_run):
    _, data = dry_run
    assert data["device"] == "cpu" and data["dry_run"] is True and data["passed"] is True
    kernels = data["checks"]["kernels"]
    assert {k["kernel"] for k in kernels} == {name for name, k in KERNELS.items() if k.triton is not None}
    assert {k["io_dtype"] for k in kernels if k["kernel"] == "update"} == {"float32", "bfloat16"}
    assert len({k["constexprs"]["U"] for k in kernels if k["kernel"] == "direct_tile"}) >= 2  # every direct size
    for k in kernels:
        assert k["passed"] and k["rel_err"] <= k["tol"], k
    decoders = {d["dtype"]: d for d in data["checks"]["decoders"]}
    assert set(decoders) == {"float32", "bfloat16"}
    assert decoders["float32"]["tol"] == 1e-5 and decoders["bfloat16"]["tol"] == 2e-2
    for d in decoders.values():
        assert d["passed"] and d["max_rel_err"] <= d["tol"]
        assert [r["prompt_len"] for r in d["runs"]] == [1, d["length"] // 2]
    graph = data["checks"]["graph"]  # the captured step: emulated on the CPU
    assert graph["mode"] == "emulate" and graph["passed"] and graph["max_rel_err"] <= graph["tol"]
    assert graph["step_s"] > 0 and graph["eager_step_s"] > 0


def test_dry_run_times_the_mixer_and_generation(dry_run):
    proc, data = dry_run
    assert [(r["C"], r["L"]) for r in data["mixer"]] == [(16, 64), (16, 128)]
    for r in data["mixer"]:
        m = r["methods"]
        assert all(m[k]["time_s"] > 0 for k in ("flash", "lazy", "offline"))
        assert m["lazy"]["estimated"] is True and m["flash"]["estimated"] is False
        assert m["flash"]["rel_err"] < 1e-5 and m["lazy"]["window_rel_err"] < 1e-5
    gen = data["generate"]["results"]
    assert [(r["config"], r["L"]) for r in gen] == [("1x16", 64), ("2x16", 64)]
    for r in gen:
        m = r["methods"]
        assert m["flash"]["rel_err"] < 1e-5 and not m["flash"]["wrong"]
        assert m["naive"]["estimated"] and m["lazy"]["estimated"] and m["naive"]["time_s"] > 0
        assert r["ratios"]["naive/flash"] == pytest.approx(m["naive"]["time_s"] / m["flash"]["time_s"])
    for fits in data["generate"]["fits"].values():  # the sampled baseline steps decode what flash does
        assert fits["naive"]["window_rel_diff_vs_flash"] < 1e-5 and fits["lazy"]["window_rel_diff_vs_flash"] < 1e-5
    # one table: a row per check and per timed configuration
    n = len(data["checks"]["kernels"]) + 2 + 1 + 2 + 2
    assert len(data["rows"]) == n and f"PASS: {n} of {n} rows ok" in proc.stdout
    assert sum(line.startswith(("  kernel", " decoder", "   graph", "   mixer", "generate"))
               for line in proc.stdout.splitlines()) == n


def test_without_cuda_it_refuses_in_one_line(tmp_path):
    proc = run_script(["--out", str(tmp_path / "out")], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu.py: error: DeviceError: ") and "CUDA" in err[0] and "--dry-run" in err[0]
    assert not (tmp_path / "out").exists()


def test_dry_run_of_the_multi_gpu_mode_decodes_sharded_on_gloo(tmp_path):
    """--tp: the sharded decode at world 1 and 2, one process per rank (gloo on the CPU in a dry run,
    NCCL with one GPU per rank on a machine that has them)."""
    proc = run_script(["--dry-run", "--tp", "2", "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_tp.json").read_text())
    assert data["passed"] and data["device"] == "cpu"
    one, two = data["results"]
    assert (one["world"], two["world"]) == (1, 2)
    assert two["rel_err"] <= data["tol"] and two["all_reduces"] > 0 and one["all_reduces"] == 0
    assert two["state"] <= one["state"] / 2 * 1.05  # each rank holds half the channels' state
    assert "PASS: logits within" in proc.stdout


def test_multi_gpu_mode_without_the_gpus_refuses_in_one_line(tmp_path):
    proc = run_script(["--tp", "2", "--out", str(tmp_path / "out")], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "needs 2 CUDA devices and found 0" in err[0]
