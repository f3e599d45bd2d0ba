"""Program: a rewritten graph (prefill, step or extend) run eagerly or compiled by inductor."""

import copy
import time

import torch
import torch.utils._pytree as pytree

from lcsm_compile.logs import get_logger

# compile="auto": a batch size is compiled once its calls so far, or those a generation announced,
# reach AUTO_COMPILE_CALLS (about the steps a compile costs: README, "Compiling the step program"); so
# compiling never costs more than twice the best choice made knowing the length up front. The
# last AUTO_TRIAL_CALLS eager calls are then timed against as many compiled ones, and the compiled
# program is kept only if it is faster (for a small model on CPU it can be slower).
AUTO_COMPILE_CALLS = 4096
AUTO_TRIAL_CALLS = 16


class Program:
    """A rewritten graph; calls rebuild the model's output structure from its flat outputs.

    compile=True compiles it with inductor directly (compile_fx, what torch.compile's default
    backend runs), not through dynamo: the program is already an FX graph with static shapes, so
    there is nothing to trace and no guards to evaluate on every call. Inductor fuses the
    time-local ops; the lcsm custom ops stay opaque calls. One compilation per input signature
    (shapes, strides, dtypes, devices): the session and position are tensor inputs, so one serves
    every position and session of a batch size; `compilations` counts them.
    compile="auto": see AUTO_COMPILE_CALLS; `expect(n)` announces n calls (a generation of known
    length). A failed automatic compile (e.g. no C++ compiler) is logged and the program stays eager.
    """

    def __init__(self, gm, out_spec, compile=False):
        self.gm = gm
        self.out_spec = out_spec
        self.compile = compile
        self.compiled = {}  # input signature -> inductor-compiled callable
        self.auto = {}  # input signature -> _AutoTrial (compile="auto")
        self.expected = 0  # calls announced by expect()

    @property
    def compilations(self) -> int:
        return len(self.compiled)

    def expect(self, calls):
        """Announce `calls` upcoming calls (0: none known), for compile="auto"."""
        self.expected = max(0, int(calls))

    def __call__(self, *prefix, inputs):
        args = (*prefix, *inputs)
        if self.compile is False:
            return self._eager(args)
        key = tuple((tuple(a.shape), a.stride(), a.dtype, a.device) for a in args)
        if self.compile == "auto":
            return self._auto(key, args)
        fn = self.compiled.get(key) or self._compile(key, args)
        return self._run(fn, args)

    def _eager(self, args):
        return pytree.tree_unflatten(list(self.gm(*args)), self.out_spec)

    def _run(self, fn, args):
        with torch.no_grad():  # decoding never needs autograd; an inference graph is the fast one
            return pytree.tree_unflatten(list(fn(*args)), self.out_spec)

    def _compile(self, key, args):
        from torch._inductor.compile_fx import compile_fx

        get_logger("runtime").info("compiling the step program with inductor for inputs %s (seconds, once)",
                                   [tuple(a.shape) for a in args[-1:]])
        with torch.no_grad():
            # a fresh graph over the same module: inductor's passes may rewrite the graph in place
            gm = torch.fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))
            fn = self.compiled[key] = compile_fx(gm, list(args))
        return fn

    def _auto(self, key, args):
        trial = self.auto.get(key)
        if trial is None:
            trial = self.auto[key] = _AutoTrial()
        if trial.verdict == "compiled":  # the steady state of a long decode: straight to the compiled program
            return self._run(self.compiled[key], args)
        if trial.verdict == "eager":
            return self._eager(args)
        fn = self.compiled.get(key)
        if fn is None and not trial.due(self.expected):
            trial.calls += 1
            return trial.timed(lambda: self._eager(args), trial.eager)
        if fn is None:
            fn = self._auto_compile(key, args, trial)
            if fn is None:
                return self._eager(args)
            return self._run(fn, args)  # its first call may still pay for lazy set-up: not timed
        out = trial.timed(lambda: self._run(fn, args), trial.compiled)
        if len(trial.compiled) == AUTO_TRIAL_CALLS:
            trial.decide(tuple(args[-1].shape)[:1])
        return out

    def _auto_compile(self, key, args, trial):
        log = get_logger("runtime")
        why = f"{self.expected} steps announced" if self.expected else f"{trial.calls} steps taken"
        start = time.perf_counter()
        try:
            fn = self._compile(key, args)
        except Exception as exc:  # noqa: BLE001 - any inductor failure: the eager program is exact too
            log.warning("compile='auto': compiling the step program failed (%s: %s); it stays eager",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.compile = False
            return None
        log.info("compile='auto': compiled the step program for batch %s (%s; %.1f s)",
                 tuple(args[-1].shape)[:1], why, time.perf_counter() - start)
        return fn


class _AutoTrial:
    """compile="auto" for one input signature: eager calls counted and the last ones timed, then
    the compiled program timed and kept (verdict "compiled") or dropped ("eager")."""

    def __init__(self):
        self.calls, self.eager, self.compiled, self.verdict = 0, [], [], None

    def due(self, expected):
        """Compile now? Once enough eager calls were timed, if the calls made or those announced pay for it."""
        return self.calls >= AUTO_TRIAL_CALLS and max(self.calls, expected) >= AUTO_COMPILE_CALLS

    def timed(self, call, times):
        """call(), its time appended to `times` (the last AUTO_TRIAL_CALLS kept)."""
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
        del times[:-AUTO_TRIAL_CALLS]
        return out

    def decide(self, batch):
        eager, compiled = sorted(self.eager)[len(self.eager) // 2], sorted(self.compiled)[len(self.compiled) // 2]
        self.verdict = "compiled" if compiled < eager else "eager"
        get_logger("runtime").info("compile='auto': batch %s step %.3f ms compiled vs %.3f ms eager: keeping %s",
                                   batch, 1e3 * compiled, 1e3 * eager, self.verdict)
