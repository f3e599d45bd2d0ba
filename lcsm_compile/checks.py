"""The caller's mistakes, named before any work: one check per option (shared by optimize(),
analyze(), the Decoder and the torch.compile backend) and token ids against the vocabulary.

A mistake in an argument or an input is the caller's, never a verdict about the model: these raise
plain ValueError / TypeError (or a typed InputError), not NotDecodable.
"""

import numbers

import torch

from lcsm_compile.errors import InputError


def _convs():
    from lcsm_compile.runtime.tiled import BANKS  # at call time: the runtime imports this module

    return tuple(sorted(BANKS))


def check_choice(name, value, allowed):
    """`value` must be one of `allowed`, of the same type (so 1 is not True and "no" is not truthy)."""
    if any(type(value) is type(a) and value == a for a in allowed):
        return
    kinds = {type(a) for a in allowed}
    error = ValueError if type(value) in kinds else TypeError
    raise error(f"{name}: expected one of {list(allowed)}, got {value!r}")


def _positive_int(name, value):
    if value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a positive int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int or None, got {value!r}")


STRATEGIES = ("auto", "tile", "recurrent")


def _strategy(name, value):
    """One strategy for every long convolution, or a dict {site name or module path: strategy}."""
    if not isinstance(value, dict):
        return check_choice(name, value, STRATEGIES)
    for key, v in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{name}: expected site names or module paths (str) as keys, got {key!r}")
        check_choice(f"{name}[{key!r}]", v, STRATEGIES)


CHECKS = {
    "conv": lambda name, v: check_choice(name, v, _convs()),
    "compile": lambda name, v: check_choice(name, v, (True, False, "auto")),
    "cuda_graph": lambda name, v: check_choice(name, v, (False, True, "emulate")),
    "validate": lambda name, v: check_choice(name, v, (True, False)),
    "latency": lambda name, v: check_choice(name, v, (True, False)),
    "strategy": _strategy,
    "crossover": _positive_int,
    "max_len": _positive_int,
}


def check_options(**options):
    """Raise ValueError / TypeError naming the first option whose value is not allowed."""
    for name, value in options.items():
        CHECKS[name](name, value)


# -- token ids --------------------------------------------------------------------------------------

# the embedding ops of an export graph (ATen) and of a dynamo graph (torch functions): (indices, weight) arg positions
_EMBEDDINGS = {torch.ops.aten.embedding.default: (1, 0), torch.nn.functional.embedding: (0, 1), torch.embedding: (1, 0)}


def vocab_size(gm, input_index=0):
    """The vocabulary of the model's token ids (graph input `input_index`; the others of a dynamo graph
    are the model's state): the rows of the first embedding that reads them, from the weight's
    recorded value. None when no embedding reads them."""
    ids = [n for n in gm.graph.nodes if n.op == "placeholder"][input_index]
    for node in ids.users:
        where = _EMBEDDINGS.get(node.target)
        if where is None or len(node.args) < 2 or node.args[where[0]] is not ids:
            continue
        weight = node.args[where[1]]
        value = weight.meta.get("val", weight.meta.get("example_value")) if isinstance(weight, torch.fx.Node) else None
        if isinstance(value, torch.Tensor) and isinstance(value.shape[0], int):
            return value.shape[0]
    return None


def check_ids(name, x, vocab):
    """Integer ids outside [0, vocab) raise InputError naming both (the embedding would say only
    "index out of range in self"). One min/max over the ids."""
    if vocab is None or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool or x.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(x)).tolist()  # one read back from the device
    if lo < 0 or hi >= vocab:
        raise InputError(f"{name}: token id {lo if lo < 0 else hi} is outside the model's vocabulary "
                         f"[0, {vocab}) (the size of its embedding)")
