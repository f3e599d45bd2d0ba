"""Prefill that continues a session (Session.extend, prefill(chunk=K)), side by side in one run:

1. Peak memory of a prefill against the prompt length, whole (one program call over the prompt)
   and chunked (K positions per extend), each in a fresh process whose allocations of 64 KiB and
   more are mappings of their own (MALLOC_MMAP_THRESHOLD_), so that its RSS follows the live
   tensors: the rise of the peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS
   before the prefill (the session's state already allocated), against that state and the
   returned outputs. Relative error of the chunked logits against the whole prefill's on the last
   positions. Seconds in that table are under the same allocator setting.
2. Continuing a live session by k positions: one extend against k steps (the step program,
   eager), at a session position of --at.

The model is a Hyena LM (lcsm_compile.models.hyena.demo_lm) with a DNA-sized vocabulary, so the
logits do not dwarf everything else. Linux only (/proc). Run alone on a quiet machine:
    python benchmarks/prefill.py [--prompts 4096 16384 65536] [--chunk 2048] [--layers 4] [--d 128]
        [--at 4096] [--ks 1 4 16 64 256 1024] [--threads 2] [--out bench_out/]
"""

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lcsm_compile  # noqa: E402
from lcsm_compile.tools.bench import common  # noqa: E402
from lcsm_compile.models.hyena import demo_lm  # noqa: E402

VOCAB = 16
STATE_PARTS = ("state", "block", "rings", "recurrent", "kv_cache")  # a session's own state, not the shared filters


def build(args, max_len):
    model = demo_lm(n_layer=args.layers, d_model=args.d, vocab=VOCAB, max_len=max_len)
    ids = torch.randint(0, VOCAB, (1, max_len), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder = lcsm_compile.optimize(model, (ids[:, :64],), max_len=max_len, validate=False, compile=False)
    return decoder, ids


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def one_prefill(args, P, chunk):
    """In this (fresh) process: the prefill of a P-position prompt, whole (chunk None) or chunked."""
    decoder, ids = build(args, P)
    session = decoder.session()
    with torch.no_grad():
        session.prefill(ids[:, :8])  # allocates the state, so the RSS before counts it once
        state = sum(session.memory_breakdown().get(k, 0) for k in STATE_PARTS)
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS restarts from the current RSS
        start = time.perf_counter()
        out = session.prefill(ids[:, :P], chunk=chunk)
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
    return {"prompt": P, "chunk": chunk, "seconds": seconds, "peak_rise_bytes": (peak - before) * 1024,
            "state_bytes": state, "output_bytes": out.numel() * out.element_size(), "tail": out[0, -16:].tolist()}


def memory_table(args):
    results = []
    for P in args.prompts:
        for chunk in (None, args.chunk):
            cmd = [sys.executable, __file__, "--one", str(P), str(chunk or 0), "--layers", str(args.layers), "--d",
                   str(args.d), "--threads", str(args.threads)]
            # every allocation of 64 KiB or more is its own mapping, returned to the system when freed, so
            # the RSS follows the live tensors instead of the allocator's reuse of freed heap
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for r in results:
        whole = next(w for w in results if w["prompt"] == r["prompt"] and w["chunk"] is None)
        r["rel_err_vs_whole"] = common.rel_err(torch.tensor(r["tail"]), torch.tensor(whole["tail"]))
        r["peak_over_state"] = (r["peak_rise_bytes"]) / r["state_bytes"]
        r["peak_over_state_and_outputs"] = r["peak_rise_bytes"] / (r["state_bytes"] + r["output_bytes"])
        r["peak_vs_whole"] = r["peak_rise_bytes"] / whole["peak_rise_bytes"]
        rows.append([r["prompt"], "whole" if r["chunk"] is None else f"chunk {r['chunk']}", f"{r['seconds']:.2f}",
                     f"{r['state_bytes'] / 2**20:.1f}", f"{r['output_bytes'] / 2**20:.1f}",
                     f"{r['peak_rise_bytes'] / 2**20:.1f}", f"{r['peak_over_state']:.2f}",
                     f"{r['peak_over_state_and_outputs']:.2f}", f"{r['peak_vs_whole']:.2f}", f"{r['rel_err_vs_whole']:.1e}"])
    print(f"prefill peak memory (Hyena LM, {args.layers} layers, d_model {args.d}, vocab {VOCAB}, max_len = prompt, "
          f"{args.threads} threads; each row a fresh process)")
    print(common.format_table(["prompt", "prefill", "s", "state MiB", "outputs MiB", "peak rise MiB", "peak/state",
                               "peak/(state+out)", "x whole", "rel err vs whole"], rows))
    return results


def extend_table(args):
    decoder, ids = build(args, args.at + max(args.ks))
    results = []

    def restart():
        session = decoder.session()
        session.prefill(ids[:, : args.at])
        return session

    with torch.no_grad():
        for k in args.ks:
            piece = ids[:, args.at : args.at + k]

            def steps(session):
                for t in range(k):
                    session.step(piece[:, t : t + 1])

            ext = _best_after(restart, lambda session: session.extend(piece))
            stp = _best_after(restart, steps)
            results.append({"k": k, "extend_s": ext, "steps_s": stp, "speedup": stp / ext})
    print(f"\ncontinuing a session at position {args.at} by k positions (extend against k eager steps)")
    print(common.format_table(["k", "extend ms", "k steps ms", "steps / extend"],
                              [[r["k"], f"{r['extend_s'] * 1e3:.2f}", f"{r['steps_s'] * 1e3:.2f}", f"{r['speedup']:.1f}"]
                               for r in results]))
    return results


def _best_after(setup, fn, repeats=3):
    """Best time of fn(setup()) over repeats + 1 runs (the first a warm-up), setup untimed."""
    best = float("inf")
    for i in range(repeats + 1):
        arg = setup()
        start = common.clock()
        fn(arg)
        if i:
            best = min(best, common.clock() - start)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--at", type=int, default=4096)
    ap.add_argument("--ks", type=int, nargs="*", default=[1, 4, 16, 64, 256, 1024])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--one", type=int, nargs=2, metavar=("PROMPT", "CHUNK"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    with common.torch_threads(args.threads):
        if args.one:
            print(json.dumps(one_prefill(args, args.one[0], args.one[1] or None)))
            return
        t_all = time.perf_counter()
        memory = memory_table(args)
        extend = extend_table(args) if args.ks else []
    data = {"args": vars(args), "machine": common.machine_info(), "memory": memory, "extend": extend,
            "wall_s": time.perf_counter() - t_all}

    def plot(path):
        series = [{"x": [r["prompt"] for r in memory if (r["chunk"] is None) == whole],
                   "y": [r["peak_rise_bytes"] for r in memory if (r["chunk"] is None) == whole],
                   "label": "whole prefill" if whole else f"prefill(chunk={args.chunk})"} for whole in (True, False)]
        series.append({"x": [r["prompt"] for r in memory if r["chunk"] is None],
                       "y": [r["state_bytes"] for r in memory if r["chunk"] is None], "label": "session state"})
        common.plot_loglog(path, series, xlabel="prompt length", ylabel="bytes", title="prefill peak memory rise")

    common.write_outputs(args.out, "prefill", data, plot, print)


if __name__ == "__main__":
    main()
