"""Serving benchmark: a stream of requests (random prompt and output lengths) through one decoder.

Every request is queued at time 0 and decoded greedily; the methods run the same requests on the
same Decoder (one analysis, one set of programs), one after the other in one run:
- sequential: one request at a time, each in its own batch-1 session (what a loop over requests does);
- static:     groups of --rows requests in arrival order, each group one left-padded batch
              (prefill(attention_mask=...)) stepped until its longest request is done;
- continuous: one session of --rows rows kept full: a request joins a free row (Session.add) as soon
              as one frees up (Session.remove) between steps; the others keep going untouched.
Reported per method: wall time, generated tokens/s, time to first token (from time 0: queueing
included) and per-token latency (the gap between a request's consecutive tokens) percentiles, and
tokens/s over the sequential method's. Every method's tokens must equal the sequential ones.

Run: python benchmarks/serve.py [--quick] [--out bench_out/]   or   lcsm-compile bench serve ...
"""

import argparse
import sys
import time
import warnings
from collections import deque

import numpy as np
import torch

from lcsm_compile.tools.bench import common
from lcsm_compile.tools.bench.generate import parse_config

METHODS = ("sequential", "static", "continuous")
PERCENTILES = (50, 90, 99)


def make_requests(n, prompt_range, output_range, vocab, seed):
    """n (prompt ids [1, P], output tokens) pairs, P and outputs uniform in their inclusive ranges."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    return [(torch.randint(0, vocab, (1, draw(*prompt_range)), generator=g), draw(*output_range)) for _ in range(n)]


class Trace:
    """Tokens and their times per request: time to first token and the gaps between tokens."""

    def __init__(self, n, start):
        self.tokens = [[] for _ in range(n)]
        self.last, self.start, self.ttft, self.gaps = [None] * n, start, [None] * n, []

    def emit(self, i, token, now):
        self.tokens[i].append(int(token))
        if self.last[i] is None:
            self.ttft[i] = now - self.start
        else:
            self.gaps.append(now - self.last[i])
        self.last[i] = now


def greedy(out):
    """Next tokens [B] from a step's or prefill's logits [B, T, V]."""
    return out[:, -1].argmax(-1)


def serve_sequential(decoder, requests):
    trace = Trace(len(requests), common.clock())
    for i, (prompt, n) in enumerate(requests):
        session = decoder.session()
        tok = greedy(session.prefill(prompt))
        trace.emit(i, tok[0], common.clock())
        for _ in range(n - 1):
            tok = greedy(session.step(tok[:, None]))
            trace.emit(i, tok[0], common.clock())
    return trace


def serve_static(decoder, requests, rows):
    trace = Trace(len(requests), common.clock())
    for first in range(0, len(requests), rows):
        group = list(range(first, min(first + rows, len(requests))))
        P = max(requests[i][0].shape[1] for i in group)
        ids = torch.zeros(len(group), P, dtype=torch.long)
        mask = torch.zeros(len(group), P, dtype=torch.long)
        for r, i in enumerate(group):
            p = requests[i][0]
            ids[r, P - p.shape[1] :], mask[r, P - p.shape[1] :] = p[0], 1
        session = decoder.session()
        tok = greedy(session.prefill(ids, attention_mask=mask))
        now = common.clock()
        for r, i in enumerate(group):
            trace.emit(i, tok[r], now)
        for k in range(1, max(requests[i][1] for i in group)):
            tok = greedy(session.step(tok[:, None]))
            now = common.clock()
            for r, i in enumerate(group):
                if k < requests[i][1]:
                    trace.emit(i, tok[r], now)
    return trace


def serve_continuous(decoder, requests, rows):
    trace = Trace(len(requests), common.clock())
    session = decoder.session(rows=rows)
    queue, active = deque(range(len(requests))), {}  # active: row -> request
    nxt = torch.zeros(rows, 1, dtype=torch.long)
    while queue or active:
        while queue and len(active) < rows:  # keep every row busy
            i = queue.popleft()
            prompt, n = requests[i]
            row, out = session.add(prompt)
            trace.emit(i, greedy(out)[0], common.clock())
            if n == 1:
                session.remove(row)
            else:
                active[row], nxt[row, 0] = i, greedy(out)[0]
        if not active:
            break
        tok = greedy(session.step(nxt))
        now = common.clock()
        for row, i in list(active.items()):
            trace.emit(i, tok[row], now)
            nxt[row, 0] = tok[row]
            if len(trace.tokens[i]) == requests[i][1]:
                session.remove(row)
                del active[row]
    return trace


def summarize(trace, wall_s):
    tokens = sum(len(t) for t in trace.tokens)
    pct = lambda xs: {f"p{q}": float(np.percentile(xs, q)) if len(xs) else None for q in PERCENTILES}  # noqa: E731
    return {"wall_s": wall_s, "tokens": tokens, "tokens_per_s": tokens / wall_s, "ttft_s": pct(trace.ttft),
            "token_latency_s": pct(trace.gaps), "latencies_s": sorted(trace.gaps)}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lcsm-compile bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=parse_config, default=(4, 128), help="LAYERSxD_MODEL of the Hyena LM (default 4x128)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rows", type=int, default=8, help="rows of the static and continuous batches")
    p.add_argument("--prompt", type=lambda s: tuple(int(v) for v in s.split(",")), default=(16, 256),
                   help="MIN,MAX prompt tokens (uniform)")
    p.add_argument("--output", type=lambda s: tuple(int(v) for v in s.split(",")), default=(16, 512),
                   help="MIN,MAX generated tokens per request (uniform)")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--compile", action="store_true", help="compile the step program (inductor) before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--out", default="bench_out/")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.requests, args.rows, args.prompt, args.output, args.vocab = (2, 32), 7, 3, (2, 12), (1, 24), 64
    for name in ("prompt", "output"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            p.error(f"--{name}: expected MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with common.torch_threads(args.threads), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run(args)


def _run(args):
    import lcsm_compile
    from lcsm_compile.models.hyena import demo_lm

    started = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    info = common.machine_info()
    layers, d = args.config
    max_len = args.prompt[1] + args.output[1]
    model = demo_lm(n_layer=layers, d_model=d, vocab=args.vocab, max_len=max_len, seed=args.seed)
    requests = make_requests(args.requests, args.prompt, args.output, args.vocab, args.seed)
    log(f"serving benchmark: torch {info['torch']}, {info['threads']} threads, {info['cpu_model']}; {layers}x{d} Hyena LM, "
        f"{args.requests} requests, prompts {args.prompt[0]}-{args.prompt[1]}, outputs {args.output[0]}-{args.output[1]} "
        f"tokens, {args.rows} rows, compile {args.compile}")
    t0 = time.perf_counter()
    decoder = lcsm_compile.optimize(model, (requests[0][0],), max_len=max_len, compile=bool(args.compile))
    log(f"  optimize {time.perf_counter() - t0:.3g} s (max_len {max_len})")
    runs = {"sequential": lambda: serve_sequential(decoder, requests),
            "static": lambda: serve_static(decoder, requests, args.rows),
            "continuous": lambda: serve_continuous(decoder, requests, args.rows)}
    warm = requests[: min(len(requests), args.rows)]  # untimed: first calls, allocator, compiles
    serve_sequential(decoder, warm[:1]), serve_static(decoder, warm, args.rows), serve_continuous(decoder, warm, args.rows)

    results, reference = {}, None
    for k in METHODS:
        t0 = common.clock()
        trace = runs[k]()
        results[k] = summarize(trace, common.clock() - t0)
        if reference is None:
            reference = trace.tokens
        results[k]["tokens_equal"] = trace.tokens == reference
        bad = [i for i, (a, b) in enumerate(zip(trace.tokens, reference)) if a != b]
        results[k]["first_mismatch_request"] = bad[0] if bad else None
        log(f"  {k}: {results[k]['wall_s']:.3g} s, {results[k]['tokens_per_s']:.0f} tokens/s"
            + ("" if results[k]["tokens_equal"] else f"  WRONG: tokens differ from sequential (request {bad[0]})"))
    base = results["sequential"]["tokens_per_s"]
    for k in METHODS:
        results[k]["speedup"] = results[k]["tokens_per_s"] / base

    log(f"\n{args.requests} requests queued at time 0; per-token latency = gap between a request's consecutive tokens; "
        "TTFT = time to first token from time 0 (queueing included). Tokens of every method vs sequential: equal, or differ.")
    ms = lambda v: common.fmt_num(None if v is None else 1e3 * v)  # noqa: E731
    rows = [[k, r["tokens"], common.fmt_num(r["wall_s"]), f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}",
             *(ms(r["token_latency_s"][f"p{q}"]) for q in PERCENTILES), ms(r["ttft_s"]["p50"]), ms(r["ttft_s"]["p99"]),
             "equal" if r["tokens_equal"] else "DIFFER"] for k, r in results.items()]
    log(common.format_table(["method", "tokens", "wall_s", "tok/s", "x seq", "lat p50 ms", "lat p90 ms", "lat p99 ms",
                             "ttft p50 ms", "ttft p99 ms", "tokens"], rows))
    config = {**vars(args), "config": f"{layers}x{d}", "max_len": max_len}
    data = {"benchmark": "serve", "machine": info, "config": config, "results": results,
            "requests": [{"prompt": p.shape[1], "output": n} for p, n in requests], "wall_s": time.perf_counter() - started}
    common.write_outputs(args.out, "serve", data, lambda path: plot(results, path), log)
    return 0 if all(r["tokens_equal"] for r in results.values()) else 1


def plot(results, path):
    """Per-token latency CDFs, one line per method, tokens/s in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    for k, r in results.items():
        lat = np.asarray(r["latencies_s"]) * 1e3
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{k}: {r['tokens_per_s']:.0f} tok/s")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels would overlap
    ax.set_xlabel("per-token latency (ms)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Serving: per-token latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
