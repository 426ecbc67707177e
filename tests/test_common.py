"""The common battery: every optimizer behaves as an optax optimizer should.

Modelled on optax's common tests for its contrib optimizers. Each optimizer of the shared case
table (the four presets, the ``nu`` variants where the damping rule matters) and
``tekfax.eadam`` runs the same checks on a tiny softmax regression: extra arguments are
ignored, ``optax.inject_hyperparams`` and schedules work, parameter dtypes survive updates,
``optax.MultiSteps`` and ``optax.partition`` compose with it, a jitted step compiles once,
training converges, and the state round-trips through bytes and pytree flattening.

The Kronecker-factored optimizers take the curvature statistics as the extra argument
``stats=`` (from :func:`tekfax.loss_and_curvature`); EAdam takes none.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax
from tests import _formulas as fm
from tests.conftest import CASES, EXACT, INTERVALS, LEARNING_RATE, PRESETS, jit, make_optimizer
from tests.models import MLP

N, D_IN, CLASSES = 32, 5, 3
EADAM_LR = 0.05
MODEL = MLP(features=(CLASSES,))  # one Dense layer: softmax regression
STEPS = 4  # with the shared INTERVALS: the eigenbasis is refreshed on steps 0 and 2
# inject_hyperparams holds the hyperparameters as float32 arrays: last-bit differences.
TOL = {"rtol": 1e-5, "atol": 1e-6}

ALL = [*CASES, "eadam"]  # every case, the nu variants included
BASIC = [*PRESETS, "eadam"]  # one case per optimizer, for the checks that damping cannot affect


def _make(case: str, learning_rate=None, **overrides) -> optax.GradientTransformationExtraArgs:
    if case == "eadam":
        return tekfax.eadam(EADAM_LR if learning_rate is None else learning_rate, **overrides)
    lr = LEARNING_RATE if learning_rate is None else learning_rate
    return make_optimizer(case, lr, **overrides)


def _hyperparams(case: str) -> dict:
    """The numeric hyperparameters of a case, as ``inject_hyperparams`` receives them."""
    if case == "eadam":
        return {"learning_rate": EADAM_LR, "b1": 0.9, "b2": 0.999}
    return {"learning_rate": LEARNING_RATE, **CASES[case][1]}


@functools.cache
def _data():
    """A fixed, learnable softmax regression: labels from a random linear teacher."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (N, D_IN))
    y = jnp.argmax(x @ (3.0 * jax.random.normal(kw, (D_IN, CLASSES))), axis=-1)
    params = MODEL.init(jax.random.key(1), x)["params"]
    return params, x, y


def _loss(params, x, y, model=MODEL):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _grads(case: str, params, x, y, rng, model=MODEL):
    """(loss, grads, extra args) for one batch: the statistics for the Kronecker cases."""
    if case == "eadam":
        loss, grads = jax.value_and_grad(_loss)(params, x, y, model)
        return loss, grads, {}
    out = tekfax.loss_and_curvature(lambda p: model.apply({"params": p}, x), params, y, rng=rng)
    return out.loss, out.grads, {"stats": out.stats}


_TRACES: dict[str, int] = {}


@functools.cache
def _train_step(case: str):
    """The case's optimizer and its jitted train step, shared by the tests of this module."""
    opt = _make(case)

    @jit
    def step(params, opt_state, rng):
        _TRACES[case] = _TRACES.get(case, 0) + 1  # runs only while tracing
        _, x, y = _data()
        loss, grads, extra = _grads(case, params, x, y, rng)
        updates, opt_state = opt.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss, updates

    return opt, step


def _train(case: str, steps: int):
    opt, step = _train_step(case)
    params = _data()[0]
    opt_state, losses = opt.init(params), []
    for k in range(steps):
        params, opt_state, loss, _ = step(params, opt_state, jax.random.key(100 + k))
        losses.append(float(loss))
    return params, opt_state, losses


def _updates(opt, case: str, steps: int = STEPS, **extra_args):
    """Updates of ``opt`` on fixed parameters (nothing applied), one per step."""
    params, x, y = _data()

    @jit
    def update(opt_state, rng):
        _, grads, extra = _grads(case, params, x, y, rng)
        return opt.update(grads, opt_state, params, **extra, **extra_args)

    opt_state, out = opt.init(params), []
    for k in range(steps):
        updates, opt_state = update(opt_state, jax.random.key(100 + k))
        out.append(updates)
    return out, opt_state


@functools.cache
def _plain_updates(case: str):
    """The updates of the case's own optimizer (``_updates``), computed once per case."""
    return _updates(_make(case), case)[0]


@functools.cache
def _jitted_grads(case: str):
    return jit(functools.partial(_grads, case))


@pytest.mark.parametrize("case", BASIC)
def test_extra_args_are_ignored(case):
    got, _ = _updates(_make(case), case, unrelated=jnp.ones(3), note="ignored")
    chex.assert_trees_all_equal(got, _plain_updates(case))


@pytest.mark.parametrize("case", ALL)
def test_inject_hyperparams_gives_the_plain_updates(case):
    hyper = _hyperparams(case)
    if case == "eadam":
        injected = optax.inject_hyperparams(tekfax.eadam)(**hyper)
    else:
        preset = CASES[case][0]
        injected = optax.inject_hyperparams(getattr(tekfax, preset), static_args=tuple(INTERVALS))(
            **hyper, **INTERVALS, **EXACT
        )
    got, state = _updates(injected, case)
    assert set(hyper) <= set(state.hyperparams)
    for g, w in zip(got, _plain_updates(case), strict=True):
        chex.assert_trees_all_close(g, w, **TOL)


@pytest.mark.parametrize("case", BASIC)
def test_schedule_as_learning_rate(case):
    """On fixed parameters, update k with lr_k = lr * 0.5**k is 0.5**k times the constant one
    (the learning rate scales last, after momentum)."""
    lr = _hyperparams(case)["learning_rate"]
    schedule = optax.exponential_decay(lr, transition_steps=1, decay_rate=0.5)
    got, _ = _updates(_make(case, schedule), case)
    for k, (g, w) in enumerate(zip(got, _plain_updates(case), strict=True)):
        chex.assert_trees_all_close(g, jax.tree.map(lambda u, k=k: 0.5**k * u, w), **TOL)


@functools.cache
def _bfloat16_step(case: str):
    opt = _make(case)
    _, x, y = _data()
    x = x.astype(jnp.bfloat16)

    @jit
    def step(params, opt_state, rng):
        loss, grads, extra = _grads(case, params, x, y, rng)
        updates, opt_state = opt.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss, updates

    return opt, step


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("case", BASIC)
def test_param_dtype_is_kept(case, dtype):
    opt, step = _bfloat16_step(case) if dtype == jnp.bfloat16 else _train_step(case)
    params = jax.tree.map(lambda p: p.astype(dtype), _data()[0])
    opt_state = opt.init(params)
    for k in range(3):
        params, opt_state, _, updates = step(params, opt_state, jax.random.key(k))
        chex.assert_trees_all_equal_dtypes(updates, params)
        assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
        chex.assert_tree_all_finite(params)


@pytest.mark.parametrize("case", BASIC)
def test_multi_steps_accumulates_and_applies_with_the_last_stats(case):
    """``optax.MultiSteps(opt, 2)`` calls ``opt.update`` on every mini-step with the running
    mean of the gradients and that mini-step's extra args, and keeps the result only on the
    second: the applied update is ``opt.update(mean gradient, init state, stats of batch 1)``."""
    params, x, y = _data()
    opt = _make(case)
    multi = optax.MultiSteps(opt, every_k_schedule=2)
    grads = _jitted_grads(case)
    batches = [grads(params, x[k::2], y[k::2], jax.random.key(k))[1:] for k in (0, 1)]
    update = jit(multi.update)
    state = multi.init(params)
    first, state = update(batches[0][0], state, params, **batches[0][1])
    chex.assert_trees_all_equal(first, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(state.inner_opt_state, opt.init(params))  # nothing applied yet
    applied, state = update(batches[1][0], state, params, **batches[1][1])

    mean = jax.tree.map(lambda a, b: (a + b) / 2, batches[0][0], batches[1][0])
    plain = jit(opt.update)
    want, want_state = plain(mean, opt.init(params), params, **batches[1][1])
    fm.assert_trees_close(applied, want, 1e-5)  # float32, two programs: scale-relative
    fm.assert_trees_close(state.inner_opt_state, want_state, 1e-5)
    if case != "eadam":  # the statistics that reached the inner optimizer are batch 1's
        other, _ = plain(mean, opt.init(params), params, **batches[0][1])
        assert not np.allclose(*(jax.flatten_util.ravel_pytree(u)[0] for u in (other, want)))


class ScaledMLP(nn.Module):
    """Two Dense layers and a learned logit scale, a leaf that no Kronecker factor covers."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, ())
        return scale * MLP(features=(4, CLASSES), name="mlp")(x)


@pytest.mark.parametrize("case", BASIC)
def test_partition_with_an_adam_branch(case):
    """The Dense layers train with the case's optimizer, the scale with adam, in one
    ``optax.partition``; each branch's update is what that optimizer gives on its own."""
    model = ScaledMLP()
    _, x, y = _data()
    params = model.init(jax.random.key(2), x)["params"]
    labels = {"scale": "adam", "mlp": jax.tree.map(lambda _: "main", params["mlp"])}
    opt = optax.partition({"main": _make(case), "adam": optax.adam(1e-2)}, labels)

    @jit
    def step(params, opt_state, rng):
        loss, grads, extra = _grads(case, params, x, y, rng, model)
        updates, opt_state = opt.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss, grads, extra, updates

    state = opt.init(params)
    new_params, state, loss0, grads, extra, updates = step(params, state, jax.random.key(0))
    main = _make(case)
    extra = {"stats": extra["stats"]["mlp"]} if extra else {}
    want_main, _ = jit(main.update)(grads["mlp"], main.init(params["mlp"]), params["mlp"], **extra)
    adam = optax.adam(1e-2)
    want_scale, _ = adam.update(grads["scale"], adam.init(params["scale"]), params["scale"])
    chex.assert_trees_all_close(updates["mlp"], want_main, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(updates["scale"], want_scale, rtol=1e-5, atol=1e-7)
    for k in range(1, 6):
        new_params, state, loss, *_ = step(new_params, state, jax.random.key(k))
    assert float(loss) < float(loss0)


@pytest.mark.parametrize("case", BASIC)
def test_jitted_step_compiles_once(case):
    _, step = _train_step(case)
    _, _, losses = _train(case, STEPS)  # steps 0..3: refreshes and plain steps alike
    assert all(np.isfinite(losses))
    assert _TRACES[case] == 1
    assert step._cache_size() == 1


@pytest.mark.parametrize("case", ALL)
def test_converges_on_softmax_regression(case):
    _, _, losses = _train(case, 30)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("case", BASIC)
def test_state_round_trips(case):
    opt, _ = _train_step(case)
    params, state, _ = _train(case, 3)
    restored = tekfax.state_from_bytes(opt.init(params), tekfax.state_to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    chex.assert_trees_all_equal(restored, state)
    leaves, treedef = jax.tree.flatten(state)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert type(rebuilt) is type(state)
    chex.assert_trees_all_equal(rebuilt, state)
