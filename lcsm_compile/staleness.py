"""When what a build read has changed since: one check for the Decoder and the backend.

A build (filters evaluated at max_len, position tables, the programs' copies of the weights) reads
the model's parameters and buffers once. It is stale when one of them was written in place since
(an optimizer step, load_state_dict's copy_: the tensor's version counter moves) or replaced by
another tensor (`model.w = nn.Parameter(...)`, load_state_dict(assign=True): another identity).
Writes through `.data` bypass the version counter, as they bypass autograd's own checks: they are
not seen.
"""

import itertools


def module_state(module):
    """(name, tensor) of every parameter and buffer of `module`, in its registration order."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


class Fingerprint:
    """The identity and version of every tensor a build read (strong references: an identity
    compared after its tensor was freed could be reused by another). `values`: names compared by
    value instead (a Python float dynamo hands the backend as a fresh 0-d tensor at every call)."""

    def __init__(self, named, values=()):
        self.values = frozenset(values)
        self.entries = [(name, t.item() if name in self.values else (t, t._version)) for name, t in named]

    def changed(self, named):
        """The name of the first tensor of `named` (the same places, read now) that is not the one
        read or was written since, or that is new or gone; None when nothing changed."""
        for (name, seen), (now_name, t) in itertools.zip_longest(self.entries, named, fillvalue=(None, None)):
            if name != now_name:
                return name or now_name
            if name in self.values:
                if t.item() != seen:
                    return name
            elif t is not seen[0] or t._version != seen[1]:
                return name
        return None
