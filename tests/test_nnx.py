"""Flax NNX models: capture, optimizers and ``nnx.Optimizer`` (docs/algorithms.md, section 10).

The contract under test::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out = tekfax.loss_and_curvature(lambda p: nnx.merge(graphdef, p, rest)(x), params, y, ...)
    updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)

References, all independent of tekfax's capture: ``jax.grad`` and ``jax.vmap(jax.grad)`` of
the NNX model applied to one example at a time, hand-written forward passes, the closed-form
Fisher block of a single example, nnx.BatchNorm's own running averages, and Linen twins: the
same networks written with ``flax.linen`` and given the same weights, whose captures and
updates the Linen tests pin down.

Parameters are drawn with NumPy into abstract models (``nnx.eval_shape``), so no JAX random
kernels are compiled, every run is jitted with :data:`tests.conftest.jit`, and the twins'
captures are compiled once per model and shared by all optimizers.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from jax.tree_util import DictKey, GetAttrKey, SequenceKey
from sklearn.datasets import load_digits

import tekfax
from tekfax.patches import input_matrix, output_matrix
from tests.conftest import PRESETS, jit

pytestmark = pytest.mark.usefixtures("x64")

F64 = jnp.float64
EXACT = {"rtol": 1e-10, "atol": 1e-12}  # float64, a handful of roundings on tiny matrices
# NNX against Linen: the same operations on the same numbers. They agree bit for bit with
# the pinned jax and flax; the tolerance, a few roundings of each leaf's largest entry,
# leaves room for a compiler that fuses the two programs differently.
TWIN = 1e-12
# Statistics and S on every step, eigenbasis refreshes on steps 0 and 2 of the three.
INTERVALS = {"curvature_every": 1, "eigen_every": 2, "rescale_every": 1}
STEPS = 3
FISHERS = ("sampled", "empirical")


# --- Models: NNX networks and their Linen twins --------------------------------------------


class NnxMLP(nnx.Module):
    """nnx.Linear layers in an nnx.List, tanh between them."""

    def __init__(self, sizes=(4, 5, 3), *, rngs):
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.layers = nnx.List([nnx.Linear(i, o, param_dtype=F64, rngs=rngs) for i, o in pairs])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


class LinenMLP(nn.Module):
    """Twin of :class:`NnxMLP`: list entry i is the Dense ``layers_i``."""

    sizes: tuple = (4, 5, 3)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.sizes[1:]):
            x = nn.Dense(f, name=f"layers_{i}")(x)
            if i < len(self.sizes) - 2:
                x = jnp.tanh(x)
        return x


CONV1 = {"strides": (2, 1), "padding": ((1, 1), (0, 1)), "kernel_dilation": (1, 2)}
CONV2 = {"padding": "SAME", "use_bias": False}


class NnxCNN(nnx.Module):
    """A strided, explicitly padded, dilated conv, then a SAME conv without bias; mean pooled.

    Input (N, 6, 5, 2): both convs see 3 x 4 positions.
    """

    def __init__(self, *, rngs):
        self.conv1 = nnx.Conv(2, 3, (3, 2), **CONV1, param_dtype=F64, rngs=rngs)
        self.conv2 = nnx.Conv(3, 3, (2, 2), **CONV2, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.conv2(jnp.tanh(self.conv1(x))).mean(axis=(1, 2))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (3, 2), **CONV1, name="conv1")(x)
        return nn.Conv(3, (2, 2), **CONV2, name="conv2")(jnp.tanh(h)).mean(axis=(1, 2))


MIX = "btd,dhk->bhtk"  # one matrix product; the output puts the heads before the positions


class NnxGeneral(nnx.Module):
    """Over (N, T, d): a LinearGeneral and an Einsum to (heads, head size), then an output
    projection LinearGeneral contracting axis=(-2, -1); mean over positions."""

    def __init__(self, *, rngs):
        kw = {"param_dtype": F64, "rngs": rngs}
        self.query = nnx.LinearGeneral(4, (2, 3), **kw)
        self.mix = nnx.Einsum(MIX, (4, 2, 3), (2, 3), **kw)
        self.out = nnx.LinearGeneral((2, 3), 3, axis=(-2, -1), **kw)

    def __call__(self, x):
        h = jnp.tanh(self.query(x)) * jnp.tanh(jnp.swapaxes(self.mix(x), 1, 2))
        return self.out(h).mean(axis=1)


class LinenGeneral(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 3), axis=-1, name="query")(x)
        m = nn.Einsum((4, 2, 3), MIX, name="mix")(x)
        h = jnp.tanh(q) * jnp.tanh(jnp.swapaxes(m, 1, 2))
        return nn.DenseGeneral(3, axis=(-2, -1), name="out")(h).mean(axis=1)


# name -> (NNX class, Linen twin, input shape); three classes throughout.
MODELS = {
    "mlp": (NnxMLP, LinenMLP(), (6, 4)),
    "cnn": (NnxCNN, LinenCNN(), (7, 6, 5, 2)),
    "general": (NnxGeneral, LinenGeneral(), (6, 3, 4)),
}


# --- Helpers --------------------------------------------------------------------------------


def _draw(abstract, seed: int = 0):
    """Random float64 arrays shaped like ``abstract``'s leaves: kernels with variance
    1 / fan-in (tanh away from saturation), other leaves with standard deviation 0.3."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.3
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), F64)

    return jax.tree.map(draw, abstract)


def _split(cls, seed: int = 0, **kwargs):
    """(graphdef, params, rest) of an NNX model with NumPy-drawn params."""
    abstract = nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    return graphdef, _draw(params, seed), rest


def _twin_name(name: str) -> str:
    """An NNX layer name in the Linen twin's spelling: "layers/0" -> "layers_0"."""
    return re.sub(r"/(\d+)", r"_\1", name)


def _segments(path) -> list[str]:
    """A pytree path in Linen-twin spelling: an integer dict key (an nnx.List index) joins
    the key before it ("layers_0"), a Variable's "value" is dropped."""
    out: list[str] = []
    for key in path:
        if isinstance(key, DictKey) and isinstance(key.key, int):
            out[-1] += f"_{key.key}"
        elif isinstance(key, DictKey):
            out.append(_twin_name(str(key.key)))
        elif isinstance(key, SequenceKey):
            out.append(str(key.idx))
        elif not (isinstance(key, GetAttrKey) and key.name == "value"):
            out.append(key.name)
    return out


def _array(leaf) -> np.ndarray:
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


def _flat(tree) -> dict[str, np.ndarray]:
    """{path: leaf} of any pytree (NNX Variables by value, random keys by their data),
    paths in Linen-twin spelling."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_segments(path)): _array(leaf) for path, leaf in leaves}


def _assert_twins(nnx_tree, linen_tree, what: str, rtol: float = TWIN) -> None:
    """The NNX tree equals its Linen twin leaf by leaf, to ``rtol`` of each leaf's scale."""
    got, want = _flat(nnx_tree), _flat(linen_tree)
    assert sorted(got) == sorted(want), what
    for path, value in want.items():
        atol = rtol * float(np.max(np.abs(value), initial=0.0))
        np.testing.assert_allclose(got[path], value, rtol=rtol, atol=atol, err_msg=f"{what} {path}")


def _ce(logits, y):
    """Batch-mean softmax cross-entropy, written out."""
    log_p = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_p, y[:, None], axis=1).mean()


def _layers(stats) -> dict[str, tekfax.LayerStats]:
    """{layer name: LayerStats} of a stats tree."""
    leaves = jax.tree.leaves(stats, is_leaf=lambda s: isinstance(s, tekfax.LayerStats))
    return {s.meta.name: s for s in leaves}


@functools.cache
def _problem(name: str) -> dict:
    """An NNX model, its Linen twin with the same weights, and a batch (x, y)."""
    cls, linen, x_shape = MODELS[name]
    graphdef, params, rest = _split(cls)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(x_shape), F64)
    y = jnp.asarray(rng.integers(0, 3, x_shape[0]))
    linen_params = traverse_util.unflatten_dict(
        {tuple(path.split("/")): jnp.asarray(v) for path, v in _flat(params).items()}
    )
    # The twin really is one: the Linen model's own params have these paths and shapes.
    chex.assert_trees_all_equal_shapes(
        linen_params, jax.eval_shape(linen.init, jax.random.key(0), x)["params"]
    )
    return {
        "nnx": (lambda p: nnx.merge(graphdef, p, rest)(x), params),
        "linen": (lambda p: linen.apply({"params": p}, x), linen_params),
        "graphdef": graphdef,
        "rest": rest,
        "x": x,
        "y": y,
    }


@functools.cache
def _capture(name: str, twin: str, fisher: str):
    """Jitted loss_and_curvature of one twin (compiled once per process)."""
    logits_fn, y = _problem(name)[twin][0], _problem(name)["y"]
    return jit(lambda p, key: tekfax.loss_and_curvature(logits_fn, p, y, fisher=fisher, rng=key))


# --- 1. Exactness ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_grads_and_per_example_statistics_are_exact(name):
    """grads is jax.grad, and sum_t a_t u_t^T is each example's own gradient in the kernel
    layout (bias row first), the gradient of jax.vmap(jax.grad) of one example's loss."""
    problem = _problem(name)
    graphdef, rest, x, y = (problem[k] for k in ("graphdef", "rest", "x", "y"))
    params = problem["nnx"][1]

    def loss(p, xs, ys):
        return _ce(nnx.merge(graphdef, p, rest)(xs), ys)

    @jit
    def run(p):
        out = tekfax.loss_and_curvature(problem["nnx"][0], p, y, fisher="empirical")
        value, grads = jax.value_and_grad(loss)(p, x, y)
        one = jax.grad(lambda q, xi, yi: loss(q, xi[None], yi[None]))
        per_example = jax.vmap(one, in_axes=(None, 0, 0))(p, x, y)
        sums = {
            k: jnp.einsum(
                "nti,nto->nio", input_matrix(s.inputs, s.meta), output_matrix(s.out_grads)[0]
            )
            for k, s in _layers(out.stats).items()
        }
        return out, value, grads, per_example, sums

    out, value, grads, per_example, sums = run(params)
    np.testing.assert_allclose(out.loss, value, **EXACT)
    assert type(out.grads) is nnx.State
    chex.assert_trees_all_close(out.grads, grads, **EXACT)
    examples = _flat(per_example)
    assert sorted(_twin_name(k) for k in sums) == sorted({p.rpartition("/")[0] for p in examples})
    for layer, g in sums.items():
        n, d_out = g.shape[0], g.shape[-1]
        kernel, bias = (examples.get(f"{_twin_name(layer)}/{k}") for k in ("kernel", "bias"))
        rows = int(bias is not None)
        np.testing.assert_allclose(
            g[:, rows:], kernel.reshape(n, -1, d_out), err_msg=layer, **EXACT
        )
        if bias is not None:
            np.testing.assert_allclose(g[:, 0], bias.reshape(n, d_out), err_msg=layer, **EXACT)


def test_mlp_statistics_are_the_hand_written_forward_and_backward_pass():
    """nnx.List MLP: a is x and tanh(h); u is p - onehot(y) and its backpropagation."""
    params, x, y = _problem("mlp")["nnx"][1], _problem("mlp")["x"], _problem("mlp")["y"]
    out = _capture("mlp", "nnx", "empirical")(params, jax.random.key(5))
    w0, b0 = params["layers"][0]["kernel"][...], params["layers"][0]["bias"][...]
    w1, b1 = params["layers"][1]["kernel"][...], params["layers"][1]["bias"][...]
    h = np.tanh(np.asarray(x) @ w0 + b0)
    logits = h @ w1 + b1
    p = np.exp(logits - logits.max(1, keepdims=True))
    u1 = p / p.sum(1, keepdims=True) - np.eye(3)[np.asarray(y)]
    u0 = (u1 @ w1.T) * (1 - h**2)
    first, head = out.stats["layers"][0], out.stats["layers"][1]
    for got, want in ((first.inputs, x), (head.inputs, h), (first.out_grads[0], u0)):
        np.testing.assert_allclose(got, want, **EXACT)
    np.testing.assert_allclose(head.out_grads[0], u1, **EXACT)


def test_kfac_block_of_one_example_is_the_exact_fisher_block():
    """A root nnx.Linear and one example: g = a (x) u, so F = A (x) G exactly, and so does
    EKFAC's Q diag(S) Q^T (diagnostics.approx_fisher_blocks against exact_fisher_blocks)."""
    graphdef, params, rest = _split(nnx.Linear, in_features=4, out_features=3, param_dtype=F64)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4)), F64)
    y = jnp.asarray([1])
    rng = jax.random.key(3)
    config = {"damping": 1e-3, "curvature_every": 1, "eigen_every": 1, "rescale_every": 1}

    def logits_fn(p):
        return nnx.merge(graphdef, p, rest)(x)

    @jit
    def run(p):
        out = tekfax.loss_and_curvature(logits_fn, p, y, rng=rng)
        exact = tekfax.diagnostics.exact_fisher_blocks(logits_fn, p, y, rng=rng)
        approx = {}
        for preset in ("kfac", "ekfac"):
            opt = getattr(tekfax, f"scale_by_{preset}")(**config)
            state = opt.update(out.grads, opt.init(p), p, stats=out.stats)[1]
            approx[preset] = tekfax.diagnostics.approx_fisher_blocks(state)
        return out, exact, approx, jax.nn.softmax(logits_fn(p))[0]

    out, exact, approx, prob = run(params)
    # The root layer is the whole model: its stats are one LayerStats named "".
    assert isinstance(out.stats, tekfax.LayerStats) and out.stats.meta.name == ""
    np.testing.assert_array_equal(out.stats.inputs, x)
    u = np.asarray(out.stats.out_grads[0, 0])  # p - onehot(c) for the sampled label c
    np.testing.assert_allclose(u, prob - np.eye(3)[np.argmin(u)], **EXACT)
    a = np.concatenate([[1.0], np.asarray(x[0])])  # bias row first, as ravel_pytree orders
    block = np.kron(np.outer(a, a), np.outer(u, u))
    np.testing.assert_allclose(exact, block, **EXACT)
    for preset, got in approx.items():
        np.testing.assert_allclose(got, block, err_msg=preset, **EXACT)


# --- 2. NNX and Linen twins -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_twin_captures_match(name):
    """Loss, grads and every layer's a, u and metadata equal the Linen twin's, both Fishers."""
    problem = _problem(name)
    key = jax.random.key(5)
    for fisher in FISHERS:
        got = _capture(name, "nnx", fisher)(problem["nnx"][1], key)
        want = _capture(name, "linen", fisher)(problem["linen"][1], key)
        np.testing.assert_allclose(got.loss, want.loss, rtol=TWIN)
        _assert_twins(got.grads, want.grads, f"{fisher} grads")
        layers, twin_layers = _layers(got.stats), _layers(want.stats)
        assert sorted(map(_twin_name, layers)) == sorted(twin_layers)
        for layer, stats in layers.items():
            twin = twin_layers[_twin_name(layer)]
            assert stats.meta == dataclasses.replace(twin.meta, name=layer)
            _assert_twins(stats, twin, f"{fisher} {layer}")


@functools.cache
def _update_step(preset: str, twin: str):
    """(optimizer, jitted step) of one twin: every model's update and new params at once.

    One compiled program per optimizer and twin serves all models and both Fisher modes
    (the statistics are its arguments): compiling costs far more here than running.
    """
    opt = getattr(tekfax, preset)(0.1, **INTERVALS)

    def step(params, states, outs):
        new = {}
        for name in params:
            out = outs[name]
            updates, state = opt.update(out.grads, states[name], params[name], stats=out.stats)
            new[name] = (optax.apply_updates(params[name], updates), state, updates)
        return new

    return opt, jit(step)


def _run_twin(preset: str, twin: str, fisher: str) -> dict:
    """STEPS updates of every model: {name: (updates per step, final state, final params)}."""
    opt, step = _update_step(preset, twin)
    params = {name: _problem(name)[twin][1] for name in MODELS}
    states = {name: opt.init(p) for name, p in params.items()}
    updates = {name: [] for name in MODELS}
    for i in range(STEPS):
        key = jax.random.fold_in(jax.random.key(7), i)  # the same labels for both twins
        outs = {name: _capture(name, twin, fisher)(p, key) for name, p in params.items()}
        new = step(params, states, outs)
        for name, (p, state, update) in new.items():
            params[name], states[name] = p, state
            updates[name].append(update)
    return {name: (updates[name], states[name], params[name]) for name in MODELS}


@pytest.mark.parametrize("preset", PRESETS)
def test_twin_updates_match(preset):
    """Three steps of each model, each Fisher: the NNX network's updates, final optimizer
    state and params equal its Linen twin's (eigenbasis refreshes on steps 0 and 2)."""
    for fisher in FISHERS:
        got, want = _run_twin(preset, "nnx", fisher), _run_twin(preset, "linen", fisher)
        for name in MODELS:
            updates, state, params = got[name]
            twin_updates, twin_state, twin_params = want[name]
            assert type(updates[0]) is type(params) is nnx.State
            for i in range(STEPS):
                _assert_twins(updates[i], twin_updates[i], f"{name} {fisher} update {i}")
            _assert_twins(state, twin_state, f"{name} {fisher} state")
            _assert_twins(params, twin_params, f"{name} {fisher} params")


# --- 3. nnx.Optimizer on real data ----------------------------------------------------------


@functools.cache
def _digits(n: int = 512):
    """The first ``n`` of scikit-learn's 8 x 8 digits, pixels scaled to [0, 1]."""
    data = load_digits()
    return jnp.asarray(data.data[:n] / 16.0, F64), jnp.asarray(data.target[:n])


def test_nnx_optimizer_trains_and_equals_the_plain_optax_loop():
    """nnx.Optimizer(model, tekfax.tekfac(...), wrt=nnx.Param) and optimizer.update(model,
    grads, stats=...) on the digits: the loss falls, and every step equals the same update
    done on the split params (opt.update, optax.apply_updates).

    The NNX step is jitted in NNX's functional form (split outside, merge inside), with the
    test suite's compiler options.
    """
    x, y = _digits()
    graphdef, params, rest = _split(NnxMLP, sizes=(64, 16, 10))
    opt = tekfax.tekfac(0.1, eigen_every=5)
    steps = 30

    def capture(graphdef, params, rest, key):
        logits_fn = lambda p: nnx.merge(graphdef, p, rest)(x)  # noqa: E731
        return tekfax.loss_and_curvature(logits_fn, params, y, rng=key)

    model = nnx.merge(graphdef, params, rest, copy=True)  # its own Variables, not params'
    optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
    both, state = nnx.split((model, optimizer))

    @jit
    def nnx_step(state, key):
        model, optimizer = nnx.merge(both, state)
        out = capture(*nnx.split(model, nnx.Param, ...), key)
        optimizer.update(model, out.grads, stats=out.stats)
        return nnx.state((model, optimizer)), out.loss

    @jit
    def plain_step(params, opt_state, key):
        out = capture(graphdef, params, rest, key)
        updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        return optax.apply_updates(params, updates), opt_state, out.loss

    opt_state = opt.init(params)
    losses, plain_losses = [], []
    for i in range(steps):
        key = jax.random.fold_in(jax.random.key(0), i)
        state, loss = nnx_step(state, key)
        params, opt_state, plain_loss = plain_step(params, opt_state, key)
        losses.append(float(loss))
        plain_losses.append(float(plain_loss))
    model, optimizer = nnx.merge(both, state)
    final = float(_ce(model(x), y))
    # Ten classes: the initial loss is near log 10; thirty steps cut it tenfold (they reach
    # about 0.003 on these 512 examples).
    assert losses[0] > 0.8 * np.log(10) and final < 0.1 * losses[0], (losses[0], final)
    np.testing.assert_allclose(losses, plain_losses, rtol=TWIN)
    _assert_twins(nnx.state(model, nnx.Param), params, "params")
    assert int(optimizer.step[...]) == steps
    _assert_twins(optimizer.opt_state, opt_state, "optimizer state")


# --- 4. BatchNorm and Dropout ---------------------------------------------------------------


class NnxNormDrop(nnx.Module):
    """Linear, BatchNorm (training mode), relu, Dropout, Linear."""

    def __init__(self, sizes=(64, 16, 10), *, rngs):
        self.hidden = nnx.Linear(sizes[0], sizes[1], param_dtype=F64, rngs=rngs)
        self.norm = nnx.BatchNorm(sizes[1], momentum=0.8, param_dtype=F64, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(sizes[1], sizes[2], param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(nnx.relu(self.norm(self.hidden(x)))))


def _norm_drop_model():
    """(graphdef, params, rest): rest holds BatchNorm's mean 0 and var 1 (in float64, like
    the params) and Dropout's stream."""
    graphdef, params, abstract_rest = _split(NnxNormDrop)
    fill = {
        "mean": lambda s: jnp.zeros(s.shape, F64),
        "var": lambda s: jnp.ones(s.shape, F64),
        "count": lambda s: jnp.zeros(s.shape, s.dtype),
        "key": lambda s: jax.random.key(4),
    }
    rest = jax.tree.map_with_path(lambda path, s: fill[path[-2].key](s), abstract_rest)
    return graphdef, params, rest


def _logits_and_rest(graphdef, rest, x):
    """logits_fn for has_aux=True: the logits and the model's mutated non-Param state.

    ``copy=True``: the Variables of ``rest`` were made outside the capture's traces, and
    NNX refuses to mutate a Variable from another trace level (TraceContextError); the
    copies are made inside the trace.
    """

    def logits_fn(p):
        model = nnx.merge(graphdef, p, rest, copy=True)
        return model(x), nnx.state(model, nnx.Not(nnx.Param))

    return logits_fn


def test_batchnorm_and_dropout_through_has_aux():
    """BatchNorm's statistics and Dropout's stream live in ``rest``; logits_fn returns the
    mutated ``rest`` as aux. The capture sees the training-mode model with one dropout
    mask, the statistics move exactly as nnx.BatchNorm moves them, and the next call draws
    a new mask."""
    x, y = _digits(64)
    graphdef, params, rest = _norm_drop_model()

    @jit
    def run(p, r):
        logits_fn = _logits_and_rest(graphdef, r, x)
        out = tekfax.loss_and_curvature(logits_fn, p, y, rng=jax.random.key(0), has_aux=True)
        loss, grads = jax.value_and_grad(lambda q: _ce(logits_fn(q)[0], y))(p)
        # The model run directly in training mode, twice: its own state after the first call.
        model = nnx.merge(graphdef, p, r, copy=True)
        first = _ce(model(x), y), nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
        return out, loss, grads, first, _ce(model(x), y)

    out, loss, grads, (direct_loss, direct_rest), second_loss = run(params, rest)
    assert set(_layers(out.stats)) == {"hidden", "head"}  # BatchNorm, Dropout: no kernel
    np.testing.assert_allclose(out.loss, loss, **EXACT)
    np.testing.assert_allclose(out.loss, direct_loss, **EXACT)
    chex.assert_trees_all_close(out.grads, grads, **EXACT)
    assert type(out.aux) is nnx.State
    _assert_twins(out.aux, direct_rest, "rest", rtol=EXACT["rtol"])
    # The running averages, written out: m <- 0.8 m + 0.2 mean_n(h), v likewise (biased).
    h = np.asarray(x) @ params["hidden"]["kernel"][...] + params["hidden"]["bias"][...]
    np.testing.assert_allclose(out.aux["norm"]["mean"][...], 0.2 * h.mean(0), **EXACT)
    np.testing.assert_allclose(out.aux["norm"]["var"][...], 0.8 + 0.2 * h.var(0), **EXACT)
    # Dropout drew one key (count 0 -> 1); the model's next call draws another mask.
    assert int(out.aux["drop"]["rngs"]["count"][...]) == 1
    assert not np.isclose(second_loss, out.loss)
    # BatchNorm's scale and bias pass through the optimizers unpreconditioned.
    untagged = tekfax.diagnostics.unpreconditioned(
        _logits_and_rest(graphdef, rest, x), params, has_aux=True
    )
    assert sorted(untagged) == ["norm/bias", "norm/scale"]


def test_batchnorm_and_dropout_model_trains_with_nnx_optimizer():
    """The training loop: capture with has_aux, write the aux back into the model, then
    optimizer.update. The loss in evaluation mode (running averages, no dropout) falls."""
    x, y = _digits()
    graphdef, params, rest = _norm_drop_model()
    model = nnx.merge(graphdef, params, rest)
    optimizer = nnx.Optimizer(model, tekfax.tekfac(0.1, eigen_every=5), wrt=nnx.Param)
    both, state = nnx.split((model, optimizer))

    @jit
    def step(state, key):
        model, optimizer = nnx.merge(both, state)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        logits_fn = _logits_and_rest(graphdef, rest, x)
        out = tekfax.loss_and_curvature(logits_fn, params, y, rng=key, has_aux=True)
        nnx.update(model, out.aux)
        optimizer.update(model, out.grads, stats=out.stats)
        return nnx.state((model, optimizer)), out.loss

    @jit
    def eval_loss(state):
        model = nnx.merge(both, state)[0]
        model.eval()
        return _ce(model(x), y)

    before = float(eval_loss(state))
    for i in range(30):
        state, _ = step(state, jax.random.fold_in(jax.random.key(1), i))
    after = float(eval_loss(state))
    assert after < 0.1 * before, (before, after)  # about 2.3 -> 0.02
    model = nnx.merge(both, state)[0]
    assert int(model.drop.rngs.count[...]) == 30  # one mask per step


# --- 5. Errors that name the layer ----------------------------------------------------------


class _Batched(nnx.Module):
    """A LinearGeneral with a separate kernel per batch index."""

    def __init__(self, *, rngs):
        self.proj = nnx.LinearGeneral(4, 3, batch_axis={0: 2}, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


class _Grouped(nnx.Module):
    def __init__(self, *, rngs):
        self.grouped = nnx.Conv(4, 4, (3,), feature_group_count=2, param_dtype=F64, rngs=rngs)
        self.head = nnx.Linear(20, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.head(self.grouped(x).reshape(x.shape[0], -1))


class _Shared(nnx.Module):
    def __init__(self, *, rngs):
        self.shared = nnx.Linear(4, 4, param_dtype=F64, rngs=rngs)
        self.head = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.head(self.shared(jnp.tanh(self.shared(x))))


class _PerHead(nnx.Module):
    """An einsum with a kernel per head: h is in the input, the kernel and the output."""

    def __init__(self, *, rngs):
        self.heads = nnx.Einsum("bhd,hdk->bhk", (2, 4, 3), param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.heads(x).reshape(x.shape[0], -1)


ERRORS = [
    pytest.param(_Batched, (2, 4), r"layer 'proj' \(LinearGeneral\).*batch_axis", id="batch-axis"),
    pytest.param(_Grouped, (2, 5, 4), r"Conv layer 'grouped'.*feature_group_count=2", id="groups"),
    pytest.param(_Shared, (2, 4), r"layer 'shared' \(Linear\).*more than once", id="shared"),
    pytest.param(
        _PerHead,
        (2, 2, 4),
        r"layer 'heads' \(Einsum\).*shared by the input and the output",
        id="einsum",
    ),
]


@pytest.mark.parametrize("cls, x_shape, match", ERRORS)
def test_unsupported_nnx_layers_raise_naming_the_layer(cls, x_shape, match):
    graphdef, params, rest = _split(cls)
    x = jnp.zeros(x_shape, F64)
    with pytest.raises(ValueError, match=match):
        tekfax.loss_and_curvature(
            lambda p: nnx.merge(graphdef, p, rest)(x),
            params,
            jnp.zeros(2, int),
            rng=jax.random.key(0),
        )


def test_model_not_built_from_the_differentiated_params_raises():
    """logits_fn ignores its argument and calls a model closed over: its kernels are not
    leaves of the params being differentiated, and the gradient would be zero."""
    graphdef, params, rest = _split(NnxMLP)
    model = nnx.merge(graphdef, params, rest)
    x = jnp.zeros((2, 4), F64)
    with pytest.raises(
        ValueError, match=r"Linear was called whose kernel is not a leaf.*nnx\.merge"
    ):
        tekfax.loss_and_curvature(lambda p: model(x), params, jnp.zeros(2, int), fisher="empirical")


# --- 6. Statistics mirror the nnx.State -----------------------------------------------------


class _Block(nnx.Module):
    def __init__(self, *, rngs):
        self.layers = nnx.List([nnx.Linear(4, 4, param_dtype=F64, rngs=rngs) for _ in range(2)])
        self.proj = nnx.LinearGeneral(4, (2, 2), param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.proj(x).reshape(x.shape[0], -1)


class _Nested(nnx.Module):
    """Layers at three depths: block/layers/0, block/layers/1, block/proj, head."""

    def __init__(self, *, rngs):
        self.block = _Block(rngs=rngs)
        self.norm = nnx.LayerNorm(4, param_dtype=F64, rngs=rngs)
        self.head = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(self.block(x)))


def _paths(tree, is_leaf=None) -> list[tuple]:
    """Every leaf's path as the raw keys (strings, and integers for an nnx.List)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return [tuple(k.key for k in path if isinstance(k, DictKey)) for path, _ in leaves]


def _abstract_capture(graphdef, rest, params, x):
    """The shapes of an empirical-Fisher capture of the merged model on ``x``."""
    return jax.eval_shape(
        lambda p: tekfax.loss_and_curvature(
            lambda q: nnx.merge(graphdef, q, rest)(x), p, jnp.zeros(3, int), fisher="empirical"
        ),
        params,
    )


def test_stats_mirror_the_state_and_init_takes_state_or_pure_arrays():
    graphdef, params, rest = _split(_Nested)
    x = jnp.zeros((3, 4), F64)
    out = _abstract_capture(graphdef, rest, params, x)
    stats_paths = _paths(out.stats, is_leaf=lambda s: isinstance(s, tekfax.LayerStats))
    kernel_paths = [p[:-1] for p in _paths(params) if p[-1] == "kernel"]
    assert stats_paths == kernel_paths  # same keys, same order, integer list indices
    assert stats_paths == [
        ("block", "layers", 0),
        ("block", "layers", 1),
        ("block", "proj"),
        ("head",),
    ]
    assert isinstance(out.stats["block"]["layers"][1], tekfax.LayerStats)
    assert out.stats["block"]["layers"][1].meta.name == "block/layers/1"
    assert out.stats["block"]["proj"].meta.d_out == 4
    assert _paths(out.grads) == _paths(params)
    # The same capture from the State's pure arrays (nnx.as_pure): the same statistics tree.
    pure_out = _abstract_capture(graphdef, rest, nnx.as_pure(params), x)
    assert jax.tree.structure(pure_out.stats) == jax.tree.structure(out.stats)
    # opt.init on the nnx.State and on its pure arrays: the same state, layers by name.
    opt = tekfax.kfac(0.1)
    state, pure = opt.init(params), opt.init(nnx.as_pure(params))
    layers = tekfax.kronecker.find_kronecker_state(state).layers
    assert sorted(layers) == ["block/layers/0", "block/layers/1", "block/proj", "head"]
    assert sorted(tekfax.kronecker.find_kronecker_state(pure).layers) == sorted(layers)
    _assert_twins(state, pure, "init", rtol=0.0)


class _Checkpointed(nnx.Module):
    """A layer called inside jax.checkpoint, a function of the module."""

    def __init__(self, *, rngs):
        self.first = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
        self.second = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.second(jax.checkpoint(lambda x: jnp.tanh(self.first(x)))(x))


def test_layer_inside_jax_checkpoint_is_tagged():
    graphdef, params, rest = _split(_Checkpointed)
    x = jnp.zeros((3, 4), F64)
    out = _abstract_capture(graphdef, rest, params, x)
    assert out.stats["first"].inputs.shape == (3, 4)
    assert out.stats["first"].out_grads.shape == (1, 3, 5)
    assert sorted(out.stats) == ["first", "second"]
