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
from lcsm_compile import tuning
from lcsm_compile.costs import Costs
from lcsm_compile.passes import layer_schedule
from lcsm_compile.recurrence import choose, recurrent_from
from lcsm_compile.report import ModalForm


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
    return optimize(*get("striped_hyena").build(), strategy="tile")  # its modal filters could take the recurrence


def test_recurrent_convolutions_join_no_tile_group():
    """StripedHyena's modal filters decoded by their recurrence: the schedule says so per site and
    has no tile work left."""
    decoder = optimize(*get("striped_hyena").build(), strategy="recurrent")
    sched = decoder.schedule
    longs = [i for i, s in enumerate(decoder.sites) if s.kind == "long"]
    assert list(sched.recurrent) == longs and decoder.bank is None and sched.tile_groups == []
    assert sched.table().count("long, recurrent: 4 modes") == 2 and sched.to_json()["recurrent"] == longs


# a recurrent step a little dearer than the red cell: the tiles' calls make up the difference after a few positions
CHEAP_RECURRENCE = Costs(call_s=1e-5, red_cell_s=1e-5, advance_s=0.0, recurrent_s=1.4e-5, mode_s=1e-12)


def test_each_long_site_shows_its_strategy_state_and_crossover(striped, monkeypatch):
    """Per long site: its strategy, its state per batch row (N complex128 modes per channel, or one
    value per position and channel), and for a proved modal filter the max_len from which "auto"
    takes the recurrence by the device's costs, that of recurrence.recurrent_from; the Report
    prints the same line under the convolution."""
    monkeypatch.setattr(tuning, "costs_for", lambda device: CHEAP_RECURRENCE)
    decoder = optimize(*get("striped_hyena").build())
    widths = [s.width for s in decoder.sites if s.kind == "long"]
    start = recurrent_from(4, widths[0], costs=CHEAP_RECURRENCE, crossover=tuning.crossover_for("cpu"), channels=sum(widths))
    assert 2 < start <= decoder.max_len  # the cheap recurrence wins from a few positions on
    for sched, strategy in ((decoder.schedule, "recurrent"), (striped.schedule, "tile")):
        longs = [s for s in sched.sites if s["kind"] == "long"]
        assert longs and all(s["strategy"] == strategy and s["modes"] == 4 for s in longs)
        per_row = [s["width"] * (4 * 16 if strategy == "recurrent" else striped.max_len * 4) for s in longs]
        assert [s["state_bytes_per_row"] for s in longs] == per_row
        assert sched.table().count(f"long, {strategy}") == len(longs)
    assert [s["recurrent_from"] for s in decoder.schedule.sites if s["kind"] == "long"] == [start, start]
    assert decoder.report.table().count(f"decodes: long, recurrent: 4 modes, state 2.0 KiB/row, recurrence from max_len {start}") == 2
    assert decoder.schedule.to_json()["transforms"] is None  # no tile work left: no FFT work to print
    assert "FFT work per channel" in striped.schedule.table() and striped.schedule.to_json()["transforms"]["ratio"] > 0


def test_the_choice_switches_where_the_costs_cross():
    """recurrent_from is the smallest max_len where the recurrence's step is no dearer than the red
    cell plus the site's share of the engine's step and amortised tiles, as a scan over every
    max_len finds it; choose
    applies it; a recurrence dearer than every tiling is never taken."""
    for costs in (CHEAP_RECURRENCE, Costs(), Costs(recurrent_s=2e-5, mode_s=1e-10, fft_flops_s=1e9)):
        for modes, width, channels, crossover in ((1, 8, 8, 4), (4, 32, 64, 16), (16, 256, 2048, 32), (64, 4096, 4096, 16)):
            poles = torch.zeros(width, modes, dtype=torch.complex128)
            form = ModalForm(poles, poles, 0.0, (modes,) * width)
            probe = type("Conv", (), {"modal": form})()
            choice = dict(costs=costs, crossover=crossover, channels=channels)
            start = recurrent_from(modes, width, **choice, longest=1 << 14)
            rec = costs.recurrent(modes, width)
            wins = [n for n in range(2, (1 << 14) + 1)
                    if rec <= costs.red_cell_s + (costs.advance_s + costs.tiling(n, channels, crossover)) * width / channels]
            assert start == (wins[0] if wins else None), (costs, modes, width)
            if start is not None:
                assert wins == list(range(start, (1 << 14) + 1))  # the tiling's cost only grows with max_len
                assert choose(probe, start, **choice) == "recurrent" and choose(probe, start - 1, **choice) == "tile"
            assert choose(probe, 8, "recurrent", **choice) == "recurrent" and choose(probe, 1 << 14, "tile", **choice) == "tile"
    never = Costs(recurrent_s=1.0)
    assert recurrent_from(4, 32, costs=never, crossover=16, channels=64) is None


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
        layer_schedule.run(gm, striped.sites, max_len=striped.max_len, crossover=16, costs=Costs())


def test_reading_the_tile_result_is_refused(striped):
    gm = copy.deepcopy(striped.programs.step)
    graph = gm.graph
    advance = next(n for n in graph.nodes if n.target is torch.ops.lcsm.advance.default)
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        graph.call_function(torch.ops.aten.clone.default, (advance,))
    with pytest.raises(layer_schedule.ScheduleError, match="read the result"):
        layer_schedule.run(gm, striped.sites, max_len=striped.max_len, crossover=16, costs=Costs())
