"""The zoo itself, checked directly in float64 (no dependency on the analysis): positives are causal,
prefix-stable and non-degenerate; each negative shows its violation where it is observable."""

import pytest
import torch

from examples.models import ZOO

POSITIVES = [e for e in ZOO if e.decodable]
LONG_RANGE = [e for e in POSITIVES if e.n_long > 0]  # short convs alone reach only a few positions back
NEGATIVES = [e for e in ZOO if not e.decodable]
TOL = 1e-10

LEAKS_FUTURE = ["neg_bidirectional", "neg_same_padding", "neg_mean_pool", "neg_conj_rev_filter", "neg_future_token_shift"]
LENGTH_DEPENDENT = ["neg_length_dependent_filter", "neg_length_dependent_arange", "neg_filter_normalized_over_lags"]
# Causal and prefix-stable, but the time mixing is not an affine map of its input (not a convolution).
NOT_AFFINE = {"neg_input_filter": lambda m: m.blocks[0].mixer, "neg_attention": lambda m: m.blocks[1].mixer}


def ids(entries):
    return [e.name for e in entries]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def out_dim(model):
    return model.embedding.num_embeddings if hasattr(model, "embedding") else model.decoder.out_features


def random_inputs(model, example, length, dtype=torch.float64):
    """Fresh random inputs shaped like the example's first input, at another length."""
    x = example[0]
    if x.dtype == torch.long:
        return torch.randint(0, model.embedding.num_embeddings, (x.shape[0], length))
    return torch.randn(x.shape[0], length, *x.shape[2:], dtype=dtype)


def perturb_from(model, x, t):
    """A copy of x with every position >= t replaced by fresh values."""
    fresh = random_inputs(model, (x,), x.shape[1] - t, dtype=x.dtype)
    if x.dtype == torch.long:
        fresh = (x[:, t:] + 1 + fresh % (model.embedding.num_embeddings - 1)) % model.embedding.num_embeddings
    return torch.cat([x[:, :t], fresh], dim=1)


def build64(entry):
    model, example = entry.build()
    return model.double(), example


@pytest.mark.parametrize("entry", ZOO, ids=ids(ZOO))
def test_builds_eval_reproducible_shape_finite(entry):
    state = torch.random.get_rng_state()
    model, example = entry.build()
    assert torch.equal(torch.random.get_rng_state(), state), "build() must not consume the global RNG"
    assert not model.training
    x = example[0]
    assert x.shape[1] <= model.max_len
    with torch.no_grad():
        y = model(*example)
    assert y.shape == (x.shape[0], x.shape[1], out_dim(model))
    assert y.is_floating_point() and torch.isfinite(y).all()

    again, _ = entry.build()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), f"{entry.name}: {name} differs between builds"


@pytest.mark.parametrize("entry", ZOO, ids=ids(ZOO))
def test_runs_at_other_lengths(entry):
    model, example = entry.build()
    for length in (2, 17, model.max_len):
        with torch.no_grad():
            y = model(random_inputs(model, example, length, dtype=torch.float32))
        assert y.shape[:2] == (example[0].shape[0], length)
        assert torch.isfinite(y).all(), f"{entry.name} at L={length}"


@pytest.mark.parametrize("entry", POSITIVES, ids=ids(POSITIVES))
@torch.no_grad()
def test_positive_is_causal_and_prefix_stable(entry):
    model, example = build64(entry)
    L = example[0].shape[1]
    x = random_inputs(model, example, L)
    y = model(x)
    for t in (1, L // 2 + 1, L - 1):
        assert rel_err(model(x[:, :t]), y[:, :t]) < TOL, f"prefix of length {t} differs"
        assert rel_err(model(perturb_from(model, x, t))[:, :t], y[:, :t]) < TOL, f"positions >= {t} leak"

    x = random_inputs(model, example, model.max_len)
    y = model(x)
    t = model.max_len - 3
    assert rel_err(model(x[:, :t]), y[:, :t]) < TOL, f"prefix {t} of a max_len input differs"


@pytest.mark.parametrize("entry", LONG_RANGE, ids=ids(LONG_RANGE))
@torch.no_grad()
def test_positive_long_range(entry):
    """The last output depends on the first input: short convs alone reach only a few positions, so
    the long convolutions carry real signal."""
    model, example = build64(entry)
    x = random_inputs(model, example, example[0].shape[1])
    x2 = x.clone()
    x2[:, 0] = (x[:, 0] + 1) % model.embedding.num_embeddings if x.dtype == torch.long else x[:, 0] + 1.0
    y, y2 = model(x), model(x2)
    assert rel_err(y2[:, -1], y[:, -1]) > 1e-6


@pytest.mark.parametrize("entry", ZOO, ids=ids(ZOO))
def test_every_parameter_contributes(entry):
    """No zero-init trap: every parameter gets a nonzero gradient, so nothing upstream of a
    filter, gate or projection is dead at initialisation."""
    model, example = build64(entry)
    x = random_inputs(model, example, example[0].shape[1])
    y = model(x)
    (y * torch.randn_like(y)).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters with zero gradient: {dead}"


def test_every_negative_has_a_violation_check():
    checked = set(LEAKS_FUTURE) | set(LENGTH_DEPENDENT) | set(NOT_AFFINE) | {"neg_wrap_around"}
    assert checked == set(ids(NEGATIVES))


@pytest.mark.parametrize("name", LEAKS_FUTURE)
@torch.no_grad()
def test_negative_leaks_future(name):
    model, example = build64(next(e for e in ZOO if e.name == name))
    L = example[0].shape[1]
    x = random_inputs(model, example, L)
    t = L // 2
    assert rel_err(model(perturb_from(model, x, t))[:, :t], model(x)[:, :t]) > 1e-8


@torch.no_grad()
def test_wrap_around_leaks_near_max_len_only():
    model, example = build64(next(e for e in ZOO if e.name == "neg_wrap_around"))
    short = random_inputs(model, example, model.max_len // 2)
    t = short.shape[1] // 2
    assert rel_err(model(perturb_from(model, short, t))[:, :t], model(short)[:, :t]) < TOL

    x = random_inputs(model, example, model.max_len)
    t = model.max_len // 2
    assert rel_err(model(perturb_from(model, x, t))[:, :t], model(x)[:, :t]) > 1e-8


@pytest.mark.parametrize("name", LENGTH_DEPENDENT)
@torch.no_grad()
def test_negative_prefix_changes_with_length(name):
    model, example = build64(next(e for e in ZOO if e.name == name))
    L = example[0].shape[1]
    x = random_inputs(model, example, L)
    y = model(x)
    t = L // 2
    assert rel_err(model(perturb_from(model, x, t))[:, :t], y[:, :t]) < TOL, "causal at a fixed length"
    assert rel_err(model(x[:, :t]), y[:, :t]) > 1e-6, "but a prefix's output depends on the total length"


@pytest.mark.parametrize("name", list(NOT_AFFINE))
@torch.no_grad()
def test_negative_mixer_is_not_a_convolution(name):
    model, example = build64(next(e for e in ZOO if e.name == name))
    L = example[0].shape[1]
    x = random_inputs(model, example, L)
    y = model(x)
    t = L // 2
    assert rel_err(model(perturb_from(model, x, t))[:, :t], y[:, :t]) < TOL, "causal"
    assert rel_err(model(x[:, :t]), y[:, :t]) < TOL, "and prefix-stable"

    mixer = NOT_AFFINE[name](model)
    d = model.embedding.embedding_dim
    a, b = torch.randn(2, L, d, dtype=torch.float64), torch.randn(2, L, d, dtype=torch.float64)
    zero = torch.zeros_like(a)
    residual = mixer(a + b) - mixer(a) - mixer(b) + mixer(zero)  # zero for any affine map
    assert rel_err(residual, mixer(a + b)) > 1e-3
