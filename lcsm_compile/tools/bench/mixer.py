"""Mixer benchmark: one bank of C causal long convolutions decoded for L steps (batch 1).

Methods, all timed in the same run on the same inputs and filters (lcsm_compile.baselines holds
every baseline; each bank is driven through the same step(x) as the flash bank):
- lazy:    per step, a dot of the history with the reversed filter (baselines.LazyConv);
- eager:   per step, scatter x_t * h into every future accumulator (baselines.EagerConv);
- naive:   per step, an FFT convolution of the whole prefix (baselines.NaiveConv: what users do today);
- offline: one FFT convolution of the finished sequence (baselines.fft_conv: a lower bound, not causal);
- flash:   lcsm_compile.OnlineConv, step by step (ours: the paper's tiling);
- partitioned: lcsm_compile.PartitionedConv, step by step (ours: frequency-domain delay lines, the
           plan lcsm_compile.partition.plan picks for C and L with this machine's tuned costs).
Baselines whose full run would exceed --budget-s are ESTIMATED from timed windows of steps
(common.estimate_total); every estimated figure is marked '~' and listed in the "est" column.
At L = 4096 (or the smallest L run) lazy and eager run in full too, validating the estimator.
Every output is checked against a float64 reference: flash's and partitioned's whole runs, a
baseline's full run, and the steps an estimate sampled.

Run: python benchmarks/mixer.py [--quick] [--out bench_out/]   (with the project's targets)
  or lcsm-compile bench mixer ...                              (measures and reports only)
"""

import argparse
import math
import sys
import time

import torch

from lcsm_compile import baselines
from lcsm_compile.tools.bench import common
from lcsm_compile.engine import OnlineConv
from lcsm_compile.partitioned import PartitionedConv

METHODS = ("lazy", "eager", "naive", "offline", "flash", "partitioned")
BANKS = {"lazy": baselines.LazyConv, "eager": baselines.EagerConv, "naive": baselines.NaiveConv}
BASELINES = tuple(BANKS)  # the stepwise baselines that may be estimated
BASIS = {"lazy": common.LINEAR, "eager": common.LINEAR, "naive": common.NLOGN}
VALIDATE_L = 4096
MAX_REL_ERR = {"float32": 1e-5, "float64": 1e-12}  # above it an output is wrong: flagged '!' and WRONG


# -- problem ------------------------------------------------------------------------------------


def make_problem(C, L, dtype, seed=0, device="cpu"):
    """Filters h [C, L] (random, decaying like trained long-conv filters) and inputs, time-major [L, C]."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(L, dtype=torch.float64) / (L / 4))
    h = (torch.randn(C, L, generator=g, dtype=torch.float64) * decay / math.sqrt(L)).to(dtype)
    XT = torch.randn(L, C, generator=g, dtype=torch.float64).to(dtype)
    return h.to(device).contiguous(), XT.to(device).contiguous()


def reference(h, X, chunk=256):
    """float64 causal convolution y = h * X [C, L] by an uncut FFT, a channel chunk at a time (memory),
    on X's device."""
    C, L = X.shape
    n = 2 * L
    out = torch.empty(C, L, dtype=torch.float64, device=X.device)
    for c in range(0, C, chunk):
        hf = torch.fft.rfft(h[c : c + chunk].double(), n=n)
        xf = torch.fft.rfft(X[c : c + chunk].double(), n=n)
        out[c : c + chunk] = torch.fft.irfft(hf * xf, n=n)[:, :L]
    return out



def run_steps(step, xs):
    """Seconds for step(x) over every x of xs in order, and the outputs stacked to [C, L]."""
    ys = []
    t0 = common.clock()
    for x in xs:
        ys.append(step(x))
    seconds = common.clock() - t0
    return seconds, torch.stack(ys, -1)


def run_ours(cls, h, xs, repeats):
    """One of our banks (OnlineConv, PartitionedConv): construction (spectra precompute) timed apart
    from the L step() calls.

    A short warm-up decode first (code paths, allocator); then `repeats` fresh runs, best kept.
    """
    L = h.shape[1]
    warm = cls(h[:, : min(L, 1024)])
    run_steps(warm.step, xs[: min(L, 1024)])
    del warm
    best = None
    for _ in range(repeats):
        t0 = common.clock()
        conv = cls(h, max_len=L)
        build_s = common.clock() - t0
        step_s, ys = run_steps(conv.step, xs)
        if best is None or step_s < best["time_s"]:
            best = {"time_s": step_s, "build_s": build_s, "memory_bytes": conv.memory_bytes()}
            if cls is OnlineConv:
                best["crossover"] = conv.crossover
            else:
                best["plan"] = conv.partition.to_json()
            Y = ys
        del conv, ys
    return best, Y


# -- one configuration --------------------------------------------------------------------------


def bench_config(C, L, args, validate_here, log):
    dtype = getattr(torch, args.dtype)
    h, XT = make_problem(C, L, dtype, seed=args.seed, device=args.device)
    xs = list(XT.unbind(0))  # pre-generated x_t [C], contiguous; nothing generated while timing
    X = XT.T.contiguous()
    ref = reference(h, X)
    rec = {"C": C, "L": L, "methods": {}}

    # offline lower bound
    off_s = common.best_time(lambda: baselines.fft_conv(h, X), repeats=args.repeats + 2, warmup=1)
    rec["methods"]["offline"] = {"time_s": off_s, "estimated": False, "rel_err": common.rel_err(baselines.fft_conv(h, X), ref)}
    log(f"  offline  {off_s:.4g} s")

    # ours: always measured in full, and checked against the float64 reference
    for name, cls in (("flash", OnlineConv), ("partitioned", PartitionedConv)):
        m, Y = run_ours(cls, h, xs, args.repeats)
        m.update(estimated=False, rel_err=common.rel_err(Y, ref))
        m["wrong"] = not m["rel_err"] <= MAX_REL_ERR[args.dtype]  # NaN is wrong too
        rec["methods"][name] = m
        log(f"  {name:8s} {m['time_s']:.4g} s (build {m['build_s']:.3g} s), rel err {m['rel_err']:.2e}"
            + ("  WRONG: the output does not match the float64 reference" if m["wrong"] else ""))
        del Y
    flash = rec["methods"]["flash"]

    for name, cls in BANKS.items():
        bank = cls(h, max_len=L)

        def restart(t, bank=bank):  # a window at position t: the inputs before t prefilled
            bank.reset()
            bank.prefill(X[:, :t])

        stepper = common.RestartingStepper(restart, lambda t, bank=bank: bank.step(xs[t]))
        est = common.estimate_total(stepper, L, basis=BASIS[name], positions=args.positions,
                                    steps=args.window_steps, max_window_s=args.window_s)
        ts = sorted(stepper.outputs)
        m = {"estimate": est, "estimate_s": est["total_s"], "measured_s": None, "rel_err": None,
             "window_rel_err": common.rel_err(torch.stack([stepper.outputs[t] for t in ts], -1), ref[:, ts])}
        del stepper
        if est["total_s"] <= args.budget_s or (validate_here and name in ("lazy", "eager")):
            bank.reset()
            seconds, Yb = run_steps(bank.step, xs)
            m["measured_s"], m["rel_err"] = seconds, common.rel_err(Yb, ref)
            del Yb
        m["estimated"] = m["measured_s"] is None
        m["time_s"] = est["total_s"] if m["estimated"] else m["measured_s"]
        if hasattr(bank, "run_bytes"):
            m["bytes"] = bank.run_bytes(L)
            m["bandwidth_Bps"] = m["bytes"] / m["time_s"]
        rec["methods"][name] = m
        meas = "-" if m["measured_s"] is None else f"{m['measured_s']:.4g} s"
        log(f"  {name:8s} est {est['total_s']:.4g} s, measured {meas}, sampled steps' rel err {m['window_rel_err']:.1e}")
        del bank

    f = flash["time_s"]
    rec["ratios"] = {
        "lazy/flash": rec["methods"]["lazy"]["time_s"] / f,
        "eager/flash": rec["methods"]["eager"]["time_s"] / f,
        "naive/flash": rec["methods"]["naive"]["time_s"] / f,
        "flash/offline": f / off_s,
        "partitioned/flash": rec["methods"]["partitioned"]["time_s"] / f,
        "partitioned/offline": rec["methods"]["partitioned"]["time_s"] / off_s,
    }
    return rec


# -- report -------------------------------------------------------------------------------------


def results_table(results):
    headers = ["C", "L", "lazy_s", "eager_s", "naive_s", "offline_s", "flash_s", "part_s", "build_s",
               "lazy/fl", "eager/fl", "naive/fl", "fl/off", "part/off", "part/fl", "flash_err", "part_err", "est"]
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
            common.fmt_num(r["ratios"]["partitioned/offline"]),
            common.fmt_num(r["ratios"]["partitioned/flash"]),
            *(f"{m[k]['rel_err']:.1e}" + ("!" if m[k].get("wrong") else "") for k in ("flash", "partitioned")),
            ",".join(k for k in BASELINES if est(k)) or "-",
        ])
    return common.format_table(headers, rows)


def bandwidth_table(results, copy_bw):
    headers = ["C", "L", "lazy_GB/s", "eager_GB/s", "copy_GB/s"]
    rows = []
    for r in results:
        m = r["methods"]
        rows.append([r["C"], r["L"],
                     common.fmt_num(m["lazy"]["bandwidth_Bps"] / 1e9, m["lazy"]["estimated"]),
                     common.fmt_num(m["eager"]["bandwidth_Bps"] / 1e9, m["eager"]["estimated"]),
                     common.fmt_num(copy_bw / 1e9)])
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


def plot(results, path):
    colors = {"lazy": "tab:red", "eager": "tab:orange", "naive": "tab:purple", "offline": "tab:gray", "flash": "tab:blue",
              "partitioned": "tab:green"}
    common.plot_loglog(path, common.method_series(results, "C", METHODS, colors, label="{method} C={group}"),
                       ylabel="seconds for L steps (hollow = estimated)", title="Mixer decode time vs L (batch 1)")


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
    p.add_argument("--device", default="cpu", help="where filters, inputs and every bank live (e.g. cuda)")
    args = p.parse_args(argv)
    if args.quick:
        args.channels, args.lengths, args.window_steps = [16], [256, 512], 16
    return args


def measure(args, log):
    """Every (C, L) of args, each a result dict (see bench_config)."""
    val_L = VALIDATE_L if VALIDATE_L in args.lengths else min(args.lengths)
    results = []
    for C in args.channels:
        for L in args.lengths:
            log(f"C={C} L={L}")
            results.append(bench_config(C, L, args, validate_here=(L == val_L and not args.no_validate), log=log))
    return results


def main(argv=None, targets=None):
    """Run, print the tables, write JSON and plot. targets: optional targets(results) ->
    [common.target(...)], printed after the results and stored in the JSON (benchmarks/mixer.py
    passes the project's)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with common.torch_threads(args.threads):
        return _run(args, targets)


def _run(args, targets):
    started = time.perf_counter()
    log = lambda s: print(s, flush=True)
    progress = lambda s: log(f"[{time.perf_counter() - started:7.1f} s] {s}")
    copy_bw = common.copy_bandwidth(mib=256, device=args.device)  # far larger than any cache
    info = common.machine_info(copy_bw)
    log(f"mixer benchmark: torch {info['torch']}, {info['threads']} threads, {info['cpu_model']}, device {args.device}, "
        f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read+write), dtype {args.dtype}, budget {args.budget_s:g} s")

    results = measure(args, progress)

    log("\nTimes in seconds for L steps (batch 1); '~' = estimated from sampled steps (see 'est').")
    log(results_table(results))

    val = common.validation_rows(results, BASELINES, ("C", "L"))
    log(f"\nEstimator validation (estimate vs full run; flag if |dev| > {common.DEVIATION_FLAG:.0%}):")
    log(common.validation_table(val, ("C", "L")))

    log("\nMemory bandwidth reached (bytes touched per run / time) vs a large torch copy_ (read+write):")
    log(bandwidth_table(results, copy_bw))

    slope_by_c = slopes(results)
    log("\nFlash log-log slope of time vs L:")
    for C, s in slope_by_c.items():
        log(f"  C={C}: {s['slope']:.3f} (L {s['L0']} -> {s['L1']})")

    data = {"benchmark": "mixer", "machine": info, "config": dict(vars(args)), "results": results,
            "validation": val, "slopes": {str(k): v for k, v in slope_by_c.items()}}
    if targets is not None:
        data["targets"] = targets(results)
        log("\n" + common.targets_text(data["targets"]))
    data["wall_s"] = time.perf_counter() - started
    common.write_outputs(args.out, "mixer", data, lambda path: plot(results, path), log)
    return 0
