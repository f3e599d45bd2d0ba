"""When compiling the step program pays: the break-even length behind compile="auto".

For each Hyena LM config, in one run: the eager step, the step compiled by inductor, the compile
time with a fresh inductor cache (cold, what a first run pays) and again from the cache it wrote
(warm), and the break-even length = compile time / (eager step - compiled step). Prints a table,
writes JSON and plots cumulative decode time against steps (the lines cross at the break-even).

    python benchmarks/compile_breakeven.py --configs 4x128,8x256 --out bench_out/breakeven
"""

import argparse
import os
import tempfile
import time

# a fresh inductor cache, set before torch is imported: the first compile below is a cold one
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lcsm_breakeven_"))

import torch  # noqa: E402

from lcsm_compile.runtime import program as runtime  # noqa: E402
from lcsm_compile.tools.bench import common  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="4x128,8x256", help="layers x d_model, comma separated")
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_out/breakeven", help="folder for JSON and PNG")
    return p.parse_args(argv)


def step_time(decoder, prompt, steps):
    """Seconds per step (best of 3 runs of `steps` steps after a prefill); the first call of each
    run is untimed (it pays a compile, if there is one)."""
    best = float("inf")
    for _ in range(3):
        session = decoder.session()
        session.prefill(prompt)
        tok = prompt[:, -1:]
        session.step(tok)
        start = time.perf_counter()
        for _ in range(steps):
            session.step(tok)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def compile_time(decoder, prompt):
    """Seconds the first compiled step costs beyond a compiled step: the compile."""
    session = decoder.session()
    session.prefill(prompt)
    start = time.perf_counter()
    session.step(prompt[:, -1:])
    return time.perf_counter() - start


def bench(config, args):
    import lcsm_compile
    from lcsm_compile.models import demo_lm

    layers, d = (int(v) for v in config.split("x"))
    model = demo_lm(n_layer=layers, d_model=d, vocab=64, max_len=args.max_len)
    prompt = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    make = lambda mode: lcsm_compile.optimize(model, (prompt,), max_len=args.max_len, compile=mode,  # noqa: E731
                                              validate=False)
    row = {"config": config}
    with torch.no_grad():
        row["eager_step_s"] = step_time(make(False), prompt, args.steps)
        cold = make(True)
        row["cold_compile_s"] = compile_time(cold, prompt)
        row["warm_compile_s"] = compile_time(make(True), prompt)  # inductor's FX graph cache, on disk
        row["compiled_step_s"] = step_time(cold, prompt, args.steps)
    row["cold_compile_s"] -= row["compiled_step_s"]
    row["warm_compile_s"] -= row["compiled_step_s"]
    saved = row["eager_step_s"] - row["compiled_step_s"]
    for kind in ("cold", "warm"):
        row[f"breakeven_{kind}"] = row[f"{kind}_compile_s"] / saved if saved > 0 else float("inf")
    return row


def plot(rows, path):
    n = [2**k for k in range(4, 17)]
    series = []
    for r in rows:
        series.append({"x": n, "y": [k * r["eager_step_s"] for k in n], "label": f"{r['config']} eager"})
        series.append({"x": n, "y": [r["cold_compile_s"] + k * r["compiled_step_s"] for k in n],
                       "label": f"{r['config']} compiled (cold compile)", "linestyle": "--"})
    common.plot_loglog(path, series, xlabel="steps", ylabel="seconds",
                       title="decode time: eager step program vs compiled (compile included)")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    with common.torch_threads(args.threads):
        rows = [bench(config.strip(), args) for config in args.configs.split(",")]
    print(common.format_table(
        ["config", "eager ms/step", "compiled ms/step", "eager/compiled", "cold compile s", "warm compile s",
         "break-even cold", "break-even warm"],
        [[r["config"], f"{1e3 * r['eager_step_s']:.3f}", f"{1e3 * r['compiled_step_s']:.3f}",
          f"{r['eager_step_s'] / r['compiled_step_s']:.2f}", f"{r['cold_compile_s']:.1f}", f"{r['warm_compile_s']:.1f}",
          f"{r['breakeven_cold']:.0f}", f"{r['breakeven_warm']:.0f}"] for r in rows]))
    print(f"compile='auto' compiles after runtime.AUTO_COMPILE_CALLS = {runtime.AUTO_COMPILE_CALLS} steps "
          f"(torch threads {args.threads}, {common.cpu_model()})")
    data = {"rows": rows, "auto_compile_calls": runtime.AUTO_COMPILE_CALLS, "args": vars(args),
            "machine": common.machine_info(), "wall_s": time.perf_counter() - start}
    common.write_outputs(args.out, "breakeven", data, lambda path: plot(rows, path), print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
