"""Pieces every benchmark shares: timers, the cost-vs-t estimator, machine facts, tables, JSON, plots.

Conventions: times are seconds of wall clock (time.perf_counter); an ESTIMATED figure is never
printed as if measured: tables prefix it with '~' and list it in an "est" column.
"""

import datetime
import importlib.util
import json
import math
import os
import platform
import time

import numpy as np
import torch

# An estimate further than this from the full run it is validated against is flagged in the output
# (a benchmark's judgement, never a test's: timings on these machines are noisy).
DEVIATION_FLAG = 0.15

# -- timers ------------------------------------------------------------------------------------


def best_time(fn, repeats=3, warmup=1, clock=time.perf_counter):
    """Best wall time of fn() over `repeats` runs after `warmup` untimed runs (best = least noise)."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


# -- cost-vs-t estimator ------------------------------------------------------------------------
# A decode loop whose per-step cost grows with t is too slow to run in full at large L. We time a
# few short windows of consecutive steps spread over [0, L), fit cost(t) as a linear combination
# of basis functions by least squares, and sum the fitted cost over every step t = 0..L-1.

LINEAR = ("1", "t")  # lazy (history read grows with t), eager (future write shrinks with t)
NLOGN = ("1", "tlogt")  # naive recompute: an FFT of size ~2(t+1) per step
OUTLIER = 4.0  # a timed step slower than this x its window's median was preempted: dropped


def basis_values(basis, t):
    """Columns of the design matrix for step indices t (array)."""
    t = np.asarray(t, dtype=np.float64)
    cols = {
        "1": np.ones_like(t),
        "t": t,
        "tlogt": (t + 1) * np.log2(t + 2),
    }
    return np.stack([cols[name] for name in basis], axis=-1)


def fit_cost(ts, costs, basis=LINEAR):
    """Least-squares coefficients of cost(t) = sum_k coef_k * basis_k(t)."""
    coef, *_ = np.linalg.lstsq(basis_values(basis, ts), np.asarray(costs, dtype=np.float64), rcond=None)
    return coef


def integrate_cost(coef, basis, L):
    """Sum of the fitted cost over every step t = 0..L-1 (an exact discrete sum, not an integral).
    A step the fit puts below zero counts as zero: noisy samples on a loaded machine can tilt the
    fit, and no step costs less than nothing, so totals never shrink as L grows."""
    return float(np.clip(basis_values(basis, np.arange(L)) @ np.asarray(coef), 0.0, None).sum())


def sample_windows(step, L, positions=8, steps=40, max_window_s=0.5, clock=time.perf_counter):
    """Time `positions` windows of up to `steps` consecutive calls step(t), spread over [0, L).

    Each window starts with one untimed call (warms caches and code paths) and stops early once it
    has run max_window_s, so an expensive method samples fewer steps.
    Steps are timed one by one; a window reports their mean after dropping steps slower than
    OUTLIER x the window's median (a step preempted by another process would skew the fit; genuine
    variation inside a window, e.g. FFT sizes, is far smaller). Returns (mean t, seconds per step).
    """
    samples = []
    for k in range(positions):
        start = min(int((k + 0.5) * L / positions) - steps // 2, L - steps - 1)
        start = max(start, 0)
        stop = min(start + 1 + steps, L)
        t0 = clock()
        step(start)
        # at least 2 timed steps, or 1 when a single step outlasts the window (noise is then small)
        min_steps = 1 if clock() - t0 > max_window_s else 2
        costs, began = [], clock()
        for t in range(start + 1, stop):
            t0 = clock()
            step(t)
            now = clock()
            costs.append(now - t0)
            if len(costs) >= min_steps and now - began > max_window_s:
                break
        if costs:
            costs = np.asarray(costs)
            kept = costs[costs <= OUTLIER * np.median(costs)]
            samples.append((start + (1 + len(costs)) / 2, float(kept.mean())))
    return samples


def estimate_total(step, L, basis=LINEAR, clock=time.perf_counter, **window_kw):
    """Estimated seconds of a full run of step(0..L-1), from sampled windows. Returns a dict."""
    samples = sample_windows(step, L, clock=clock, **window_kw)
    ts, costs = zip(*samples)
    coef = fit_cost(ts, costs, basis)
    return {
        "total_s": integrate_cost(coef, basis, L),
        "basis": list(basis),
        "coef": [float(c) for c in coef],
        "samples": [[float(t), float(c)] for t, c in samples],
    }


# -- machine facts ------------------------------------------------------------------------------


def copy_bandwidth(mib=256, repeats=5):
    """Bytes/s of a large torch copy_, counting both the read and the write (best of `repeats`)."""
    n = mib * 2**20 // 4
    src = torch.randn(n)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), repeats=repeats, warmup=1)
    return 2 * n * 4 / seconds


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(copy_bw=None):
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if copy_bw is not None:
        info["copy_bandwidth_Bps"] = copy_bw
    return info


# -- output -------------------------------------------------------------------------------------


def fmt_num(value, estimated=False, digits=3):
    """A number for a table: '-' when missing, '~' in front when estimated."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    s = f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return ("~" if estimated else "") + s


def format_table(headers, rows):
    """Fixed-width text table; every cell is str()-ed and right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def loglog_slope(x0, y0, x1, y1):
    """Slope of the line through (x0, y0) and (x1, y1) in log-log space."""
    return math.log(y1 / y0) / math.log(x1 / x0)


MATPLOTLIB_MISSING = "matplotlib is not installed (pip install 'lcsm-compile[bench]')"


def have_matplotlib() -> bool:
    """Plots are optional: checked before a run, so a missing matplotlib never costs a finished table."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_loglog(path, series, xlabel="L", ylabel="seconds", title=None):
    """Log-log plot. series: list of dicts with x, y, label, and optional color, linestyle,
    estimated (list of bools: estimated points are drawn hollow)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for s in series:
        color, style = s.get("color"), s.get("linestyle", "-")
        (line,) = ax.plot(s["x"], s["y"], linestyle=style, color=color, label=s["label"])
        est = s.get("estimated") or [False] * len(s["x"])
        for x, y, e in zip(s["x"], s["y"], est):
            ax.plot([x], [y], "o", color=line.get_color(), markerfacecolor="none" if e else line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
