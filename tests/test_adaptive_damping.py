"""Levenberg-Marquardt adaptive damping (tekfax.adaptive_damping; algorithms, section 9).

References: the quadratic model against dense float64 matrices built from
:func:`tekfax.diagnostics.damped_fisher_blocks` (and the identity for untagged parameters);
the damping rule against objectives whose reduction ratio is set by construction; the damped
eigenvalues D in the state against KFAC's factored damping in closed form; a short training
run on scikit-learn's digits.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits

import tekfax
from tekfax.adaptive_damping import (
    NEUTRAL_RATIO,
    AdaptiveDampingState,
    adaptive_damping,
    current_damping,
    quadratic_model,
)
from tekfax.kronecker import find_kronecker_state
from tests.conftest import jit, make_scale_by
from tests.models import MLP, setup


class NormedMLP(nn.Module):
    """Dense -> LayerNorm -> tanh -> Dense: the LayerNorm's parameters are not tagged."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.LayerNorm()(nn.Dense(5)(x)))
        return nn.Dense(3)(x)


def _inner(case: str = "kfac", learning_rate: float = 0.1, momentum: float = 0.0, **overrides):
    """scale_by_<case>, momentum, learning rate (alpha also given to the KL clip, if on)."""
    if overrides.get("norm_constraint") is not None:
        overrides["learning_rate"] = learning_rate
    return optax.chain(
        make_scale_by(case, **overrides),
        optax.trace(momentum),
        optax.scale_by_learning_rate(learning_rate),
    )


def _loss_fn(logits_fn, y):
    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y).mean()

    return loss


# --- 1. The quadratic model ----------------------------------------------------------------


def _dense_model(grads, delta, opt_state) -> float:
    """g^T d + 1/2 d^T C d in float64 NumPy: C from damped_fisher_blocks, identity elsewhere."""
    blocks = tekfax.diagnostics.damped_fisher_blocks(opt_state)
    total = 0.0
    for name in grads:
        g = np.asarray(ravel_pytree(grads[name])[0], np.float64)
        d = np.asarray(ravel_pytree(delta[name])[0], np.float64)
        block = np.asarray(blocks[name], np.float64) if name in blocks else np.eye(d.size)
        total += g @ d + 0.5 * d @ block @ d
    return total


def test_quadratic_model_matches_dense_float64(x64):
    logits_fn, params, _, y = setup(NormedMLP(), (8, 4), 3, jnp.float64)
    assert "LayerNorm_0" in params  # an untagged parameter group, curvature = identity
    inner = _inner("ekfac", momentum=0.9)  # D = S + lambda: not a Kronecker product

    @jit
    def two_steps(params):
        state = inner.init(params)
        for k in range(2):  # the second step's delta includes momentum
            out = tekfax.loss_and_curvature(logits_fn, params, y, rng=jax.random.key(k))
            delta, state = inner.update(out.grads, state, params, stats=out.stats)
            params = optax.apply_updates(params, delta)
        flat, unravel = ravel_pytree(delta)
        other = unravel(jax.random.normal(jax.random.key(7), flat.shape, flat.dtype))
        models = [quadratic_model(out.grads, d, state) for d in (delta, other)]
        return out.grads, (delta, other), state, models

    grads, directions, state, models = two_steps(params)
    # The optimizer's step, and any other direction: the model is the quadratic form itself.
    for direction, got in zip(directions, models, strict=True):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), _dense_model(grads, direction, state), rtol=1e-10)


# --- 2. The damping rule -------------------------------------------------------------------

OMEGA = 0.5  # decay = 0.5 with interval = 1, so each adjustment halves or doubles lambda
LAMBDA0 = 0.1


@functools.cache
def _adjuster(min_damping: float = 1e-8, max_damping: float = 1e2):
    """A jitted first update whose obj_fn makes the reduction ratio ``rho`` by construction.

    obj_fn(params) = 0 and obj_fn(anything else) = rho * M(Delta), so rho is the ratio; with
    ``constant`` obj_fn is 1 everywhere (no measurable change). The step is
    ``learning_rate`` times P(g) (an argument, so one compilation serves every case).
    Returns (lambda, recorded rho, M(Delta)) after the update.
    """
    logits_fn, params, _, y = setup(MLP(), (8, 3), 4)
    inner = optax.chain(make_scale_by("kfac"), optax.inject_hyperparams(optax.scale)(-1.0))
    bounds = {"min_damping": min_damping, "max_damping": max_damping}
    opt = adaptive_damping(inner, initial_damping=LAMBDA0, interval=1, decay=OMEGA, **bounds)

    @jit
    def adjust(rho, constant, learning_rate):
        out = tekfax.loss_and_curvature(logits_fn, params, y, rng=jax.random.key(1))
        state = opt.init(params)
        state.inner_state[1].hyperparams["step_size"] = -jnp.asarray(learning_rate)
        # The update the wrapper makes, so the predicted change M(Delta) is known here.
        delta, new_inner = inner.update(
            out.grads, state.inner_state, params, stats=out.stats, damping=state.damping
        )
        predicted = quadratic_model(out.grads, delta, new_inner)

        def obj_fn(p):
            leaves = zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True)
            moved = jnp.any(jnp.stack([jnp.any(a != b) for a, b in leaves]))
            return jnp.where(constant, 1.0, jnp.where(moved, rho * predicted, 0.0))

        _, state = opt.update(out.grads, state, params, stats=out.stats, obj_fn=obj_fn)
        return state.damping, state.rho, predicted

    return adjust


@pytest.mark.parametrize(
    ("rho", "factor", "recorded"),
    [
        (1.0, OMEGA, 1.0),  # better than predicted: decrease
        (0.8, OMEGA, 0.8),
        (0.5, 1.0, 0.5),  # in [1/4, 3/4]: keep
        (0.1, 1 / OMEGA, 0.1),  # worse: increase
        (-1.0, 1 / OMEGA, -1.0),  # the loss went up
        (np.nan, 1 / OMEGA, 0.0),  # not finite: increase, recorded as 0
        (np.inf, 1 / OMEGA, 0.0),
    ],
)
def test_damping_rule(rho, factor, recorded):
    damping, got_rho, predicted = _adjuster()(rho, False, 0.1)
    assert float(predicted) < 0
    np.testing.assert_allclose(float(damping), LAMBDA0 * factor, rtol=1e-6)
    np.testing.assert_allclose(float(got_rho), recorded, rtol=1e-5)


def test_unmeasurable_step_keeps_damping():
    """A loss that does not change at all says nothing about the model: lambda stays."""
    damping, rho, _ = _adjuster()(1.0, True, 0.1)
    assert float(damping) == np.float32(LAMBDA0)
    assert float(rho) == NEUTRAL_RATIO


@pytest.mark.parametrize("learning_rate", [0.0, -0.1])
def test_non_negative_predicted_change_raises_damping(learning_rate):
    """A zero step (M = 0) or an ascent step (M > 0) counts as rho < 1/4, whatever h does."""
    damping, rho, predicted = _adjuster()(1.0, False, learning_rate)
    assert float(predicted) >= 0
    np.testing.assert_allclose(float(damping), LAMBDA0 / OMEGA, rtol=1e-6)
    assert float(rho) == 0.0


@pytest.mark.parametrize(("rho", "bound"), [(1.0, "min"), (0.1, "max")])
def test_damping_is_clamped(rho, bound):
    bounds = {"min_damping": 0.08, "max_damping": 0.15}
    damping, _, _ = _adjuster(**bounds)(rho, False, 0.1)
    np.testing.assert_allclose(float(damping), bounds[f"{bound}_damping"], rtol=1e-6)


def test_adjusts_only_on_due_steps():
    """interval = 3: steps 2 and 5 evaluate obj_fn (twice each), the others never call it."""
    logits_fn, params, x, y = setup(MLP(), (8, 3), 4)
    calls = []

    def obj_fn(p):
        loss = _loss_fn(lambda q: MLP().apply({"params": q}, x), y)(p)
        jax.debug.callback(lambda: calls.append(1))
        return loss

    opt = adaptive_damping(_inner(), initial_damping=LAMBDA0, interval=3)

    @jit
    def step(params, state, k):
        out = tekfax.loss_and_curvature(logits_fn, params, y, rng=jax.random.key(k))
        updates, state = opt.update(out.grads, state, params, stats=out.stats, obj_fn=obj_fn)
        return optax.apply_updates(params, updates), state

    state, dampings, counts = opt.init(params), [], []
    for k in range(7):
        params, state = step(params, state, k)
        jax.effects_barrier()
        dampings.append(float(state.damping))
        counts.append(len(calls))
    assert counts == [0, 0, 2, 2, 2, 4, 4]
    assert dampings[0] == dampings[1] == np.float32(LAMBDA0)
    assert dampings[2] != dampings[1]  # a real step on this problem is not neutral
    assert dampings[3] == dampings[4] == dampings[2] and dampings[6] == dampings[5]


# --- 3. Training --------------------------------------------------------------------------

NUM_TRAIN, BATCH, STEPS = 1280, 128, 150
START = 1e-8


class DigitsMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(jnp.tanh(nn.Dense(32)(x)))


def _train():
    """KFAC on digits, lr 0.1, no momentum, KL clip 1e-2, lambda from 1e-8; the full-set
    loss before and after, and lambda after every step."""
    digits = load_digits()
    perm = np.random.default_rng(0).permutation(len(digits.data))[:NUM_TRAIN]
    xs = jnp.asarray((digits.data[perm] / 16.0).astype(np.float32))
    ys = jnp.asarray(digits.target[perm].astype(np.int32))
    model = DigitsMLP()
    # The library's default schedule (the shared test INTERVALS are for exactness tests).
    schedule = {"curvature_every": 10, "eigen_every": 100, "rescale_every": 10}
    inner = _inner(damping=1.0, norm_constraint=1e-2, learning_rate=0.1, **schedule)
    opt = adaptive_damping(inner, initial_damping=START)

    def step(carry, k):
        params, state = carry
        start = (k % (NUM_TRAIN // BATCH)) * BATCH
        xb = jax.lax.dynamic_slice_in_dim(xs, start, BATCH)
        yb = jax.lax.dynamic_slice_in_dim(ys, start, BATCH)

        def logits_fn(p):
            return model.apply({"params": p}, xb)

        rng = jax.random.fold_in(jax.random.key(1), k)
        out = tekfax.loss_and_curvature(logits_fn, params, yb, rng=rng)
        obj_fn = _loss_fn(logits_fn, yb)
        updates, state = opt.update(out.grads, state, params, stats=out.stats, obj_fn=obj_fn)
        return (optax.apply_updates(params, updates), state), current_damping(state)

    def full_loss(params):
        return _loss_fn(lambda p: model.apply({"params": p}, xs), ys)(params)

    @jit
    def run(params):
        (params, _), dampings = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(STEPS))
        return full_loss(params), dampings

    initial = model.init(jax.random.key(0), xs[:1])["params"]
    loss, dampings = run(initial)
    return float(full_loss(initial)), float(loss), np.asarray(dampings)


def test_training_from_tiny_damping():
    """From lambda = 1e-8 training stays finite and converges, and the rule raises lambda:
    with lambda that small the clipped KFAC steps often do worse than the model predicts."""
    before, loss, dampings = _train()
    assert np.isfinite(loss) and np.all(np.isfinite(dampings))
    assert loss < 0.05 * before  # from about ln 10 (uniform predictions) to below 0.12
    assert dampings.max() > 10 * START  # a tenfold rise: at least nine net increases


# --- 4. Wiring ------------------------------------------------------------------------------


def test_inner_preconditioner_uses_the_adaptive_damping():
    """D in the state is KFAC's factored damping at lambda, not the inner hyperparameter."""
    logits_fn, params, _, y = setup(MLP(), (8, 3), 4)
    opt = adaptive_damping(_inner(damping=1.0), initial_damping=LAMBDA0, interval=1)
    obj_fn = _loss_fn(logits_fn, y)

    @jit
    def step(params, state, k):
        out = tekfax.loss_and_curvature(logits_fn, params, y, rng=jax.random.key(k))
        updates, state = opt.update(out.grads, state, params, stats=out.stats, obj_fn=obj_fn)
        return optax.apply_updates(params, updates), state

    state, used = opt.init(params), []
    for k in range(2):
        used.append(float(state.damping))
        params, state = step(params, state, k)
        root = np.sqrt(used[-1])
        for layer in find_kronecker_state(state).layers.values():
            expected = np.outer(np.asarray(layer.eig_in) + root, np.asarray(layer.eig_out) + root)
            np.testing.assert_allclose(np.asarray(layer.damped), expected, rtol=1e-5)
    assert used[0] == np.float32(LAMBDA0) and used[1] != used[0]  # step 2 used an adjusted one


def test_composes_in_chain_guard_and_jit():
    logits_fn, params, _, y = setup(MLP(), (8, 3), 4)
    opt = tekfax.skip_non_finite(
        optax.chain(adaptive_damping(tekfax.kfac(0.1), initial_damping=LAMBDA0, interval=1))
    )
    obj_fn = _loss_fn(logits_fn, y)

    @jit
    def step(params, state, k):
        out = tekfax.loss_and_curvature(logits_fn, params, y, rng=jax.random.key(k))
        updates, state = opt.update(
            out.grads, state, params, stats=out.stats, obj_fn=obj_fn, value=out.loss
        )
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for k in range(3):
        params, state = step(params, state, k)
    assert int(tekfax.skipped_steps(state)) == 0  # rho is finite, so the guard passes
    assert float(current_damping(state)) != np.float32(LAMBDA0)
    found = optax.tree_utils.tree_get_all_with_path(state, "AdaptiveDampingState")
    assert int(found[0][1].count) == 3 and isinstance(found[0][1], AdaptiveDampingState)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_damping": 0.0}, "initial_damping"),
        ({"initial_damping": -1.0}, "initial_damping"),
        ({"initial_damping": 1e-3, "interval": 0}, "interval"),
        ({"initial_damping": 1e-3, "decay": 1.0}, "decay"),
        ({"initial_damping": 1e-3, "decay": 0.0}, "decay"),
        ({"initial_damping": 1e-3, "min_damping": 1.0, "max_damping": 0.1}, "min_damping"),
        ({"initial_damping": 1e3}, r"initial_damping .* must lie in"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adaptive_damping(_inner(), **kwargs)


def test_clear_errors():
    _, params, _, _ = setup(MLP(), (8, 3), 4)
    with pytest.raises(ValueError, match="Kronecker preconditioner"):
        adaptive_damping(optax.sgd(0.1), initial_damping=1e-3).init(params)
    opt = adaptive_damping(_inner(), initial_damping=1e-3)
    state = opt.init(params)
    with pytest.raises(ValueError, match="obj_fn"):  # checked first, before any work
        opt.update(params, state, params, stats=None)
    with pytest.raises(ValueError, match="adaptive_damping state"):
        current_damping(state.inner_state)
