"""The layer-schedule pass: site levels and critical path from the step program's dataflow, tile
groups over the one bank, and the check that the tile call reads only history."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import lcsm_compile
from examples.models import get
from examples.models.common import LM, Block, seeded, token_inputs
from examples.models.conv1d_long import LongConv1dMixer
from lcsm_compile.passes import layer_schedule


class TwoBranches(nn.Module):
    """Two independent mixers on the same input: their convolutions share levels."""

    def __init__(self, d_model, l_max):
        super().__init__()
        self.a, self.b = LongConv1dMixer(d_model, l_max), LongConv1dMixer(d_model, l_max)

    def forward(self, u):
        return self.a(u) + self.b(u)


def optimize(model, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lcsm_compile.optimize(model, inputs, **kw)


@pytest.fixture(scope="module")
def striped():
    return optimize(*get("striped_hyena").build(), strategy="tile")  # its modal filters would take the recurrence


def test_recurrent_convolutions_join_no_tile_group():
    """StripedHyena's modal filters decode by their recurrence (the default strategy): the schedule
    says so per site and has no tile work left."""
    decoder = optimize(*get("striped_hyena").build())
    sched = decoder.schedule
    longs = [i for i, s in enumerate(decoder.sites) if s.kind == "long"]
    assert list(sched.recurrent) == longs and decoder.bank is None and sched.tile_groups == []
    assert sched.table().count("long, recurrent: 4 modes") == 2 and sched.to_json()["recurrent"] == longs


def test_each_long_site_shows_its_strategy_state_and_crossover(striped):
    """Per long site: its strategy, its state per batch row (N complex128 modes per channel, or one
    value per position and channel), and for a proved modal filter the max_len from which "auto"
    takes the recurrence, that of recurrence.choose."""
    from lcsm_compile.recurrence import choose, recurrent_from

    decoder = optimize(*get("striped_hyena").build())
    assert decoder.report.table().count(f"strategy='auto' takes its recurrence from max_len {recurrent_from(4)}") == 2
    for sched, strategy in ((decoder.schedule, "recurrent"), (striped.schedule, "tile")):
        longs = [s for s in sched.sites if s["kind"] == "long"]
        assert longs and all(s["strategy"] == strategy and s["recurrent_from"] == recurrent_from(4) for s in longs)
        per_row = [s["width"] * (4 * 16 if strategy == "recurrent" else striped.max_len * 4) for s in longs]
        assert [s["state_bytes_per_row"] for s in longs] == per_row
        assert sched.table().count(f"long, {strategy}") == len(longs)
        assert sched.table().count(f"recurrence from max_len {recurrent_from(4)}") == len(longs)
    assert decoder.schedule.to_json()["transforms"] is None  # no tile work left: no FFT work to print
    assert "FFT work per channel" in striped.schedule.table() and striped.schedule.to_json()["transforms"]["ratio"] > 0
    for modes in (1, 4, 16, 64):  # the printed crossover is where choose switches
        n = recurrent_from(modes)
        form = type("Form", (), {"poles": torch.zeros(1, modes)})()
        probe = type("Conv", (), {"modal": form})()
        assert choose(probe, n) == "recurrent" and choose(probe, n - 1) == "tile", modes


def test_sequential_layers_form_one_chain(striped):
    sched = striped.schedule
    names = [s["name"] for s in sched.sites]
    assert len(sched.levels) == len(names) == 4  # short, long per layer, two layers in series
    assert [len(level) for level in sched.levels] == [1, 1, 1, 1]
    assert sched.critical_path == [level[0] for level in sched.levels]
    assert [s["kind"] for s in sched.sites] == ["short", "long", "short", "long"]
    assert [s["module"].split(".")[1] for s in sched.sites] == ["0", "0", "1", "1"]  # blocks.<layer>


def test_tile_groups_cover_every_size_once_per_call(striped):
    sched, bank = striped.schedule, striped.bank
    sizes = [g["size"] for g in sched.tile_groups]
    assert sizes == [2**k for k in range(len(sizes))] and sizes[-1] * 2 >= striped.max_len - 2
    for g in sched.tile_groups:
        assert g["kernel"] == ("direct" if g["size"] <= bank.crossover else "fft")
        assert g["channels"] == bank.channels == sum(s["width"] for s in sched.sites if s["kind"] == "long")
        assert g["sites"] == [s["name"] for s in sched.sites if s["kind"] == "long"]
    # steps 1..N run the tile of size i & -i: the groups' (first, every) describe exactly that
    for i in range(1, 300):
        runs = [g["size"] for g in sched.tile_groups if i >= g["first_step"] and (i - g["first_step"]) % g["every"] == 0]
        assert runs == [i & -i] or (i & -i) > sizes[-1] and runs == []


def test_parallel_branches_share_a_level():
    with seeded(0):
        model = LM(64, 16, [Block(16, TwoBranches(16, 128))], 128).eval()
    decoder = optimize(model, token_inputs(64, 32))
    sched = decoder.schedule
    assert [len(level) for level in sched.levels] == [2, 2]
    assert [s["kind"] for s in sched.sites if s["name"] in sched.levels[0]] == ["short", "short"]
    assert len(sched.critical_path) == 2
    assert len(sched.edges) == 2  # each branch's short conv feeds only its own long conv
    # the decoder built from this schedule is exact
    x = torch.randint(0, 64, (2, 128))
    with torch.no_grad():
        s = decoder.session()
        y = torch.cat([s.prefill(x[:, :5])] + [s.step(x[:, t : t + 1]) for t in range(5, 128)], 1)
        full = model(x).double()
    assert ((y.double() - full).norm() / full.norm()).item() < 1e-5


def test_outputs_are_printable(striped):
    sched = striped.schedule
    table = sched.table()
    assert "critical path" in table and "fft" in table and "direct" in table
    dot = sched.to_dot()
    assert dot.startswith("digraph") and dot.count("->") == len(sched.edges) + 2  # + long sites -> advance
    data = sched.to_json()
    assert set(data) >= {"levels", "critical_path", "tile_groups"}


def test_tile_call_before_a_layer_is_refused(striped):
    gm = copy.deepcopy(striped.programs.step)
    advance = next(n for n in gm.graph.nodes if n.target is torch.ops.lcsm.advance.default)
    session, outputs = advance.args
    advance.args = (session, outputs[:-1])  # the last layer's convolution no longer precedes the tiles
    with pytest.raises(layer_schedule.ScheduleError, match="does not depend on"):
        layer_schedule.run(gm, striped.sites, max_len=striped.max_len, crossover=16)


def test_reading_the_tile_result_is_refused(striped):
    gm = copy.deepcopy(striped.programs.step)
    graph = gm.graph
    advance = next(n for n in graph.nodes if n.target is torch.ops.lcsm.advance.default)
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        graph.call_function(torch.ops.aten.clone.default, (advance,))
    with pytest.raises(layer_schedule.ScheduleError, match="read the result"):
        layer_schedule.run(gm, striped.sites, max_len=striped.max_len, crossover=16)
