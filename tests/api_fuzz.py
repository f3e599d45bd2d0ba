"""A stateful fuzzer of the decoding API (hypothesis's RuleBasedStateMachine).

DecodeMachine: prefill, step, add, remove and generate on one session with rows, in-place weight
updates and load_state_dict, and exceptions (KeyboardInterrupt included) injected at the k-th op
call inside a call. BackendMachine: the naive loop under torch.compile(backend="lcsm"), calls that
extend, shrink or diverge from the last input, weight changes and injected exceptions. Every
output is checked against the model run from scratch on the sequence so far; every error must be
the typed one the call's situation calls for, or the injected exception itself.

The decoder is built once per process (optimize takes seconds): each example starts by pointing it
at a fresh copy of the weights it was built from. A weight change makes it stale for the rest of
the example: prefill, add and generate raise StaleDecoder; steps of a started session decode the
weights its prefill saw.

    python tests/api_fuzz.py --examples 500      # the long mode; tests/test_api_fuzz.py runs a few
"""

import argparse
import collections
import copy
import functools
import sys

import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import lcsm_compile
from lcsm_compile.engine import OnlineConv
from lcsm_compile.errors import LcsmError, MaxLenExceeded, SessionBroken, SessionNotStarted, StaleDecoder
from lcsm_compile.models import demo_lm
from lcsm_compile.runtime import SessionState
from lcsm_compile.staleness import Fingerprint, module_state

VOCAB, MAX_LEN, ROWS, TOL = 32, 64, 3, 1e-4
# every call a decode makes on a session's state: an injected fault lands inside one of them
OPS = [(SessionState, m) for m in ("reset", "conv_prefill", "conv_step", "short_prefill", "short_step", "advance")]
OPS.append((OnlineConv, "release"))
counts = collections.Counter()  # what the fuzzer did, over every example of the process


@functools.lru_cache(maxsize=None)
def built():
    """(the decoder, the weights it was built from), once per process."""
    model = demo_lm(n_layer=1, d_model=16, vocab=VOCAB, max_len=MAX_LEN)
    decoder = lcsm_compile.optimize(model, (torch.randint(0, VOCAB, (1, 16)),), max_len=MAX_LEN, compile=False)
    return decoder, copy.deepcopy(model.state_dict())


class Fault(Exception):
    """An injected failure that is not an interrupt."""


class Injector:
    """Wraps every op of OPS: once armed, the k-th op call raises (before or after doing its work)."""

    def __init__(self):
        self.armed, self.fired = None, False
        self.saved = [(cls, name, getattr(cls, name)) for cls, name in OPS]
        for cls, name, original in self.saved:
            setattr(cls, name, self._wrap(original))

    def _wrap(self, original):
        def op(*args, **kwargs):
            armed = self.armed
            if armed is not None:
                armed[0] -= 1
                if armed[0] == 0:
                    self.armed, self.fired = None, True
                    if armed[2]:
                        original(*args, **kwargs)
                    raise armed[1]("injected")
            return original(*args, **kwargs)

        return op

    def arm(self, k, exc, after):
        self.armed, self.fired = [k, exc, after], False

    def disarm(self):
        self.armed = None

    def restore(self):
        for cls, name, original in self.saved:
            setattr(cls, name, original)


class DecodeMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.decoder, weights = built()
        self.model = demo_lm(n_layer=1, d_model=16, vocab=VOCAB, max_len=MAX_LEN)
        self.model.load_state_dict(weights)
        self.reference = copy.deepcopy(self.model)  # the weights the decoder decodes, never changed
        # a fresh copy of the same weights for this example (the built one may be stale from an earlier example)
        self.decoder.source, self.decoder.fingerprint = self.model, Fingerprint(module_state(self.model))
        self.session = self.decoder.session(rows=ROWS)
        self.rows = [None] * ROWS  # each row's ids so far (None: free)
        self.broken = False
        self.stale = False
        self.injector = Injector()
        for length in (3, 7):  # two rows live, one free: every rule has something to act on
            self.add(length)

    def teardown(self):
        if hasattr(self, "injector"):
            self.injector.restore()

    # -- checks

    def logits(self, seq):
        with torch.no_grad():
            return self.reference(torch.tensor([seq]))[0]

    def close(self, out, ref, what):
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL, f"{what}: rel err {err:.2e}"

    def call(self, name, fn, expected=None):
        """Run fn(); an exception must be `expected` (a typed error this situation calls for) or the
        injected one, which leaves the session broken when it was a state change. Returns (ok, out)."""
        counts[name] += 1
        try:
            out = fn()
        except BaseException as exc:
            fired, self.injector.fired = self.injector.fired, False
            self.injector.disarm()
            if fired and str(exc) == "injected":
                counts["injected " + type(exc).__name__] += 1
                if name != "generate":
                    self.broken = True
                return False, None
            assert expected is not None and isinstance(exc, expected), f"{name}: unexpected {exc!r}"
            assert isinstance(exc, LcsmError), f"{name}: untyped {exc!r}"
            counts[f"{name} -> {type(exc).__name__}"] += 1
            return False, None
        self.injector.disarm()
        self.injector.fired = False
        assert expected is None, f"{name}: expected {expected.__name__}, returned"
        counts[f"{name} ok"] += 1
        return True, out

    # -- rules

    @rule(batch=st.integers(1, 2), length=st.integers(1, 12))
    def prefill(self, batch, length):
        prompt = torch.randint(0, VOCAB, (batch, length))
        ok, out = self.call("prefill", lambda: self.session.prefill(prompt), StaleDecoder if self.stale else None)
        if ok:
            self.rows = [p.tolist() for p in prompt]
            self.broken = False
            for r, seq in enumerate(self.rows):
                self.close(out[r], self.logits(seq), "prefill")

    @rule(data=st.data())
    def step(self, data):
        tokens = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=len(self.rows), max_size=len(self.rows)))
        live = [r for r, seq in enumerate(self.rows) if seq is not None]
        expected = (SessionBroken if self.broken else SessionNotStarted if not live
                    else MaxLenExceeded if any(len(self.rows[r]) >= MAX_LEN for r in live) else None)
        ok, out = self.call("step", lambda: self.session.step(torch.tensor(tokens)[:, None]), expected)
        if ok:
            for r in live:
                self.rows[r] = self.rows[r] + [tokens[r]]
                self.close(out[r, 0], self.logits(self.rows[r])[-1], "step")

    @precondition(lambda self: len(self.rows) == ROWS)  # add/remove on the session's rows
    @rule(length=st.integers(1, 12))
    def add(self, length):
        prompt = torch.randint(0, VOCAB, (1, length))
        free = [r for r, seq in enumerate(self.rows) if seq is None]
        expected = SessionBroken if self.broken else LcsmError if not free else StaleDecoder if self.stale else None
        ok, out = self.call("add", lambda: self.session.add(prompt), expected)
        if ok:
            row, logits = out
            assert row == free[0]
            self.rows[row] = prompt[0].tolist()
            self.close(logits[0], self.logits(self.rows[row]), "add")

    @precondition(lambda self: len(self.rows) == ROWS)
    @rule(data=st.data())
    def remove(self, data):
        live = [r for r, seq in enumerate(self.rows) if seq is not None]
        row = data.draw(st.sampled_from(live) if live and data.draw(st.booleans()) else st.integers(0, ROWS - 1))
        expected = SessionBroken if self.broken else LcsmError if self.rows[row] is None else None
        ok, _ = self.call("remove", lambda: self.session.remove(row), expected)
        if ok:
            self.rows[row] = None

    @rule(k=st.integers(1, 9), data=st.data())
    def extend(self, k, data):
        """k positions at once: every row (all must be live), or some live rows at their own positions."""
        live = [r for r, seq in enumerate(self.rows) if seq is not None]
        rows = sorted(data.draw(st.sets(st.sampled_from(live), min_size=1))) if live and data.draw(st.booleans()) else None
        picked = rows if rows is not None else list(range(len(self.rows)))
        tokens = torch.randint(0, VOCAB, (len(picked), k))
        expected = (SessionBroken if self.broken else LcsmError if rows is None and len(live) < len(self.rows)
                    else MaxLenExceeded if any(len(self.rows[r]) + k > MAX_LEN for r in picked) else None)
        ok, out = self.call("extend", lambda: self.session.extend(tokens, rows=rows), expected)
        if ok:
            for i, r in enumerate(picked):
                self.rows[r] = self.rows[r] + tokens[i].tolist()
                self.close(out[i], self.logits(self.rows[r])[-k:], "extend")

    @rule(length=st.integers(1, 8), new=st.integers(1, 6))
    def generate(self, length, new):
        prompt = torch.randint(0, VOCAB, (1, length))
        ok, out = self.call("generate", lambda: self.decoder.generate(prompt, new), StaleDecoder if self.stale else None)
        if ok:  # greedy: each new token is an argmax of the model's logits (ties within rounding)
            logits = self.logits(out[0, :-1].tolist())[length - 1 :]
            chosen = logits.gather(-1, out[0, length:, None])[:, 0]
            assert bool((logits.max(-1).values - chosen <= TOL * logits.abs().max()).all()), "generate"

    @precondition(lambda self: not self.stale)  # once per example: the decoder stays stale after it
    @rule(how=st.sampled_from(["in place", "load_state_dict"]), scale=st.floats(0.01, 0.1))
    def change_weights(self, how, scale):
        counts[f"weights changed {how}"] += 1
        with torch.no_grad():
            if how == "in place":  # an optimizer step
                for p in self.model.parameters():
                    p.add_(scale * torch.randn_like(p))
            else:
                self.model.load_state_dict(demo_lm(n_layer=1, d_model=16, vocab=VOCAB, max_len=MAX_LEN, seed=1).state_dict())
        self.stale = True

    @rule(k=st.integers(1, 6), interrupt=st.booleans(), after=st.booleans(), data=st.data())
    def interrupted(self, k, interrupt, after, data):
        """A call whose k-th op raises KeyboardInterrupt or an error (after its work, or before)."""
        calls = ["prefill", "step", "extend", "generate"] + (["add", "remove"] if len(self.rows) == ROWS else [])
        call = data.draw(st.sampled_from(calls))
        self.injector.arm(k, KeyboardInterrupt if interrupt else Fault, after)
        if call == "prefill":
            self.prefill(data.draw(st.integers(1, 2)), data.draw(st.integers(1, 12)))
        elif call in ("add", "generate"):
            getattr(self, call)(*([data.draw(st.integers(1, 8))] * (1 if call == "add" else 2)))
        elif call == "extend":
            self.extend(data.draw(st.integers(1, 9)), data)
        else:
            getattr(self, call)(data)

    @invariant()
    def positions_follow_the_rows(self):
        if not self.broken:
            assert self.session.positions == [None if seq is None else len(seq) for seq in self.rows]


class BackendMachine(RuleBasedStateMachine):
    """The naive loop under the backend: calls that extend, shrink or diverge from the last input,
    weight changes (the backend rebuilds its decoder) and faults injected inside a call. Every call
    must equal the model's output on the same input. Each example compiles afresh (a few seconds),
    so that no example depends on what an earlier one left in dynamo's cache or the weights."""

    @initialize(length=st.integers(2, 12))
    def start(self, length):
        torch._dynamo.reset()
        self.model = demo_lm(n_layer=1, d_model=16, vocab=VOCAB, max_len=MAX_LEN)
        self.c = torch.compile(self.model, backend="lcsm", dynamic=True,
                               options={"max_len": MAX_LEN, "compile_step": False})
        self.ids = torch.randint(0, VOCAB, (2, length))
        self.changed = False
        self.injector = Injector()
        self.call()

    def teardown(self):
        if hasattr(self, "injector"):
            self.injector.restore()
        torch._dynamo.reset()

    def call(self):
        counts["backend call"] += 1
        try:
            with torch.no_grad():
                out = self.c(self.ids)
        except BaseException as exc:
            fired, self.injector.fired = self.injector.fired, False
            self.injector.disarm()
            # a fault inside a rebuild's validation is that decoder's refusal, naming the fault
            assert fired and (str(exc) == "injected" or isinstance(exc, LcsmError) and "injected" in str(exc)), \
                f"backend: unexpected {exc!r}"
            counts["backend injected -> " + type(exc).__name__] += 1
            return
        self.injector.disarm()
        with torch.no_grad():
            ref = self.model(self.ids)
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL, f"backend: rel err {err:.2e} at length {self.ids.shape[1]}"
        counts["backend ok"] += 1

    @precondition(lambda self: self.ids.shape[1] < MAX_LEN)
    @rule(new=st.integers(1, 16))
    def extend(self, new):
        new = min(new, MAX_LEN - self.ids.shape[1])
        self.ids = torch.cat([self.ids, torch.randint(0, VOCAB, (2, new))], 1)
        self.call()

    @precondition(lambda self: self.ids.shape[1] > 2)
    @rule(data=st.data())
    def shrink(self, data):
        self.ids = self.ids[:, : data.draw(st.integers(2, self.ids.shape[1] - 1))]
        self.call()

    @rule(data=st.data())
    def diverge(self, data):
        t = data.draw(st.integers(0, self.ids.shape[1] - 1))
        self.ids = self.ids.clone()
        self.ids[:, t] = (self.ids[:, t] + 1) % VOCAB
        self.call()

    @precondition(lambda self: not self.changed)  # once per example: each costs a rebuild (seconds)
    @rule(how=st.sampled_from(["in place", "load_state_dict"]), seed=st.integers(1, 3))
    def change_weights(self, how, seed):
        self.changed = True
        counts[f"backend weights changed {how}"] += 1
        with torch.no_grad():
            if how == "in place":
                for p in self.model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            else:
                self.model.load_state_dict(demo_lm(n_layer=1, d_model=16, vocab=VOCAB, max_len=MAX_LEN, seed=seed).state_dict())
        self.call()

    @precondition(lambda self: self.ids.shape[1] < MAX_LEN - 1)
    @rule(k=st.integers(1, 12), interrupt=st.booleans(), after=st.booleans(), new=st.integers(1, 6))
    def interrupted(self, k, interrupt, after, new):
        """An extending call whose k-th op raises, then the next token's call (the caller goes on)."""
        self.injector.arm(k, KeyboardInterrupt if interrupt else Fault, after)
        self.extend(new)
        self.extend(1)


CI = settings(max_examples=15, stateful_step_count=12, deadline=None)
CI_BACKEND = settings(max_examples=4, stateful_step_count=10, deadline=None)  # each example compiles: seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="examples of DecodeMachine")
    parser.add_argument("--backend-examples", type=int, default=20, help="examples of BackendMachine (each compiles: seconds)")
    parser.add_argument("--steps", type=int, default=20, help="rules per example")
    args = parser.parse_args(argv)
    import unittest

    suite = unittest.TestSuite()
    for machine, examples in ((DecodeMachine, args.examples), (BackendMachine, args.backend_examples)):
        if examples:
            machine.TestCase.settings = settings(max_examples=examples, stateful_step_count=args.steps, deadline=None)
            suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(machine.TestCase))
    result = unittest.TextTestRunner(verbosity=1).run(suite)
    for key, n in sorted(counts.items()):
        print(f"{n:7d}  {key}")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
