"""Decoder and sessions: run the prefill and step programs on a session's convolution state.

A Decoder holds what every session shares (the programs, the filters and their tile operators);
a Session holds one decode's state (one bank with every long convolution of every layer, ring
buffers for short convolutions, a KV cache per causal attention) and its position. Sessions are
independent and can be interleaved.
"""

import contextlib
import copy
import functools
import time

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from lcsm_compile import ops
from lcsm_compile.checks import check_ids
from lcsm_compile.errors import DeviceError, DTypeError, LcsmError, MaxLenExceeded, SessionBroken, SessionNotStarted, ShapeError
from lcsm_compile.logs import get_logger


class SessionState:
    """What the custom ops of one session act on.

    capacity: the session's rows N (fixed by its first prefill, or by Decoder.session(rows=N)).
    rows: None while a program runs on every row; during a row prefill (Session.add, a ragged
    prefill) or a row extend the int64 indices of the rows the program's batch stands for.
    start: None during a prefill from position 0; during an extend (Session.extend) the position of
    its first input, from which the prefill ops continue the state.
    positions: int64 [N], each row's own position (where its next step's input goes); live: bool
    [N], the rows holding a sequence. A step runs every row; free rows compute and are ignored.
    """

    def __init__(self, decoder):
        self.bank = decoder.bank.fork() if decoder.bank is not None else None  # None: short convolutions only
        self.slices = decoder.bank_slices  # site index -> channel slice of the bank (long convs)
        self.sites = decoder.sites
        self.rings = {}  # site index -> [K-1, N, W] last inputs of a short convolution
        self.recurrent = decoder.recurrent  # site index -> recurrence.Recurrence (modal long convolutions)
        self.modes = {}  # site index -> [N, W, modes] complex128 state of a recurrent convolution
        self.short_filters = decoder.short_filters  # site index -> (taps [W, K] causal, bias or None)
        self.attention = getattr(decoder, "attention", [])  # AttentionSites
        self.max_len = decoder.max_len
        self.kv = {}  # attention site index -> (k cache, v cache) [N, G, max_len, D], allocated on first prefill
        self.capacity, self.rows, self.positions, self.live, self.start = None, None, None, None, None
        self.device, self.graph, self.positions_device = decoder.device, False, None

    def reset(self, capacity):
        """Forget every sequence; `capacity` rows from now on, all free."""
        if self.bank is not None:
            if self.capacity is not None and capacity != self.capacity:
                self.bank = self.bank.fork()  # another batch size: fresh state
            self.bank.reset()
        self.rings.clear()  # KV caches stay allocated: a row reads only the positions it wrote
        self.modes.clear()
        self.capacity, self.rows, self.graph = capacity, None, False
        self.positions = torch.zeros(capacity, dtype=torch.long)
        self.live = torch.zeros(capacity, dtype=torch.bool)

    # long convolutions: one bank, red cells per site, one tile call per position
    # every site's input is brought to the bank's dtype (convolutions of one model can run in
    # different dtypes, e.g. a bfloat16 model with one FFT in float32): exact widening, one rounding back
    def conv_prefill(self, index, u):
        if index in self.recurrent:
            return self._recurrent_prefill(index, u)
        if self.start is not None:
            if self.rows is not None and self.bank.S is None:
                self.bank.bind(self.capacity)
            y = self.bank.extend(u.to(self.bank.dtype), channels=self.slices[index], rows=self.rows, start=self.start)
        elif self.rows is None:
            y = self.bank.prefill(u.to(self.bank.dtype), channels=self.slices[index])
        else:
            if self.bank.S is None:
                self.bank.bind(self.capacity)
            y = self.bank.prefill(u.to(self.bank.dtype), channels=self.slices[index], rows=self.rows)
        return self._plus_bias(index, y).to(u.dtype)

    def conv_step(self, index, u):
        if index in self.recurrent:
            x = u[..., 0]
            y = self.recurrent[index].step(self.modes[index], x.reshape(self.modes[index].shape[:2]))
            return self._plus_bias(index, y.reshape(x.shape).unsqueeze(-1)).to(u.dtype)
        y = self.bank.red_cell(u[..., 0].to(self.bank.dtype), channels=self.slices[index]).unsqueeze(-1)
        return self._plus_bias(index, y).to(u.dtype)

    def _recurrent_prefill(self, index, u):
        rec = self.recurrent[index]
        before = self.modes.get(index) if self.start is not None else None  # an extend continues the state
        if before is not None and self.rows is not None:
            before = before[self.rows.to(before.device)]
        y, state = rec.prefill(u.reshape(-1, rec.width, u.shape[-1]), before)
        if self.rows is None:
            self.modes[index] = state
        else:
            if index not in self.modes:
                self.modes[index] = state.new_zeros(self.capacity, rec.width, rec.modes)
            self.modes[index][self.rows.to(state.device)] = state
        return self._plus_bias(index, y.reshape(u.shape)).to(u.dtype)

    def advance(self):
        if self.bank is not None:
            self.bank.advance()
        self.positions += self.live
        if self.graph:
            self.positions_device.copy_(self.positions)

    def graph_safe(self):
        """Every op of a step issues the same kernels at every position from now on (until the next
        reset): positions on the device for the KV caches, the bank's red cells graph-safe. For
        lcsm_compile.graphs, which captures the step without advance."""
        self.graph = True
        self.positions_device = self.positions.to(self.device)
        if self.bank is not None and "graph_safe" in self.bank.capabilities:
            self.bank.graph_safe()

    def _plus_bias(self, index, y):
        bias = self.sites[index].conv.bias
        return y if bias is None else y + bias.reshape(-1, 1).to(y.dtype)

    # short convolutions: a ring buffer of the last K-1 inputs
    def short_prefill(self, index, u):
        weight, _, bias = self.short_filters[index]  # weight [W, 1, K], oldest input first
        K = weight.shape[-1]
        ring = self.rings.get(index) if self.start is not None else None  # an extend continues after its inputs
        if ring is None:
            window = F.pad(u, (K - 1, 0))  # zeros before the prompt
        else:
            window = torch.cat([(ring if self.rows is None else ring[:, self.rows]).permute(1, 2, 0).to(u.dtype), u], -1)
        y = F.conv1d(window, weight.to(u.dtype), bias, groups=weight.shape[0])
        past = window[..., u.shape[-1] :].permute(2, 0, 1)  # the last K-1 inputs
        if self.rows is None:
            self.rings[index] = past.clone(memory_format=torch.contiguous_format)  # [K-1, N, W], oldest first
        else:
            if index not in self.rings:
                self.rings[index] = past.new_zeros(K - 1, self.capacity, past.shape[-1])
            self.rings[index][:, self.rows] = past
        return y

    def short_step(self, index, u):
        _, taps, bias = self.short_filters[index]  # taps [K, 1, W], oldest input first
        ring = self.rings[index]
        window = torch.cat([ring, u.permute(2, 0, 1)])  # [K, B, W]
        y = (window * taps.to(u.dtype)).sum(0)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ring.copy_(window[1:])  # in place: a captured step (lcsm_compile.graphs) keeps reading this ring
        return y.unsqueeze(-1)

    # causal attention: a KV cache of max_len positions per site and row
    def attn_prefill(self, index, q, k, v):
        if self.start:
            return self._attn_extend(index, q, k, v)
        N, G, P = self.capacity or q.shape[0], k.shape[1], k.shape[2]
        cache = self.kv.get(index)
        want = ((N, G, self.max_len, k.shape[3]), (N, G, self.max_len, v.shape[3]))
        if cache is None or tuple(cache[0].shape) != want[0] or tuple(cache[1].shape) != want[1] \
                or cache[0].dtype != k.dtype or cache[0].device != k.device:
            cache = self.kv[index] = (k.new_zeros(want[0]), v.new_zeros(want[1], dtype=v.dtype))
        rows = slice(None) if self.rows is None else self.rows.to(k.device)
        cache[0][rows, :, :P] = k
        cache[1][rows, :, :P] = v
        site = self.attention[index].attn
        if site.spelling == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=_sdpa_scale(site))
        causal = torch.ones(P, P, dtype=torch.bool, device=q.device).tril()
        return _softmax_attention(site, q, k, v, causal)

    def _attn_extend(self, index, q, k, v):
        """k positions from `start` on: their keys and values appended, each query attends over the
        row's prefix up to its own position."""
        kc, vc = self.kv[index]
        t, P = self.start, k.shape[2]
        rows = slice(None) if self.rows is None else self.rows.to(kc.device)
        kc[rows, :, t : t + P] = k
        vc[rows, :, t : t + P] = v
        keys, values = kc[rows, :, : t + P], vc[rows, :, : t + P]
        allowed = torch.arange(t + P, device=kc.device) <= torch.arange(t, t + P, device=kc.device)[:, None]  # [P, t + P]
        site = self.attention[index].attn
        if site.spelling == "sdpa":
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=_sdpa_scale(site))
        return _softmax_attention(site, q, keys, values, allowed)

    def attn_step(self, index, q, k, v):
        kc, vc = self.kv[index]
        N = kc.shape[0]
        if self.graph:  # a captured step reads nothing on the host: positions on the device, every key masked
            pos, m = self.positions_device, self.max_len
        else:
            pos, m = self.positions.to(kc.device), int(self.positions.max()) + 1  # keys any row can see
        r = torch.arange(N, device=kc.device)
        kc[r, :, pos] = k[:, :, 0]  # each row writes its own position
        vc[r, :, pos] = v[:, :, 0]
        allowed = (torch.arange(m, device=kc.device) <= pos[:, None])[:, None, None, :]  # [N, 1, 1, m]
        site = self.attention[index].attn
        if site.spelling == "sdpa":
            return F.scaled_dot_product_attention(q, kc[:, :, :m], vc[:, :, :m], attn_mask=allowed, scale=_sdpa_scale(site))
        return _softmax_attention(site, q, kc[:, :, :m], vc[:, :, :m], allowed)

    def memory_breakdown(self):
        rings = sum(r.numel() * r.element_size() for r in self.rings.values())
        kv = sum(t.untyped_storage().nbytes() for pair in self.kv.values() for t in pair)
        modes = sum(m.numel() * m.element_size() for m in self.modes.values())
        return {**(self.bank.memory_breakdown() if self.bank is not None else {}), "rings": rings, "recurrent": modes,
                "kv_cache": kv}


def _sdpa_scale(site):
    (_, scale), = site.scale_ops
    return scale


def _softmax_attention(site, q, k, v, allowed):
    """The explicit spelling as the model computes it: q k^T, its scalings in order, -inf where a
    key is not allowed, softmax over keys, then the weights (in v's dtype) times v."""
    s = q @ k.transpose(-2, -1)
    for op, c in site.scale_ops:
        s = s * c if op == "mul" else s / c
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=site.softmax_dtype)
    return (p.to(v.dtype) @ v).to(v.dtype)


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


def _contiguous_strides(shape):
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= size
    return tuple(reversed(strides))


def _inference(method):
    """A Session method run in inference mode: no op of a decode records autograd state or bumps a
    version counter (on CPU that bookkeeping is a large part of a small model's step), and the state
    is created and updated there. Outputs come back as ordinary tensors, so callers may modify them
    in place (an inference tensor refuses that outside inference mode)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.inference_mode():
            out = method(self, *args, **kwargs)
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t, out)

    return run


class Session:
    """One decode of N rows. `prefill(prompt)` starts every row (at one position, or left-padded
    prompts with `attention_mask`, each row from its first real token); `add(prompt)` and
    `remove(row)` let rows join and leave between steps (continuous batching); `step(x)` advances
    every live row at its own position. Outputs follow the model's layout.

    Rows at their own positions are exactly what each row gets decoded alone: each keeps its own
    position for the convolutions, ring buffers and position tables; they need conv="flash", a
    capture with a symbolic batch, and position tables that have a batch dim (else a typed error).

    Every state change is all-or-nothing: one that does not finish (any exception, KeyboardInterrupt
    included) leaves the session broken, and every call but prefill raises SessionBroken until a
    prefill restarts it. prefill and add check that the model's weights are those the decoder was
    built from (Decoder.check_fresh); a step decodes the weights its prefill saw.
    """

    def __init__(self, decoder, rows=None):
        self.decoder = decoder
        self.state = SessionState(decoder)
        self.handle = ops.register(self.state)  # [session id, position]; lcsm::advance moves the position
        self._own_positions = False  # rows at their own positions (after a ragged prefill, add or remove)
        self._captured = None  # lcsm_compile.graphs.CapturedStep, with Decoder(cuda_graph=...)
        self._broken = None  # the state change that did not finish, until a prefill restarts the session
        if rows is not None:
            if not (isinstance(rows, int) and rows >= 1):
                raise ValueError(f"rows: expected an int >= 1, got {rows!r}")
            self._rows_supported("Decoder.session(rows=N)")
            self.state.reset(rows)
            self._own_positions = True

    @property
    def position(self) -> int:
        """Positions seen so far (the next step's position), when every row shares it."""
        if self._own_positions:
            raise LcsmError("position: the rows are at their own positions; read Session.positions")
        return int(self.handle[1])

    @property
    def positions(self) -> list:
        """Each row's own position (its next step's position); None for a free row."""
        if self.state.capacity is None:
            return []
        return [int(p) if live else None for p, live in zip(self.state.positions, self.state.live)]

    def _check(self, x, length):
        d = self.decoder
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != d.input_ndim or x.shape[1] != length and length is not None:
            want = f"{d.input_ndim}-D with the sequence on dim 1" + ("" if length is None else f" of length {length}")
            raise ShapeError(f"input: expected {want} (like the example input {tuple(d.example_shape)}), got {tuple(x.shape)}")
        if not d.batch_dynamic and x.shape[0] != d.example_shape[0]:
            raise ShapeError(f"input: expected batch {d.example_shape[0]}: the model's capture fixed the batch size "
                             f"(torch.export could not keep it symbolic), got {x.shape[0]}")
        if tuple(x.shape[2:]) != tuple(d.example_shape[2:]):
            raise ShapeError(f"input: expected trailing dims {tuple(d.example_shape[2:])}, got {tuple(x.shape[2:])}")
        if x.dtype != d.input_dtype:
            raise DTypeError(f"input: expected dtype {d.input_dtype}, got {x.dtype}")
        if x.device != d.device:
            raise DeviceError(f"input: expected device {d.device}, got {x.device}")
        check_ids("input", x, d.vocab)

    @contextlib.contextmanager
    def _changing(self, what):
        """A state change: the session is broken from its start until it finishes."""
        self._broken = what
        yield
        self._broken = None

    def _check_not_broken(self, what):
        if self._broken is not None:
            raise SessionBroken(f"{what}: a {self._broken} of this session did not finish, so its state is partly "
                                f"updated; call prefill(prompt) to restart it (or start a new session)")

    def _recapture(self):
        """A captured step (cuda_graph) holds the state's layout: capture again after it changes."""
        if self._captured is not None:
            self._captured.invalidate()

    def _check_prompt(self, prompt):
        self._check(prompt, None)
        P = prompt.shape[1]
        if P < 1:
            raise ShapeError("prompt: expected at least one position")
        if P > self.decoder.max_len:
            raise MaxLenExceeded(f"prompt of {P} positions exceeds max_len = {self.decoder.max_len}")
        return P

    def _rows_supported(self, what):
        """Rows at their own positions need a bank that keeps per-row positions, a prefill program
        that runs on any batch (one row), and position tables with a batch dim to index per row."""
        d = self.decoder
        if getattr(d, "rows_why", None):
            raise LcsmError(f"{what}: {d.rows_why}")
        if not d.can("rows"):
            raise LcsmError(f"{what}: rows at their own positions need conv='flash'; this decoder's bank is "
                            f"{type(d.bank).__name__}, which decodes every row at one position")
        if not d.batch_dynamic:
            raise LcsmError(f"{what}: rows at their own positions need a capture with a symbolic batch; "
                            f"torch.export fixed this model's batch to {d.example_shape[0]}")
        for const in d.report.position_constants:
            if const.rows_why is not None:
                raise LcsmError(f"{what}: rows at their own positions read position table {const.name} one row per "
                                f"batch row, which this table does not allow: {const.rows_why}")

    @_inference
    def prefill(self, prompt, attention_mask=None, chunk=None):
        """Run the prompt [B, P, ...] at once; returns the model's outputs for every prompt position.

        attention_mask [B, P] (Hugging Face convention, left padding): 1 on real tokens, 0 on the
        padding before them. Each row then starts from its first real token at its own position 0,
        padding never enters its state, and its outputs at real positions are those of the row
        decoded alone; outputs at padding positions are 0.
        chunk=K: run the prompt K positions at a time (each piece an extend), so the activations
        held at once are those of K positions, not of the whole prompt; the outputs are the same."""
        P = self._check_prompt(prompt)
        B = prompt.shape[0]
        lengths = _real_lengths(attention_mask, B, P)
        if lengths is not None:
            self._rows_supported("prefill(attention_mask=...)")
        if chunk is not None:
            if not (isinstance(chunk, int) and chunk >= 1):
                raise ValueError(f"chunk: expected an int >= 1 (positions per piece), got {chunk!r}")
            if lengths is not None:
                raise ValueError("prefill: chunk= and attention_mask= together are not supported; prefill the rows "
                                 "with add() and feed the rest with extend(x, rows=...)")
            self._extendable("prefill(chunk=...)")
        self.decoder.check_fresh()
        with self._changing("prefill"):
            self._recapture()
            self.state.reset(B)
            self._own_positions = lengths is not None
            if lengths is not None:
                return self._prefill_ragged(prompt, lengths)
            if chunk is not None and chunk < P:
                outputs = _Placed(B, P, "prefill(chunk=...)")
                for start in range(0, P, chunk):
                    outputs.put(self._extend_window(prompt[:, start : start + chunk], None, start), slice(None),
                                slice(start, start + chunk))
                out = outputs.result()
            else:  # every row real from position 0: one program call, one shared position
                out = self.decoder.prefill_program(self.handle, inputs=(prompt,))
            self.handle[1] = P
            self.state.positions[:], self.state.live[:] = P, True
            return out

    def _prefill_ragged(self, prompt, lengths):
        """Left-padded prompts: one row prefill per distinct prompt length, outputs placed per row."""
        B, P = prompt.shape[:2]
        outputs = _Placed(B, P, "prefill(attention_mask=...)")
        for n in sorted(set(lengths.tolist())):  # one prefill call per distinct prompt length
            rows = (lengths == n).nonzero().squeeze(1)
            outputs.put(self._prefill_rows(prompt[rows, P - n :], rows), rows, slice(P - n, P))
        return outputs.result()

    def _extendable(self, what):
        d = self.decoder
        if d.extend_why:
            raise LcsmError(f"{what}: {d.extend_why}")
        if not d.can("extend"):
            raise LcsmError(f"{what}: continuing a session with several positions at once needs conv='flash'; this "
                            f"decoder's bank is {type(d.bank).__name__}, which only steps")

    @_inference
    def extend(self, x, rows=None):
        """Append k positions at once to live sequences and return the model's outputs for them:
        x [B, k, ...] continues every row (B = the session's rows), or with `rows` (a list of live
        rows) x [len(rows), k, ...] continues those rows only, each from its own position, while the
        others keep theirs (a server's chunked prefill for one row while the others step). Any mix
        of prefill, add, extend and step decodes what one prefill of each whole sequence gives.

        Each convolution continues with the tiles its k steps would run, batched by size, so the
        work is about that of one prefill of k positions plus what those tiles read from the past;
        the model's other ops run once over the k positions (the extend program)."""
        state = self.state
        if state.capacity is None:
            raise SessionNotStarted("extend: call prefill(prompt) first")
        self._check_not_broken("extend")
        self._extendable("extend")
        self._check(x, None)
        k = x.shape[1]
        if k < 1:
            raise ShapeError("extend: expected at least one position")
        if rows is None:
            if x.shape[0] != state.capacity:
                raise ShapeError(f"extend: expected batch {state.capacity} (the session's rows), got {x.shape[0]}; "
                                 f"pass rows= to continue some rows only")
            if not bool(state.live.all()):
                free = (~state.live).nonzero().squeeze(1).tolist()
                raise LcsmError(f"extend: rows {free} hold no sequence; pass rows= with the live rows to continue")
            index = torch.arange(state.capacity)
        else:
            self._rows_supported("extend(rows=...)")
            index = _live_rows(rows, state, "extend")
            if x.shape[0] != index.numel():
                raise ShapeError(f"extend: expected batch {index.numel()} (one per row in rows), got {x.shape[0]}")
        over = state.positions[index] + k > self.decoder.max_len
        if bool(over.any()):
            r = int(index[over][0])
            raise MaxLenExceeded(f"extend: row {r} at position {int(state.positions[r])} + {k} positions exceeds "
                                 f"max_len = {self.decoder.max_len}")
        with self._changing("extend"):
            self._recapture()
            state.graph = False  # a captured step makes its positions and block graph-safe again
            if rows is None and not self._own_positions:  # one shared position: one program call
                out = self._extend_window(x, None, self.position)
                self.handle[1] += k
                state.positions += k
                return out
            self._own_positions = True
            outputs, at = _Placed(index.numel(), k, "extend(rows=...)"), state.positions[index]
            for p in sorted(set(at.tolist())):  # one program call per distinct position (the position tables)
                part = (at == p).nonzero().squeeze(1)
                outputs.put(self._extend_window(x[part], index[part], p), part, slice(None))
                state.positions[index[part]] += k
            return outputs.result()

    def _extend_window(self, x, rows, start):
        """The extend program on x [n, k, ...] at positions start .. start + k - 1 of `rows` (None: all)."""
        state = self.state
        state.rows, state.start = rows, start
        try:
            positions = torch.arange(start, start + x.shape[1], device=self.decoder.device)
            return self.decoder.extend_program(self.handle, positions, inputs=(x,))
        finally:
            state.rows = state.start = None

    def _prefill_rows(self, prompt, rows):
        """Prefill `rows` (free) with their prompts [len(rows), P, ...]; the other rows are untouched."""
        state = self.state
        state.rows = rows
        try:
            out = self.decoder.prefill_program(self.handle, inputs=(prompt,))
        finally:
            state.rows = None
        state.positions[rows], state.live[rows] = prompt.shape[1], True
        return out

    @_inference
    def add(self, prompt):
        """Prefill a new sequence, prompt [1, P, ...], into a free row between steps (continuous
        batching); returns (row, the model's outputs for the prompt). The other rows' state is
        untouched. The session needs its rows first: a prefill, or Decoder.session(rows=N)."""
        if self.state.capacity is None:
            raise SessionNotStarted("add: the session has no rows yet; prefill(prompt) or Decoder.session(rows=N) first")
        self._check_not_broken("add")
        self._rows_supported("add")
        self._check_prompt(prompt)
        if prompt.shape[0] != 1:
            raise ShapeError(f"add: expected one sequence, a prompt [1, P, ...], got batch {prompt.shape[0]}")
        free = (~self.state.live).nonzero()
        if free.numel() == 0:
            raise LcsmError(f"add: all {self.state.capacity} rows hold a sequence; remove() one first")
        row = int(free[0])
        self.decoder.check_fresh()
        with self._changing("add"):
            self._own_positions = True
            self._recapture()
            return row, self._prefill_rows(prompt, torch.tensor([row]))

    @_inference
    def remove(self, row):
        """Free `row` (its sequence is done); add() may fill it again. The other rows are untouched."""
        state = self.state
        self._check_not_broken("remove")
        if state.capacity is None or not (isinstance(row, int) and 0 <= row < state.capacity) or not state.live[row]:
            live = [] if state.capacity is None else state.live.nonzero().squeeze(1).tolist()
            raise LcsmError(f"remove: expected a row holding a sequence (one of {live}), got {row!r}")
        self._rows_supported("remove")
        with self._changing("remove"):
            self._own_positions = True
            self._recapture()
            if state.bank is not None:
                state.bank.release([row])
            state.live[row], state.positions[row] = False, 0

    @_inference
    def step(self, x):
        """Take the input at every row's next position (a length-1 slice along the sequence dim,
        e.g. ids [N, 1]; free rows' inputs are ignored); returns the model's outputs for those
        positions in the same layout (e.g. [N, 1, V]; 0 for free rows)."""
        state, max_len = self.state, self.decoder.max_len
        if state.capacity is None:
            raise SessionNotStarted("step: call prefill(prompt) first")
        self._check_not_broken("step")
        if not bool(state.live.any()):
            raise SessionNotStarted("step: no row holds a sequence; add() one first")
        over = state.live & (state.positions >= max_len)
        if bool(over.any()):
            r = int(over.nonzero()[0])
            where = f"row {r} is at position {int(state.positions[r])}" if self._own_positions else f"position {self.position}"
            raise MaxLenExceeded(f"step: {where}, past max_len = {max_len}")
        self._check(x, 1)
        if x.shape[0] != state.capacity:
            raise ShapeError(f"input: expected batch {state.capacity} (the session's rows), got {x.shape[0]}")
        if x.stride() != _contiguous_strides(x.shape):
            # e.g. ids[:, t:t+1] of a longer buffer: the compiled step is specialised on strides
            x = x.clone(memory_format=torch.contiguous_format)
        device = self.decoder.device
        pos = torch.tensor([self.position], device=device) if not self._own_positions else state.positions.to(device)
        with self._changing("step"):
            if self.decoder.cuda_graph:
                if self._captured is None:
                    from lcsm_compile.graphs import CapturedStep

                    self._captured = CapturedStep(self, "emulate" if self.decoder.cuda_graph == "emulate" else "cuda")
                out = self._captured(pos, x)
            else:
                out = self.decoder.step_fn(self.handle, pos, inputs=(x,))
        if not self._own_positions:
            return out
        free = ~state.live
        if not bool(free.any()):
            return out
        free = free.to(device)
        return pytree.tree_map(lambda t: t.masked_fill(free.view(-1, *[1] * (t.dim() - 1)), 0)
                               if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == free.numel() else t, out)

    def memory_breakdown(self, per_channel_position=False) -> dict:
        """Bytes per part: the bank's (state, block, spectra, Toeplitz blocks, filters; the last
        three shared by every session of the decoder), the ring buffers, the modal states of the
        recurrent convolutions ("recurrent") and the KV caches of the causal attentions ("kv_cache",
        0 before the first prefill).
        per_channel_position: each part divided by batch rows x long-conv channels x max_len, the
        cost of one position of one channel (after a prefill; the state is 4 bytes in float32)."""
        parts = self.state.memory_breakdown()
        if per_channel_position:
            if self.state.capacity is None:
                raise SessionNotStarted("memory_breakdown(per_channel_position=True): call prefill(prompt) first")
            if self.state.bank is None:
                raise ValueError("memory_breakdown(per_channel_position=True): this model has no long convolution on the "
                                 "tiling (none, or each decodes by its recurrence, whose state does not grow with positions)")
            cells = self.state.capacity * self.state.bank.channels * self.decoder.max_len
            parts = {k: v / cells for k, v in parts.items()}
        return parts

    def memory_bytes(self) -> int:
        """Bytes this session holds, shared filter operators included: sum of memory_breakdown()."""
        return sum(self.memory_breakdown().values())


def _real_lengths(mask, B, P):
    """Real tokens per row of a left-padded attention_mask [B, P] (None: no mask, or no padding)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor [B, P] of 0/1, got {type(mask).__name__}")
    if tuple(mask.shape) != (B, P):
        raise ShapeError(f"attention_mask: expected shape {(B, P)} (the prompt's batch and length), got {tuple(mask.shape)}")
    m = mask.detach().cpu()
    if m.is_floating_point() or m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("attention_mask: expected integer or bool 0/1 values (1 on real tokens)")
    m = m.to(torch.long)
    lengths = m.sum(1)
    left_padded = (m == (torch.arange(P) >= P - lengths[:, None]).long()).all(1)
    if not bool(left_padded.all()):
        r = int((~left_padded).nonzero()[0])
        raise ValueError(f"attention_mask: row {r} is not left-padded (zeros, then ones up to the last position)")
    if bool((lengths == 0).any()):
        r = int((lengths == 0).nonzero()[0])
        raise ValueError(f"attention_mask: row {r} has no real token")
    return None if bool((lengths == P).all()) else lengths


def _live_rows(rows, state, what):
    """rows (a list of distinct live row indices) -> int64 tensor, or a typed error naming them."""
    live = state.live.nonzero().squeeze(1).tolist()
    if not isinstance(rows, (list, tuple)) or not rows or len(set(rows)) != len(rows) \
            or not all(isinstance(r, int) and r in live for r in rows):
        raise LcsmError(f"{what}: expected rows as a list of distinct rows holding a sequence (of {live}), got {rows!r}")
    return torch.tensor(rows, dtype=torch.long)


class _Placed:
    """The outputs of B rows and T positions, assembled from program calls on parts of them: each
    part's leaves [rows, n, ...] go to their rows and positions of zero leaves [B, T, ...]."""

    def __init__(self, B, T, what):
        self.B, self.T, self.what, self.leaves, self.spec = B, T, what, None, None

    def put(self, out, rows, positions):
        flat, self.spec = pytree.tree_flatten(out)
        if self.leaves is None:
            self.leaves = [self._zeros_like(leaf) for leaf in flat]
        want = (len(range(self.B)[rows]) if isinstance(rows, slice) else rows.numel(), len(range(self.T)[positions]))
        for full, leaf in zip(self.leaves, flat):
            if isinstance(leaf, torch.Tensor):
                if tuple(leaf.shape[:2]) != want:
                    raise ShapeError(f"{self.what}: an output of shape {tuple(leaf.shape)} is not [rows, positions, ...] "
                                     f"= {want}; its parts cannot be placed")
                full[rows, positions] = leaf

    def _zeros_like(self, leaf):
        if not isinstance(leaf, torch.Tensor):
            return leaf
        if leaf.dim() < 2:
            raise ShapeError(f"{self.what}: an output of shape {tuple(leaf.shape)} has no [batch, positions] dims to "
                             f"place each part's outputs in")
        return leaf.new_zeros(self.B, self.T, *leaf.shape[2:])

    def result(self):
        return pytree.tree_unflatten(self.leaves, self.spec)
