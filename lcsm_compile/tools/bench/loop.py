"""The naive generation loop, unchanged user code, under three executions of the same model.

    ids = prompt
    for t in range(P, L):
        logits = m(ids)                                   # the whole prefix, every step
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)

Methods (all in one run, same model, same prompt):
- eager:    m = model;
- lcsm:     m = torch.compile(model, backend="lcsm", dynamic=True): only the new position is
            computed, through the decode programs (lcsm_compile.backend), the step program
            compiled by inductor at the second call;
- lcsm_eager_step: the same with options compile_step=False (no compile time, slower steps);
- inductor: m = torch.compile(model, backend="inductor", dynamic=True): the same O(t log t)
            forward per step, compiled.
Every method runs in full up to --full-len (its tokens are checked against lcsm's there); beyond
it, eager and inductor are ESTIMATED from timed windows of teacher-forced calls spread over [P, L)
(common.estimate_total with the t log t basis), marked '~' and listed in the "est" column. Both
lcsm methods always run in full to L. "first_s" is the first call: compile (dynamo + the backend) +
prompt; the step program's compilation (lcsm) falls in the loop's second call.

Run: python benchmarks/backend_loop.py [--length 8192] [--out bench_out/backend_loop]
"""

import argparse
import math
import os
import sys

import torch

from lcsm_compile.tools.bench import common
from lcsm_compile.generation import NaiveSession

METHODS = ("eager", "lcsm", "lcsm_eager_step", "inductor")
LCSM_METHODS = ("lcsm", "lcsm_eager_step")  # the backend, with and without its compiled step: run in full


def make_callable(model, method, max_len):
    if method == "eager":
        return model
    torch._dynamo.reset()  # a fresh cache per method: no graph is shared between them
    if method in LCSM_METHODS:
        import lcsm_compile.backend  # noqa: F401  registers "lcsm"

        options = {"max_len": max_len, "compile_step": method == "lcsm"}
        return torch.compile(model, backend="lcsm", dynamic=True, options=options)
    if method == "inductor":
        return torch.compile(model, backend="inductor", dynamic=True)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def greedy_loop(m, prompt, length, checkpoints=(), clock=common.clock, progress=None):
    """Run the naive greedy loop (generation.NaiveSession: m on the whole prefix per token) to
    `length` positions. Returns (ids, first_s, cumulative seconds at each checkpoint length,
    measured from the end of the first call)."""
    session = NaiveSession(m)
    P = prompt.shape[1]
    cum, marks = {}, sorted(c for c in checkpoints if P < c <= length)
    with torch.no_grad():
        t0 = clock()
        logits = session.prefill(prompt)
        first = clock() - t0
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        start = clock()
        for t in range(P + 1, length):  # the prefix has t positions once nxt is appended
            logits = session.step(nxt)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            if marks and t + 1 == marks[0]:
                cum[marks.pop(0)] = clock() - start
                if progress:
                    progress(f"  {t + 1} positions: {cum[t + 1]:.2f}s")
    cum[length] = clock() - start
    ids = torch.cat([session.prefix, nxt], 1)
    return ids, first, cum


def estimate_loop(m, tokens, P, length, checkpoints, full, full_s, budget_window_s=0.5):
    """Cumulative seconds of the loop's calls m(tokens[:, :t]) for t in (P, c] per checkpoint c past
    `full`: the `full_s` seconds measured up to `full` plus the fitted cost of the calls from there
    (the fit serves the tail only, so an estimate never undercuts what was measured)."""
    def step(t):
        with torch.no_grad():
            m(tokens[:, : max(t + 1, P + 1)])

    est = common.estimate_total(step, length, basis=common.NLOGN, max_window_s=budget_window_s)
    done = common.integrate_cost(est["coef"], est["basis"], full)
    cum = {c: full_s + common.integrate_cost(est["coef"], est["basis"], c) - done for c in checkpoints}
    return cum, est


def compare(model, example_ids, length, methods=METHODS, progress=True, *, full_len=512, max_len=None,
            checkpoints=None):
    """Time the naive greedy loop of every method from the prompt `example_ids` [B, P] to `length`
    positions. Returns a dict with per-method first-call seconds, cumulative loop seconds at each
    checkpoint (flagged estimated or not), token agreement with lcsm, and ratios over lcsm."""
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else None
    P = example_ids.shape[1]
    max_len = max_len or getattr(model, "max_len", None) or length
    if checkpoints is None:
        checkpoints = [2 ** k for k in range(int(math.log2(P)) + 1, int(math.log2(length)) + 1)]
        checkpoints = sorted({c for c in checkpoints if P < c < length} | {length})
    results, tokens = {}, {}
    order = ["lcsm"] + [m for m in methods if m != "lcsm"] if "lcsm" in methods else list(methods)
    for method in order:
        if say:
            say(f"{method}: compiling / first call")
        m = make_callable(model, method, max_len)
        full = length if method in LCSM_METHODS else min(full_len, length)
        ids, first, cum = greedy_loop(m, example_ids, full, checkpoints, progress=say)
        tokens[method] = ids
        res = {"first_s": first, "full_len": full, "cum": {}, "estimated": {}}
        for c in checkpoints:
            if c <= full:
                res["cum"][c], res["estimated"][c] = cum.get(c, cum[full]), False
        if full < length:
            if "lcsm" not in tokens:
                raise ValueError("estimating a baseline past --full-len needs the lcsm run's tokens (include lcsm)")
            if say:
                say(f"{method}: estimating the loop to {length} from timed windows")
            est_cum, est = estimate_loop(m, tokens["lcsm"], P, length, [c for c in checkpoints if c > full],
                                         full, cum[full])
            for c, v in est_cum.items():
                res["cum"][c], res["estimated"][c] = v, True
            res["estimate"] = est
        if method != "lcsm" and "lcsm" in tokens:
            a, b = tokens["lcsm"][:, P:full], ids[:, P:full]
            same = (a == b)
            res["tokens_checked"] = int(same.numel())
            res["tokens_agree"] = bool(same.all())
            mism = (~same.all(0)).nonzero()
            res["first_mismatch"] = int(P + mism[0, 0]) if len(mism) else None
        if method == "lcsm":
            from lcsm_compile import backend

            rec = backend.records[-1] if backend.records else None
            res["backend"] = {"kind": rec.kind, "reason": rec.reason, "build_s": rec.seconds, "times": rec.times} if rec else None
        results[method] = res
        if say:
            say(f"{method}: first call {first:.2f}s, loop to {length}: "
                f"{'~' if res['estimated'][length] else ''}{res['cum'][length]:.2f}s")
    torch._dynamo.reset()
    for method, res in results.items():
        if method != "lcsm" and "lcsm" in results:
            res["over_lcsm"] = {c: res["cum"][c] / results["lcsm"]["cum"][c] for c in checkpoints}
    return {"prompt": P, "length": length, "batch": int(example_ids.shape[0]), "checkpoints": checkpoints,
            "methods": results, "machine": common.machine_info()}


def table(out):
    methods = list(out["methods"])
    headers = ["L"] + [f"{m}_s" for m in methods] + [f"{m}/lcsm" for m in methods if m != "lcsm"] + ["est"]
    rows = []
    for c in out["checkpoints"]:
        row, est = [c], []
        for m in methods:
            r = out["methods"][m]
            e = r["estimated"][c]
            row.append(common.fmt_num(r["cum"][c], e))
            if e:
                est.append(m)
        for m in methods:
            if m != "lcsm":
                r = out["methods"][m]
                row.append(common.fmt_num(r["over_lcsm"][c], r["estimated"][c]) if "over_lcsm" in r else "-")
        row.append(",".join(est) or "-")
        rows.append(row)
    lines = [common.format_table(headers, rows), ""]
    for m in methods:
        r = out["methods"][m]
        extra = ""
        if "tokens_agree" in r:
            extra = (f"; tokens agree with lcsm on positions [{out['prompt']}, {r['full_len']}): {r['tokens_agree']}"
                     + ("" if r["tokens_agree"] else f" (first mismatch at {r['first_mismatch']})"))
        lines.append(f"{m}: first call (compile + prompt) {r['first_s']:.2f}s; run in full to {r['full_len']}{extra}")
    b = out["methods"].get("lcsm", {}).get("backend")
    if b:
        lines.append(f"lcsm backend: {b['kind']} {b['reason']} build {b['build_s']:.2f}s "
                     + " ".join(f"{k}={v:.2f}" for k, v in b["times"].items()))
    return "\n".join(lines)


def plot(out, path):
    series = []
    for m, r in out["methods"].items():
        xs = [c for c in out["checkpoints"] if c in r["cum"]]
        series.append({"x": xs, "y": [r["cum"][c] for c in xs], "label": f"{m} (naive loop)",
                       "estimated": [r["estimated"][c] for c in xs]})
    common.plot_loglog(path, series, xlabel="positions generated to (L)", ylabel="seconds (loop after first call)",
                       title=f"naive greedy loop, prompt {out['prompt']}, batch {out['batch']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--max-len", type=int, default=None, help="model and backend max_len (default: --length)")
    p.add_argument("--full-len", type=int, default=512, help="eager/inductor run in full to this length, estimated beyond")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/backend_loop")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from lcsm_compile.models.hyena import demo_lm

    max_len = args.max_len or args.length
    model = demo_lm(n_layer=args.n_layer, d_model=args.d_model, vocab=args.vocab, max_len=max_len)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=g)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    out = compare(model, prompt, args.length, methods, progress=not args.quiet, full_len=args.full_len, max_len=max_len)
    out["args"] = vars(args)
    text = table(out)
    print(text)
    common.write_outputs(args.out, "backend_loop", out, lambda path: plot(out, path),
                         lambda s: print(s.strip(), file=sys.stderr))
    with open(os.path.join(args.out, "backend_loop.txt"), "w") as f:
        f.write(text + "\n")
    return 0
