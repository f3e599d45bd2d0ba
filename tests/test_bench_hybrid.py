"""benchmarks/hybrid.py --quick: its outputs (no timing assertions: these machines are noisy)."""

import json

import pytest

from test_bench_mixer import load_script


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert load_script("hybrid").main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    with open(out / "hybrid.json") as f:
        return out, json.load(f)


def test_quick_run_measures_every_method_side_by_side(quick_run):
    out, data = quick_run
    assert [r["L"] for r in data["results"]] == [128, 256]
    small, large = data["results"]
    for r in data["results"]:
        m = r["methods"]
        assert set(m) == {"flash", "lazy", "naive"}
        assert r["ratios"]["lazy/flash"] == pytest.approx(m["lazy"]["time_s"] / m["flash"]["time_s"])
        assert r["ratios"]["naive/flash"] == pytest.approx(m["naive"]["time_s"] / m["flash"]["time_s"])
        assert m["flash"]["rel_err"] < 1e-5 and m["flash"]["rel_err_vs_lazy"] < 1e-5
        # 2 attention sites x (k, v) x 4 heads x L x 8, float32, batch 1
        assert m["flash"]["kv_cache_bytes"] == 2 * 2 * 4 * r["L"] * 8 * 4
    assert small["methods"]["naive"]["estimated"] is False and small["methods"]["naive"]["tokens_vs_flash"]["equal"]
    assert large["methods"]["naive"]["estimated"] is True
    png = out / "hybrid.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
