"""The recurrent strategy: a long convolution with a proved modal filter steps N complex states per
channel and row (lcsm_compile.recurrence.Recurrence), whatever the length."""

from lcsm_compile.runtime.strategy import Strategy


class RecurrentConvs(Strategy):
    def __init__(self, decoder, shared):
        super().__init__(decoder, shared)
        self.recurrences = decoder.recurrent  # site index -> recurrence.Recurrence
        self.modes = {}  # site index -> [N, W, modes] complex128 state

    def reset(self, capacity):
        self.modes.clear()

    def prefill(self, index, u):
        shared, rec = self.shared, self.recurrences[index]
        before = self.modes.get(index) if shared.start is not None else None  # an extend continues the state
        if before is not None and shared.rows is not None:
            before = before[shared.rows.to(before.device)]
        y, state = rec.prefill(u.reshape(-1, rec.width, u.shape[-1]), before)
        if shared.rows is None:
            self.modes[index] = state
        else:
            if index not in self.modes:
                self.modes[index] = state.new_zeros(shared.capacity, rec.width, rec.modes)
            self.modes[index][shared.rows.to(state.device)] = state
        return self.plus_bias(index, y.reshape(u.shape)).to(u.dtype)

    def step(self, index, u):
        x = u[..., 0]
        state = self.modes[index]
        y = self.recurrences[index].step(state, x.reshape(state.shape[:2]))
        return self.plus_bias(index, y.reshape(x.shape).unsqueeze(-1)).to(u.dtype)

    def memory_breakdown(self):
        return {"recurrent": sum(m.numel() * m.element_size() for m in self.modes.values())}
