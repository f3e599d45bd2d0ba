"""`lcsm-compile demo`: the main job on the bundled Hyena LM.

Optimize the model (analysis, decode rewrite, layer schedule, compiled step program), print the
report and the schedule, verify teacher-forced exactness against the model's own forward, generate
a few thousand tokens with a progress bar, and time the same generation with the naive loop that
recomputes the model on the growing prefix. Exits 1 if the decoder is not exact.
"""

import json
import time
import warnings

import torch

import lcsm_compile
from lcsm_compile import generation, verify
from lcsm_compile.models import demo_lm


def add_arguments(parser):
    """The demo's options, for `lcsm-compile demo`."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=128, help="prompt length")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens to generate after the prompt")
    parser.add_argument("--verify-len", type=int, default=1024, help="positions of the teacher-forced check")
    parser.add_argument("--no-compile", action="store_true", help="run the step program eagerly")
    parser.add_argument("--no-naive", action="store_true", help="skip the (slow) naive loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON summary instead of the report")


def main(args):
    L = args.prompt + args.tokens
    if args.prompt < 1 or args.tokens < 1:
        raise lcsm_compile.LcsmError("demo: --prompt and --tokens must be at least 1")
    say = (lambda *a: None) if args.json else print  # --json: one JSON object on stdout, nothing else
    g = torch.Generator().manual_seed(args.seed)
    model = demo_lm(args.layers, args.d_model, args.vocab, max_len=L, seed=args.seed)
    say(f"lcsm-compile demo: Hyena LM, {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, max_len {L}, {torch.get_num_threads()} threads")
    result = {"layers": args.layers, "d_model": args.d_model, "vocab": args.vocab, "prompt": args.prompt,
              "tokens": args.tokens, "max_len": L, "threads": torch.get_num_threads()}

    start = time.perf_counter()
    example = torch.randint(0, args.vocab, (1, min(64, L)), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's deprecation chatter; the report says what matters
        decoder = lcsm_compile.optimize(model, (example,), max_len=L, compile=not args.no_compile)
    result["optimize_s"] = round(time.perf_counter() - start, 3)
    result["long_convs"] = len([c for c in decoder.report.accepted if c.kind == "long"])
    say(f"\n== report (analysis + decode rewrite: {result['optimize_s']:.1f} s)")
    say(decoder.report.table())
    say("\n== layer schedule")
    say(decoder.schedule.table())

    n = min(args.verify_len, L)
    ids = torch.randint(0, args.vocab, (1, n), generator=g)
    start = time.perf_counter()
    check = verify.teacher_forced(model, decoder, (ids,), (1, min(37, n)))
    ok = check["passed"]
    result["exactness"] = {"positions": n, "tol": check["tol"], "passed": ok,
                           "runs": [{k: r[k] for k in ("prompt_len", "steps", "max_rel_err")} for r in check["runs"]]}
    say(f"\n== exactness (teacher-forced against the float64 model, {n} positions; the first session "
        f"compiles the step: {time.perf_counter() - start:.1f} s)")
    for run in check["runs"]:
        say(f"prefill {run['prompt_len']:>3} + {run['steps']} steps: max relative error per position "
            f"{run['max_rel_err']:.1e}")
    say(f"exact (< {check['tol']:.0e})" if ok else "NOT EXACT")

    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g)
    say(f"\n== generating {args.tokens} tokens after a {args.prompt}-token prompt")
    session = decoder.session()
    with torch.no_grad():
        start = time.perf_counter()
        ours = generation.generate(session.prefill, session.step, prompt, args.tokens, progress=not args.json)
        ours_s = time.perf_counter() - start
    result["state_bytes"] = session.memory_bytes()
    parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in session.memory_breakdown().items())
    say(f"state held by the session: {result['state_bytes'] / 2**20:.1f} MiB ({parts})")
    rows = [("lcsm (flash)", ours_s)]
    result["lcsm_s"] = round(ours_s, 4)
    if not args.no_naive:
        with torch.no_grad():
            start = time.perf_counter()
            naive = generation.naive_generate(model, prompt, args.tokens, progress=not args.json)
            rows.append(("naive loop", time.perf_counter() - start))
        same = int((naive == ours).all(0).sum()) - args.prompt
        result.update(naive_s=round(rows[1][1], 4), tokens_identical=same, speedup=round(rows[1][1] / ours_s, 3))
        say(f"tokens identical to the naive loop: {same}/{args.tokens}")
    say(f"\n{'method':<14} {'seconds':>9} {'ms/token':>9}")
    for name, s in rows:
        say(f"{name:<14} {s:>9.2f} {s / args.tokens * 1e3:>9.2f}")
    if "speedup" in result:
        say(f"speedup over the naive loop: {result['speedup']:.1f}x")
    if args.json:
        print(json.dumps(result))
    if not ok:
        raise SystemExit(1)
