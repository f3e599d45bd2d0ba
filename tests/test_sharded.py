"""Channel-sharded decode (optimize(tp=group)): 2 and 4 processes on the gloo backend, spawned here
and talking over 127.0.0.1, against the single-process decoder each rank also builds."""

import datetime
import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

import lcsm_compile
from examples.models import get, public_attention
from lcsm_compile.tools.bench import common

c10d = torch.ops._c10d_functional
aten = torch.ops.aten


def _decode(decoder, ids, prompt):
    """Teacher-forced outputs over ids from a `prompt`-token prefill; a row joining a 2-row session with
    add() for 4 steps; the session's state bytes."""
    session = decoder.session()
    outs = [session.prefill(ids[:, :prompt])]
    outs += [session.step(ids[:, t : t + 1]) for t in range(prompt, ids.shape[1])]
    state = sum(session.state.memory_breakdown().get(k, 0) for k in ("state", "block", "rings", "recurrent", "kv_cache"))
    rows = decoder.session(rows=2)
    _, first = rows.add(ids[:1, :prompt])
    joined = [first] + [rows.step(torch.cat([ids[:1, t : t + 1]] * 2))[:1] for t in range(prompt, prompt + 4)]
    return torch.cat(outs, 1), torch.cat(joined, 1), state


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _work(rank, world, port, name, dtype, whole, compile, out_dir):
    """One rank: the sharded decoder against the model run on the whole sequence (and, with `whole`,
    against the single-process decoder, validated like it). compile: the step program compiled by
    inductor, all-reduces included (functional collectives)."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        _, _, spelling = name.partition(":")  # "public_attention:SPELLING": a Hyena + attention hybrid
        model, (x,) = public_attention.build(spelling) if spelling else get(name).build()
        model = model.to(dtype)
        L, prompt = 64, 7
        # a 1-D DeviceMesh where the step is compiled, the process group itself elsewhere
        tp = init_device_mesh("cpu", (world,)) if compile else dist.group.WORLD
        sharded = lcsm_compile.optimize(model, (x,), max_len=L, tp=tp, validate=whole, compile=compile)
        ids = torch.randint(0, sharded.vocab, (2, L), generator=torch.Generator().manual_seed(5))  # same on every rank
        out, joined, state = _decode(sharded, ids, prompt)
        with torch.no_grad():
            full = model(ids)
        step = sharded.programs.step.graph
        reduces = [n for n in step.nodes if n.target is c10d.all_reduce.default]
        gathers = [n for n in step.nodes if n.target is c10d.all_gather_into_tensor.default]
        result = {
            "err": _rel(out, full), "rows_err": _rel(joined, full[:1, : prompt + 4]), "out": out.sum().item(),
            "state": state, "all_reduces": len(reduces), "rows": sharded.shard_plan.all_reduces(),
            "all_gathers": len(gathers), "outputs": sharded.shard_plan.all_gathers(),
            # every all-reduce sums the partial output of a row-parallel projection: none inside a mixer
            "after_rows": all(n.args[0].target in (aten.linear.default, aten.mm.default, aten.matmul.default,
                                                   aten.einsum.default, aten.tensordot.default, aten.conv1d.default)
                              for n in reduces),
            "split_attention": sorted(i for r in sharded.shard_plan.regions for i in r.attention),
            "attention": len(sharded.attention),
            "split_sites": sorted(i for r in sharded.shard_plan.regions for i in r.sites), "sites": len(sharded.sites),
            "compilations": sharded.step_fn.compilations,
        }
        if whole:
            single = lcsm_compile.optimize(model, (x,), max_len=L)
            result["whole_err"] = _rel(out, _decode(single, ids, prompt)[0])
            result["whole_state"] = _decode(single, ids, prompt)[2]
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _spawn(world, name, dtype, whole, compile, tmp_path):
    mp.spawn(_work, args=(world, common.free_port(), name, dtype, whole, compile, str(tmp_path)), nprocs=world, join=True)
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world, name, dtype, tol", [
    (2, "hyena_order2", torch.float32, 1e-5),  # tiled long convolutions and ring buffers; validated sharded
    (4, "hyena_order2", torch.float64, 1e-12),
    (2, "striped_hyena", torch.float64, 1e-12),  # modal filters: their recurrent states split
    (2, "h3", torch.float32, 1e-5),  # q, k, v written as weight @ u.T: one region; the step compiled
    (2, "multihead_hyena", torch.float64, 1e-12),  # whole heads in every tensor and convolution
    (2, "public_attention:gpt2", torch.float64, 1e-12),  # attention and its KV cache by heads; validated
    (2, "public_attention:llama_gqa_sdpa", torch.float64, 1e-12),  # grouped keys and values: the rank's groups
    (2, "wavenet_dilated", torch.float64, 1e-12),  # inputs sliced on each rank; 1x1 conv1d rows with a bias
])
def test_sharded_decoding_equals_the_model(world, name, dtype, tol, tmp_path):
    whole = (world, name) in ((2, "hyena_order2"), (2, "public_attention:gpt2"))
    compile = name == "h3"
    results = _spawn(world, name, dtype, whole, compile, tmp_path)
    for r in results:
        assert r["err"] < tol and r["rows_err"] < tol, r  # against the model over the whole sequence
        assert r["all_reduces"] == r["rows"] > 0 and r["after_rows"]
        assert r["all_gathers"] == r["outputs"] == 1  # the LM head is vocabulary-parallel: its logits gathered
        assert r["split_sites"] == list(range(r["sites"]))  # every convolution's channels split
        assert r["split_attention"] == list(range(r["attention"]))  # every attention's heads split
        assert r["compilations"] == (2 if compile else 0)  # one shared position, and rows at their own positions
        if whole:
            assert r["whole_err"] < 1e-6, r  # against the single-process decoder
            assert r["state"] <= r["whole_state"] / world * 1.05, r  # per-rank state: 1/world of the whole
    assert len({r["out"] for r in results}) == 1  # every rank got the same outputs


def _gather_work(rank, world, port, out_dir):
    """One rank: a program that outputs a tensor of 8 channels in blocks of 4, given the rank's share."""
    import torch.fx as fx

    from lcsm_compile.passes import shard_rewrite

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        whole = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
        graph = fx.Graph()
        x = graph.placeholder("x")
        y = graph.call_function(aten.mul.Scalar, (x, 2.0))
        graph.output((y,))
        gm = fx.GraphModule(torch.nn.Module(), graph)
        layout = (1, 8, 4)  # dim, size, block
        shard_rewrite._gather(gm, y, layout, world, dist.group.WORLD.group_name)
        gm.recompile()
        (out,) = gm(whole[:, shard_rewrite._indices(layout, rank, world)])
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_an_output_gathered_from_blocks_comes_back_in_channel_order(tmp_path):
    """Each rank holds its share of every block of the split dim (channels 0, 1, 4, 5 on rank 0 of 2):
    the all-gather puts every channel back in its place."""
    mp.spawn(_gather_work, args=(2, common.free_port(), str(tmp_path)), nprocs=2, join=True)
    whole = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"{r}.pt"), whole * 2)


def test_tp_needs_a_process_group():
    model, inputs = get("hyena_order2").build()
    with pytest.raises(TypeError, match="tp: expected a torch.distributed ProcessGroup or a 1-D DeviceMesh, got str"):
        lcsm_compile.optimize(model, inputs, max_len=64, tp="world")
