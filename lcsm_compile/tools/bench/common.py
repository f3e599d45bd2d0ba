"""Pieces every benchmark shares: timers, the cost-vs-t estimator, estimator validation, machine
facts, tables, targets, JSON, plots.

Conventions: times are seconds of wall clock (clock(): time.perf_counter once queued CUDA work is
done); an ESTIMATED figure is never printed as if measured: tables prefix it with '~' and list it in
an "est" column.
"""

import contextlib
import datetime
import importlib.util
import json
import math
import os
import socket
import platform
import time

import numpy as np
import torch

from lcsm_compile.kernels.triton_common import rel_err  # noqa: F401  ||a - b|| / ||b|| in float64, for every benchmark

# An estimate further than this from the full run it is validated against is flagged in the output
# (a benchmark's judgement, never a test's: timings on these machines are noisy).
DEVIATION_FLAG = 0.15

# -- timers ------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group of ranks spawned on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clock():
    """Seconds of wall clock, read once the GPU (if one is in use) has finished its queued work: a
    timing must not stop while kernels still run. On the CPU, time.perf_counter()."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def best_time(fn, repeats=3, warmup=1, clock=clock):
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
        "t2": t * t,  # recomputing attention over the prefix
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


def sample_windows(step, L, positions=8, steps=40, max_window_s=0.5, clock=clock):
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


def estimate_total(step, L, basis=LINEAR, clock=clock, **window_kw):
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


class RestartingStepper:
    """step(t) for the estimator's windows, on a decoder fed known inputs: a jump to a new position
    t first restarts the decoder at t (restart(t): reset, then prefill the inputs before t; the
    untimed first call of each window pays for it), then steps it (step(t) -> that output, kept in
    .outputs by position for exactness checks)."""

    def __init__(self, restart, step):
        self.restart, self.step, self.pos, self.outputs = restart, step, None, {}

    def __call__(self, t):
        if self.pos != t:
            self.restart(t)
        self.outputs[t] = self.step(t)
        self.pos = t + 1


def validation_rows(results, methods, ids):
    """Every (result, method) timed both ways: its full run ("measured_s") against its estimate
    ("estimate_s"), the relative deviation, and whether it is past DEVIATION_FLAG. ids: the keys
    that name a result (e.g. ("C", "L"))."""
    rows = []
    for r in results:
        for k in methods:
            m = r["methods"].get(k)
            if m is not None and m["measured_s"] is not None:
                dev = (m["estimate_s"] - m["measured_s"]) / m["measured_s"]
                rows.append({**{i: r[i] for i in ids}, "method": k, "measured_s": m["measured_s"],
                             "estimated_s": m["estimate_s"], "deviation": dev, "flag": abs(dev) > DEVIATION_FLAG})
    return rows


def validation_table(rows, ids):
    if not rows:
        return "  (no baseline run in full)"
    return format_table([*ids, "method", "measured_s", "estimated_s", "dev", "flag"],
                        [[*(v[i] for i in ids), v["method"], fmt_num(v["measured_s"]), fmt_num(v["estimated_s"]),
                          f"{v['deviation']:+.1%}", "FLAG" if v["flag"] else "ok"] for v in rows])


# -- targets ------------------------------------------------------------------------------------
# A benchmark reports; whoever runs it may pass targets(results) -> [target(...)] to judge it.


def target(text, value, ok, estimated=False):
    """One target: PASS / MISS by ok(value), or n/a when its configuration was not run (value None)."""
    return {"target": text, "value": value, "estimated": bool(estimated),
            "status": "n/a" if value is None else ("PASS" if ok(value) else "MISS")}


def find(results, **keys):
    """The result whose fields equal `keys`, or None."""
    return next((r for r in results if all(r[k] == v for k, v in keys.items())), None)


def targets_text(targets):
    lines = ["Targets (informational):"]
    for t in targets:
        v = "-" if t["value"] is None else fmt_num(t["value"], t["estimated"])
        lines.append(f"  {t['status']:4s}  {t['target']}: {v}")
    return "\n".join(lines)


# -- machine facts ------------------------------------------------------------------------------


def copy_bandwidth(mib=256, repeats=5, device="cpu"):
    """Bytes/s of a large torch copy_ on `device`, counting both the read and the write (best of `repeats`)."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
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
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


@contextlib.contextmanager
def torch_threads(n):
    """torch's thread count set to n (None: unchanged) inside, restored after: a benchmark's
    --threads must not leak into a caller's process (tests)."""
    before = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


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


def method_series(results, group, methods, colors, label="{method} {group}"):
    """Log-log series: one per (group value, method) of time_s vs L, estimated points marked;
    one line style per group value (e.g. per C, or per config). label: a format of method, group."""
    styles = ["-", "--", ":", "-."]
    series = []
    for i, g in enumerate(dict.fromkeys(r[group] for r in results)):
        rs = sorted((r for r in results if r[group] == g), key=lambda r: r["L"])
        for k in methods:
            series.append({"x": [r["L"] for r in rs], "y": [r["methods"][k]["time_s"] for r in rs],
                           "estimated": [r["methods"][k]["estimated"] for r in rs],
                           "label": label.format(method=k, group=g),
                           "color": colors[k], "linestyle": styles[i % len(styles)]})
    return series


def write_outputs(out_dir, name, data, plot, log):
    """Write out_dir/name.json, and out_dir/name.png by plot(path) when matplotlib is installed
    (a note instead otherwise); log says what was written."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.png")
    write_json(json_path, data)
    wall = f" ({data['wall_s']:.1f} s)" if "wall_s" in data else ""
    if have_matplotlib():
        plot(png_path)
        log(f"\nwrote {json_path} and {png_path}{wall}")
    else:
        log(f"\nwrote {json_path}; no plot: {MATPLOTLIB_MISSING}{wall}")
    return json_path


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
