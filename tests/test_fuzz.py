"""The differential fuzzer (tests/fuzz.py) at a fixed seed, plus checks of the generator itself.

Properties on lcsm_compile, one test per model each (the id is the model's index; the message holds
its description and the command that reproduces it):
- accepted => the teacher-forced decode is exact (prefill 1 and total/2, then steps);
- only legal ops => accepted;
- never a crash (anything but NotDecodable from optimize; any error while decoding);
- an illegal model is refused with a rejected candidate inside the illegal construct;
- with validate=False (the analysis alone), accepted => exact still holds.

The generator checks do not run lcsm_compile: every LEGAL model is causal and prefix-stable in float64,
every ILLEGAL one shows its violation, the dtype tolerances sit above the models' own rounding, and
the grammar's productions are all drawn.
"""

import pytest

import fuzz

SEED = 0
N_MODELS = 36  # with TOTAL, about 3 minutes on 2 CPU cores against the current code
TOTAL = 64  # positions decoded per prompt length
N_UNCHECKED = 18  # models also run with validate=False: the analysis alone must never accept a wrong decoder
N_LABELS = 60  # models whose labels are checked numerically (float64, no lcsm_compile)
N_COVERAGE = 400  # models drawn to cover the grammar


@pytest.fixture(scope="module")
def results():
    cache = {}

    def get(i):
        if i not in cache:
            cache[i] = fuzz.run_case(fuzz.generate(SEED, i), total=TOTAL)
        return cache[i]

    return get


@pytest.fixture(scope="module")
def unchecked():
    cache = {}

    def get(i):
        if i not in cache:
            cache[i] = fuzz.run_case(fuzz.generate(SEED, i), total=TOTAL, validate=False)
        return cache[i]

    return get


@pytest.mark.parametrize("i", range(N_UNCHECKED))
def test_accepted_is_exact_without_the_translation_validation(unchecked, i):
    """validate=False: what the analysis accepts decodes exactly (rows included), with no safety net."""
    r = unchecked(i)
    assert r.outcome not in ("silent_error", "crash") and r.rows != "wrong", r.line()


# property -> the outcome that breaks it
PROPERTIES = {"accepted_is_exact": "silent_error", "legal_is_accepted": "legal_refused", "never_crashes": "crash"}


@pytest.mark.parametrize("prop", PROPERTIES)
@pytest.mark.parametrize("i", range(N_MODELS))
def test_fuzz_property(results, i, prop):
    r = results(i)
    assert r.outcome != PROPERTIES[prop], r.line()


@pytest.mark.parametrize("i", range(N_MODELS))
def test_rows_at_own_positions_are_never_wrong(results, i):
    """An accepted model's rows at their own positions (ragged prompts) decode exactly, checked
    by the fuzzer's own oracle; the decoder may withhold them, never get them wrong."""
    r = results(i)
    assert r.rows != "wrong", f"rows: {r.rows_detail}\n" + r.line()


@pytest.mark.parametrize("i", range(N_MODELS))
def test_illegal_refusal_names_the_construct(results, i):
    r = results(i)
    if r.outcome == "illegal_refused":
        assert r.names_illegal, f"refused, but not at {r.illegal}: " + r.line()


@pytest.mark.parametrize("i", range(N_LABELS))
def test_generator_labels_hold(i):
    case = fuzz.generate(SEED, i)
    problem = fuzz.check_labels(case)
    assert problem is None, f"{problem}\n    {case.desc}"


@pytest.mark.parametrize("illegal", sorted(fuzz.ILLEGAL))
def test_every_illegal_construct_shows_its_violation(illegal):
    for i in range(2):
        case = fuzz.generate(SEED, 1000 + i, illegal=illegal)
        problem = fuzz.check_labels(case)
        assert problem is None, f"{problem}\n    {case.desc}"


@pytest.mark.parametrize("i", range(0, N_LABELS, 2))
def test_tolerance_sits_above_the_models_own_rounding(i):
    """A model run in its own dtype is within a third of the decode tolerance of the reference, so a
    decode flagged inexact is wrong, not merely rounded."""
    case = fuzz.generate(SEED, i)
    assert fuzz.own_error(case) < fuzz.TOL[case.dtype] / 3, case.desc


def test_generator_covers_the_grammar():
    drawn = set().union(*(fuzz.generate(SEED, i).productions for i in range(N_COVERAGE)))
    assert fuzz.all_productions() - drawn == set()
    assert drawn - fuzz.all_productions() == set(), "all_productions() is missing names the grammar draws"


def test_generation_is_reproducible():
    import torch

    for i in (3, 4):
        a, b = fuzz.generate(SEED, i), fuzz.generate(SEED, i)
        assert a.desc == b.desc
        for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            assert torch.equal(p, q), name
    assert fuzz.generate(SEED, 3).desc != fuzz.generate(SEED + 1, 3).desc


def test_forced_dtype_keeps_the_structure():
    import torch

    a, b = fuzz.generate(SEED, 5), fuzz.generate(SEED, 5, dtype=torch.float64)
    assert a.desc.split(" | ", 1)[1] == b.desc.split(" | ", 1)[1]
    assert b.dtype == torch.float64 and next(b.model.parameters()).dtype == torch.float64


def test_the_fuzzer_catches_a_wrong_decoder(monkeypatch):
    """The runner itself can fail: a decoder whose steps are off by a little is a silent error."""
    import torch

    case = fuzz.generate(SEED, 0, dtype=torch.float64, illegal="")

    class Session:
        def __init__(self):
            self.seen = []

        def _run(self, x, chunk=None):
            self.seen.append(x)
            xs = torch.cat(self.seen, 1)
            return case.model(xs)[:, -x.shape[1]:] * (1 + 1e-3 * (xs.shape[1] > 10))

        prefill = step = extend = _run

    class WrongDecoder:
        batch_dynamic = True

        def can(self, capability):
            return True

        def session(self):
            return Session()

    err, first_bad = fuzz.teacher_forced(case, WrongDecoder(), total=24)
    assert first_bad is not None and first_bad[1] == 10, (err, first_bad)
