"""Load a model for the command line from `module:factory` or `path.py:factory`.

The factory is called with no arguments (or the `--arg key=value` ones) and returns either a
model or a `(model, example_inputs)` pair. A bare model needs its example inputs described:
`--input-shape 2,64 --vocab 256` (token ids in [0, 256)) or `--input-shape 2,64,16 --dtype float32`
(floats), the sequence on dim 1. Without --vocab or --dtype, a model with an nn.Embedding gets token
ids in [0, num_embeddings) of its first one, any other model standard normal floats. Every problem
is a LoadError: one line naming what was expected.
"""

import ast
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from lcsm_compile.errors import LcsmError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32}


class LoadError(LcsmError):
    """The MODEL spec, the factory or what it returned is not usable."""


@dataclass
class Loaded:
    spec: str
    model: nn.Module
    inputs: tuple  # example inputs, the sequence on dim 1 of the first
    max_len: int | None  # --max-len, else the model's `max_len` attribute, else None (the example length)
    vocab: int | None  # token-id models: ids are drawn from [0, vocab)

    @property
    def length(self) -> int:
        return int(self.inputs[0].shape[1])

    @property
    def tokens(self) -> bool:
        return not self.inputs[0].is_floating_point()


def parse_spec(spec: str) -> tuple[str, str]:
    """'pkg.mod:factory' or 'dir/file.py:factory' -> (module or path, factory name)."""
    target, sep, factory = spec.rpartition(":")
    if not sep or not target or not factory:
        raise LoadError(f"MODEL: expected module:factory or path.py:factory, got {spec!r}")
    if not all(part.isidentifier() for part in factory.split(".")):
        raise LoadError(f"MODEL: the factory after ':' must be a Python name, got {factory!r} in {spec!r}")
    return target, factory


def import_target(target: str):
    """Import a module by dotted name (the current directory first on sys.path) or a .py file."""
    if target.endswith(".py") or os.sep in target or "/" in target:
        return _import_file(target)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name) or exc.name == target:
            raise LoadError(f"MODEL: cannot import module {target!r} ({exc}; is the current directory "
                            f"{cwd} its parent?)") from exc
        raise LoadError(f"importing {target} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"importing {target} failed: {type(exc).__name__}: {_first_line(exc)}") from exc


def _import_file(target: str):
    """A .py file. Inside packages (folders with __init__.py) it is imported under its dotted name
    with the folder above the outermost package on sys.path, as pytest's prepend mode does, so its
    absolute imports of its own package (`from examples.models.common import ...`) resolve; a
    loose file is imported from its folder under a private name."""
    path = os.path.abspath(target)
    if not os.path.isfile(path):
        raise LoadError(f"MODEL: no such file {target!r}")
    root, parts = os.path.split(os.path.splitext(path)[0])
    parts = [parts]
    while os.path.isfile(os.path.join(root, "__init__.py")):
        root, package = os.path.split(root)
        parts.insert(0, package)
    dotted = ".".join(parts)
    if root not in sys.path:  # the package's (or the loose file's neighbours') imports
        sys.path.insert(0, root)
    if len(parts) > 1 and all(p.isidentifier() for p in parts):
        try:
            module = importlib.import_module(dotted)
        except Exception as exc:  # noqa: BLE001 - the user's file: report it in one line
            raise LoadError(f"importing {target} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        if os.path.abspath(getattr(module, "__file__", "") or "") != path:
            raise LoadError(f"MODEL: {target!r} imports as {dotted!r}, but that name is already the module "
                            f"{getattr(module, '__file__', None)!r}; rename the file or use module:factory")
        return module
    name = "_lcsm_user_" + "_".join(parts).replace("-", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"MODEL: cannot import {target!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: report it in one line
        sys.modules.pop(name, None)
        raise LoadError(f"importing {target} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    return module


def resolve_factory(module, target: str, factory: str):
    obj = module
    for part in factory.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            known = f" (callables defined there: {', '.join(names[:20])})" if names else ""
            raise LoadError(f"MODEL: {target!r} has no factory {factory!r}{known}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LoadError(f"MODEL: {target}:{factory} is a {type(obj).__name__}, expected a callable factory")
    return obj


def parse_kwargs(items) -> dict:
    """['n_layer=2', 'name=abc'] -> {'n_layer': 2, 'name': 'abc'} (values as Python literals, else strings)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise LoadError(f"--arg: expected key=value, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(n < 1 for n in shape):
        raise LoadError(f"--input-shape: expected positive sizes with the sequence second, like 2,64 or 2,64,16; got {text!r}")
    return shape


def make_inputs(shape, *, vocab=None, dtype=None, seed=0) -> tuple:
    """Random example inputs: token ids in [0, vocab) when vocab is set (or dtype is an int type),
    else standard normal floats."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if vocab is not None or (dt is not None and not dt.is_floating_point):
        if vocab is None:
            raise LoadError("--dtype int64 needs --vocab (token ids are drawn from [0, vocab))")
        return (torch.randint(0, int(vocab), tuple(shape), generator=g, dtype=dt or torch.int64),)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(dt or torch.float32),)


def infer_vocab(model, inputs, vocab=None):
    """Token-id models: --vocab, else the first nn.Embedding's size, else max(example ids) + 1."""
    if vocab is not None:
        return int(vocab)
    x = inputs[0]
    if x.is_floating_point():
        return None
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return int(m.num_embeddings)
    return int(x.max()) + 1


def random_inputs(loaded: Loaded, length=None, seed=0) -> tuple:
    """Fresh random inputs like the example ones (same batch, trailing dims and dtype), `length` long."""
    x = loaded.inputs[0]
    shape = (x.shape[0], int(length or x.shape[1]), *x.shape[2:])
    g = torch.Generator().manual_seed(seed)
    if loaded.tokens:
        first = torch.randint(0, loaded.vocab, shape, generator=g, dtype=x.dtype)
    else:
        first = torch.randn(shape, generator=g, dtype=torch.float64).to(x.dtype)
    return (first, *loaded.inputs[1:])


def load(spec, *, input_shape=None, vocab=None, dtype=None, max_len=None, kwargs=None, seed=0) -> Loaded:
    """Import the factory named by `spec`, call it and normalise what it returns (model in eval mode)."""
    target, factory = parse_spec(spec)
    fn = resolve_factory(import_target(target), target, factory)
    kwargs = parse_kwargs(kwargs) if isinstance(kwargs, (list, tuple)) else (kwargs or {})
    try:
        out = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's factory: report it in one line
        raise LoadError(f"factory {spec} raised {type(exc).__name__}: {_first_line(exc)}") from exc

    if isinstance(out, nn.Module):
        model, inputs = out, None
    elif isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], nn.Module):
        model, inputs = out
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if not (isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs)):
            raise LoadError(f"factory {spec} returned (model, {_kind(inputs)}): expected example inputs as a tensor "
                            "or a tuple of tensors")
        inputs = tuple(inputs)
    else:
        raise LoadError(f"factory {spec} returned {_kind(out)}: expected an nn.Module or a (model, example_inputs) pair")

    if input_shape is not None:  # the options describe (or override) the example inputs
        shape = parse_shape(input_shape) if isinstance(input_shape, str) else tuple(input_shape)
        if vocab is None and inputs is not None and not inputs[0].is_floating_point() and (dtype is None or dtype.startswith("int")):
            vocab = infer_vocab(model, inputs)
        elif vocab is None and inputs is None and dtype is None:  # a bare model that embeds tokens takes ids
            vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)
        inputs = make_inputs(shape, vocab=vocab, dtype=dtype, seed=seed) + (tuple(inputs[1:]) if inputs else ())
    elif inputs is None:
        raise LoadError(f"factory {spec} returned a bare model: describe its example inputs with --input-shape "
                        "(e.g. --input-shape 2,64 --vocab 256 for token ids, --input-shape 2,64,16 --dtype float32 for floats)")
    if inputs[0].dim() < 2:
        raise LoadError(f"example input of shape {tuple(inputs[0].shape)}: expected the sequence on dim 1 (e.g. [batch, length])")
    model.eval()
    if max_len is None and isinstance(getattr(model, "max_len", None), int):
        max_len = model.max_len
    if max_len is not None and int(max_len) < inputs[0].shape[1]:
        raise LoadError(f"--max-len {max_len} is shorter than the example length {inputs[0].shape[1]}")
    return Loaded(spec, model, inputs, None if max_len is None else int(max_len), infer_vocab(model, inputs, vocab))


def _kind(obj) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(type(o).__name__ for o in obj[:4])})"
    return "None" if obj is None else f"{'an' if type(obj).__name__[0] in 'aeiouAEIOU' else 'a'} {type(obj).__name__}"


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""
