"""The hybrid crossover: chosen from measurements, cached per device, safe default without a cache."""

import json
import subprocess
import sys

import torch

from lcsm_compile import OnlineConv, tuning


def test_choose_crossover_stops_at_first_size_where_fft_wins():
    rows = [(1, 1.0, 5.0), (2, 2.0, 5.0), (4, 6.0, 5.0), (8, 1.0, 9.0)]
    assert tuning.choose_crossover(rows) == 2  # 8 is direct-faster again, but 4 broke the run
    assert tuning.choose_crossover([(1, 9.0, 1.0)]) == 1  # the red cell's neighbour is always direct


def test_default_without_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE_DIR", str(tmp_path))
    assert tuning.crossover_for("cpu") == tuning.DEFAULTS["cpu"]
    assert OnlineConv(torch.randn(2, 64)).crossover == tuning.DEFAULTS["cpu"]


def test_tune_measures_caches_and_engine_uses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE_DIR", str(tmp_path))
    crossover, rows = tuning.tune("cpu", channels=16, max_size=8)
    assert [U for U, _, _ in rows] == [1, 2, 4, 8]
    assert all(d > 0 and f > 0 for _, d, f in rows)
    cached = json.loads((tmp_path / "tuning.json").read_text())
    assert cached[tuning.device_key("cpu")]["crossover"] == crossover
    assert tuning.crossover_for("cpu") == crossover
    # a planted value proves the engine reads the cache rather than the default
    cached[tuning.device_key("cpu")]["crossover"] = 4
    (tmp_path / "tuning.json").write_text(json.dumps(cached))
    conv = OnlineConv(torch.randn(2, 64))
    assert conv.crossover == 4 and conv.block == 8


def test_cli_tune_json(tmp_path):
    env = {"LCSM_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "lcsm_compile.cli", "tune", "--channels", "8", "--max-size", "4", "--json"],
        capture_output=True, text=True, env=env, check=True,
    )
    result = json.loads(out.stdout)
    assert result["crossover"] in (1, 2, 4) and len(result["rows"]) == 3
    assert (tmp_path / "tuning.json").exists()
