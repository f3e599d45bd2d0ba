"""The generation benchmark's deterministic pieces and a --quick run's outputs.

No timing assertions (these machines are noisy): how far the estimator lands from a full run is the
benchmark's own output (its FLAG column), checked here only for consistency.
"""

import argparse
import json
import math

import pytest
import torch

from lcsm_compile.tools.bench import common, generate
from test_bench_mixer import load_script


class FakeClock:
    """A clock that advances only when a fake step runs: step t costs cost(t) seconds."""

    def __init__(self, cost):
        self.now, self.cost = 0.0, cost

    def __call__(self):
        return self.now

    def step(self, t):
        self.now += self.cost(t)


def test_segments_cover_every_step_once():
    assert generate.segments(16, [256, 128]) == [(16, 127), (127, 255)]
    assert generate.segments(127, [128]) == []  # no step position left


@pytest.mark.parametrize("method", ["lazy", "naive"])
def test_sampled_fit_recovers_the_total_over_every_length(method):
    basis = generate.BASIS[method]
    coef = {"lazy": [4e-4, 2e-8], "naive": [1e-3, 3e-7, 2e-8]}[method]
    cost = lambda t: float(common.basis_values(basis, [t])[0] @ coef)
    clock = FakeClock(cost)
    args = argparse.Namespace(positions=4, window_steps=16, window_s=0.5)
    P, lengths = 128, [1024, 4096, 8192]
    fit = generate.sample_cost(clock.step, generate.segments(P, lengths), basis, args, clock=clock)
    assert len(fit["samples"]) == 4 * len(lengths)
    assert fit["coef"] == pytest.approx(coef, rel=1e-4)
    for L in lengths:
        exact = sum(cost(t) for t in range(P, L - 1))
        assert generate.fitted_total(fit, P, L - 1) == pytest.approx(exact, rel=1e-6)


def test_token_agreement():
    a = torch.tensor([[1, 2, 3, 4, 5]])
    assert generate.token_agreement(a, a, 2) == {"equal": True, "first_mismatch": None}
    b = torch.tensor([[1, 2, 3, 9, 5, 7]])  # a longer reference: compared on a's length
    assert generate.token_agreement(a, b, 2) == {"equal": False, "first_mismatch": 3}


def test_parse_config_and_decoder_options():
    assert generate.parse_config("8x256") == (8, 256)
    with pytest.raises(argparse.ArgumentTypeError):
        generate.parse_config("8-256")
    args = generate.parse_args(["--configs", "4x128,8x256", "--lengths", "4096,8192"])
    assert args.configs == [(4, 128), (8, 256)] and args.lengths == [4096, 8192]
    assert generate.decoder_options(args) == {"compile": False}  # explicit: never "auto" inside a timing
    assert generate.decoder_options(generate.parse_args(["--compile"])) == {"compile": True}


def test_an_unknown_decoder_option_is_a_clear_error(monkeypatch):
    import lcsm_compile

    def decoder(report, example_inputs, *, max_len, conv):  # a build_decoder without compile=
        raise AssertionError("unreachable")

    monkeypatch.setattr(lcsm_compile, "build_decoder", decoder)
    with pytest.raises(SystemExit, match="compile"):
        generate.make_decoder(None, 64, torch.zeros(1, 4, dtype=torch.long), "flash", {"compile": True})


def _fake_record(config, L, estimated):
    m = {k: {"time_s": 1.0, "estimated": k in estimated} for k in generate.METHODS}
    m["flash"].update(build_s=0.01, rel_err=1e-7, wrong=False, us_per_token=100.0, memory_bytes=2**20)
    ratios = {"lazy/flash": 1.0, "naive/flash": 1.0, "flash/floor": 1.0, "step/eager": 1.0}
    return {"config": config, "L": L, "analyze_s": 1.0, "eager_forward_s": 1e-4, "methods": m, "ratios": ratios}


def test_results_table_marks_estimates():
    table = generate.results_table([_fake_record("4x128", 64, {"lazy", "naive"}), _fake_record("4x128", 128, set())])
    est_row, measured_row = table.splitlines()[2:4]
    assert est_row.count("~") == 4  # lazy and naive times, and their ratios to flash
    assert est_row.rstrip().endswith("naive,lazy")
    assert "~" not in measured_row and measured_row.rstrip().endswith("-")


def _target_record(config, L, naive_over_flash, estimated=True):
    m = {k: {"time_s": 1.0, "estimated": k != "flash" and estimated} for k in generate.METHODS}
    ratios = {"lazy/flash": 10.0, "naive/flash": naive_over_flash, "flash/floor": 1.0, "step/eager": 1.0}
    return {"config": config, "L": L, "methods": m, "ratios": ratios}


def test_the_projects_targets_judge_the_issue_13_thresholds():
    targets = load_script("generate").targets
    got = {t["target"]: t for t in targets([_target_record("8x256", 8192, 150.0)])}
    naive = got["generation of 8x256 to 8192 tokens >= 150x the naive loop"]
    assert naive["status"] == "PASS" and naive["value"] == 150.0 and naive["estimated"] is True
    assert got["flash vs lazy >= 8x at L=32768 for 8x256"]["status"] == "n/a"  # the other targets stay
    assert got["flash within 1.25x of the floor at L=16384 for 8x256"]["status"] == "n/a"
    assert got["flash step <= 1.25x one eager forward on one position for 8x256 (L=8192)"]["status"] == "PASS"
    missed = {t["target"]: t["status"] for t in targets([_target_record("8x256", 8192, 149.0)])}
    assert missed["generation of 8x256 to 8192 tokens >= 150x the naive loop"] == "MISS"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # one thread: on a loaded machine two-thread FFTs can stall; only outputs are checked here
    argv = ["--quick", "--threads", "1", "--no-progress", "--out", str(out)]
    assert generate.main(argv, targets=load_script("generate").targets) == 0
    with open(out / "generate.json") as f:
        return out, json.load(f)


def test_quick_run_covers_every_method_config_and_length(quick_run):
    _, data = quick_run
    assert {"benchmark", "machine", "config", "decoder_options", "results", "fits", "validation", "targets",
            "wall_s"} <= set(data)
    assert [(r["config"], r["L"]) for r in data["results"]] == [("2x32", 128), ("2x32", 256)]
    for r in data["results"]:
        assert set(r["methods"]) == set(generate.METHODS)
        assert set(r["ratios"]) == {"lazy/flash", "naive/flash", "flash/floor", "step/eager"}
        m = r["methods"]
        for k in generate.METHODS:  # per token: the same run's time over the L - P generated tokens
            assert m[k]["us_per_token"] == pytest.approx(1e6 * m[k]["time_s"] / (r["L"] - 16)), (r["L"], k)
        for ratio, (a, b) in {"lazy/flash": ("lazy", "flash"), "naive/flash": ("naive", "flash"),
                              "flash/floor": ("flash", "floor")}.items():
            assert r["ratios"][ratio] == pytest.approx(m[a]["time_s"] / m[b]["time_s"])
        # the state (inputs and accumulators) of the 64 long-conv channels at batch 1, float32: 64 * L * 4
        assert m["flash"]["memory_bytes"] >= 64 * r["L"] * 4
    small, large = data["results"]  # and the L-sized parts dominate: twice L, more than 1.5x the bytes
    assert large["methods"]["flash"]["memory_bytes"] > 1.5 * small["methods"]["flash"]["memory_bytes"]
    assert set(data["fits"]["2x32"]) == set(generate.BASELINES)
    # the project's targets (benchmarks/generate.py): only the step-vs-eager one has a 2x32 row to judge
    assert [t["status"] != "n/a" for t in data["targets"]] == [False, False, False, True]


def test_quick_run_flash_is_exact(quick_run):
    _, data = quick_run
    for r in data["results"]:
        fl = r["methods"]["flash"]
        assert fl["estimated"] is False
        assert fl["rel_err"] < 1e-5 and not fl["wrong"]
    for k in ("naive", "lazy"):  # the sampled baseline steps agree with flash's logits
        assert data["fits"]["2x32"][k]["window_rel_diff_vs_flash"] < 1e-5


def test_quick_run_flags_estimates(quick_run):
    _, data = quick_run
    small, large = data["results"]
    for k in generate.BASELINES:
        # --quick: every baseline runs in full at the smallest L and is estimated above it
        assert small["methods"][k]["estimated"] is False and small["methods"][k]["time_s"] == small["methods"][k]["measured_s"]
        assert large["methods"][k]["estimated"] is True and large["methods"][k]["measured_s"] is None
        assert large["methods"][k]["time_s"] == large["methods"][k]["estimate_s"]
    for k in ("naive", "lazy"):  # exact baselines run in full generate flash's tokens
        assert small["methods"][k]["tokens_vs_flash"]["equal"]


def test_quick_run_validates_the_estimator_against_full_runs(quick_run):
    """Every baseline run in full is estimated too, and the row says how far apart they are (the
    judgement of that distance is the benchmark's FLAG, not an assertion)."""
    _, data = quick_run
    rows = {(v["L"], v["method"]): v for v in data["validation"]}
    assert set(rows) == {(128, k) for k in generate.BASELINES}
    small = data["results"][0]["methods"]
    for (_, k), v in rows.items():
        assert v["measured_s"] == small[k]["measured_s"] and v["estimated_s"] == small[k]["estimate_s"]
        assert v["deviation"] == pytest.approx((v["estimated_s"] - v["measured_s"]) / v["measured_s"])
        assert v["flag"] == (abs(v["deviation"]) > common.DEVIATION_FLAG)


def test_quick_run_writes_png(quick_run):
    out, _ = quick_run
    png = out / "generate.png"
    assert png.exists() and png.stat().st_size > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
