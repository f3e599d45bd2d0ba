"""Model-agnostic generation driver with Hugging Face `generate()` semantics.

A decoder is two callables:

* ``prefill(ids [B, P]) -> logits [B, P, V]`` consumes the prompt;
* ``step(ids [B, 1]) -> logits [B, 1, V]`` consumes one new position.

:func:`generate` drives them exactly the way ``transformers.GenerationMixin._sample`` drives a model with a KV
cache (greedy or multinomial sampling, temperature / top-k / top-p warpers, EOS and padding, streamer), so a
fast decoder and the O(L^2) loop of :func:`naive_generate` (a :class:`NaiveSession`) produce the same tokens from the same logits and
the same ``torch.Generator``.

Semantics followed (transformers ``src/transformers/generation/``):

* ``utils.py`` ``_get_logits_processor``: warpers only when ``do_sample``, in the order temperature (skipped
  at 1.0), top-k, top-p (skipped at 1.0).
* ``utils.py`` ``_sample``: logits of the last position copied to float32 on the ids' device; ``softmax`` then
  ``torch.multinomial(probs, num_samples=1)`` when sampling, else ``torch.argmax``; finished rows get
  ``next_tokens * unfinished + pad * (1 - unfinished)``; ``streamer.put(next_tokens.cpu())`` each step and
  ``streamer.end()`` after the loop; the loop stops once every row is finished, so the returned sequence is then
  shorter than ``P + max_new_tokens``.
* ``generate``: ``streamer.put(input_ids.cpu())`` once before decoding; ``_prepare_special_tokens``: with an EOS
  and no pad id, pad defaults to the first EOS id.
* ``logits_process.py``: ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` (copied
  conventions below).

The model is called once per generated token except the last (whose logits nobody needs): prefill, then
``n - 1`` steps.  Tokens fed to ``step`` for finished rows are the pad token, as in HF.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
import numbers
import sys
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
import torch.utils._pytree as pytree

from lcsm_compile.errors import DTypeError, MaxLenExceeded, SessionNotStarted, ShapeError

__all__ = ["process_logits", "pick_logits", "generate", "NaiveSession", "naive_generate"]

EosIds = Union[int, Sequence[int], torch.Tensor, None]


# ----------------------------------------------------------------------------------------------------------
# argument checks (shared by process_logits and generate, so both reject the same values the same way)


def _is_int(x) -> bool:
    # bool is an int subclass; True as a top_k or token id is a bug, not a 1
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_warper_args(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a float > 0, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        # HF: "`temperature` has to be a strictly positive float"; inf would turn -inf logits into nan
        hint = " (for greedy decoding use do_sample=False)" if temperature == 0 else ""
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature}{hint}")
    if top_k is not None:
        if not _is_int(top_k):
            raise TypeError(f"top_k: expected None or an int >= 1, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k: expected None or an int >= 1, got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
            raise TypeError(f"top_p: expected None or a float in (0, 1], got {type(top_p).__name__}")
        if not (0 < top_p <= 1):
            raise ValueError(f"top_p: expected None or a float in (0, 1], got {top_p}")


def _check_logits(name: str, logits, shape) -> None:
    """`shape` entries of None match any size."""
    if not isinstance(logits, torch.Tensor):
        raise DTypeError(f"{name}: expected a floating-point torch.Tensor, got {type(logits).__name__}")
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if logits.dim() != len(shape) or any(s is not None and s != g for s, g in zip(shape, logits.shape)):
        raise ShapeError(f"{name}: expected logits of shape {want}, got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ShapeError(f"{name}: expected logits with a vocabulary of at least 1, got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise DTypeError(f"{name}: expected floating-point logits, got {logits.dtype}")


# ----------------------------------------------------------------------------------------------------------
# logits warpers


def process_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> torch.Tensor:
    """Apply HF's sampling warpers to ``logits [B, V]``: temperature, then top-k, then top-p.

    Removed entries become ``-inf``.  The input is never modified.  Conventions (``logits_process.py``):

    * temperature: ``scores / temperature``; skipped at 1.0 as ``_get_logits_processor`` does.
    * top-k: ``k = min(top_k, V)``; removes ``scores < topk(scores, k).values[..., -1]``, so every token tied with
      the k-th largest score is kept (more than k may survive).
    * top-p: sorts ascending, ``cumsum(softmax)``, removes the entries with cumulative probability
      ``<= 1 - top_p`` but always keeps the largest one (``min_tokens_to_keep=1``).  That keeps the smallest
      set of most probable tokens whose mass is ``>= top_p``; which of several tied tokens survive follows
      ``torch.sort``.  Skipped at ``top_p == 1.0`` (so tokens whose probability underflows to 0 stay finite).
    """
    _check_logits("logits", logits, (None, None))
    _check_warper_args(temperature, top_k, top_p)
    scores = logits
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cum <= (1 - top_p)
        sorted_remove[..., -1:] = False  # keep at least the most probable token
        remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


# ----------------------------------------------------------------------------------------------------------
# the driver


def _check_prompt(prompt_ids) -> None:
    if not isinstance(prompt_ids, torch.Tensor):
        raise DTypeError(f"prompt_ids: expected a 2-D integer torch.Tensor [batch, prompt_len], got {type(prompt_ids).__name__}")
    if prompt_ids.dim() != 2:
        raise ShapeError(f"prompt_ids: expected a 2-D tensor [batch, prompt_len], got shape {tuple(prompt_ids.shape)}")
    dt = prompt_ids.dtype
    if dt.is_floating_point or dt.is_complex or dt == torch.bool:
        raise DTypeError(f"prompt_ids: expected an integer dtype (torch.long), got {dt}")
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        # the first new token comes from the last prompt position, so there must be one
        raise ShapeError(f"prompt_ids: expected at least 1 row and 1 token, got shape {tuple(prompt_ids.shape)}")


def _eos_list(eos_token_id: EosIds) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.reshape(-1).tolist()
    if _is_int(eos_token_id):
        ids = [eos_token_id]
    elif isinstance(eos_token_id, (list, tuple)):
        ids = list(eos_token_id)
    else:
        ids = []
    if not ids or not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id: expected None, an int >= 0 or a non-empty list of them, got {eos_token_id!r}")
    return [int(i) for i in ids]


def _new_token_count(P: int, max_new_tokens: int, max_len: Optional[int], on_max_len: str) -> int:
    if max_len is None or P + max_new_tokens <= max_len:
        return max_new_tokens
    if on_max_len == "error":
        raise MaxLenExceeded(
            f"prompt length {P} + max_new_tokens {max_new_tokens} = {P + max_new_tokens} exceeds max_len {max_len}; "
            f"lower max_new_tokens to {max(max_len - P, 0)} or pass on_max_len='truncate'"
        )
    if P > max_len:
        # truncation can only shorten the generation, never the prompt
        raise MaxLenExceeded(f"prompt length {P} alone exceeds max_len {max_len}; nothing can be generated")
    n = max_len - P
    warnings.warn(
        f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds max_len {max_len}; generating only {n} new tokens",
        UserWarning,
        stacklevel=3,
    )
    return n


def generate(
    prefill: Callable[[torch.Tensor], torch.Tensor],
    step: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: EosIds = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    streamer=None,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    progress: Union[bool, str] = False,
    max_len: Optional[int] = None,
    on_max_len: str = "error",
    logits: Optional[Callable] = None,
    prefill_last_only: bool = False,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids [B, P]``; returns ``ids [B, P + n]`` (long).

    ``n == max_new_tokens`` unless every row emitted an EOS earlier: then generation stops and ``n`` is the number
    of tokens produced so far (HF returns the shorter sequence the same way).  Rows that finished earlier hold
    ``pad_token_id`` (default: the first EOS id) after their EOS.

    * ``do_sample=False``: greedy ``argmax`` (first index on ties); temperature / top_k / top_p are ignored, with a
      warning if set.  ``do_sample=True``: :func:`process_logits` then
      ``torch.multinomial(softmax, 1, generator=generator)``.
    * ``streamer``: HF ``BaseStreamer`` protocol: ``put(prompt_ids.cpu())`` once, ``put(new_tokens [B].cpu())``
      per generated token, ``end()`` at the end.
    * ``callback(position, new_tokens [B])``: per generated token, ``position`` the 0-based index of the new token
      in the returned sequence (``P`` for the first one).
    * ``progress``: a tqdm bar on stderr, total = the number of tokens that will be generated at most; a string
      labels it.
    * ``max_len``: bound on ``P + max_new_tokens``; ``on_max_len="error"`` raises :class:`MaxLenExceeded` before
      any work, ``"truncate"`` warns and generates ``max_len - P`` tokens.

    * ``logits``: ``logits(output) -> [B, t, V]`` picks the logits out of what the model returns; by default
      they are taken the Hugging Face way (:func:`pick_logits`).
    * ``prefill_last_only``: ``prefill`` returns the last prompt position's logits only (``[B, 1, V]``), as
      ``Session.prefill(..., keep_last=1)`` does; the others are never needed.

    ``max_new_tokens=0`` returns a copy of the prompt without calling the decoder.
    """
    # --- every check before any work, so a bad call never leaves a half-run decoder behind
    _check_prompt(prompt_ids)
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens: expected an int >= 0, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens}")
    _check_warper_args(temperature, top_k, top_p)
    eos = _eos_list(eos_token_id)
    if pad_token_id is not None and not (_is_int(pad_token_id) and pad_token_id >= 0):
        raise ValueError(f"pad_token_id: expected None or an int >= 0, got {pad_token_id!r}")
    if on_max_len not in ("error", "truncate"):
        raise ValueError(f"on_max_len: expected 'error' or 'truncate', got {on_max_len!r}")
    if max_len is not None and not (_is_int(max_len) and max_len >= 1):
        raise ValueError(f"max_len: expected None or an int >= 1, got {max_len!r}")
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer: expected an object with put() and end() (HF BaseStreamer), got {type(streamer).__name__}")
    if logits is not None and not callable(logits):
        raise TypeError(f"logits: expected None or a callable(model output) -> logits, got {type(logits).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable(position, new_tokens), got {type(callback).__name__}")
    if not do_sample:
        ignored = []
        if temperature != 1.0:
            ignored.append(f"temperature={temperature}")
        if top_k is not None:
            ignored.append(f"top_k={top_k}")
        if top_p is not None and top_p != 1.0:
            ignored.append(f"top_p={top_p}")
        if ignored:
            # HF GenerationConfig.validate warns the same way: these flags only act in sampling mode
            warnings.warn(f"do_sample=False (greedy): {', '.join(ignored)} ignored; pass do_sample=True to use them",
                          UserWarning, stacklevel=2)

    B, P = prompt_ids.shape
    n = _new_token_count(P, max_new_tokens, max_len, on_max_len)
    if eos and pad_token_id is None:
        pad_token_id = eos[0]  # HF _prepare_special_tokens: pad_token_tensor = eos_token_tensor[0]

    device = prompt_ids.device
    ids = prompt_ids.to(torch.long)
    if streamer is not None:
        streamer.put(ids.cpu())
    if n == 0:
        if streamer is not None:
            streamer.end()
        return ids.clone()

    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    out = [ids]

    def last_scores(name: str, output, length: int) -> torch.Tensor:
        scores = pick_logits(output, logits)
        _check_logits(name, scores, (B, length, None))
        # HF _sample: float32 copy on the ids' device, so fp16/bf16 decoders sample like HF does
        return scores[:, -1, :].to(dtype=torch.float32, device=device, copy=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=n, file=sys.stderr, disable=not progress, unit="tok", desc=progress if isinstance(progress, str) else None)
    try:
        scores = last_scores("prefill", prefill(ids), 1 if prefill_last_only else P)
        V = scores.shape[-1]
        for i in range(n):
            if do_sample:
                probs = process_logits(scores, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                tok = torch.argmax(scores, dim=-1)
            if eos_t is not None:
                tok = torch.where(unfinished, tok, torch.full_like(tok, pad_token_id))
            out.append(tok[:, None])
            if streamer is not None:
                streamer.put(tok.cpu())
            if callback is not None:
                callback(P + i, tok)
            bar.update(1)
            if eos_t is not None:
                unfinished &= ~torch.isin(tok, eos_t)
                if not bool(unfinished.any()):
                    break  # every row finished: HF stops here and returns the shorter sequence
            if i == n - 1:
                break  # the last token's logits are never needed; don't advance the decoder past it
            scores = last_scores("step", step(tok[:, None]), 1)
            if scores.shape[-1] != V:
                raise ShapeError(f"step: expected logits with vocabulary size {V} (as prefill returned), got {scores.shape[-1]}")
    finally:
        bar.close()
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)


def pick_logits(output, logits=None):
    """The logits in a model's output: ``logits(output)`` when a selector is given, else as Hugging Face
    code takes them: the output itself if a tensor, its ``"logits"`` key or ``.logits`` attribute (a
    ``ModelOutput``), else the first element of a tuple or list (``(logits, aux)``)."""
    if logits is not None:
        return logits(output)
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output  # _check_logits names what it got


class NaiveSession:
    """The O(L^2) loop users write, as a decoding session: every step appends the new input to the
    prefix and calls the model on the whole prefix again. The baseline every decoder is compared with.

    prefill(x [B, P, ...]) -> model(x); step(x [B, 1, ...]) -> model(prefix + x) with every tensor
    output cut to its last position (dim 1), the layout a Decoder session's step returns.
    """

    def __init__(self, model: Callable):
        self.model, self.prefix = model, None

    def prefill(self, x: torch.Tensor):
        self.prefix = x
        return self.model(x)

    def step(self, x: torch.Tensor):
        if self.prefix is None:
            raise SessionNotStarted("step: call prefill(prompt) first")
        self.prefix = torch.cat([self.prefix, x], dim=1)
        out = self.model(self.prefix)
        return pytree.tree_map(lambda t: t[:, -1:] if isinstance(t, torch.Tensor) else t, out)


def naive_generate(model: Callable[[torch.Tensor], torch.Tensor], prompt_ids: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
    """The O(L^2) reference: ``model(ids[:, :t]) -> logits [B, t, V]`` recomputed on the whole prefix each step.

    It runs a :class:`NaiveSession` through :func:`generate` (same options), so sampling, EOS handling and
    streaming are shared and a fast decoder can be compared token for token.
    """

    def checked(ids: torch.Tensor):
        output = model(ids)
        _check_logits("model", pick_logits(output, options.get("logits")), (ids.shape[0], ids.shape[1], None))
        return output

    session = NaiveSession(checked)
    return generate(session.prefill, session.step, prompt_ids, max_new_tokens, **options)
