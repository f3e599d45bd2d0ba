"""The hybrid crossover: chosen from measurements, cached per device, safe default without a cache."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from helpers import reference_crossover
from lcsm_compile import OnlineConv, tuning
from lcsm_compile.tools import tune
from lcsm_compile.errors import DeviceError
from lcsm_compile.costs import Costs


def test_choose_crossover_stops_at_first_size_where_fft_wins():
    rows = [(1, 1.0, 5.0), (2, 2.0, 5.0), (4, 6.0, 5.0), (8, 1.0, 9.0)]
    assert tune.choose_crossover(rows) == 2  # 8 is direct-faster again, but 4 broke the run
    assert tune.choose_crossover([(1, 9.0, 1.0)]) == 1  # the red cell's neighbour is always direct
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # random timings: the same choice as the reference statement of the rule
        rows = [(2**k, *torch.rand(2, generator=g).tolist()) for k in range(6)]
        assert tune.choose_crossover(rows) == reference_crossover(rows), rows


def test_devices_that_cannot_run_here_are_device_errors():
    bad = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(DeviceError, match="expected"):
        tune.tune(bad, channels=4, max_size=2, save=False)
    with pytest.raises(DeviceError, match=r"expected 'cpu' or 'cuda\[:N\]'"):
        tune.measure("tpu", channels=4, max_size=2)


def test_default_without_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE_DIR", str(tmp_path))
    assert tuning.crossover_for("cpu") == tuning.DEFAULTS["cpu"]
    assert OnlineConv(torch.randn(2, 64)).crossover == tuning.DEFAULTS["cpu"]


def test_tune_measures_caches_and_engine_uses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE_DIR", str(tmp_path))
    crossover, rows, costs = tune.tune("cpu", channels=16, max_size=8)
    assert [U for U, _, _ in rows] == [1, 2, 4, 8] and crossover == reference_crossover(rows)
    cached = json.loads((tmp_path / "tuning.json").read_text())
    assert cached[tuning.device_key("cpu")]["crossover"] == crossover
    assert tuning.crossover_for("cpu") == crossover
    assert tuning.costs_for("cpu") == costs and costs != Costs()  # measured, not the defaults
    fields = dataclasses.asdict(costs)  # a noisy timing may find no cost per channel, per mode or of the engine, never a negative one
    assert all(v > 0 for k, v in fields.items() if k not in ("recurrent_channel_s", "mode_s", "advance_s"))
    assert fields["recurrent_channel_s"] >= 0 and fields["mode_s"] >= 0 and fields["advance_s"] >= 0
    # a planted value proves the engine reads the cache rather than the default
    cached[tuning.device_key("cpu")]["crossover"] = 4
    (tmp_path / "tuning.json").write_text(json.dumps(cached))
    conv = OnlineConv(torch.randn(2, 64))
    assert conv.crossover == 4 and conv.block == 8


def test_cli_tune_json(tmp_path):
    env = {"LCSM_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "lcsm_compile", "tune", "--channels", "8", "--max-size", "4", "--json"],
        capture_output=True, text=True, env=env, check=True,
    )
    result = json.loads(out.stdout)
    assert [U for U, _, _ in result["rows"]] == [1, 2, 4] and result["crossover"] == reference_crossover(result["rows"])
    (entry,) = json.loads((tmp_path / "tuning.json").read_text()).values()
    assert entry["rows"] == result["rows"] and entry["crossover"] == result["crossover"]
