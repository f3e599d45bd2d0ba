"""Session: one decode of N rows on a Decoder's programs (prefill, extend, step, rows joining and leaving).

A Decoder holds what every session shares (the programs, the filters and their tile operators);
a Session holds one decode's state (SessionState: one state per decoding strategy) and its
position. Sessions are independent and can be interleaved.
"""

import contextlib
import functools

import torch
import torch.utils._pytree as pytree

from lcsm_compile.checks import check_ids
from lcsm_compile.errors import DeviceError, DTypeError, LcsmError, MaxLenExceeded, SessionBroken, SessionNotStarted, ShapeError
from lcsm_compile.runtime import ops
from lcsm_compile.runtime.state import SessionState


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
        self.handle = ops.register(self.state)  # [session id]: what the programs' custom ops find the state by
        self._own_positions = False  # rows at their own positions (after a ragged prefill, add or remove)
        self._captured = None  # runtime.graphs.CapturedStep, with optimize(cuda_graph=...)
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
        return int(self.state.positions[0]) if self.state.capacity is not None else 0

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
        if d.rows_why:
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
    def prefill(self, prompt, attention_mask=None, chunk=None, keep_last=None):
        """Run the prompt [B, P, ...] at once; returns the model's outputs for every prompt position.

        attention_mask [B, P] (Hugging Face convention, left padding): 1 on real tokens, 0 on the
        padding before them. Each row then starts from its first real token at its own position 0,
        padding never enters its state, and its outputs at real positions are those of the row
        decoded alone; outputs at padding positions are 0.
        chunk=K: run the prompt K positions at a time (each piece an extend), so the activations
        held at once are those of K positions, not of the whole prompt; the outputs are the same.
        keep_last=n: return the outputs of the last n positions only ([B, n, ...]); with chunk, the
        other pieces' outputs are dropped as they come (an LM's logits of a long prompt need not fit)."""
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
        if keep_last is not None and not (isinstance(keep_last, int) and 1 <= keep_last <= P):
            raise ValueError(f"keep_last: expected None or an int in [1, {P}] (the prompt's positions), got {keep_last!r}")
        keep = P if keep_last is None else keep_last
        self.decoder.check_fresh()
        with self._changing("prefill"):
            self._recapture()
            self.state.reset(B)
            self._own_positions = lengths is not None
            if lengths is not None:
                return _last_positions(self._prefill_ragged(prompt, lengths), keep)
            if chunk is not None and chunk < P:
                outputs = _Placed(B, keep, "prefill(chunk=...)")
                for start in range(0, P, chunk):
                    stop = min(start + chunk, P)
                    out = self._extend_window(prompt[:, start:stop], None, start)
                    first = max(start, P - keep)  # the piece's positions that are kept
                    if first < stop:
                        outputs.put(_last_positions(out, stop - first), slice(None), slice(first - (P - keep), stop - (P - keep)))
                out = outputs.result()
            else:  # every row real from position 0: one program call, one shared position
                out = _last_positions(self.decoder.prefill_program(self.handle, inputs=(prompt,)), keep)
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
            state.release([row])
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
                    from lcsm_compile.runtime.graphs import CapturedStep

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
            bank = self.state.tiled.bank
            if bank is None:
                raise ValueError("memory_breakdown(per_channel_position=True): this model has no long convolution on the "
                                 "tiling (none, or each decodes by its recurrence, whose state does not grow with positions)")
            cells = self.state.capacity * bank.channels * self.decoder.max_len
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


def _last_positions(out, n):
    """The model's outputs cut to their last n positions (dim 1 of every tensor leaf)."""
    return pytree.tree_map(lambda t: t[:, t.shape[1] - n :] if isinstance(t, torch.Tensor) and t.dim() >= 2 else t, out)


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
