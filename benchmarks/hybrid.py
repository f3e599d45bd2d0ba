"""Hybrid generation benchmark: a 4-layer LM of 2 Hyena convolution layers and 2 causal attention
layers (examples/models/hybrid.py, SDPA is_causal=True), greedy generation to L tokens at batch 1:

- flash: lcsm_compile's decoder (Flash Inference tiles for the convolutions, KV caches for attention);
- lazy: the same step program on the lazy convolution bank (conv="lazy": a plain KV-cache decoder
  with each convolution recomputed as a dot product over its history);
- naive: the loop users write (lcsm_compile.generation.NaiveSession: the model on the whole prefix
  at every step), run in full up to --naive-full-max and estimated above it from sampled windows.

All three run in one process, side by side, so the ratios are measured on the same machine state.
Exactness: flash's logits against lazy's at every L (both exact), and teacher-forced against the
float64 model up to --check-max (the float64 forward holds L^2 attention scores).

Run: python benchmarks/hybrid.py [--quick] [--out bench_out/]   (full size: L = 4096, 16384)
"""

import argparse
import copy
import os
import sys
import time
import warnings

import torch

from lcsm_compile.tools.bench import common
from lcsm_compile.generation import NaiveSession
from lcsm_compile.tools.bench.generate import generate_session, int_list, teacher_forced_stepper, token_agreement, warm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/ from a checkout

METHODS = ("flash", "lazy", "naive")
NAIVE_BASIS = ("1", "t", "t2")  # naive recompute: MLPs O(t), FFTs O(t log t), attention O(t^2) per step


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/hybrid.py", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int_list, default=[4096, 16384], help="total lengths L (default 4096,16384)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--naive-full-max", type=int, default=0, help="naive runs in full up to this L, estimated above")
    p.add_argument("--check-max", type=int, default=2048, help="teacher-forced float64 check up to this L")
    p.add_argument("--positions", type=int, default=6, help="naive estimator: windows per length")
    p.add_argument("--window-steps", type=int, default=16)
    p.add_argument("--window-s", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench_out/")
    p.add_argument("--quick", action="store_true", help="tiny sizes (d 32, 4 heads, L 128,256): a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.d_model, args.heads, args.prompt, args.vocab = [128, 256], 32, 4, 16, 64
        args.naive_full_max, args.check_max, args.positions, args.window_steps, args.window_s = 128, 256, 3, 8, 0.2
    if min(args.lengths) <= args.prompt + 1:
        p.error(f"every length must exceed the prompt ({args.prompt}) + 1")
    return args


def build_model(args, max_len):
    from examples.models.common import seeded
    from examples.models.hybrid import hybrid_lm

    with seeded(args.seed):
        return hybrid_lm("sdpa", "haha", d_model=args.d_model, heads=args.heads, max_len=max_len, vocab=args.vocab).eval()


def bench(args, log):
    import lcsm_compile

    lengths, P = sorted(args.lengths), args.prompt
    model = build_model(args, lengths[-1])
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, args.vocab, (1, P), generator=g)
    t0 = time.perf_counter()
    report = lcsm_compile.analyze(model, (prompt,), max_len=lengths[-1])
    if not report.decodable:
        raise lcsm_compile.NotDecodable(report)
    analyze_s = time.perf_counter() - t0
    log(f"analyze {analyze_s:.3g} s: {len(report.sites)} convolutions, {len(report.attention)} attention sites")
    results = []
    for L in lengths:
        row = {"config": f"4x{args.d_model}", "L": L, "prompt": P, "tokens": L - P, "methods": {}}
        runs = {}
        for conv in ("flash", "lazy"):
            dec = lcsm_compile.build_decoder(report, (prompt,), max_len=L, conv=conv, compile=False)
            warm(dec.session(), prompt, L)
            session = dec.session()
            runs[conv] = run = generate_session(session, prompt, L, keep_logits=True)
            row["methods"][conv] = {"time_s": run["time_s"], "estimated": False,
                                    "us_per_token": 1e6 * run["time_s"] / (L - P),
                                    "kv_cache_bytes": session.memory_breakdown()["kv_cache"],
                                    "memory_bytes": session.memory_bytes()}
            log(f"  L={L} {conv}: {run['time_s']:.3g} s")
        flash, lazy = runs["flash"], runs["lazy"]
        row["methods"]["flash"]["rel_err_vs_lazy"] = common.rel_err(flash["logits"], lazy["logits"])
        row["methods"]["flash"]["tokens_vs_lazy"] = token_agreement(flash["tokens"], lazy["tokens"], P)
        if L <= args.check_max:
            model64 = copy.deepcopy(model).double()
            ref = model64(flash["tokens"][:, : flash["logits"].shape[0]])[0]
            row["methods"]["flash"]["rel_err"] = common.rel_err(flash["logits"], ref)
        naive = NaiveSession(model)
        if L <= args.naive_full_max:
            run = generate_session(naive, prompt, L)
            row["methods"]["naive"] = {"time_s": run["time_s"], "estimated": False,
                                       "tokens_vs_flash": token_agreement(run["tokens"], flash["tokens"], P)}
        else:  # sampled windows of teacher-forced steps over [P, L), fitted and summed
            stepper = teacher_forced_stepper(naive, flash["tokens"])
            samples = [(t + P, c) for t, c in common.sample_windows(lambda t: stepper(t + P), L - 1 - P, args.positions,
                                                                     args.window_steps, args.window_s)]
            ts, costs = zip(*samples)
            coef = common.fit_cost(ts, costs, NAIVE_BASIS)
            total = float(sum(max(0.0, float(common.basis_values(NAIVE_BASIS, [t])[0] @ coef)) for t in range(P, L - 1)))
            row["methods"]["naive"] = {"time_s": total, "estimated": True, "samples": [list(s) for s in samples]}
        row["methods"]["naive"]["us_per_token"] = 1e6 * row["methods"]["naive"]["time_s"] / (L - P)
        log(f"  L={L} naive: {'~' if row['methods']['naive']['estimated'] else ''}{row['methods']['naive']['time_s']:.3g} s")
        m = row["methods"]
        row["ratios"] = {"lazy/flash": m["lazy"]["time_s"] / m["flash"]["time_s"],
                         "naive/flash": m["naive"]["time_s"] / m["flash"]["time_s"]}
        results.append(row)
    return results, analyze_s


def results_table(results):
    rows = []
    for r in results:
        m = r["methods"]
        est = m["naive"]["estimated"]
        rows.append([r["config"], r["L"], common.fmt_num(m["flash"]["time_s"]), common.fmt_num(m["lazy"]["time_s"]),
                     common.fmt_num(m["naive"]["time_s"], est), common.fmt_num(r["ratios"]["lazy/flash"]),
                     common.fmt_num(r["ratios"]["naive/flash"], est), common.fmt_num(m["flash"]["us_per_token"]),
                     m["flash"]["kv_cache_bytes"], common.fmt_num(m["flash"]["rel_err_vs_lazy"]),
                     common.fmt_num(m["flash"].get("rel_err"))])
    return common.format_table(["config", "L", "flash s", "lazy s", "naive s", "lazy/flash", "naive/flash",
                                "flash us/tok", "KV bytes", "err vs lazy", "err vs f64"], rows)


def plot(results, path):
    colors = {"naive": "tab:purple", "lazy": "tab:red", "flash": "tab:blue"}
    common.plot_loglog(path, common.method_series(results, "config", METHODS, colors),
                       ylabel="seconds to generate up to L tokens (hollow = estimated)",
                       title="Hyena + attention hybrid LM: greedy generation time vs L (batch 1)")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    with common.torch_threads(args.threads), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results, analyze_s = bench(args, log)
    log("\n" + results_table(results))
    data = {"benchmark": "hybrid", "machine": common.machine_info(), "config": vars(args), "analyze_s": analyze_s,
            "results": results, "wall_s": time.perf_counter() - started}
    common.write_outputs(args.out, "hybrid", data, lambda path: plot(results, path), log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
