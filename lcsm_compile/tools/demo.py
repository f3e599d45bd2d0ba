"""`lcsm-compile demo`: the main job on the bundled Hyena LM.

Optimize the model (analysis, decode rewrite, layer schedule, compiled step program), print the
report and the schedule, verify teacher-forced exactness against the model's own forward, generate
a few thousand tokens with a progress bar, and time the same generation with the naive loop that
recomputes the model on the growing prefix. Exits 1 if the decoder is not exact.
"""

import json
import os
import sys
import time
import warnings

import torch
from tqdm import tqdm

import lcsm_compile
from lcsm_compile import generation, verify
from lcsm_compile.models import demo_lm


def add_arguments(parser):
    """The demo's options, for `lcsm-compile demo`."""
    parser.add_argument("--layers", type=int, default=4, help="Hyena blocks of the model (default 4)")
    parser.add_argument("--d-model", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size (default 256)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens to generate after the prompt")
    parser.add_argument("--verify-len", type=int, default=1024, help="positions of the teacher-forced check")
    parser.add_argument("--no-compile", action="store_true", help="run the step program eagerly")
    parser.add_argument("--no-naive", action="store_true", help="skip the (slow) naive loop")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a busy machine times "
                                                    "the methods more fairly)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, prompt and inputs (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary instead of the report")


def main(args):
    L = args.prompt + args.tokens
    if args.prompt < 1 or args.tokens < 1:
        raise lcsm_compile.LcsmError("demo: --prompt and --tokens must be at least 1")
    say = (lambda *a, **k: None) if args.json else print  # --json: one JSON object on stdout, nothing else
    if args.threads is not None:
        if args.threads < 1:
            raise lcsm_compile.LcsmError(f"demo: --threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    busy = _busy()
    if busy:
        print(f"lcsm-compile demo: warning: {busy}", file=sys.stderr)
    g = torch.Generator().manual_seed(args.seed)
    model = demo_lm(args.layers, args.d_model, args.vocab, max_len=L, seed=args.seed)
    say(f"lcsm-compile demo: Hyena LM, {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, max_len {L}, {torch.get_num_threads()} threads")
    result = {"layers": args.layers, "d_model": args.d_model, "vocab": args.vocab, "prompt": args.prompt,
              "tokens": args.tokens, "max_len": L, "threads": torch.get_num_threads(), "unreliable_timings": busy}

    start = time.perf_counter()
    example = torch.randint(0, args.vocab, (1, min(64, L)), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's deprecation chatter; the report says what matters
        decoder = lcsm_compile.optimize(model, (example,), max_len=L, compile=not args.no_compile)
    result["optimize_s"] = round(time.perf_counter() - start, 3)
    result["long_convs"] = len([c for c in decoder.report.accepted if c.kind == "long"])
    say(f"\n== what the analysis found ({result['optimize_s']:.1f} s: capture, checks, decode rewrite)")
    say(_convolutions(decoder, L))
    say("\n== per-token work (the layer schedule)")
    say(_schedule(decoder.schedule.to_json()))

    n = min(args.verify_len, L)
    ids = torch.randint(0, args.vocab, (1, n), generator=g)
    if not args.no_compile:  # on its own, so the exactness check's progress bars measure decoding
        say("\n== compiling the step program with inductor (once per batch size; inductor caches it on disk, "
            "so a second run compiles faster)", flush=True)
        start = time.perf_counter()
        with torch.no_grad():
            warm = decoder.session()
            warm.prefill(ids[:, :1])
            warm.step(ids[:, 1:2])
        result["compile_s"] = round(time.perf_counter() - start, 3)
        say(f"compiled in {result['compile_s']:.1f} s")
    progress = None if args.json else (lambda it, desc: tqdm(it, desc=f"exactness, {desc}", unit="pos", leave=False))
    start = time.perf_counter()
    check = verify.teacher_forced(model, decoder, (ids,), (1, min(37, n)), progress=progress)
    ok = check["passed"]
    result["exactness"] = {"positions": n, "tol": check["tol"], "passed": ok,
                           "runs": [{k: r[k] for k in ("prompt_len", "steps", "max_rel_err")} for r in check["runs"]]}
    say(f"\n== exactness (teacher-forced: prefill P positions, then one step per position, against the model "
        f"run on the whole sequence in float64; {n} positions, {time.perf_counter() - start:.1f} s)")
    for run in check["runs"]:
        say(f"prefill {run['prompt_len']:>3} + {run['steps']} steps: max relative error per position "
            f"{run['max_rel_err']:.1e}")
    say(f"exact (< {check['tol']:.0e})" if ok else "NOT EXACT")

    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g)
    say(f"\n== generating {args.tokens} tokens after a {args.prompt}-token prompt")
    session = decoder.session()
    with torch.no_grad():
        start = time.perf_counter()
        ours = generation.generate(session.prefill, session.step, prompt, args.tokens,
                                   progress=False if args.json else "lcsm decoder")
        ours_s = time.perf_counter() - start
    result["state_bytes"] = session.memory_bytes()
    parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in session.memory_breakdown().items())
    say(f"state held by the session: {result['state_bytes'] / 2**20:.1f} MiB ({parts})")
    rows = [("lcsm (flash)", ours_s)]
    result["lcsm_s"] = round(ours_s, 4)
    if not args.no_naive:
        with torch.no_grad():
            start = time.perf_counter()
            naive = generation.naive_generate(model, prompt, args.tokens,
                                              progress=False if args.json else "naive loop (the model on the whole prefix per token)")
            rows.append(("naive loop", time.perf_counter() - start))
        same = int((naive == ours).all(0).sum()) - args.prompt
        result.update(naive_s=round(rows[1][1], 4), tokens_identical=same, speedup=round(rows[1][1] / ours_s, 3))
        say(f"tokens identical to the naive loop: {same}/{args.tokens}")
    say(f"\n{'method':<14} {'seconds':>9} {'ms/token':>9}")
    for name, s in rows:
        say(f"{name:<14} {s:>9.2f} {s / args.tokens * 1e3:>9.2f}")
    if "speedup" in result:
        say(f"speedup over the naive loop: {result['speedup']:.1f}x" + (f" (unreliable: {busy})" if busy else ""))
    if args.json:
        print(json.dumps(result), file=args.stdout)
    if not ok:
        raise SystemExit(1)


def _busy():
    """Why timings on this machine are unreliable now (None when they are not): more runnable work
    than cores, so the two methods are timed while sharing the CPUs with other processes."""
    load, cores = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"the 1-minute load average {load:.1f} exceeds the {cores} cores: timings are unreliable "
            "(--threads 1, or a quiet machine)")


def _convolutions(decoder, max_len):
    """The accepted convolutions in plain numbers (the full Report: `lcsm-compile detect`)."""
    convs = [c for c in decoder.report.accepted if c.kind in ("long", "short")]
    how = {"long": "the Flash Inference tiling, one bank for every layer", "short": "a ring buffer of its last inputs"}
    rows = [("module", "kind", "channels", "filter length", "decoded with")]
    rows += [(c.module_path, c.kind, str(c.channels), str(c.conv.h.shape[-1]), how[c.kind]) for c in convs]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"decodable: each of the {len(convs)} ops that mix positions is a causal convolution "
             f"(the output at t reads inputs <= t only), checked for every length up to max_len {max_len}"]
    lines += [f"  {r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}  {r[4]}" for r in rows]
    lines.append("(`lcsm-compile detect MODEL` prints the analysis' full report: proofs, symbolic lengths, checks)")
    return "\n".join(lines)


def _schedule(data):
    """The layer schedule (decoder.schedule) in words and plain numbers."""
    n, rounds = len(data["sites"]), len(data["levels"])
    lines = [f"a token passes the {n} convolutions in {rounds} rounds, one after another (a convolution waits "
             "for the output it reads): that chain is the per-token work no method batches away"]
    groups = data["tile_groups"]
    if groups:
        lines.append(f"then one call per step adds the token's contribution to the future outputs of all "
                     f"{len(groups[0]['sites'])} long convolutions ({groups[0]['channels']} channels), "
                     "by a tile whose size depends on the step:")
        lines.append(f"  {'tile size':>9}  {'computed':<8}  steps after the prompt")
        for gr in groups:
            first, every = gr["first_step"], gr["every"]
            how = "directly" if gr["kernel"] == "direct" else "by FFT"
            lines.append(f"  {gr['size']:>9}  {how:<8}  {first}, {first + every}, {first + 2 * every}, ... (one in {every})")
    return "\n".join(lines)
