"""One CUDA device, one script: every Triton kernel and the whole decoder checked against torch,
then the mixer and end-to-end generation timed against the baselines. Sized to finish in under 5
minutes on one H200 (baselines estimated from sampled steps, one repeat).

(a) checks: each Triton specialisation a decode of the timed sizes launches (cli.kernel_plan, fp32
    and bf16 inputs) against its torch reference (verify.check_kernels_here); a Hyena LM decoder in
    fp32 and bf16, teacher-forced (verify.teacher_forced) against the same model in float64; the
    step as a captured CUDA graph (lcsm_compile.runtime.graphs, cuda_graph=True), teacher-forced and its
    step time against the eager step's;
(b) mixer (bench.mixer): flash vs lazy vs offline FFT at L in {16K, 64K}, C in {2048, 8192};
(c) generation (bench.generate): 8x256 and 18x864 Hyena LMs to 8192 tokens, flash in full, lazy and
    the naive loop estimated from sampled windows.
Prints one table, writes DIR/gpu.json; exits 1 if a check failed or a flash output was wrong.

Multi-GPU mode, --tp WORLD...: the sharded decode (lcsm_compile.tools.bench.sharded; optimize(tp=...))
of a Hyena LM on 1 and each WORLD GPUs, one process per GPU over NCCL: per-rank state, step time
and the logits against one GPU's. Writes DIR/gpu_tp.json.

Run: python benchmarks/gpu.py [--out DIR]             (needs a CUDA device)
     python benchmarks/gpu.py --tp 2 4 [--out DIR]    (needs as many CUDA devices as the largest WORLD)
     python benchmarks/gpu.py --dry-run [--tp 2] [--out DIR]   (the same code path on the CPU at tiny
                                                       sizes, the Triton kernels under TRITON_INTERPRET=1,
                                                       the ranks on gloo)
"""

import argparse
import os
import sys
import time

# torch and lcsm_compile are imported inside the functions: a dry run must set TRITON_INTERPRET
# before triton is first imported (lcsm_compile imports it).

SIZES = {
    "cuda": {"mixer_channels": [2048, 8192], "mixer_lengths": [16384, 65536],
             "lms": ["8x256", "18x864"], "lm_length": 8192, "prompt": 128, "vocab": 256,
             "check_lm": (8, 256), "check_length": 512, "kernel_channels": [2048, 8192],
             "window": ["--positions", "4", "--window-steps", "8", "--window-s", "0.25"],
             "sharded": ["--layers", "8", "--d", "1024", "--L", "16384", "--prompt", "128", "--steps", "512"]},
    "dry-run": {"mixer_channels": [16], "mixer_lengths": [64, 128],
                "lms": ["1x16", "2x16"], "lm_length": 64, "prompt": 8, "vocab": 32,
                "check_lm": (2, 16), "check_length": 48, "kernel_channels": [16],
                "window": ["--positions", "2", "--window-steps", "4", "--window-s", "0.02"],
                "sharded": ["--layers", "2", "--d", "32", "--L", "64", "--prompt", "8", "--steps", "16"]},
}
# Teacher-forced decoder error (the worst position, relative to the reference's rms position) vs the
# float64 model: fp32 as `lcsm-compile verify`; bf16 as tests/test_dtypes.py, whose worst
# whole-output error over the zoo was 7.4e-3.
DECODER_TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/gpu", help="folder for gpu.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreted: the same code path")
    p.add_argument("--tp", type=int, nargs="+", metavar="WORLD", help="multi-GPU mode: sharded decode on WORLD GPUs")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:  # before triton's first import (lcsm_compile imports it): the kernels run interpreted
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from lcsm_compile.errors import DeviceError

    if args.tp and not args.dry_run and torch.cuda.device_count() < max(args.tp):
        raise DeviceError(f"benchmarks/gpu.py --tp {max(args.tp)} needs {max(args.tp)} CUDA devices and found "
                          f"{torch.cuda.device_count()}; use --dry-run for the same code path on the CPU")
    if not args.dry_run and not torch.cuda.is_available():
        raise DeviceError("benchmarks/gpu.py needs a CUDA device and found none; use --dry-run for the same "
                          "checks and timings on the CPU at tiny sizes")
    from lcsm_compile.tools.bench import common

    device = "cpu" if args.dry_run else "cuda"
    size = SIZES["dry-run" if args.dry_run else "cuda"]
    if args.tp:
        return run_tp(args, device, size)
    # a dry run's tensors are too small to split between threads, and a busy CI machine stalls
    # multi-threaded CPU ops
    with torch.no_grad(), common.torch_threads(1 if args.dry_run else None):
        return run(args, device, size)


SHARDED_TOL = 1e-5  # fp32 logits of every world size against world 1's (tests/test_sharded.py: ~2e-7 on the CPU)


def run_tp(args, device, size):
    """Multi-GPU mode: the sharded benchmark at world 1 and each --tp world, one device per rank."""
    from lcsm_compile.tools.bench import common, sharded

    started = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - started:6.1f} s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    bench = sharded.parse_args([*size["sharded"], "--worlds", "1", *map(str, sorted(set(args.tp) - {1})),
                                "--device", device, "--threads", "1" if args.dry_run else "2"])
    rows = sharded.measure(bench, log)
    passed = all(r["rel_err"] <= SHARDED_TOL for r in rows)
    print(f"benchmarks/gpu.py --tp on {device}{' (dry run: tiny sizes, gloo, not a measurement)' if args.dry_run else ''}: "
          f"{bench.layers} layers, d_model {bench.d}, L {bench.L}")
    print(sharded.table(rows))
    print(f"{'PASS' if passed else 'FAIL'}: logits within {SHARDED_TOL:g} of world 1 at every world size")
    data = {"benchmark": "gpu_tp", "device": device, "dry_run": args.dry_run, "machine": common.machine_info(),
            "config": vars(bench), "results": rows, "tol": SHARDED_TOL, "passed": passed,
            "wall_s": time.perf_counter() - started}
    common.write_json(os.path.join(args.out, "gpu_tp.json"), data)
    return 0 if passed else 1


def run(args, device, size):
    import warnings

    from lcsm_compile.tools.bench import common, generate, mixer

    started = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - started:6.1f} s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    info = common.machine_info()
    log(f"device {device}{' (dry run)' if args.dry_run else ''}: {info.get('cuda_device', info['cpu_model'])}")

    kernels = check_kernels(device, size, log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # analysis notes on the model are not this script's output
        decoders = [check_decoder(device, size, dtype, log) for dtype in ("float32", "bfloat16")]
        graph = check_graph(device, size, args.dry_run, log)
        mixer_args = mixer.parse_args(["--channels", *map(str, size["mixer_channels"]),
                                       "--lengths", *map(str, size["mixer_lengths"]), "--device", device,
                                       "--budget-s", "0", "--no-validate", "--repeats", "1", *size["window"]])
        mixer_results = mixer.measure(mixer_args, log)
        gen_args = generate.parse_args(["--configs", ",".join(size["lms"]), "--lengths", str(size["lm_length"]),
                                        "--prompt", str(size["prompt"]), "--vocab", str(size["vocab"]),
                                        "--device", device, "--full-limit-s", "0", "--validate-limit-s", "0",
                                        "--eager-calls", "5", "--no-progress", *size["window"]])
        gen_results, gen_fits = generate.measure(gen_args, log)

    rows = table_rows(kernels, decoders, graph, mixer_results, gen_results, mixer.MAX_REL_ERR["float32"],
                      generate.MAX_REL_ERR)
    passed = all(r["ok"] for r in rows)
    print(f"benchmarks/gpu.py on {device}{' (dry run: tiny sizes, not a measurement)' if args.dry_run else ''}: "
          f"{info.get('cuda_device', info['cpu_model'])}, torch {info['torch']}. Times in seconds; "
          "'~' = estimated from sampled steps (see 'est').")
    print(table(rows))
    print(f"{'PASS' if passed else 'FAIL'}: {sum(r['ok'] for r in rows)} of {len(rows)} rows ok")
    data = {"benchmark": "gpu", "device": device, "dry_run": args.dry_run, "machine": info,
            "checks": {"kernels": kernels, "decoders": decoders, "graph": graph},
            "mixer": mixer_results, "generate": {"results": gen_results, "fits": gen_fits},
            "rows": rows, "passed": passed, "wall_s": time.perf_counter() - started}
    common.write_json(os.path.join(args.out, "gpu.json"), data)
    log(f"wrote {os.path.join(args.out, 'gpu.json')}")
    return 0 if passed else 1


# -- (a) checks ---------------------------------------------------------------------------------


def check_kernels(device, size, log):
    """Every Triton specialisation the timed decodes launch (the red cell per IO dtype, the direct
    tile per size up to the device's crossover), once each against its torch reference."""
    from lcsm_compile import verify
    from lcsm_compile.tools.cli import kernel_plan
    from lcsm_compile.tuning import crossover_for

    crossover = crossover_for(device)
    specs = []
    for C in size["kernel_channels"]:
        for io in ("float32", "bfloat16"):
            plan, _ = kernel_plan([("bank", C, io)], max_len=max(size["mixer_lengths"]), crossover=crossover,
                                  state_dtype="float32")
            specs += [s for s in plan if s["kernel"] == "update" or io == "float32"]  # tiles read state only
    res = verify.check_kernels_here(specs, device=device)
    log(f"kernels: {sum(r['passed'] for r in res['results'])} of {len(specs)} specialisations match ({res['device']})")
    return res["results"]


def check_decoder(device, size, dtype_name, log):
    """A Hyena LM in `dtype_name` optimized on `device`, teacher-forced from two prompt lengths
    against the same weights in float64."""
    import torch

    import lcsm_compile
    from lcsm_compile import verify
    from lcsm_compile.models.hyena import demo_lm

    layers, d = size["check_lm"]
    L, vocab = size["check_length"], size["vocab"]
    model = demo_lm(n_layer=layers, d_model=d, vocab=vocab, max_len=L).to(device=device, dtype=getattr(torch, dtype_name))
    ids = torch.randint(0, vocab, (1, L), generator=torch.Generator().manual_seed(1)).to(device)
    decoder = lcsm_compile.optimize(model, (ids[:, : size["prompt"]],), max_len=L, validate=False)
    res = verify.teacher_forced(model, decoder, (ids,), prompt_lens=(1, L // 2), tol=DECODER_TOL[dtype_name], scale="rms")
    log(f"decoder {layers}x{d} {dtype_name}: teacher-forced rel err {res['max_rel_err']:.2e} (tol {res['tol']:g})")
    return {"config": f"{layers}x{d}", "dtype": dtype_name, "length": L, **res}


def check_graph(device, size, dry_run, log):
    """The step as a captured CUDA graph (lcsm_compile.runtime.graphs; emulated in a dry run): the float32
    check LM teacher-forced through it, and its step time against the eager step's, both measured
    over the same positions after a warm-up."""
    import torch

    import lcsm_compile
    from lcsm_compile import verify
    from lcsm_compile.tools.bench import common
    from lcsm_compile.models.hyena import demo_lm

    layers, d = size["check_lm"]
    L, vocab, P = size["check_length"], size["vocab"], size["prompt"]
    model = demo_lm(n_layer=layers, d_model=d, vocab=vocab, max_len=L).to(device)
    ids = torch.randint(0, vocab, (1, L), generator=torch.Generator().manual_seed(2)).to(device)
    mode = "emulate" if dry_run else True
    graphed = lcsm_compile.optimize(model, (ids[:, :P],), max_len=L, cuda_graph=mode, compile=False, validate=False)
    res = verify.teacher_forced(model, graphed, (ids,), prompt_lens=(1, L // 2), tol=DECODER_TOL["float32"], scale="rms")
    times = {}
    for name, dec in (("graph", graphed), ("eager", lcsm_compile.Decoder(graphed.plan, graphed.report, example_inputs=(ids[:, :P],),
                                                                        compile=False))):
        session = dec.session()
        session.prefill(ids[:, :P])
        for t in range(P, P + 8):  # warm-up (and the capture)
            session.step(ids[:, t : t + 1])
        start = common.clock()
        for t in range(P + 8, L):
            session.step(ids[:, t : t + 1])
        times[name] = (common.clock() - start) / (L - P - 8)
    log(f"captured step {layers}x{d}: teacher-forced rel err {res['max_rel_err']:.2e}; step {times['graph'] * 1e6:.0f} us "
        f"vs eager {times['eager'] * 1e6:.0f} us")
    return {"config": f"{layers}x{d}", "length": L, "mode": str(mode), "step_s": times["graph"],
            "eager_step_s": times["eager"], **res}


# -- the table ----------------------------------------------------------------------------------


def table_rows(kernels, decoders, graph, mixer_results, gen_results, mixer_tol, gen_tol):
    """One row per check and per timed configuration; `ok`: the check passed / the flash output matched."""
    rows = []
    for k in kernels:
        ce = " ".join(f"{a}={b}" for a, b in k["constexprs"].items())
        rows.append({"part": "kernel", "case": f"{k['kernel']} {ce} C={k['channels']} io={k['io_dtype'] or k['state_dtype']}",
                     "rel_err": k["rel_err"], "tol": k["tol"], "ok": k["passed"]})
    for d in decoders:
        rows.append({"part": "decoder", "case": f"{d['config']} {d['dtype']} L={d['length']} teacher-forced",
                     "rel_err": d["max_rel_err"], "tol": d["tol"], "ok": d["passed"]})
    rows.append({"part": "graph", "case": f"{graph['config']} float32 L={graph['length']} captured step ({graph['mode']})",
                 "rel_err": graph["max_rel_err"], "tol": graph["tol"], "ok": graph["passed"], "flash_s": graph["step_s"],
                 "other": "eager step", "other_s": graph["eager_step_s"], "ratio_name": "eager/graph",
                 "ratio": graph["eager_step_s"] / graph["step_s"]})
    for r in mixer_results:
        m = r["methods"]
        rows.append({"part": "mixer", "case": f"C={r['C']} L={r['L']}", "rel_err": m["flash"]["rel_err"], "tol": mixer_tol,
                     "ok": not m["flash"]["wrong"], "flash_s": m["flash"]["time_s"], "lazy_s": m["lazy"]["time_s"],
                     "other_s": m["offline"]["time_s"], "other": "offline", "lazy/flash": r["ratios"]["lazy/flash"],
                     "ratio": r["ratios"]["flash/offline"], "ratio_name": "flash/offline",
                     "est": [k for k in ("lazy",) if m[k]["estimated"]]})
    for r in gen_results:
        m = r["methods"]
        rows.append({"part": "generate", "case": f"{r['config']} L={r['L']}", "rel_err": m["flash"]["rel_err"],
                     "tol": gen_tol, "ok": not m["flash"]["wrong"], "flash_s": m["flash"]["time_s"],
                     "lazy_s": m["lazy"]["time_s"], "other_s": m["naive"]["time_s"], "other": "naive",
                     "lazy/flash": r["ratios"]["lazy/flash"], "ratio": r["ratios"]["naive/flash"],
                     "ratio_name": "naive/flash", "est": [k for k in ("lazy", "naive") if m[k]["estimated"]]})
    return rows


def table(rows):
    from lcsm_compile.tools.bench import common

    headers = ["part", "case", "rel_err", "tol", "ok", "flash_s", "lazy_s", "other_s", "lazy/fl", "ratio", "est"]
    cells = []
    for r in rows:
        est = r.get("est", [])
        e = lambda k: k in est  # noqa: E731
        other = r.get("other")
        cells.append([
            r["part"], r["case"], "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}",
            "-" if r["tol"] is None else f"{r['tol']:g}", "ok" if r["ok"] else "FAIL",
            common.fmt_num(r.get("flash_s")), common.fmt_num(r.get("lazy_s"), e("lazy")),
            "-" if other is None else f"{other} {common.fmt_num(r['other_s'], e(other))}",
            common.fmt_num(r.get("lazy/flash"), e("lazy")),
            "-" if other is None else f"{r['ratio_name']} {common.fmt_num(r['ratio'], e(other))}",
            ",".join(est) or "-",
        ])
    return common.format_table(headers, cells)


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except Exception as e:
        from lcsm_compile.errors import LcsmError  # imported here: main() sets TRITON_INTERPRET first

        if not isinstance(e, LcsmError):
            raise
        print(f"gpu.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
