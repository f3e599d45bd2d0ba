"""Mixer benchmark: one bank of C causal long convolutions decoded for L steps (batch 1).

Methods, all timed in the same run on the same inputs and filters:
- lazy:    per step, a batched dot of the history x[:, :t+1] with the reversed filter;
- eager:   per step, scatter x_t * h into every future accumulator; y_t = acc[:, t];
- naive:   per step, an FFT convolution of the whole prefix (what users do today);
- offline: one FFT convolution of the finished sequence (a lower bound, not causal);
- flash:   lcsm_compile.OnlineConv, step by step (ours).
Baselines whose full run would exceed --budget-s are ESTIMATED from timed windows of steps
(common.estimate_total); every estimated figure is marked '~' and listed in the "est" column.
At L = 4096 (or the smallest L run) lazy and eager run in full too, validating the estimator.

Run: python benchmarks/mixer.py [--quick] [--out bench_out/]   or   lcsm-compile bench mixer
"""

import argparse
import bisect
import math
import os
import sys
import time

import torch

from lcsm_compile.bench import common

METHODS = ("lazy", "eager", "naive", "offline", "flash")
BASELINES = ("lazy", "eager", "naive")  # the stepwise baselines that may be estimated
VALIDATE_L = 4096
MAX_REL_ERR = {"float32": 1e-5, "float64": 1e-12}  # above it an output is wrong: flagged '!' and WRONG
TARGETS = {"lazy_over_flash": 110.0, "flash_over_offline": 4.0, "slope": 1.3}


# -- problem ------------------------------------------------------------------------------------


def make_problem(C, L, dtype, seed=0):
    """Filters h [C, L] (random, decaying like trained long-conv filters) and inputs, time-major [L, C]."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(L, dtype=torch.float64) / (L / 4))
    h = (torch.randn(C, L, generator=g, dtype=torch.float64) * decay / math.sqrt(L)).to(dtype)
    XT = torch.randn(L, C, generator=g, dtype=torch.float64).to(dtype)
    return h.contiguous(), XT.contiguous()


def reference(h, X, chunk=256):
    """float64 causal convolution y = h * X [C, L] by an uncut FFT, a channel chunk at a time (memory)."""
    C, L = X.shape
    n = 2 * L
    out = torch.empty(C, L, dtype=torch.float64)
    for c in range(0, C, chunk):
        hf = torch.fft.rfft(h[c : c + chunk].double(), n=n)
        xf = torch.fft.rfft(X[c : c + chunk].double(), n=n)
        out[c : c + chunk] = torch.fft.irfft(hf * xf, n=n)[:, :L]
    return out


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


# -- baselines ----------------------------------------------------------------------------------
# Each baseline keeps preallocated state and exposes step(t, x_t) -> y_t [C] and reset().


class Lazy:
    """y_t = <x[:, :t+1], reversed h[:, :t+1]> per channel; history and reversed filter preallocated.

    Layouts (the fastest is picked per (C, L) by pick_fastest, so the baseline is as good as torch
    allows here): "vecdot"/"bmm" channel-major [C, L]; "tm" time-major [L, C], elementwise product
    then sum (a [t+1, C] temporary); "blocked" time-major, accumulating products of blocks of
    positions into a cache-sized [K, C] buffer in place (no large temporary: near copy bandwidth
    at large sizes, where the one-shot layouts pay for writing and reading a temporary).
    """

    VARIANTS = ("vecdot", "bmm", "tm", "blocked")
    basis = common.LINEAR
    BLOCK_BYTES = 2 << 20  # the blocked layout's accumulator: small enough to stay in L2/L3

    def __init__(self, h, variant="blocked"):
        C, L = h.shape
        self.C, self.L, self.variant = C, L, variant
        hr = h.flip(-1)  # hr[:, L-1-k] = h[:, k], so hr[:, L-1-t:] lines up with x[:, 0..t]
        if variant in ("tm", "blocked"):
            self.hist = torch.zeros(L, C, dtype=h.dtype)
            self.hr = hr.T.contiguous()
            self.K = max(8, self.BLOCK_BYTES // (C * h.element_size()))
            self.acc = torch.zeros(min(self.K, L), C, dtype=h.dtype) if variant == "blocked" else None
        else:
            self.hist = torch.zeros(C, L, dtype=h.dtype)
            self.hr = hr.contiguous()

    def reset(self):
        self.hist.zero_()

    def step(self, t, x):
        L = self.L
        if self.variant == "blocked":
            self.hist[t] = x
            acc, off = self.acc[: min(self.K, t + 1)], L - 1 - t  # only the rows this step uses
            acc.zero_()
            for a in range(0, t + 1, self.K):
                b = min(a + self.K, t + 1)
                acc[: b - a].addcmul_(self.hist[a:b], self.hr[off + a : off + b])
            return acc.sum(0)
        if self.variant == "tm":
            self.hist[t] = x
            return (self.hist[: t + 1] * self.hr[L - 1 - t :]).sum(0)
        self.hist[:, t] = x
        if self.variant == "bmm":
            return torch.bmm(self.hist[:, None, : t + 1], self.hr[:, L - 1 - t :, None]).view(self.C)
        return torch.linalg.vecdot(self.hist[:, : t + 1], self.hr[:, L - 1 - t :])

    def bytes_per_run(self):
        """Bytes read over a full run: history and filter, (t+1) positions each, per step."""
        return self.hist.element_size() * self.C * self.L * (self.L + 1)


class Eager:
    """Per step, acc[t:] += x_t * h[:L-t] in place (addcmul_); y_t = acc[t] is then complete.

    Layouts: "cm" channel-major acc [C, L]; "tm" time-major acc [L, C] (one contiguous span).
    """

    VARIANTS = ("cm", "tm")
    basis = common.LINEAR

    def __init__(self, h, variant="tm"):
        C, L = h.shape
        self.C, self.L, self.variant = C, L, variant
        if variant == "tm":
            self.acc = torch.zeros(L, C, dtype=h.dtype)
            self.h = h.T.contiguous()
        else:
            self.acc = torch.zeros(C, L, dtype=h.dtype)
            self.h = h.contiguous()

    def reset(self):
        self.acc.zero_()

    def step(self, t, x):
        if self.variant == "tm":
            self.acc[t:].addcmul_(self.h[: self.L - t], x)
            return self.acc[t]  # a view: later steps only touch acc[t+1:]
        self.acc[:, t:].addcmul_(self.h[:, : self.L - t], x[:, None])
        return self.acc[:, t]

    def bytes_per_run(self):
        """Bytes touched over a full run: read acc and h, write acc, (L-t) positions each, per step."""
        return self.acc.element_size() * 3 * self.C * self.L * (self.L + 1) // 2


class Naive:
    """At step t, the model's FFT convolution of the whole prefix, filter spectrum included (the model
    recomputes it every forward); keep the last output. FFT size: the smallest 5-smooth n >= 2(t+1),
    kinder than Hyena's n = 2(t+1), which hits slow prime sizes (Bluestein) at many t."""

    VARIANTS = ("fft",)
    basis = common.NLOGN

    def __init__(self, h, variant="fft"):
        C, L = h.shape
        self.C, self.L, self.variant, self.h = C, L, variant, h
        self.hist = torch.zeros(C, L, dtype=h.dtype)
        self.sizes = fast_sizes(2 * L)

    def reset(self):
        self.hist.zero_()

    def step(self, t, x):
        self.hist[:, t] = x
        p = t + 1
        n = self.sizes[bisect.bisect_left(self.sizes, 2 * p)]
        f = torch.fft.rfft(self.hist[:, :p], n=n) * torch.fft.rfft(self.h[:, :p], n=n)
        return torch.fft.irfft(f, n=n)[:, t]


def fast_sizes(limit):
    """Sorted 5-smooth numbers (2^a 3^b 5^c) up to the first one >= limit: fast FFT sizes."""
    out, p2 = [], 1
    while p2 < 2 * limit:
        p3 = p2
        while p3 < 2 * limit:
            p5 = p3
            while p5 < 2 * limit:
                out.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return sorted(out)


def pick_fastest(cls, h, xs, steps=4):
    """Build each layout of a baseline, time a few steps at t = 3L/4 (where most of the run's cost
    lies), and keep the fastest. Returns (instance, {variant: seconds per step})."""
    L = h.shape[1]
    t0 = max(0, min(3 * L // 4, L - steps - 1))
    if len(cls.VARIANTS) == 1:
        return cls(h, cls.VARIANTS[0]), {}
    best, timings = None, {}
    for variant in cls.VARIANTS:
        b = cls(h, variant)
        ts = range(t0, t0 + steps)
        timings[variant] = common.best_time(lambda: [b.step(t, xs[t]) for t in ts], repeats=2) / steps
        if best is None or timings[variant] < timings[best.variant]:
            best = b
        del b
    best.reset()
    return best, timings


def run_steps(step, xs):
    """Seconds for step(t, xs[t]) over every t, and the outputs stacked to [C, L]."""
    ys = []
    t0 = time.perf_counter()
    for t, x in enumerate(xs):
        ys.append(step(t, x))
    seconds = time.perf_counter() - t0
    return seconds, torch.stack(ys, -1)


# -- offline and flash --------------------------------------------------------------------------


def offline_fft(h, X):
    """One FFT convolution of the finished sequence: rfft of x and h at n = 2L, product, irfft."""
    L = X.shape[-1]
    n = 2 * L
    return torch.fft.irfft(torch.fft.rfft(X, n=n) * torch.fft.rfft(h, n=n), n=n)[:, :L]


def run_flash(h, xs, repeats):
    """OnlineConv: construction (spectra precompute) timed apart from the L step() calls.

    A short warm-up decode first (code paths, allocator); then `repeats` fresh runs, best kept.
    """
    from lcsm_compile import OnlineConv

    L = h.shape[1]
    warm = OnlineConv(h[:, : min(L, 1024)])
    for x in xs[: min(L, 1024)]:
        warm.step(x)
    del warm
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        conv = OnlineConv(h, max_len=L)
        build_s = time.perf_counter() - t0
        ys = []
        t0 = time.perf_counter()
        for x in xs:
            ys.append(conv.step(x))
        step_s = time.perf_counter() - t0
        if best is None or step_s < best["time_s"]:
            best = {"time_s": step_s, "build_s": build_s, "memory_bytes": conv.memory_bytes(), "crossover": conv.crossover}
            Y = torch.stack(ys, -1)
        del conv, ys
    return best, Y


# -- one configuration --------------------------------------------------------------------------


def bench_config(C, L, args, validate_here, log):
    dtype = getattr(torch, args.dtype)
    h, XT = make_problem(C, L, dtype, seed=args.seed)
    xs = list(XT.unbind(0))  # pre-generated x_t [C], contiguous; nothing generated while timing
    X = XT.T.contiguous()
    ref = reference(h, X)
    rec = {"C": C, "L": L, "methods": {}}

    # offline lower bound
    off_s = common.best_time(lambda: offline_fft(h, X), repeats=args.repeats + 2, warmup=1)
    rec["methods"]["offline"] = {"time_s": off_s, "estimated": False, "rel_err": rel_err(offline_fft(h, X), ref)}
    log(f"  offline  {off_s:.4g} s")

    # flash (ours): always measured in full, and checked against the float64 reference
    flash, Y = run_flash(h, xs, args.repeats)
    flash.update(estimated=False, rel_err=rel_err(Y, ref))
    rec["methods"]["flash"] = flash
    flash["wrong"] = not flash["rel_err"] <= MAX_REL_ERR[args.dtype]  # NaN is wrong too
    log(f"  flash    {flash['time_s']:.4g} s (build {flash['build_s']:.3g} s), rel err {flash['rel_err']:.2e}"
        + ("  WRONG: the output does not match the float64 reference" if flash["wrong"] else ""))
    del Y

    for name, cls in (("lazy", Lazy), ("eager", Eager), ("naive", Naive)):
        base, layouts = pick_fastest(cls, h, xs)
        est = common.estimate_total(
            lambda t: base.step(t, xs[t]), L, basis=cls.basis,
            positions=args.positions, steps=args.window_steps, max_window_s=args.window_s,
        )
        m = {"variant": base.variant, "layout_s_per_step": layouts, "estimate": est, "measured_s": None, "rel_err": None}
        full = est["total_s"] <= args.budget_s or (validate_here and name in ("lazy", "eager"))
        if full:
            base.reset()
            seconds, Yb = run_steps(base.step, xs)
            m["measured_s"], m["rel_err"] = seconds, rel_err(Yb, ref)
            del Yb
        m["estimated"] = m["measured_s"] is None
        m["time_s"] = est["total_s"] if m["estimated"] else m["measured_s"]
        if hasattr(base, "bytes_per_run"):
            m["bytes"] = base.bytes_per_run()
            m["bandwidth_Bps"] = m["bytes"] / m["time_s"]
        rec["methods"][name] = m
        meas = "-" if m["measured_s"] is None else f"{m['measured_s']:.4g} s"
        log(f"  {name:8s} est {est['total_s']:.4g} s, measured {meas} ({base.variant})")
        del base

    f = flash["time_s"]
    rec["ratios"] = {
        "lazy/flash": rec["methods"]["lazy"]["time_s"] / f,
        "eager/flash": rec["methods"]["eager"]["time_s"] / f,
        "naive/flash": rec["methods"]["naive"]["time_s"] / f,
        "flash/offline": f / off_s,
    }
    return rec


# -- report -------------------------------------------------------------------------------------


def results_table(results):
    headers = ["C", "L", "lazy_s", "eager_s", "naive_s", "offline_s", "flash_s", "build_s",
               "lazy/fl", "eager/fl", "naive/fl", "fl/off", "flash_err", "est"]
    rows = []
    for r in results:
        m = r["methods"]
        est = lambda k: m[k]["estimated"]
        rows.append([
            r["C"], r["L"],
            *(common.fmt_num(m[k]["time_s"], est(k)) for k in METHODS),
            common.fmt_num(m["flash"]["build_s"]),
            common.fmt_num(r["ratios"]["lazy/flash"], est("lazy")),
            common.fmt_num(r["ratios"]["eager/flash"], est("eager")),
            common.fmt_num(r["ratios"]["naive/flash"], est("naive")),
            common.fmt_num(r["ratios"]["flash/offline"]),
            f"{m['flash']['rel_err']:.1e}" + ("!" if m["flash"].get("wrong") else ""),
            ",".join(k for k in BASELINES if est(k)) or "-",
        ])
    return common.format_table(headers, rows)


def validation_rows(results):
    """Every (C, L, method) timed both ways: measured vs estimated and the relative deviation."""
    rows = []
    for r in results:
        for k in BASELINES:
            m = r["methods"][k]
            if m["measured_s"] is not None:
                dev = (m["estimate"]["total_s"] - m["measured_s"]) / m["measured_s"]
                rows.append({"C": r["C"], "L": r["L"], "method": k, "measured_s": m["measured_s"],
                             "estimated_s": m["estimate"]["total_s"], "deviation": dev,
                             "flag": abs(dev) > common.DEVIATION_FLAG})
    return rows


def bandwidth_table(results, copy_bw):
    headers = ["C", "L", "lazy_GB/s", "eager_GB/s", "copy_GB/s", "lazy_layout", "eager_layout"]
    rows = []
    for r in results:
        m = r["methods"]
        rows.append([r["C"], r["L"],
                     common.fmt_num(m["lazy"]["bandwidth_Bps"] / 1e9, m["lazy"]["estimated"]),
                     common.fmt_num(m["eager"]["bandwidth_Bps"] / 1e9, m["eager"]["estimated"]),
                     common.fmt_num(copy_bw / 1e9), m["lazy"]["variant"], m["eager"]["variant"]])
    return common.format_table(headers, rows)


def slopes(results):
    """Per C, the log-log slope of flash time from the smallest to the largest L."""
    out = {}
    for C in sorted({r["C"] for r in results}):
        rs = sorted((r for r in results if r["C"] == C), key=lambda r: r["L"])
        if len(rs) >= 2:
            a, b = rs[0], rs[-1]
            out[C] = {"L0": a["L"], "L1": b["L"], "slope": common.loglog_slope(
                a["L"], a["methods"]["flash"]["time_s"], b["L"], b["methods"]["flash"]["time_s"])}
    return out


def targets(results, slope_by_c):
    """The project's targets, informational: PASS / MISS / n/a (configuration not in this run)."""
    find = lambda C, L: next((r for r in results if r["C"] == C and r["L"] == L), None)
    out = []
    r = find(2048, 32768)
    v = r and r["ratios"]["lazy/flash"]
    out.append({"target": "flash vs lazy >= 110x at C=2048, L=32768", "value": v,
                "estimated": bool(r and r["methods"]["lazy"]["estimated"]),
                "status": "n/a" if v is None else ("PASS" if v >= TARGETS["lazy_over_flash"] else "MISS")})
    r = find(2048, 16384)
    v = r and r["ratios"]["flash/offline"]
    out.append({"target": "flash within 4x of offline at C=2048, L=16384", "value": v, "estimated": False,
                "status": "n/a" if v is None else ("PASS" if v <= TARGETS["flash_over_offline"] else "MISS")})
    for C, s in slope_by_c.items():
        out.append({"target": f"flash log-log slope <= 1.3 at C={C} (L {s['L0']}..{s['L1']})", "value": s["slope"],
                    "estimated": False, "status": "PASS" if s["slope"] <= TARGETS["slope"] else "MISS"})
    return out


def plot(results, path):
    colors = {"lazy": "tab:red", "eager": "tab:orange", "naive": "tab:purple", "offline": "tab:gray", "flash": "tab:blue"}
    styles = ["-", "--", ":", "-."]
    series = []
    for i, C in enumerate(sorted({r["C"] for r in results})):
        rs = sorted((r for r in results if r["C"] == C), key=lambda r: r["L"])
        for k in METHODS:
            series.append({"x": [r["L"] for r in rs], "y": [r["methods"][k]["time_s"] for r in rs],
                           "estimated": [r["methods"][k]["estimated"] for r in rs],
                           "label": f"{k} C={C}", "color": colors[k], "linestyle": styles[i % len(styles)]})
    common.plot_loglog(path, series, ylabel="seconds for L steps (hollow = estimated)",
                       title="Mixer decode time vs L (batch 1)")


# -- entry point --------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lcsm-compile bench mixer", description=__doc__.split("\n")[0])
    p.add_argument("--channels", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--out", default="bench_out/")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="a baseline whose estimated full run exceeds this many seconds is reported as the estimate")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the full lazy/eager runs that validate the estimator (flash is always checked)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (C=16, L=256 512): a smoke test in seconds")
    p.add_argument("--repeats", type=int, default=1, help="flash runs per configuration (best kept)")
    p.add_argument("--positions", type=int, default=8, help="estimator: windows spread over [0, L)")
    p.add_argument("--window-steps", type=int, default=40, help="estimator: timed steps per window (at most)")
    p.add_argument("--window-s", type=float, default=0.5, help="estimator: seconds per window (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default, all cores)")
    args = p.parse_args(argv)
    if args.quick:
        args.channels, args.lengths, args.window_steps = [16], [256, 512], 16
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # --threads must not leak into a caller's process (tests)


def _run(args):
    started = time.perf_counter()
    log = lambda s: print(s, flush=True)
    progress = lambda s: log(f"[{time.perf_counter() - started:7.1f} s] {s}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    copy_bw = common.copy_bandwidth(mib=256)  # far larger than any cache
    info = common.machine_info(copy_bw)
    log(f"mixer benchmark: torch {info['torch']}, {info['threads']} threads, {info['cpu_model']}, "
        f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read+write), dtype {args.dtype}, budget {args.budget_s:g} s")
    val_L = VALIDATE_L if VALIDATE_L in args.lengths else min(args.lengths)

    results = []
    for C in args.channels:
        for L in args.lengths:
            progress(f"C={C} L={L}")
            results.append(bench_config(C, L, args, validate_here=(L == val_L and not args.no_validate), log=progress))

    log("\nTimes in seconds for L steps (batch 1); '~' = estimated from sampled steps (see 'est').")
    log(results_table(results))

    val = validation_rows(results)
    log(f"\nEstimator validation (estimate vs full run; flag if |dev| > {common.DEVIATION_FLAG:.0%}):")
    log(common.format_table(["C", "L", "method", "measured_s", "estimated_s", "dev", "flag"],
                            [[v["C"], v["L"], v["method"], common.fmt_num(v["measured_s"]), common.fmt_num(v["estimated_s"]),
                              f"{v['deviation']:+.1%}", "FLAG" if v["flag"] else "ok"] for v in val]) if val else "  (none run)")

    log("\nMemory bandwidth reached (bytes touched per run / time) vs a large torch copy_ (read+write):")
    log(bandwidth_table(results, copy_bw))

    slope_by_c = slopes(results)
    log("\nFlash log-log slope of time vs L:")
    for C, s in slope_by_c.items():
        log(f"  C={C}: {s['slope']:.3f} (L {s['L0']} -> {s['L1']})")

    tg = targets(results, slope_by_c)
    log("\nTargets (informational):")
    for t in tg:
        val_s = "-" if t["value"] is None else common.fmt_num(t["value"], t["estimated"])
        log(f"  {t['status']:4s}  {t['target']}: {val_s}")

    wall = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "mixer.json"), os.path.join(args.out, "mixer.png")
    common.write_json(json_path, {
        "benchmark": "mixer", "machine": info,
        "config": {k: v for k, v in vars(args).items()}, "validate_L": val_L,
        "results": results, "validation": val, "slopes": {str(k): v for k, v in slope_by_c.items()},
        "targets": tg, "wall_s": wall,
    })
    if common.have_matplotlib():
        plot(results, png_path)
        log(f"\nwrote {json_path} and {png_path} ({wall:.1f} s)")
    else:
        log(f"\nwrote {json_path}; no plot: {common.MATPLOTLIB_MISSING} ({wall:.1f} s)")
    return 0
