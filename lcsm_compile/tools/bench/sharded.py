"""Channel-sharded decode (optimize(tp=group)) against world size: a Hyena LM
(lcsm_compile.models.hyena) decoded teacher-forced from a prompt to L by 1, 2 and 4 processes
(spawned here, over 127.0.0.1: gloo on the CPU cores, or NCCL with one GPU per rank, --device cuda,
which benchmarks/gpu.py --tp runs), side by side in one run. Per world size: each
rank's session state (tiled state and blocks, ring buffers) and shared operators (filters, spectra,
Toeplitz blocks), the mean step time (the slowest rank's), the collectives per step, and the relative
error of the logits against the single-process decoder. The cores are shared: each rank gets
threads // world torch threads, so on a 2-core machine world 4 oversubscribes nothing but runs
two ranks per core; the step time says what communication and smaller matrices cost here, not
what separate devices would give (benchmarks/gpu.py --tp is for a machine with several GPUs).

Run alone on a quiet machine:
    python benchmarks/sharded.py [--layers 4] [--d 256] [--L 2048] [--prompt 64] [--steps 256]
        [--worlds 1 2 4] [--threads 2] [--device cpu] [--out bench_out/]
"""

import argparse
import datetime
import json
import os
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lcsm_compile
from lcsm_compile.models.hyena import hyena_lm
from lcsm_compile.tools.bench import common

STATE = ("state", "block", "rings", "recurrent")
SHARED = ("filters", "toeplitz", "spectra")


def _rank(rank, world, port, args, out_dir):
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, args.threads // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        torch.manual_seed(0)
        model = hyena_lm(2, args.layers, vocab=256, d_model=args.d, max_len=args.L).eval().to(device)
        ids = torch.randint(0, 256, (1, args.prompt + args.steps), generator=torch.Generator().manual_seed(1)).to(device)
        prompt = ids[:, : args.prompt]
        tp = dist.group.WORLD if world > 1 else None
        decoder = lcsm_compile.optimize(model, (prompt,), max_len=args.L, tp=tp, validate=False, compile=False)
        session = decoder.session()
        outs = [session.prefill(prompt)]
        with torch.no_grad():
            for t in range(args.prompt, args.prompt + 8):  # warm-up steps, not timed
                outs.append(session.step(ids[:, t : t + 1]))
            dist.barrier()
            start = common.clock()
            for t in range(args.prompt + 8, ids.shape[1]):
                outs.append(session.step(ids[:, t : t + 1]))
            step_s = (common.clock() - start) / (ids.shape[1] - args.prompt - 8)
        parts = session.memory_breakdown()
        plan = decoder.shard_plan
        result = {"step_s": step_s, "state": sum(parts.get(k, 0) for k in STATE), "shared": sum(parts.get(k, 0) for k in SHARED),
                  "all_reduces": 0 if plan is None else plan.all_reduces(),
                  "all_gathers": 0 if plan is None else plan.all_gathers()}
        torch.save(torch.cat(outs, 1).cpu(), os.path.join(out_dir, f"out{rank}.pt"))
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def measure(args, log=print):
    rows, reference = [], None
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank, args=(world, common.free_port(), args, tmp), nprocs=world, join=True)
            ranks = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(world)]
            out = torch.load(os.path.join(tmp, "out0.pt"))
        reference = out if reference is None else reference
        rows.append({"world": world, "step_s": max(r["step_s"] for r in ranks), "state": ranks[0]["state"],
                     "shared": ranks[0]["shared"], "all_reduces": ranks[0]["all_reduces"],
                     "all_gathers": ranks[0]["all_gathers"],
                     "rel_err": float((out - reference).norm() / reference.norm())})
        log(f"sharded: world {world} done")
    return rows


def table(rows):
    base = rows[0]
    headers = ["world", "state/rank MiB", "x world 1", "operators/rank MiB", "step ms", "x world 1", "all-reduces/step",
               "all-gathers/step", "rel err vs world 1"]
    out = [[str(r["world"]), f"{r['state'] / 2**20:.3f}", f"{r['state'] / base['state']:.3f}", f"{r['shared'] / 2**20:.3f}",
            f"{r['step_s'] * 1e3:.2f}", f"{r['step_s'] / base['step_s']:.2f}", str(r["all_reduces"]), str(r["all_gathers"]),
            f"{r['rel_err']:.1e}"] for r in rows]
    return common.format_table(headers, out)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, NCCL")
    p.add_argument("--out", default="bench_out/")
    args = p.parse_args(argv)
    if args.worlds[0] != 1:
        raise SystemExit("--worlds: the first must be 1 (the single-process baseline)")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    print(f"sharded decode: {args.layers} layers, d_model {args.d}, L {args.L}, prompt {args.prompt}, {args.steps} steps "
          f"timed, {args.threads} threads shared by the ranks", flush=True)
    rows = measure(args)
    print(table(rows))
    data = {"benchmark": "sharded", "machine": common.machine_info(None), "config": vars(args), "results": rows,
            "wall_s": time.perf_counter() - start}

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        worlds = [r["world"] for r in rows]
        a.plot(worlds, [r["state"] / 2**20 for r in rows], "o-", label="session state per rank")
        a.plot(worlds, [rows[0]["state"] / w / 2**20 for w in worlds], "--", label="1/world of world 1")
        a.set_xlabel("world size"), a.set_ylabel("MiB"), a.legend()
        b.plot(worlds, [r["step_s"] * 1e3 for r in rows], "o-")
        b.set_xlabel("world size"), b.set_ylabel("ms per step (slowest rank)")
        fig.suptitle(f"sharded decode, {args.layers} layers d_model {args.d}, L {args.L}, "
                     + ("one GPU per rank (NCCL)" if args.device == "cuda" else "CPU (gloo)"))
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    common.write_outputs(args.out, "sharded", data, plot, print)


if __name__ == "__main__":
    main()
