"""Typed errors. Each names what was expected, so a user can fix the call without reading code."""


class LcsmError(Exception):
    """Base class of every error lcsm_compile raises on purpose."""


class ShapeError(LcsmError, ValueError):
    """A tensor had the wrong shape."""


class DTypeError(LcsmError, TypeError):
    """A tensor had an unsupported or mismatched dtype."""


class DeviceError(LcsmError, ValueError):
    """A tensor lives on a different device than the state it must join."""


class InputError(LcsmError, ValueError):
    """An input the model cannot take, e.g. a token id outside its vocabulary."""


class MaxLenExceeded(LcsmError, IndexError):
    """A step or prefill would go past the maximum length the state was built for."""


def check_tensor(name, t, *, shape=None, dtype=None, device=None):
    """Raise a typed error naming the expectation when `t` does not match it."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ShapeError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise DTypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise DeviceError(f"{name}: expected device {device}, got {t.device}")


class NotDecodable(LcsmError):
    """The model has an op that mixes positions and is not an accepted causal convolution.

    `report` holds every candidate with its verdict and reason."""

    def __init__(self, report):
        self.report = report
        super().__init__(f"model is not decodable: {report.refusal()}")


class SessionNotStarted(LcsmError, RuntimeError):
    """A step on a session that has no prompt yet: call `session.prefill(prompt)` first."""


class StaleDecoder(LcsmError, RuntimeError):
    """A parameter or buffer of the model changed (written in place, or replaced) after the decoder
    was built from it: call lcsm_compile.optimize(model, ...) again."""


class SessionBroken(LcsmError, RuntimeError):
    """A state change of the session (prefill, step, add, remove) did not finish: an exception,
    KeyboardInterrupt included, left its state partly updated. prefill(prompt) restarts it."""
