"""The mixer benchmark's deterministic pieces: the estimator, the table marks, and a --quick run's outputs.

No timing assertions: these machines are noisy. The estimator is tested with a fake clock.
"""

import json
import math

import pytest
import torch

from lcsm_compile.bench import common, mixer


class FakeClock:
    """A clock that advances only when a fake step runs: step t costs cost(t) seconds."""

    def __init__(self, cost):
        self.now, self.cost = 0.0, cost

    def __call__(self):
        return self.now

    def step(self, t):
        self.now += self.cost(t)


def test_integrate_cost_is_the_exact_sum():
    a, b, L = 3e-5, 2e-8, 1000
    assert common.integrate_cost([a, b], common.LINEAR, L) == pytest.approx(L * a + b * L * (L - 1) / 2, rel=1e-12)


@pytest.mark.parametrize("steps,window_s", [(40, 0.5), (40, 1e-9)])  # full windows, and windows cut short
def test_estimator_recovers_a_linear_cost(steps, window_s):
    a, b, L = 5e-5, 3e-9, 4096
    clock = FakeClock(lambda t: a + b * t)
    est = common.estimate_total(clock.step, L, basis=common.LINEAR, clock=clock, steps=steps, max_window_s=window_s)
    assert est["coef"] == pytest.approx([a, b], rel=1e-6)
    assert est["total_s"] == pytest.approx(L * a + b * L * (L - 1) / 2, rel=1e-9)
    assert len(est["samples"]) == 8


def test_a_fitted_cost_below_zero_counts_as_zero():
    """A fit tilted by noise (early steps timed slow) that crosses zero: the steps past the crossing
    add nothing, so the total keeps what the positive steps cost and never shrinks with L."""
    coef = [3e-3, -1e-5]  # cost(t) = 3e-3 - 1e-5 t: positive below t = 300, negative beyond
    positive = sum(3e-3 - 1e-5 * t for t in range(300))
    assert common.integrate_cost(coef, common.LINEAR, 300) == pytest.approx(positive, rel=1e-12)
    assert common.integrate_cost(coef, common.LINEAR, 1000) == pytest.approx(positive, rel=1e-12)


def test_estimator_recovers_an_nlogn_cost():
    a, b, L = 1e-4, 4e-9, 8192
    cost = lambda t: a + b * (t + 1) * math.log2(t + 2)
    clock = FakeClock(cost)
    # a window's mean cost is the cost at its mean t only up to curvature: tiny for t log t
    est = common.estimate_total(clock.step, L, basis=common.NLOGN, clock=clock)
    assert est["total_s"] == pytest.approx(sum(cost(t) for t in range(L)), rel=1e-3)


def test_windows_stay_inside_the_run():
    seen = []
    common.sample_windows(seen.append, 100, positions=8, steps=40, clock=lambda: 0.0)
    assert min(seen) >= 0 and max(seen) < 100


def test_fmt_num_marks_estimates():
    assert common.fmt_num(12.5, estimated=True).startswith("~")
    assert not common.fmt_num(12.5).startswith("~")
    assert common.fmt_num(None) == "-"


def _fake_record(C, L, estimated):
    m = {k: {"time_s": 1.0, "estimated": k in estimated} for k in mixer.METHODS}
    m["flash"].update(build_s=0.01, rel_err=1e-7)
    ratios = {"lazy/flash": 1.0, "eager/flash": 1.0, "naive/flash": 1.0, "flash/offline": 1.0}
    return {"C": C, "L": L, "methods": m, "ratios": ratios}


def test_results_table_marks_estimates():
    table = mixer.results_table([_fake_record(8, 64, {"lazy", "naive"}), _fake_record(8, 128, set())])
    est_row, measured_row = table.splitlines()[2:4]
    assert est_row.count("~") == 4  # lazy and naive times, and their ratios to flash
    assert est_row.rstrip().endswith("lazy,naive")
    assert "~" not in measured_row and measured_row.rstrip().endswith("-")


def test_baselines_are_exact(monkeypatch):
    """Every baseline layout computes the causal convolution (the benchmark never times a wrong answer)."""
    monkeypatch.setattr(mixer.Lazy, "BLOCK_BYTES", 1)  # blocks of 8 positions: several, and partial ones
    C, L = 4, 61
    h, XT = mixer.make_problem(C, L, torch.float64, seed=1)
    ref = mixer.reference(h, XT.T.contiguous())
    xs = list(XT.unbind(0))
    for cls in (mixer.Lazy, mixer.Eager, mixer.Naive):
        for variant in cls.VARIANTS:
            _, Y = mixer.run_steps(cls(h, variant).step, xs)
            assert mixer.rel_err(Y, ref) < 1e-12, (cls.__name__, variant)
    assert mixer.rel_err(mixer.offline_fft(h, XT.T.contiguous()), ref) < 1e-12


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # one thread: on a loaded machine two-thread FFTs can stall for seconds; only outputs are checked here
    assert mixer.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    with open(out / "mixer.json") as f:
        return out, json.load(f)


def test_quick_run_writes_json(quick_run):
    _, data = quick_run
    assert {"benchmark", "machine", "config", "results", "validation", "slopes", "targets", "wall_s"} <= set(data)
    assert {"torch", "threads", "cpu_model", "copy_bandwidth_Bps", "date"} <= set(data["machine"])
    assert [(r["C"], r["L"]) for r in data["results"]] == [(16, 256), (16, 512)]
    for r in data["results"]:
        assert set(r["methods"]) == set(mixer.METHODS)
        assert set(r["ratios"]) == {"lazy/flash", "eager/flash", "naive/flash", "flash/offline"}
        for k in mixer.BASELINES:
            m = r["methods"][k]
            assert {"time_s", "estimated", "estimate", "measured_s"} <= set(m)
            assert m["estimate"]["total_s"] > 0
    # the smallest L validates the estimator for lazy and eager at every C
    assert {(v["C"], v["method"]) for v in data["validation"] if v["L"] == 256} >= {(16, "lazy"), (16, "eager")}


def test_quick_run_flash_is_exact(quick_run):
    _, data = quick_run
    for r in data["results"]:
        assert r["methods"]["flash"]["rel_err"] < 1e-5
        for k in mixer.BASELINES:  # baselines run in full are checked too
            if r["methods"][k]["rel_err"] is not None:
                assert r["methods"][k]["rel_err"] < 1e-5


def test_quick_run_writes_png(quick_run):
    out, _ = quick_run
    png = out / "mixer.png"
    assert png.exists() and png.stat().st_size > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_run_keeps_its_results_and_skips_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "have_matplotlib", lambda: False)
    assert mixer.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "mixer.json").read_text())["results"]
    assert not (tmp_path / "mixer.png").exists()
    out = capsys.readouterr().out
    assert "no plot: matplotlib is not installed (pip install 'lcsm-compile[bench]')" in out and "lazy/fl" in out
