"""Step latency of one bank of C long convolutions decoded for L steps (batch 1), side by side in one run:

- flash:                  lcsm_compile.OnlineConv, the paper's tiling (amortised: a tile of size U every 2U steps);
- partitioned:            lcsm_compile.PartitionedConv, its throughput plan (every level fires at once);
- partitioned (latency):  its latency plan: large levels delayed by one block and spread over it.

Each bank decodes 1 + --runs times and the last --runs decodes are timed (the first touches the
state's pages and plans every transform size), every step alone (time.perf_counter around step()).
The table gives, over the first timed decode, the mean, p50, p99, p99.9 and max step, max / p50,
and the whole decode's time against flash's; and "sched max": the max over positions of each
position's fastest time across the timed decodes. A schedule's spikes recur at the same position
in every decode while a stall of the machine (another process, a preempted thread) does not, so
"sched max / p50" is the schedule's own figure on a shared machine. It leaves out the first SETTLE
positions: right after a reset that zeroed hundreds of MiB of state, every bank here (flash too)
takes 1-4 ms per step for a few steps, the machine's memory management rather than a schedule.
Every output is checked against a float64 FFT convolution. Run alone on a quiet machine (torch threads: --threads, default 2):
    python benchmarks/latency.py [--channels 256] [--length 131072] [--out bench_out/]
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcsm_compile.engine import OnlineConv  # noqa: E402
from lcsm_compile.partitioned import PartitionedConv  # noqa: E402
from lcsm_compile.tools.bench import common  # noqa: E402
from lcsm_compile.tools.bench.mixer import make_problem, reference  # noqa: E402

METHODS = {
    "flash": lambda h, L: OnlineConv(h, max_len=L),
    "partitioned": lambda h, L: PartitionedConv(h, max_len=L),
    "partitioned (latency)": lambda h, L: PartitionedConv(h, max_len=L, latency=True),
}


SETTLE = 16  # positions after a reset left out of the sched max (see above)


def timed_steps(bank, xs):
    """Seconds of each step, and the outputs [C, L]. Python's cyclic garbage collector is off
    meanwhile: its collections land on arbitrary steps and cost any schedule alike."""
    times, ys = [], []
    gc.collect()
    gc.disable()
    try:
        for x in xs:
            t0 = time.perf_counter()
            ys.append(bank.step(x))
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return torch.tensor(times, dtype=torch.float64), torch.stack(ys, -1)


def measure(C, L, seed=0, runs=2):
    h, XT = make_problem(C, L, torch.float32, seed=seed)
    xs = list(XT.unbind(0))
    ref = reference(h, XT.T.contiguous())
    rows = {}
    for name, build in METHODS.items():
        bank = build(h, L)
        timed_steps(bank, xs)  # a whole decode first: state pages, every transform size's plan
        decodes = []
        for _ in range(runs):
            bank.reset()
            times, Y = timed_steps(bank, xs)
            decodes.append(times)
        times, fastest = decodes[0], torch.stack(decodes).min(0).values
        fastest[:SETTLE] = 0.0
        q = torch.quantile(times, torch.tensor([0.5, 0.99, 0.999], dtype=torch.float64)).tolist()
        row = {"mean_s": times.mean().item(), "p50_s": q[0], "p99_s": q[1], "p999_s": q[2], "max_s": times.max().item(),
               "argmax": int(times.argmax()), "sched_max_s": fastest.max().item(), "sched_argmax": int(fastest.argmax()),
               "total_s": times.sum().item(), "rel_err": common.rel_err(Y, ref)}
        if isinstance(bank, PartitionedConv):
            row["plan"] = bank.partition.to_json()
        row["times_s"] = times.tolist()
        rows[name] = row
        print(f"  {name:22s} total {row['total_s']:.3g} s, p50 {q[0] * 1e6:.0f} us, max {row['max_s'] * 1e3:.2f} ms, "
              f"rel err {row['rel_err']:.1e}", flush=True)
        del bank, Y
    return rows


def table(rows):
    flash = rows["flash"]["total_s"]
    headers = ["method", "mean_us", "p50_us", "p99_us", "p99.9_us", "max_ms", "max/p50", "sched_max_ms", "sched_max/p50",
               "at", "total_s", "total/flash", "rel_err"]
    out = [[name, f"{r['mean_s'] * 1e6:.1f}", f"{r['p50_s'] * 1e6:.1f}", f"{r['p99_s'] * 1e6:.1f}", f"{r['p999_s'] * 1e6:.0f}",
            f"{r['max_s'] * 1e3:.2f}", f"{r['max_s'] / r['p50_s']:.1f}", f"{r['sched_max_s'] * 1e3:.2f}",
            f"{r['sched_max_s'] / r['p50_s']:.1f}", r["sched_argmax"], f"{r['total_s']:.2f}", f"{r['total_s'] / flash:.2f}",
            f"{r['rel_err']:.1e}"] for name, r in rows.items()]
    return common.format_table(headers, out)


def plot(rows, path, C, L):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (name, r), color in zip(rows.items(), ("tab:blue", "tab:green", "tab:orange")):
        t = torch.tensor(r["times_s"]) * 1e6
        ax.plot(t.numpy(), ".", ms=1.5, color=color, label=f"{name} (max/p50 {r['max_s'] / r['p50_s']:.0f})")
    ax.set_yscale("log")
    ax.set_xlabel("position")
    ax.set_ylabel("step time (us)")
    ax.set_title(f"Step latency, C={C}, L={L}, batch 1")
    ax.legend(markerscale=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=2, help="timed decodes per method (sched max: per-position fastest)")
    p.add_argument("--out", default="bench_out/")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"step latency: C={args.channels}, L={args.length}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    rows = measure(args.channels, args.length, args.seed, args.runs)
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: {kk: vv for kk, vv in r.items() if kk != "times_s"} for k, r in rows.items()}
    with open(out / "latency.json", "w") as f:
        json.dump({"benchmark": "latency", "machine": common.machine_info(None), "config": vars(args), "results": summary}, f,
                  indent=1)
    plot(rows, out / "latency.png", args.channels, args.length)
    print(f"wrote {out / 'latency.json'} and {out / 'latency.png'}")


if __name__ == "__main__":
    main()
