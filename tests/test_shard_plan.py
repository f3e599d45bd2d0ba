"""The shard plan (passes/shard_plan.py): which projections split their channels across ranks, read
from the step program alone (no processes)."""

import json
import re
import warnings

import pytest

import lcsm_compile
from examples.models import get, public_attention
from lcsm_compile.passes import shard_plan


def plan_of(name, world=None):
    """name: a zoo model, or "public_attention:SPELLING" (examples/models/public_attention.py)."""
    module, _, spelling = name.partition(":")
    model, inputs = public_attention.build(spelling) if spelling else get(name).build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder = lcsm_compile.optimize(model, inputs, max_len=64, validate=False)
    names = {i: s.name for i, s in enumerate(decoder.sites)}
    return shard_plan.run(decoder.programs.step, decoder.example_shape, decoder.input_dtype, world), names, decoder


def weights(nodes):
    return [shard_plan._weight(n) for n in nodes]


def test_hyena_blocks_split_like_megatron_one_all_reduce_per_mixer_and_per_mlp():
    plan, names, decoder = plan_of("hyena_order2")
    mixers = [r for r in plan.regions if r.sites]
    mlps = [r for r in plan.regions if r.rows and not r.sites]
    assert len(mixers) == 2 and len(mlps) == 2
    for b, r in enumerate(mixers):
        assert weights(r.columns) == [f"blocks.{b}.mixer.in_proj.weight"]
        assert weights(r.rows) == [f"blocks.{b}.mixer.out_proj.weight"]
        assert r.block == r.channels // 3  # the fused projection splits into x1, x2, v: each is split across ranks
        assert sorted(decoder.sites[i].kind for i in r.sites) == ["long", "short"]
    assert sorted(i for r in mixers for i in r.sites) == list(range(len(decoder.sites)))  # no site decoded whole
    assert [weights(r.columns) for r in mlps] == [["blocks.0.mlp.fc1.weight"], ["blocks.1.mlp.fc1.weight"]]
    assert plan.all_reduces() == 4  # none inside a mixer: only after the row-parallel projections
    (head,) = [r for r in plan.regions if r.gathers]  # vocabulary-parallel: each rank's logits gathered
    assert weights(head.columns) == ["lm_head.weight"] and head.rows == [] and len(head.gathers) == 1
    assert plan.declined == [] and plan.all_gathers() == 1
    assert all(r.fits(2) and r.fits(4) for r in plan.regions)
    at3, _, _ = plan_of("hyena_order2", world=3)  # blocks of 32 and 64 channels: not over 3 ranks
    assert at3.regions == [] and at3.all_reduces() == 0
    unfit = {w for d in at3.declined if "do not split over 3 ranks" in d.why for w in weights(d.columns)}
    assert {"blocks.0.mixer.in_proj.weight", "blocks.1.mlp.fc1.weight", "lm_head.weight"} <= unfit
    text = plan.table(names)
    assert "4 all-reduces and 1 all-gather per step" in text and "blocks.0.mixer.in_proj.weight" in text
    assert "lm_head.weight (64 channels, blocks of 64) -> sites none -> 1 output + all-gather" in text


def test_h3_projections_that_meet_form_one_region():
    plan, names, _ = plan_of("h3")
    (mixer,) = [r for r in plan.regions if r.sites][:1]
    assert weights(mixer.columns) == ["blocks.0.mixer.q_proj.weight", "blocks.0.mixer.k_proj.weight",
                                      "blocks.0.mixer.v_proj.weight"]  # weight @ u.T, not F.linear
    assert weights(mixer.rows) == ["blocks.0.mixer.output_linear.weight"]
    assert len(mixer.sites) == 2


@pytest.mark.parametrize("name, op, why", [
    ("zoology_short_conv", "linalg_vector_norm", "acts along the split channels"),  # a norm over the split channels
    ("rwkv_token_shift_hyena", "cat", "concatenates along the split channels"),
    ("multiquery_long_conv", "repeat", "does not act per channel"),  # one value head repeated over the query heads
    ("public_attention:llama_gqa_sdpa", "attn_step", "keys and values not split by heads"),  # repeat_kv's groups
])
def test_a_region_that_needs_communication_inside_stays_replicated_and_says_which_op(name, op, why):
    plan, names, _ = plan_of(name)
    reasons = [d.why for d in plan.declined]
    assert any(r.startswith(op) and why in r for r in reasons), reasons
    assert "replicated:" in plan.table(names)


def test_cli_schedule_prints_the_plan_at_a_world_size(capsys):
    from lcsm_compile.tools import cli

    assert cli.main(["schedule", "examples.models.hyena:build_order2", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "shard plan of the step program: 5 regions split their channels, 4 all-reduces and 1 all-gather per step" in out
    whole, rank = out.split("rank 0 of 2: ")  # the schedule of rank 0's programs: half of every site's state
    state = lambda text: re.findall(r"fft_irfft \(long, tile, state ([\d.]+) KiB/row", text)  # noqa: E731
    assert float(state(rank)[0]) == float(state(whole)[0]) / 2
    assert cli.main(["schedule", "examples.models.hyena:build_order2", "--tp", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    declined = data["shard_plan"]["declined"]
    assert data["rank_schedule"]["sites"][1]["state_bytes_per_row"] == data["sites"][1]["state_bytes_per_row"]  # nothing split
    assert data["shard_plan"]["regions"] == []
    assert {"blocks.0.mixer.in_proj.weight", "lm_head.weight"} <= \
        {w for d in declined if "do not split over 3 ranks" in d["why"] for w in d["columns"]}


def test_heads_split_whole_out_of_the_channel_axis_and_merge_back():
    """Multi-head Hyena: x1, x2, v unflattened into 4 heads of 8, an outer product per head (einsum
    bhkl,bhvl->bhkvl) flattened into the 256 channels of the long convolution, contracted back per
    head and flattened: each rank holds whole heads, in every tensor and convolution on the way."""
    plan, names, decoder = plan_of("multihead_hyena")
    mixers = [r for r in plan.regions if r.sites]
    assert len(mixers) == 2 and all(r.grain == 8 and r.block == 32 for r in mixers)
    assert sorted(i for r in mixers for i in r.sites) == list(range(len(decoder.sites)))
    assert "whole heads of 8" in plan.table(names)
    at8, _, _ = plan_of("multihead_hyena", world=8)  # 4 channels a rank: half a head
    assert not any(r.sites for r in at8.regions)
    assert {w for d in at8.declined if "in whole heads of 8" in d.why for w in weights(d.columns)} >= \
        {"blocks.0.mixer.in_proj.weight", "blocks.1.mixer.in_proj.weight"}


@pytest.mark.parametrize("name, rows", [
    ("hyena_planned_lengths", "blocks.0.mixer.out_w & blocks.0.mixer.out_scale"),  # einsum de,bdl->ble with a weight built by an einsum
    ("multiquery_long_conv", "blocks.0.mixer.out_weight"),  # tensordot(x, W, [2], [0])
])
def test_projections_written_as_einsum_or_tensordot_reduce_the_channels(name, rows):
    plan, _, _ = plan_of(name)
    mixer = next(r for r in plan.regions if r.sites)
    assert weights(mixer.rows) == [rows]


def test_attention_splits_by_heads_with_its_projections():
    """GPT-2's attention (Conv1D projections: addmm; heads by view + permute): the queries, keys and
    values split by heads, so each rank's KV cache holds its heads. Llama's grouped keys and values,
    repeated to one per query head (repeat_kv), are computed whole; each rank keeps its heads' copies."""
    plan, names, _ = plan_of("public_attention:gpt2")
    (attention,) = [r for r in plan.regions if r.attention]
    assert attention.attention == [0] and attention.grain == 8
    assert weights(attention.columns) == ["blocks.1.mixer.c_attn.weight"]
    assert weights(attention.rows) == ["blocks.1.mixer.c_proj.weight"]
    assert "attention 0 by heads" in plan.table(names)
    plan, _, _ = plan_of("public_attention:llama_gqa_sdpa")
    (attention,) = [r for r in plan.regions if r.attention]
    assert weights(attention.columns) == ["blocks.1.mixer.q_proj.weight"]
    assert attention.grain == 8


def test_a_convolution_of_the_residual_stream_slices_its_input_on_each_rank():
    """WaveNet's dilated convolutions read the residual stream itself, with no projection before them:
    each rank slices its channels of their input locally, and the 1x1 conv1d projections after them
    (res and skip) are row-parallel. M2's third convolution reads its input the same way."""
    plan, names, decoder = plan_of("wavenet_dilated")
    layers = [r for r in plan.regions if r.sites]
    assert sorted(i for r in layers for i in r.sites) == list(range(len(decoder.sites)))  # every site split
    assert weights(layers[0].columns) == ["the input of site 0", "the input of site 1"]
    assert weights(layers[0].rows) == ["layers.0.res.weight", "layers.0.skip.weight"]
    plan, _, decoder = plan_of("m2_causal")
    assert sorted(i for r in plan.regions for i in r.sites) == list(range(len(decoder.sites)))
