"""Generation benchmark: a Hyena LM generating greedily from a prompt up to L tokens (batch 1).

Per configuration (layers x d_model) one model and ONE analysis report (at the largest L); every
decoder below is built from that report. Methods, all timed in the same run on the same model, each
a session (prefill, then step per token) driven by the same loop:
- naive: the recompute loop, lcsm_compile.generation.NaiveSession: the model on the whole prefix for
         every new token (what users do today);
- lazy:  the decoder's step program with each long convolution a full dot product over the history
         (O(t) per step: lcsm_compile.baselines.LazyConv);
- flash: the decoder's step program with the Flash Inference bank (ours), one decoder per L;
- floor: the step program with each long convolution cut to its lag-0 term (baselines.FloorConv): the
         per-token work that remains when the mixer costs nothing (not the model's output; a timing floor).
Generation = prefill the prompt, then greedy decode (argmax of the last logits fed back) up to L
tokens; a method's time is the whole decode (prefill + steps), us/token = time / (L - prompt).

Flash always runs in full and is validated: its logits, teacher-forced on the sequence it generated,
against a float64 copy of the model's full forward (rel err), and its tokens against every baseline
run in full. The baselines' per-step cost vs position t is sampled once per configuration in short
windows of steps spread over every length segment (common.sample_windows, teacher-forced on flash's
sequence by common.RestartingStepper), fitted, and summed over each run (common.fit_cost and
integrate_cost).
A baseline whose estimated run exceeds --full-limit-s is reported as the estimate: marked '~' in
tables and listed in the "est" column. At the smallest L a wider limit (--validate-limit-s)
applies, so the estimator is checked against full runs.
"One eager forward" is model(ids[:, :1]): the model's own cost on a single position.

Run: python benchmarks/generate.py [--quick] [--out bench_out/]   (with the project's targets)
  or lcsm-compile bench generate ...                             (measures and reports only)
"""

import argparse
import copy
import sys
import time
import warnings

import torch

from lcsm_compile.tools.bench import common
from lcsm_compile.generation import NaiveSession

METHODS = ("naive", "lazy", "flash", "floor")
BASELINES = ("naive", "lazy", "floor")  # may be estimated; flash always runs in full
BASIS = {"naive": ("1", "t", "tlogt"), "lazy": common.LINEAR, "floor": common.LINEAR}
MAX_REL_ERR = 1e-5  # float32 decoding vs the float64 teacher-forced forward
WARMUP_STEPS = 32


# -- configuration ------------------------------------------------------------------------------


def parse_config(s):
    """'8x256' -> (8, 256): layers x d_model."""
    try:
        layers, d = s.lower().split("x")
        return int(layers), int(d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"config: expected LAYERSxD_MODEL like 4x128, got {s!r}") from None


def int_list(s):
    return [int(v) for v in s.split(",") if v]


def config_name(layers, d):
    return f"{layers}x{d}"


def decoder_options(args):
    """Every keyword the benchmark passes to lcsm_compile.build_decoder, built in one place from the flags.
    The compile mode is explicit: under the default compile="auto" a compile would land inside one
    of the sampled windows of a baseline and its per-step estimate would be wrong."""
    return {"compile": bool(args.compile)}  # True: the step program compiled by inductor (before timing)


def make_decoder(report, L, prompt, conv, options):
    import lcsm_compile

    try:
        return lcsm_compile.build_decoder(report, (prompt,), max_len=L, conv=conv, **options)
    except TypeError as e:
        if options and any(k in str(e) for k in options):
            msg = f"decoder options {sorted(options)}: not accepted by this lcsm_compile.build_decoder ({e})"
            raise SystemExit(msg) from None
        raise


def progress_bar(args, total, desc):
    from tqdm import tqdm

    # disable=None: bars only on a terminal (no carriage-return noise in logs)
    return tqdm(total=total, desc=desc, disable=None if args.progress else True, mininterval=1.0, leave=False,
                unit="tok", file=sys.stderr, dynamic_ncols=True)


# -- generation loops ---------------------------------------------------------------------------

BAR_EVERY = 256  # steps between progress-bar updates (keeps the bar out of the timed loop's cost)


def generate_session(session, prompt, L, bar=None, keep_logits=False):
    """Prefill the prompt, then greedy steps up to L tokens on a fresh `session` (a Decoder's, or a
    NaiveSession).

    Returns dict: tokens [1, L], prefill_s, step_s, time_s, steps, and logits [L-1, V] for positions
    0..L-2 when keep_logits (the step outputs are kept by reference: no copy inside the timed loop).
    """
    P = prompt.shape[1]
    seq = torch.empty(1, L, dtype=prompt.dtype, device=prompt.device)
    seq[:, :P] = prompt
    outs = []
    t0 = common.clock()
    first = session.prefill(prompt)
    nxt = first[:, -1:].argmax(-1)  # [1, 1]: the next input is the new token tensor itself, as in
    seq[:, P : P + 1] = nxt  # gpt-fast / HF (a slice of seq would carry seq's stride into the step)
    t1 = common.clock()
    for t in range(P, L - 1):
        out = session.step(nxt)
        nxt = out[:, -1:].argmax(-1)
        seq[:, t + 1 : t + 2] = nxt
        if keep_logits:
            outs.append(out)
        if bar is not None and (t - P) % BAR_EVERY == BAR_EVERY - 1:
            bar.update(BAR_EVERY)
    t2 = common.clock()
    res = {"tokens": seq, "prefill_s": t1 - t0, "step_s": t2 - t1, "time_s": t2 - t0, "steps": L - 1 - P}
    if keep_logits:
        res["logits"] = torch.cat([first[0]] + [o[0] for o in outs])  # [L-1, V]
    return res


def warm(session, prompt, L):
    """An untimed short decode: first-call costs (allocator, code paths, compilation) stay out of timings."""
    generate_session(session, prompt, min(L, prompt.shape[1] + 1 + WARMUP_STEPS))


# -- per-step cost sampling ---------------------------------------------------------------------


def teacher_forced_stepper(session, tokens):
    """step(t) for the estimator: `session`'s step at position t fed tokens[:, t] (a jump re-prefills
    tokens[:, :t]), with the greedy pick generate_session makes; keeps the logits by position."""
    def step(t):
        out = session.step(tokens[:, t : t + 1])  # Session.step makes a strided slice contiguous
        out[:, -1:].argmax(-1)  # the greedy pick, as in generate_session
        return out[0, -1]

    return common.RestartingStepper(lambda t: session.prefill(tokens[:, :t]), step)


def segments(first, lengths):
    """Step positions, per length segment: [first, L0 - 1), [L0 - 1, L1 - 1), ... (a run to L steps
    positions up to L - 2)."""
    out, a = [], first
    for L in sorted(lengths):
        if L - 1 > a:
            out.append((a, L - 1))
            a = L - 1
    return out


def sample_cost(step, segs, basis, args, clock=common.clock):
    """Time windows of step(t) in every segment, fit cost(t) over all of them. Returns the fit dict."""
    samples = []
    for a, b in segs:
        win = common.sample_windows(lambda k: step(a + k), b - a, positions=args.positions,
                                    steps=args.window_steps, max_window_s=args.window_s, clock=clock)
        samples += [(a + k, c) for k, c in win]
    ts, costs = zip(*samples)
    coef = common.fit_cost(ts, costs, basis)
    return {"basis": list(basis), "coef": [float(c) for c in coef],
            "samples": [[float(t), float(c)] for t, c in samples]}


def fitted_total(fit, a, b):
    """Fitted seconds of the steps at positions a..b-1."""
    return common.integrate_cost(fit["coef"], fit["basis"], b) - common.integrate_cost(fit["coef"], fit["basis"], a)


# -- checks -------------------------------------------------------------------------------------



def teacher_forced_err(model64, tokens, logits):
    """Rel err of decoded logits [L-1, V] (positions 0..L-2) vs the float64 model's full forward."""
    ref = model64(tokens[:, : logits.shape[0]])[0]
    return common.rel_err(logits, ref)


def token_agreement(tokens, ref_tokens, P):
    """How the generated part of `tokens` compares with ref_tokens: all equal, or the first mismatch."""
    a, b = tokens[0, P:], ref_tokens[0, P : tokens.shape[1]]
    diff = (a != b).nonzero()
    return {"equal": bool(diff.numel() == 0), "first_mismatch": None if diff.numel() == 0 else P + int(diff[0, 0])}


# -- one configuration --------------------------------------------------------------------------


def bench_config(layers, d, args, log):
    import lcsm_compile
    from lcsm_compile.models.hyena import demo_lm

    name = config_name(layers, d)
    P, lengths = args.prompt, sorted(args.lengths)
    Lmax = lengths[-1]
    opts = decoder_options(args)
    model = demo_lm(n_layer=layers, d_model=d, vocab=args.vocab, max_len=Lmax, seed=args.seed).to(args.device)
    model64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, args.vocab, (1, P), generator=g).to(args.device)

    t0 = time.perf_counter()
    report = lcsm_compile.analyze(model, (prompt,), max_len=Lmax)
    analyze_s = time.perf_counter() - t0
    if not report.decodable:
        raise lcsm_compile.NotDecodable(report)
    log(f"  analyze {analyze_s:.3g} s (max_len {Lmax})")

    # one eager forward of the model on a single position: mean of a batch of calls, best batch
    one = prompt[:, :1]
    calls = args.eager_calls
    eager_s = common.best_time(lambda: [model(one) for _ in range(calls)], repeats=3, warmup=1) / calls
    log(f"  eager forward on one position {eager_s * 1e6:.0f} us")

    rows = {L: {"config": name, "layers": layers, "d_model": d, "L": L, "prompt": P, "tokens": L - P,
                "analyze_s": analyze_s, "eager_forward_s": eager_s, "methods": {}} for L in lengths}

    # flash: a decoder per L, always run in full, validated teacher-forced against float64
    flash_tokens = flash_logits = None
    for L in lengths:
        t0 = common.clock()
        dec = make_decoder(report, L, prompt, "flash", {"compile": "auto"} if args.auto_compile else opts)
        build_s = common.clock() - t0
        t0 = common.clock()
        warm(dec.session(), prompt, L)
        warm_s = common.clock() - t0  # includes compilation under --compile
        session = dec.session()
        dec.step_fn.expect(L - 1 - P)  # what Decoder.generate announces: compile="auto" may compile in the run
        with progress_bar(args, L - 1 - P, f"{name} L={L} flash") as bar:
            run = generate_session(session, prompt, L, bar, keep_logits=True)
        memory = session.memory_bytes()
        del dec, session
        err = teacher_forced_err(model64, run["tokens"], run["logits"])
        m = {"time_s": run["time_s"], "estimated": False, "build_s": build_s, "warm_s": warm_s,
             "prefill_s": run["prefill_s"], "step_s": run["step_s"], "us_per_token": run["time_s"] / (L - P) * 1e6,
             "us_per_step": run["step_s"] / max(run["steps"], 1) * 1e6, "memory_bytes": memory,
             "rel_err": err, "wrong": not err <= MAX_REL_ERR}
        rows[L]["methods"]["flash"] = m
        log(f"  L={L} flash {run['time_s']:.4g} s ({m['us_per_step']:.0f} us/step, build {build_s:.3g} s, "
            f"warm-up {warm_s:.3g} s, {memory / 2**20:.1f} MiB), teacher-forced rel err {err:.2e}"
            + ("  WRONG: does not match the model's forward" if m["wrong"] else ""))
        rows[L]["_flash_tokens"] = run["tokens"]  # compared with the baselines' tokens below
        if L == Lmax:
            flash_tokens, flash_logits = run["tokens"], run["logits"]
        del run

    # baselines: sample cost(t) once per configuration on flash's sequence, then per L full or estimated
    fits = {}
    for k in BASELINES:
        log(f"  {k}: sampling the per-step cost ({args.positions} windows per length segment)")
        t0 = common.clock()
        if k == "naive":
            new_session, build_s = (lambda: NaiveSession(model)), None
        else:
            dec = make_decoder(report, Lmax, prompt, k, opts)  # per-step cost does not depend on max_len
            new_session, build_s = dec.session, common.clock() - t0
        warm(new_session(), prompt, Lmax)
        s = new_session()
        prefill_s = common.best_time(lambda: s.prefill(prompt), repeats=3, warmup=1)
        stepper = teacher_forced_stepper(new_session(), flash_tokens)
        fit = sample_cost(stepper, segments(P, lengths), BASIS[k], args)
        fit["prefill_s"] = prefill_s
        fit["sampling_s"] = common.clock() - t0
        if k != "floor":  # the sampled steps, teacher-forced, against flash's logits at the same positions
            ts = sorted(stepper.outputs)
            got = torch.stack([stepper.outputs[t] for t in ts])
            fit["window_rel_diff_vs_flash"] = common.rel_err(flash_logits[ts], got)
        del stepper, s
        fits[k] = fit
        diff = fit.get("window_rel_diff_vs_flash")
        log(f"  {k} cost sampled at {len(fit['samples'])} windows in {fit['sampling_s']:.3g} s"
            + ("" if diff is None else f", rel diff vs flash {diff:.1e}"))

        for L in lengths:
            est_s = prefill_s + fitted_total(fit, P, L - 1)
            limit = max(args.full_limit_s, args.validate_limit_s) if L == lengths[0] else args.full_limit_s
            m = {"estimate_s": est_s, "measured_s": None, "build_s": build_s, "tokens_vs_flash": None}
            if est_s <= limit:
                with progress_bar(args, L - P, f"{name} L={L} {k}") as bar:
                    run = generate_session(new_session(), prompt, L, bar)
                m["measured_s"] = run["time_s"]
                if k != "floor":  # floor is not the model: its tokens are not expected to match
                    m["tokens_vs_flash"] = token_agreement(run["tokens"], rows[L]["_flash_tokens"], P)
                del run
            m["estimated"] = m["measured_s"] is None
            m["time_s"] = est_s if m["estimated"] else m["measured_s"]
            m["us_per_token"] = m["time_s"] / (L - P) * 1e6
            rows[L]["methods"][k] = m
            meas = "-" if m["measured_s"] is None else f"{m['measured_s']:.4g} s"
            a = m["tokens_vs_flash"]
            agree = "" if a is None else ("; tokens equal flash's" if a["equal"]
                                          else f"; tokens differ from flash's from position {a['first_mismatch']}")
            log(f"  L={L} {k:5s} est {est_s:.4g} s, measured {meas}{agree}")
        del new_session

    out = []
    for L in lengths:
        r = rows[L]
        r.pop("_flash_tokens", None)
        m = r["methods"]
        f = m["flash"]["time_s"]
        r["ratios"] = {
            "lazy/flash": m["lazy"]["time_s"] / f,
            "naive/flash": m["naive"]["time_s"] / f,
            "flash/floor": f / m["floor"]["time_s"],
            "step/eager": m["flash"]["us_per_step"] * 1e-6 / eager_s,
        }
        out.append(r)
    return out, fits


# -- report -------------------------------------------------------------------------------------


def results_table(results):
    headers = ["config", "L", "analyze_s", "build_s", "naive_s", "lazy_s", "flash_s", "floor_s", "flash_us/tok",
               "eager_us", "lazy/fl", "naive/fl", "fl/floor", "step/eager", "flash_err", "MiB", "est"]
    rows = []
    for r in results:
        m = r["methods"]
        est = lambda k: m[k]["estimated"]
        fl = m["flash"]
        rows.append([
            r["config"], r["L"], common.fmt_num(r["analyze_s"]), common.fmt_num(fl["build_s"]),
            *(common.fmt_num(m[k]["time_s"], est(k)) for k in METHODS),
            common.fmt_num(fl["us_per_token"]), common.fmt_num(r["eager_forward_s"] * 1e6),
            common.fmt_num(r["ratios"]["lazy/flash"], est("lazy")),
            common.fmt_num(r["ratios"]["naive/flash"], est("naive")),
            common.fmt_num(r["ratios"]["flash/floor"], est("floor")),
            common.fmt_num(r["ratios"]["step/eager"]),
            f"{fl['rel_err']:.1e}" + ("!" if fl["wrong"] else ""),
            common.fmt_num(fl["memory_bytes"] / 2**20),
            ",".join(k for k in BASELINES if est(k)) or "-",
        ])
    return common.format_table(headers, rows)


def plot(results, path):
    colors = {"naive": "tab:purple", "lazy": "tab:red", "flash": "tab:blue", "floor": "tab:gray"}
    common.plot_loglog(path, common.method_series(results, "config", METHODS, colors),
                       ylabel="seconds to generate up to L tokens (hollow = estimated)",
                       title="Hyena LM greedy generation time vs L (batch 1)")


# -- entry point --------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lcsm-compile bench generate", description=__doc__.split("\n")[0])
    p.add_argument("--configs", type=lambda s: [parse_config(c) for c in s.split(",") if c],
                   default=[(4, 128), (8, 256)], help="LAYERSxD_MODEL,... (default 4x128,8x256)")
    p.add_argument("--lengths", type=int_list, default=[4096, 8192, 16384, 32768],
                   help="total sequence lengths L, comma separated (default 4096,8192,16384,32768)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefilled)")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--out", default="bench_out/")
    p.add_argument("--full-limit-s", type=float, default=30.0,
                   help="a baseline whose estimated run exceeds this many seconds is reported as the estimate")
    p.add_argument("--validate-limit-s", type=float, default=90.0,
                   help="the limit at the smallest L instead, so the estimator is checked against full runs")
    p.add_argument("--compile", action="store_true",
                   help="pass compile=True to lcsm_compile.Decoder (the step program compiled by inductor)")
    p.add_argument("--auto-compile", action="store_true",
                   help="flash decoders get the default compile='auto' (a compile lands inside the timed run, "
                        "as for a user's decoder.generate); the baselines' step programs stay as --compile says")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (2x32, vocab 64, prompt 16, L 128,256): a smoke test in seconds")
    p.add_argument("--positions", type=int, default=4, help="estimator: windows per length segment")
    p.add_argument("--window-steps", type=int, default=32, help="estimator: timed steps per window (at most)")
    p.add_argument("--window-s", type=float, default=0.5, help="estimator: seconds per window (at most)")
    p.add_argument("--eager-calls", type=int, default=20, help="eager forwards per timed batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default, all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--device", default="cpu", help="where the model, its decoders and the tokens live (e.g. cuda)")
    args = p.parse_args(argv)
    if args.quick:
        # every baseline runs in full at the smallest L (estimator check) and is estimated above it
        args.configs, args.lengths, args.prompt, args.vocab = [(2, 32)], [128, 256], 16, 64
        args.full_limit_s, args.validate_limit_s = 0.0, float("inf")
        args.positions, args.window_steps, args.window_s, args.eager_calls = 3, 12, 0.2, 5
    if args.prompt < 1 or min(args.lengths) <= args.prompt + 1:
        p.error(f"every length must exceed the prompt ({args.prompt}) + 1")
    return args


def measure(args, log):
    """Every config of args at every length: (results, fits per config); see bench_config."""
    results, fits = [], {}
    for layers, d in args.configs:
        name = config_name(layers, d)
        log(f"config {name} (layers {layers}, d_model {d}), L {sorted(args.lengths)}")
        rs, fits[name] = bench_config(layers, d, args, log)
        results += rs
    return results, fits


def main(argv=None, targets=None):
    """Run, print the tables, write JSON and plot. targets: optional targets(results) ->
    [common.target(...)], printed after the results and stored in the JSON (benchmarks/generate.py
    passes the project's)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with common.torch_threads(args.threads), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # analysis notes on the model are not the benchmark's output
        return _run(args, targets)


def _run(args, targets):
    started = time.perf_counter()
    log = lambda s: print(s, flush=True)
    progress = lambda s: log(f"[{time.perf_counter() - started:7.1f} s] {s}")
    info = common.machine_info()
    opts = decoder_options(args)
    log(f"generation benchmark: torch {info['torch']}, {info['threads']} threads, {info['cpu_model']}, device {args.device}; "
        f"prompt {args.prompt}, vocab {args.vocab}, full-limit {args.full_limit_s:g} s, decoder options {opts or '{}'}")

    results, fits = measure(args, progress)

    log(f"\nSeconds to generate from a {args.prompt}-token prompt up to L tokens (batch 1, greedy; prefill + steps); "
        "'~' = estimated from sampled steps (see 'est').\nanalyze_s: analysis per config; build_s: flash Decoder "
        "per L; eager_us: one eager forward on one position; step/eager: flash us/step over it.")
    log(results_table(results))

    val = common.validation_rows(results, BASELINES, ("config", "L"))
    log(f"\nEstimator check (estimate vs full run; flag if |dev| > {common.DEVIATION_FLAG:.0%}):")
    log(common.validation_table(val, ("config", "L")))

    log("\nExactness: flash logits teacher-forced on the generated sequence vs the float64 model's forward; "
        "tokens vs every baseline run in full:")
    for r in results:
        fl = r["methods"]["flash"]
        agree = []
        for k in ("naive", "lazy"):
            a = r["methods"][k]["tokens_vs_flash"]
            if a is not None:
                agree.append(f"{k} " + ("equal" if a["equal"] else f"differ from {a['first_mismatch']}"))
        log(f"  {r['config']} L={r['L']}: rel err {fl['rel_err']:.2e} ({'WRONG' if fl['wrong'] else 'ok'}); "
            f"tokens: {', '.join(agree) or 'no full baseline run'}; flash memory {fl['memory_bytes'] / 2**20:.1f} MiB")
    for name, f in fits.items():
        d = [f"{k} {f[k]['window_rel_diff_vs_flash']:.1e}" for k in ("naive", "lazy")]
        log(f"  {name}: sampled baseline steps vs flash logits (teacher-forced) rel diff: {', '.join(d)}")

    config = dict(vars(args))
    config["configs"] = [config_name(*c) for c in args.configs]
    config = {k: (None if isinstance(v, float) and v == float("inf") else v) for k, v in config.items()}  # strict JSON
    data = {"benchmark": "generate", "machine": info, "config": config, "decoder_options": opts,
            "results": results, "fits": fits, "validation": val}
    if targets is not None:
        data["targets"] = targets(results)
        log("\n" + common.targets_text(data["targets"]))
    data["wall_s"] = time.perf_counter() - started
    common.write_outputs(args.out, "generate", data, lambda path: plot(results, path), log)
    return 0
