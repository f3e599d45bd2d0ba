"""Recurrent decoding of a modal long convolution: h[t] = Re sum_n r_n p_n^t (passes/modal.py).

y_t = sum_{s<=t} h[t-s] x_s + D x_t = Re sum_n r_n S_{n,t} + D x_t, with S_t = p S_{t-1} + x_t:
N complex states per channel and row, whatever the length, where the tiling holds max_len.

The state is complex128 for every model dtype: a pole near the unit circle sums ~1/(1-|p|) inputs,
and in complex64 its rounding drifts over a long decode; the update is a few multiply-adds per
mode, so the wider state costs little. A prompt is consumed in chunks of CHUNK positions (within
a chunk a direct causal product, across chunks the state), so no buffer grows with the prompt
beyond its own inputs and outputs.
"""

import torch

from lcsm_compile.report import ModalForm

CHUNK = 64


def choose(conv, max_len, strategy="auto", *, costs, crossover, channels):
    """How a long convolution (report.ConvStructure) decodes: "recurrent" or "tile". The recurrence
    needs a proved modal form (conv.modal, passes/modal.py); "auto" takes it from the max_len on
    where it is no slower per step than the tiling (recurrent_from). Memory favours the recurrence at
    any length (N states against max_len): strategy="recurrent" takes it whatever the speed."""
    form = conv.modal
    if strategy == "tile" or not isinstance(form, ModalForm):
        return "tile"
    if strategy == "recurrent":
        return "recurrent"
    start = recurrent_from(form.poles.shape[1], form.poles.shape[0], costs=costs, crossover=crossover, channels=channels)
    return "recurrent" if start is not None and max_len >= start else "tile"


def recurrent_from(modes, width, *, costs, crossover, channels, longest=1 << 40):
    """The smallest max_len from which "auto" takes the recurrence of a filter of `modes` modes on
    `width` channels, by the per-machine costs (lcsm_compile.costs.Costs, lcsm-compile tune): its
    step against the same convolution tiled, its red cell plus its share of the tiles that serve
    the `channels` channels of every long convolution (Costs.tiled, which grows as max_len passes
    each power of two). None where the recurrence stays slower up to `longest`."""
    recurrent = costs.recurrent(modes, width)
    size = 1
    while size < longest:
        if recurrent <= costs.tiled(size + 1, width, channels, crossover):
            return size + 1
        size *= 2
    return None


class Recurrence:
    """One convolution's modal form, shared by every session of a decoder.

    poles, residues: [W, N] complex; skip: [W] or None (the lag-0 term D).
    A session's state for it is [rows, W, N] complex128 (see runtime.recurrent.RecurrentConvs)."""

    def __init__(self, poles, residues, skip, device):
        self.p = poles.to(device=device, dtype=torch.complex128)
        self.r = residues.to(device=device, dtype=torch.complex128)
        self.width, self.modes = self.p.shape
        self.skip = None if skip is None else skip.detach().reshape(-1).to(device=device, dtype=torch.float64)
        # powers p^j for j < CHUNK (a cumulative product: exact at p = 0 and p = 1)
        steps = torch.cat([torch.ones_like(self.p[:, :, None]), self.p[:, :, None].expand(-1, -1, CHUNK - 1)], -1)
        self.powers = steps.cumprod(-1)  # [W, N, CHUNK]
        self.h = (self.r[:, :, None] * self.powers).real.sum(1)  # [W, CHUNK]: the filter's first lags
        self.carry = (self.r * self.p)[:, :, None] * self.powers  # [W, N, CHUNK]: r p^(j+1), the state's part of y_j
        self.r_real = torch.view_as_real(self.r.conj().resolve_conj()).reshape(self.width, 2 * self.modes)  # Re(r s) = s . conj(r)

    def prefill(self, x, state=None):
        """x [n, W, P] -> (outputs [n, W, P] float64, state after the prompt [n, W, N] complex128).
        state: the state before x (a session continued by an extend; default zeros), not modified.
        Outputs at and after a non-finite input are NaN, as the convolution's are; earlier ones are not."""
        n, W, P = x.shape
        xs = x.to(torch.float64)
        bad = ~torch.isfinite(xs)
        if bool(bad.any()):  # the chunk's product would smear a NaN onto earlier outputs: restore it causally
            y, S = self.prefill(xs.masked_fill(bad, 0.0), state)
            first = torch.where(bad.any(-1), bad.int().argmax(-1), P)
            y = y.masked_fill(torch.arange(P, device=x.device) >= first[..., None], float("nan"))
            return y, S.masked_fill((first < P)[..., None], float("nan"))
        S = torch.zeros(n, W, self.modes, dtype=torch.complex128, device=x.device) if state is None else state
        y = torch.empty(n, W, P, dtype=torch.float64, device=x.device)
        lags = torch.arange(min(P, CHUNK), device=x.device)
        causal = lags[:, None] >= lags[None, :]
        toeplitz = self.h[:, : len(lags)][:, (lags[:, None] - lags[None, :]).clamp(min=0)] * causal  # [W, out, in]
        for start in range(0, P, CHUNK):
            xc = xs[..., start : start + CHUNK]
            k = xc.shape[-1]
            past = torch.einsum("nwm,wmj->nwj", S, self.carry[:, :, :k]).real
            y[..., start : start + k] = torch.einsum("wts,nws->nwt", toeplitz[:, :k, :k], xc) + past
            # S <- p^k S + sum_j p^(k-1-j) x_j
            S = S * (self.powers[:, :, k - 1] * self.p) + torch.einsum("wmj,nwj->nwm", self.powers[:, :, :k].flip(-1),
                                                                        xc.to(S.dtype))
        if self.skip is not None:
            y = y + self.skip[:, None] * xs
        return y, S

    def step(self, S, x):
        """One position for every row: x [n, W] (any real dtype) -> y [n, W] float64; S [n, W, N] is
        updated in place (a captured step replays the same kernels on the same buffer). Four calls:
        on a CPU a step's cost is mostly their dispatch."""
        S.mul_(self.p).add_(x[..., None])  # S = p S + x, x widened exactly
        y = torch.linalg.vecdot(torch.view_as_real(S).flatten(-2), self.r_real)  # Re(sum r S)
        return y if self.skip is None else y.addcmul_(x, self.skip)  # x first: widened, not refused
