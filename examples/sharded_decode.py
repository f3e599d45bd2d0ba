"""Channel-sharded decode of the bundled Hyena LM over torch.distributed:

    torchrun --nproc-per-node 2 examples/sharded_decode.py [--max-len 2048] [--new 64]

Every rank builds the same seeded model and calls optimize(..., tp=group) with the same example:
each then holds 1/world of the channels between every in-projection and out-projection (their
weights, filters, tiled state and ring buffers), and the session returns the full logits on every
rank. Prints the shard plan (rank 0), each rank's session state, and checks that every rank
generated the same tokens as the model decoded whole.
"""

import argparse
import os

import torch
import torch.distributed as dist

import lcsm_compile
from lcsm_compile.models.hyena import demo_lm


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--new", type=int, default=64)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = demo_lm(max_len=args.max_len).to(device)
    prompt = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    decoder = lcsm_compile.optimize(model, (prompt,), max_len=args.max_len, tp=dist.group.WORLD)
    if rank == 0:
        print(decoder.shard_plan.table({i: s.name for i, s in enumerate(decoder.sites)}))
    tokens = decoder.generate(prompt, args.new)
    session = decoder.session()
    session.prefill(prompt)
    parts = session.memory_breakdown()
    print(f"rank {rank}/{world}: session state {sum(parts.get(k, 0) for k in ('state', 'block', 'rings')) / 2**20:.2f} MiB, "
          f"filters and operators {sum(parts.get(k, 0) for k in ('filters', 'toeplitz', 'spectra')) / 2**20:.2f} MiB", flush=True)
    with torch.no_grad():  # the model itself, decoded whole, greedily: the same tokens
        ids = prompt
        for _ in range(args.new):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
    same = torch.equal(tokens, ids)
    print(f"rank {rank}: {args.new} tokens, {'the same as' if same else 'DIFFERENT from'} the model decoded whole", flush=True)
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
