"""generate()/process_logits against hand-computed HF semantics and against the O(L^2) naive loop."""

import math
import warnings

import pytest
import torch

from lcsm_compile.errors import DTypeError, MaxLenExceeded, SessionNotStarted, ShapeError
from lcsm_compile.generation import NaiveSession, generate, naive_generate, process_logits

INF = math.inf


def kept(scores):
    return torch.isfinite(scores)


# ---------------------------------------------------------------------------------------------------------------
# (a) process_logits


def test_temperature_divides_logits():
    x = torch.tensor([[1.0, 2.0, 4.0], [-2.0, 0.0, 6.0]])
    assert torch.equal(process_logits(x, temperature=2.0), torch.tensor([[0.5, 1.0, 2.0], [-1.0, 0.0, 3.0]]))
    assert torch.equal(process_logits(x, temperature=0.5), torch.tensor([[2.0, 4.0, 8.0], [-4.0, 0.0, 12.0]]))
    assert torch.equal(process_logits(x), x)  # all defaults: nothing applies
    assert torch.equal(x, torch.tensor([[1.0, 2.0, 4.0], [-2.0, 0.0, 6.0]]))  # input untouched


def test_top_k_keeps_every_tie_of_the_kth_score():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    assert torch.equal(process_logits(x, top_k=2), torch.tensor([[-INF, 3.0, 3.0, -INF, -INF]]))
    assert torch.equal(process_logits(x, top_k=3), torch.tensor([[-INF, 3.0, 3.0, 2.0, -INF]]))
    # HF removes only scores < the k-th largest: with k=1 both tied maxima survive
    assert torch.equal(process_logits(x, top_k=1), torch.tensor([[-INF, 3.0, 3.0, -INF, -INF]]))
    # k >= V keeps everything (HF clamps k to the vocabulary)
    assert torch.equal(process_logits(x, top_k=5), x)
    assert torch.equal(process_logits(x, top_k=99), x)


def test_top_k_per_row():
    x = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    assert torch.equal(process_logits(x, top_k=1), torch.tensor([[-INF, -INF, 2.0], [2.0, -INF, -INF]]))


def test_top_p_exact_boundary_with_exact_probabilities():
    # four equal logits: every probability is exactly 0.25 and every cumulative sum is exact
    x = torch.zeros(1, 4)
    # mass exactly 0.5 is reached by 2 tokens: HF removes cum <= 1 - top_p = 0.5, i.e. 2 of them
    assert kept(process_logits(x, top_p=0.5)).sum().item() == 2
    assert kept(process_logits(x, top_p=0.75)).sum().item() == 3
    assert kept(process_logits(x, top_p=0.25)).sum().item() == 1
    # just above a boundary needs one more token
    assert kept(process_logits(x, top_p=0.5 + 1e-3)).sum().item() == 3
    assert kept(process_logits(x, top_p=0.25 + 1e-3)).sum().item() == 2
    # far below every boundary: at least one token is always kept
    assert kept(process_logits(x, top_p=1e-9)).sum().item() == 1


def test_top_p_exact_boundary_with_masked_entries():
    # probabilities exactly [0.5, 0.5, 0, 0]: -inf entries count as zero mass and stay removed
    x = torch.tensor([[0.0, -INF, 0.0, -INF]])
    out = process_logits(x, top_p=0.5)
    assert kept(out).sum().item() == 1 and kept(out)[0, [1, 3]].sum().item() == 0
    assert torch.equal(kept(process_logits(x, top_p=0.6)), torch.tensor([[True, False, True, False]]))


def test_top_p_single_dominant_token():
    x = torch.tensor([[0.0, 10.0, 0.0, 0.0]])  # p(token 1) = 1 / (1 + 3e-10) ~ 0.999864, others ~ 4.54e-5
    assert torch.equal(process_logits(x, top_p=0.9), torch.tensor([[-INF, 10.0, -INF, -INF]]))
    assert torch.equal(process_logits(x, top_p=0.9998), torch.tensor([[-INF, 10.0, -INF, -INF]]))
    # 0.999864 < 0.9999 <= 0.999909: one of the tied small tokens is needed too
    out = process_logits(x, top_p=0.9999)
    assert kept(out).sum().item() == 2 and out[0, 1].item() == 10.0
    # 0.999955 < 0.99999: all of them
    assert kept(process_logits(x, top_p=0.99999)).sum().item() == 4


def test_top_p_one_keeps_all_even_underflowing_tokens():
    # p(token 2) underflows to exactly 0 in float32; applying the warper at 1.0 would remove it (cum 0 <= 0),
    # HF skips top_p=1.0 altogether and so must we
    x = torch.tensor([[0.0, 1.0, -1000.0]])
    assert torch.softmax(x, -1)[0, 2].item() == 0.0
    assert torch.equal(process_logits(x, top_p=1.0), x)


def test_order_temperature_then_top_k_then_top_p():
    # temperature before top-p: at T=1 the top two tokens are needed for 0.7, at T=0.25 the first suffices
    x = torch.tensor([[2.0, 1.0, 0.0]])
    assert kept(process_logits(x, top_p=0.7)).tolist() == [[True, True, False]]
    assert torch.equal(process_logits(x, temperature=0.25, top_p=0.7), torch.tensor([[8.0, -INF, -INF]]))
    # top-k before top-p: top-p sees the distribution renormalised over the top-k (two tokens of 0.5 each)
    # (top-k keeps the two 1s, each then of probability exactly 0.5; top-p first would keep both 1s)
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    out = process_logits(y, top_k=2, top_p=0.5)
    assert kept(out).sum().item() == 1 and kept(out)[0, [1, 3]].sum().item() == 0
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert kept(process_logits(z, top_k=2, top_p=0.99)).tolist() == [[True, True, False, False]]


def reference_top_p_keep(logits, top_p):
    """HF's definition in float64: the smallest set of most probable tokens whose mass is >= top_p."""
    probs = torch.softmax(logits.double(), -1)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    margin = INF
    for r in range(probs.shape[0]):
        p, idx = torch.sort(probs[r], descending=True)
        cum = torch.cumsum(p, 0)
        k = int((cum < top_p).sum().item()) + 1  # first prefix reaching top_p
        keep[r, idx[: min(k, len(p))]] = True
        margin = min(margin, (cum - top_p).abs().min().item())
    return keep, margin


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.95, 0.999])
def test_top_p_matches_definition_on_random_logits(top_p):
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(16, 64, generator=g) * 2.0
    want, margin = reference_top_p_keep(logits, top_p)
    assert margin > 1e-6  # no cumulative sum sits on the boundary, so float32 vs float64 cannot matter
    got = kept(process_logits(logits, top_p=top_p))
    assert torch.equal(got, want)
    assert not torch.equal(want, torch.ones_like(want))  # the warper actually removed something
    # kept entries keep their value
    assert torch.equal(process_logits(logits, top_p=top_p)[got], logits[got])


def test_top_p_after_temperature_matches_definition():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(8, 40, generator=g)
    want, margin = reference_top_p_keep(logits / 0.6, 0.8)
    assert margin > 1e-5
    assert torch.equal(kept(process_logits(logits, temperature=0.6, top_p=0.8)), want)


# ---------------------------------------------------------------------------------------------------------------
# (a2) sampling against a reference written from the definitions, not from lcsm_compile.generation


def reference_distribution(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution HF's sampler draws the next token from, for 1-D `logits`, in float64: softmax of
    logits / temperature; top-k keeps every token at least as probable as the k-th most probable; top-p then
    keeps the smallest set of most probable tokens whose mass (renormalised after top-k) reaches top_p."""
    p = torch.softmax(logits.double() / temperature, -1)
    if top_k is not None:
        kth = torch.sort(p, descending=True).values[min(top_k, p.numel()) - 1]
        p = torch.where(p >= kth, p, torch.zeros_like(p))
        p = p / p.sum()
    if top_p is not None and top_p < 1.0:
        order = torch.argsort(p, descending=True, stable=True)
        cum = torch.cumsum(p[order], 0)
        n = int((cum < top_p).sum()) + 1  # the first prefix whose mass reaches top_p
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[order[:n]] = True
        p = torch.where(keep, p, torch.zeros_like(p))
        p = p / p.sum()
    return p


LOG = lambda *probs: torch.tensor(probs, dtype=torch.float64).log()  # noqa: E731


@pytest.mark.parametrize("logits, opts, want", [
    (LOG(0.5, 0.25, 0.125, 0.125), {}, [0.5, 0.25, 0.125, 0.125]),
    (LOG(0.5, 0.25, 0.125, 0.125), dict(top_p=0.7), [2 / 3, 1 / 3, 0, 0]),  # 0.5 < 0.7 <= 0.75
    (LOG(0.5, 0.25, 0.125, 0.125), dict(top_p=0.75), [2 / 3, 1 / 3, 0, 0]),  # reaching top_p exactly is enough
    (LOG(0.5, 0.25, 0.125, 0.125), dict(top_k=1), [1, 0, 0, 0]),
    (LOG(0.5, 0.25, 0.25), dict(temperature=0.5), [2 / 3, 1 / 6, 1 / 6]),  # p^2, renormalised
    (torch.tensor([0.0, math.log(4)]), dict(temperature=2.0), [1 / 3, 2 / 3]),  # sqrt(4) = 2
    (LOG(0.4, 0.2, 0.2, 0.2), dict(top_k=2), [0.4, 0.2, 0.2, 0.2]),  # ties with the k-th all stay
    (LOG(0.5, 0.3, 0.2), dict(top_k=2, top_p=0.6), [1, 0, 0]),  # top-k -> (0.625, 0.375): 0.625 >= 0.6
    (LOG(0.5, 0.3, 0.2), dict(top_k=2, top_p=0.7), [0.625, 0.375, 0]),
])
def test_reference_distribution_by_hand(logits, opts, want):
    assert torch.allclose(reference_distribution(logits, **opts), torch.tensor(want, dtype=torch.float64), atol=1e-12)


def _within_sampling_noise(counts, probs, n):
    """Every count within 5 standard deviations of n * p, and exactly 0 where p is 0."""
    for c, p in zip(counts.tolist(), probs.tolist()):
        if p == 0:
            assert c == 0, (counts, probs)
        else:
            assert abs(c - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (counts, probs)


SAMPLING_CASES = [dict(), dict(temperature=0.7), dict(top_k=3), dict(top_p=0.8), dict(temperature=1.5, top_k=4, top_p=0.9)]


@pytest.mark.parametrize("opts", SAMPLING_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_generate_samples_the_reference_distribution(opts):
    """Each of n rows draws its first token from the same logits: the counts follow the reference
    distribution, and the second token follows the distribution of the logits the decoder returned for
    that row's first token (a step's logits depend on what was fed)."""
    n, V = 40000, 6
    g = torch.Generator().manual_seed(0)
    first = torch.randn(V, generator=g) * 1.5
    then = torch.randn(V, V, generator=g) * 1.5  # logits after token a: then[a]

    def prefill(ids):
        return first.expand(ids.shape[0], ids.shape[1], V).clone()

    def step(ids):
        return then[ids[:, 0]][:, None, :]

    out = generate(prefill, step, torch.zeros(n, 1, dtype=torch.long), 2, do_sample=True,
                   generator=torch.Generator().manual_seed(1), **opts)
    a, b = out[:, 1], out[:, 2]
    p0 = reference_distribution(first, **opts)
    _within_sampling_noise(torch.bincount(a, minlength=V), p0, n)
    for tok in range(V):
        rows = a == tok
        if rows.sum() >= 500:
            _within_sampling_noise(torch.bincount(b[rows], minlength=V), reference_distribution(then[tok], **opts),
                                   int(rows.sum()))


def test_sampling_check_can_fail():
    """Negative control: tokens drawn without the warpers do not pass for the top-p distribution."""
    n, V = 40000, 6
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 1.5
    plain = torch.multinomial(torch.softmax(logits, -1).expand(n, V), 1, replacement=True,
                              generator=torch.Generator().manual_seed(1))[:, 0]
    with pytest.raises(AssertionError):
        _within_sampling_noise(torch.bincount(plain, minlength=V), reference_distribution(logits, top_p=0.8), n)


# ---------------------------------------------------------------------------------------------------------------
# (b) fast decoder == naive loop


class ToyLM:
    """Embedding -> causal cumulative mean -> linear, with integer weights.

    logits_t = (sum_{s<=t} E[x_s]) @ W / t: the integer sums and products are exact in float32, so the running-state
    decoder below yields bit-identical logits to the full recomputation and any token mismatch is a driver bug.
    SCALE (a power of two, exact) keeps the logits small enough that sampling is not near-deterministic.
    """

    SCALE = 8.0

    def __init__(self, V=13, D=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.V = V
        self.E = torch.randint(-4, 5, (V, D), generator=g).float()
        self.W = torch.randint(-4, 5, (D, V), generator=g).float()

    def __call__(self, ids):
        t = torch.arange(1, ids.shape[1] + 1, dtype=torch.float32).view(1, -1, 1)
        return (self.E[ids].cumsum(1) @ self.W) / (t * self.SCALE)

    def decoder(self, log=None):
        st = {}

        def prefill(ids):
            st["sum"], st["t"] = self.E[ids].sum(1), ids.shape[1]
            return self(ids)

        def step(ids):
            assert ids.shape == (st["sum"].shape[0], 1) and ids.dtype == torch.long
            if log is not None:
                log.append(ids.clone())
            st["sum"] = st["sum"] + self.E[ids[:, 0]]
            st["t"] += 1
            return ((st["sum"] @ self.W) / (st["t"] * self.SCALE))[:, None, :]

        return prefill, step


def prompt(B=3, P=5, V=13, seed=1):
    return torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(seed))


def test_greedy_matches_naive():
    m, ids = ToyLM(), prompt()
    log = []
    fast = generate(*m.decoder(log), ids, 20)
    slow = naive_generate(m, ids, 20)
    assert fast.shape == (3, 25) and fast.dtype == torch.long
    assert torch.equal(fast, slow)
    assert torch.equal(fast[:, :5], ids)
    # step saw exactly the chosen tokens, in order, and was not called for the last one
    assert len(log) == 19 and torch.equal(torch.cat(log, 1), fast[:, 5:-1])
    # greedy really is the argmax of the model on the prefix
    for t in range(5, 25):
        assert torch.equal(fast[:, t], m(fast[:, :t])[:, -1].argmax(-1))


@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7), dict(top_k=4), dict(top_p=0.8),
                                  dict(temperature=1.3, top_k=6, top_p=0.9)])
def test_sampling_matches_naive_with_same_seed(opts):
    m, ids = ToyLM(), prompt()
    fast = generate(*m.decoder(), ids, 30, do_sample=True, generator=torch.Generator().manual_seed(5), **opts)
    slow = naive_generate(m, ids, 30, do_sample=True, generator=torch.Generator().manual_seed(5), **opts)
    assert torch.equal(fast, slow)
    greedy = generate(*m.decoder(), ids, 30)
    assert not torch.equal(fast, greedy)  # sampling actually sampled


def test_sampling_uses_the_given_generator_only():
    m, ids = ToyLM(), prompt()
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(generate(*m.decoder(), ids, 20, do_sample=True, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(runs[0], runs[1])
    other = generate(*m.decoder(), ids, 20, do_sample=True, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(runs[0], other)


def test_top_k_one_sampling_is_greedy():
    m, ids = ToyLM(), prompt()
    sampled = generate(*m.decoder(), ids, 15, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(*m.decoder(), ids, 15))


def test_greedy_ignores_sampling_options_with_warning():
    m, ids = ToyLM(), prompt()
    with pytest.warns(UserWarning, match="temperature=0.5.*top_k=3.*ignored"):
        out = generate(*m.decoder(), ids, 10, temperature=0.5, top_k=3)
    assert torch.equal(out, generate(*m.decoder(), ids, 10))


def test_low_precision_logits_are_sampled_in_float32():
    # HF _sample copies the logits to float32 before warping/softmax: a float16 decoder must sample exactly like
    # one returning the same values upcast; in float16, large logits / 0.25 would overflow to inf and give nan probs
    m, ids = ToyLM(), prompt()
    outs = []
    for cast in (lambda t: (t * 4000).half(), lambda t: (t * 4000).half().float()):
        pre, st = m.decoder()
        outs.append(generate(lambda x: cast(pre(x)), lambda x: cast(st(x)), ids, 30, do_sample=True, top_p=0.9,
                             temperature=0.25, generator=torch.Generator().manual_seed(2)))
    assert outs[0].dtype == torch.long and torch.equal(outs[0], outs[1])


def test_int32_prompt_and_zero_new_tokens():
    m, ids = ToyLM(), prompt()
    out = generate(*m.decoder(), ids.int(), 6)
    assert out.dtype == torch.long and torch.equal(out, generate(*m.decoder(), ids, 6))
    calls = []
    same = generate(lambda x: calls.append(x), lambda x: calls.append(x), ids, 0)
    assert torch.equal(same, ids) and same is not ids and calls == []


# ---------------------------------------------------------------------------------------------------------------
# (c) EOS handling, with a scripted decoder: row b emits script[b][j] as its j-th new token


def scripted(script, V=10):
    script = torch.tensor(script)
    st = {"j": 0, "fed": []}

    def onehot(j):
        out = torch.full((script.shape[0], V), -5.0)
        out[torch.arange(script.shape[0]), script[:, j]] = 5.0
        return out

    def prefill(ids):
        out = torch.zeros(ids.shape[0], ids.shape[1], V)
        out[:, -1] = onehot(0)
        return out

    def step(ids):
        st["fed"].append(ids[:, 0].tolist())
        st["j"] += 1
        return onehot(st["j"])[:, None]

    return prefill, step, st


P0 = torch.tensor([[1, 1], [1, 1]])


def test_per_row_finish_pads_after_eos():
    pre, stp, st = scripted([[5, 2, 7, 7], [4, 4, 4, 4]])
    out = generate(pre, stp, P0, 4, eos_token_id=2, pad_token_id=0)
    assert out[:, 2:].tolist() == [[5, 2, 0, 0], [4, 4, 4, 4]]
    # finished rows are fed the pad token, as HF does
    assert st["fed"] == [[5, 4], [2, 4], [0, 4]]


def test_pad_defaults_to_first_eos_id():
    pre, stp, _ = scripted([[3, 7, 7, 7], [4, 4, 4, 4]])
    out = generate(pre, stp, P0, 4, eos_token_id=[3, 2])
    assert out[:, 2:].tolist() == [[3, 3, 3, 3], [4, 4, 4, 4]]


def test_any_eos_in_list_finishes_a_row():
    pre, stp, _ = scripted([[2, 7, 7, 7], [4, 9, 7, 7]])
    out = generate(pre, stp, P0, 4, eos_token_id=[9, 2], pad_token_id=0)
    # both rows finished after 2 tokens, so the output is shorter than P + max_new_tokens
    assert out[:, 2:].tolist() == [[2, 0], [4, 9]]


def test_early_stop_when_all_rows_finished():
    pre, stp, st = scripted([[2, 5, 5, 5, 5], [6, 6, 2, 5, 5]])
    out = generate(pre, stp, P0, 5, eos_token_id=2, pad_token_id=0)
    assert out.tolist() == [[1, 1, 2, 0, 0], [1, 1, 6, 6, 2]]
    assert len(st["fed"]) == 2  # no step after the last row finished


def test_eos_at_first_token_everywhere_returns_one_token():
    pre, stp, st = scripted([[2, 5], [2, 5]])
    out = generate(pre, stp, P0, 2, eos_token_id=2)
    assert out.tolist() == [[1, 1, 2], [1, 1, 2]] and st["fed"] == []


def test_without_eos_the_token_is_ordinary():
    pre, stp, _ = scripted([[2, 5, 5], [2, 2, 2]])
    assert generate(pre, stp, P0, 3)[:, 2:].tolist() == [[2, 5, 5], [2, 2, 2]]


def test_eos_fast_matches_naive_with_sampling():
    m, ids = ToyLM(), prompt()
    kw = dict(do_sample=True, temperature=1.5, eos_token_id=[3, 7], pad_token_id=12)
    fast = generate(*m.decoder(), ids, 40, generator=torch.Generator().manual_seed(11), **kw)
    slow = naive_generate(m, ids, 40, generator=torch.Generator().manual_seed(11), **kw)
    assert torch.equal(fast, slow)
    new = fast[:, 5:]
    assert ((new == 3) | (new == 7)).any(dim=1).all()  # every row hit an EOS in this seeded run...
    for row in new.tolist():  # ...and holds only pads after it
        first = min(row.index(e) for e in (3, 7) if e in row)
        assert all(t == 12 for t in row[first + 1:])


# ---------------------------------------------------------------------------------------------------------------
# (d) streamer, callback, progress


class RecordingStreamer:
    def __init__(self):
        self.events = []

    def put(self, value):
        self.events.append(("put", value.clone()))

    def end(self):
        self.events.append(("end", None))


def test_streamer_protocol_and_callback():
    m, ids = ToyLM(), prompt()
    s, calls = RecordingStreamer(), []
    out = generate(*m.decoder(), ids, 7, streamer=s, callback=lambda pos, tok: calls.append((pos, tok.clone())))
    kinds = [k for k, _ in s.events]
    assert kinds == ["put"] * 8 + ["end"]
    assert torch.equal(s.events[0][1], ids)
    for i, (_, v) in enumerate(s.events[1:8]):
        assert v.shape == (3,) and v.device.type == "cpu" and torch.equal(v, out[:, 5 + i])
    assert [p for p, _ in calls] == list(range(5, 12))
    assert all(torch.equal(t, out[:, p]) for p, t in calls)


def test_streamer_on_early_stop_and_zero_tokens():
    pre, stp, _ = scripted([[2, 5, 5], [6, 2, 5]])
    s, calls = RecordingStreamer(), []
    out = generate(pre, stp, P0, 3, eos_token_id=2, streamer=s, callback=lambda p, t: calls.append(p))
    assert out.shape == (2, 4) and [k for k, _ in s.events] == ["put", "put", "put", "end"] and calls == [2, 3]
    s = RecordingStreamer()
    generate(pre, stp, P0, 0, streamer=s)
    assert [k for k, _ in s.events] == ["put", "end"]


def test_progress_bar_goes_to_stderr(capsys):
    m, ids = ToyLM(), prompt()
    generate(*m.decoder(), ids, 4, progress=True)
    assert "4/4" in capsys.readouterr().err
    generate(*m.decoder(), ids, 4)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------------------------
# (e) bad input


def never(*a):
    raise AssertionError("the decoder must not be called on bad input")


@pytest.mark.parametrize("bad, err, msg", [
    ([[1, 2]], DTypeError, r"prompt_ids: expected a 2-D integer torch.Tensor"),
    (torch.tensor([1, 2, 3]), ShapeError, r"prompt_ids: expected a 2-D tensor.*\(3,\)"),
    (torch.zeros(2, 3), DTypeError, r"prompt_ids: expected an integer dtype.*float32"),
    (torch.zeros(2, 3, dtype=torch.bool), DTypeError, r"prompt_ids: expected an integer dtype.*bool"),
    (torch.zeros(2, 0, dtype=torch.long), ShapeError, r"prompt_ids: expected at least 1 row and 1 token"),
])
def test_bad_prompt(bad, err, msg):
    with pytest.raises(err, match=msg):
        generate(never, never, bad, 3)


@pytest.mark.parametrize("kw, msg", [
    (dict(max_new_tokens=-1), r"max_new_tokens: expected an int >= 0, got -1"),
    (dict(temperature=0.0), r"temperature: expected a finite float > 0, got 0.0 \(for greedy"),
    (dict(temperature=-1.0), r"temperature: expected a finite float > 0, got -1.0"),
    (dict(temperature=math.nan), r"temperature: expected a finite float > 0"),
    (dict(top_k=0), r"top_k: expected None or an int >= 1, got 0"),
    (dict(top_p=0.0), r"top_p: expected None or a float in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p: expected None or a float in \(0, 1\], got 1.5"),
    (dict(eos_token_id=[]), r"eos_token_id: expected"),
    (dict(on_max_len="clip", max_len=4), r"on_max_len: expected 'error' or 'truncate'"),
])
def test_bad_options_raise_value_error(kw, msg):
    kw = dict(max_new_tokens=3, do_sample=True) | kw
    n = kw.pop("max_new_tokens")
    with pytest.raises(ValueError, match=msg):
        generate(never, never, torch.ones(2, 3, dtype=torch.long), n, **kw)


def test_bad_option_types():
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="max_new_tokens"):
        generate(never, never, ids, 2.0)
    with pytest.raises(TypeError, match="top_k"):
        generate(never, never, ids, 2, do_sample=True, top_k=2.5)
    with pytest.raises(TypeError, match="streamer"):
        generate(never, never, ids, 2, streamer=object())


def test_process_logits_rejects_bad_input():
    with pytest.raises(ShapeError, match=r"logits: expected logits of shape \[\*, \*\], got \(4,\)"):
        process_logits(torch.zeros(4))
    with pytest.raises(DTypeError, match="floating-point"):
        process_logits(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="top_p"):
        process_logits(torch.zeros(2, 4), top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        process_logits(torch.zeros(2, 4), temperature=0)


def test_wrong_decoder_output_shapes():
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ShapeError, match=r"prefill: expected logits of shape \[2, 3, \*\], got \(2, 5\)"):
        generate(lambda x: torch.zeros(2, 5), never, ids, 2)
    with pytest.raises(ShapeError, match=r"prefill: expected logits of shape \[2, 3, \*\], got \(2, 1, 5\)"):
        generate(lambda x: torch.zeros(2, 1, 5), never, ids, 2)  # returned only the last position
    with pytest.raises(ShapeError, match=r"step: expected logits of shape \[2, 1, \*\], got \(2, 5\)"):
        generate(lambda x: torch.zeros(2, 3, 5), lambda x: torch.zeros(2, 5), ids, 2)
    with pytest.raises(ShapeError, match=r"step: expected logits with vocabulary size 5.*got 6"):
        generate(lambda x: torch.zeros(2, 3, 5), lambda x: torch.zeros(2, 1, 6), ids, 2)
    with pytest.raises(ShapeError, match=r"model: expected logits of shape \[2, 3, \*\]"):
        naive_generate(lambda x: torch.zeros(2, 5), ids, 2)


def test_naive_session_recomputes_the_prefix_and_returns_its_last_position():
    """The naive loop every benchmark and the CLI time: the model on the whole prefix per step, each
    tensor output (any pytree) cut to the last position, as a decoder session's step returns it."""
    calls = []

    def model(x):
        calls.append(x.clone())
        return {"cumsum": x.cumsum(1), "length": x.shape[1]}

    session = NaiveSession(model)
    with pytest.raises(SessionNotStarted, match="call prefill"):
        session.step(torch.ones(2, 1))
    x = torch.randn(2, 6, 3)
    assert torch.equal(session.prefill(x[:, :4])["cumsum"], x[:, :4].cumsum(1))
    out = session.step(x[:, 4:5])
    assert torch.allclose(out["cumsum"], x[:, :5].sum(1, keepdim=True)) and out["length"] == 5
    assert [c.shape[1] for c in calls] == [4, 5] and torch.equal(calls[-1], x[:, :5])


# ---------------------------------------------------------------------------------------------------------------
# (f) max_len


def test_max_len_error_before_any_work():
    s = RecordingStreamer()
    with pytest.raises(MaxLenExceeded, match=r"prompt length 5 \+ max_new_tokens 10 = 15 exceeds max_len 12") as e:
        generate(never, never, prompt(), 10, max_len=12, streamer=s)
    assert isinstance(e.value, IndexError) and s.events == []


def test_max_len_truncate_warns_and_stops_at_max_len():
    m, ids = ToyLM(), prompt()
    with pytest.warns(UserWarning, match=r"max_new_tokens 10 exceeds max_len 12; generating only 7"):
        out = generate(*m.decoder(), ids, 10, max_len=12, on_max_len="truncate")
    assert out.shape == (3, 12)
    assert torch.equal(out, generate(*m.decoder(), ids, 7))


def test_max_len_exactly_reached_is_fine_and_prompt_too_long_cannot_be_truncated():
    m, ids = ToyLM(), prompt()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(*m.decoder(), ids, 7, max_len=12).shape == (3, 12)
    with pytest.raises(MaxLenExceeded, match=r"prompt length 5 alone exceeds max_len 4"):
        generate(never, never, ids, 3, max_len=4, on_max_len="truncate")
