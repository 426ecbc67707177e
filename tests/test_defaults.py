"""The full optimizers as they come: robust defaults, guarded steps, an opt-out.

``tekfax.<preset>(learning_rate)`` turns on the trust region (``norm_constraint``), the
relative damping floor and the non-finite guard. These tests train real models on
scikit-learn's digits with those defaults and check what a user relies on: memorising a batch
to zero loss stays there (the late-phase collapse of the eigenvalue-corrected methods, which
the unprotected configuration shows), a large learning rate on a ReLU MLP trains, and the
opt-out gives the bare chain.
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
from sklearn.datasets import load_digits

import tekfax
from tekfax.alias import FULL_DEFAULTS
from tekfax.guard import SkipNonFiniteState
from tests.conftest import PRESETS, jit

UNPROTECTED = {"norm_constraint": None, "damping_floor": 0.0, "skip_non_finite": False}


class _MLP(nn.Module):
    features: tuple[int, ...]
    activation: str

    @nn.compact
    def __call__(self, x):
        for width in self.features[:-1]:
            x = getattr(nn, self.activation)(nn.Dense(width)(x))
        return nn.Dense(self.features[-1])(x)


@functools.cache
def _digits():
    x, y = load_digits(return_X_y=True)
    return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y, jnp.int32)


def _train(model, opt, x, y, batches, seed=0):
    """Runs ``opt`` over ``batches`` (a (steps, batch) index array) in one jitted scan.

    Returns the final params, the optimizer state and the loss of every step.
    """
    params = model.init(jax.random.key(seed), x[:1])["params"]
    batches = jnp.asarray(batches)

    def step(carry, k):
        p, s = carry
        idx = batches[k]
        out = tekfax.loss_and_curvature(
            lambda q: model.apply({"params": q}, x[idx]),
            p,
            y[idx],
            rng=jax.random.fold_in(jax.random.key(seed + 1), k),
            compute_stats=tekfax.stats_needed(s),
        )
        updates, s = opt.update(out.grads, s, p, stats=out.stats)
        return (optax.apply_updates(p, updates), s), out.loss

    run = jit(lambda c: jax.lax.scan(step, c, jnp.arange(len(batches))))
    (params, state), losses = run((params, opt.init(params)))
    return params, state, np.asarray(losses)


def _memorise(preset: str, **overrides):
    """1,000 steps on one batch of 64 digits, damping 1e-4, lr 0.1."""
    x, y = _digits()
    opt = getattr(tekfax, preset)(0.1, damping=1e-4, **overrides)
    batches = np.tile(np.arange(64), (1000, 1))
    return _train(_MLP((32, 10), "tanh"), opt, x, y, batches)


@pytest.mark.parametrize("preset", ["ekfac", "tekfac"])
def test_memorising_a_batch_reaches_zero_loss_and_stays_there(preset):
    _, state, losses = _memorise(preset)
    assert np.all(np.isfinite(losses))
    assert losses[0] > 1.0  # it starts at chance
    assert losses[500:].max() < 1e-4  # and the second half stays near zero
    assert int(tekfax.skipped_steps(state)) == 0


def test_without_the_protections_memorising_collapses():
    """The failure the defaults prevent: S shrinks with the loss, the step tends to g / lambda."""
    _, _, losses = _memorise("ekfac", **UNPROTECTED)
    assert losses[500:].max() > losses[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_relu_mlp_trains_at_a_large_learning_rate_with_the_defaults(preset):
    """lr 0.1, 64-64-32-10 ReLU, 3 epochs of digits (batch 128): the call a new user writes."""
    x, y = _digits()
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1437], order[1437:]
    batches = np.concatenate(
        [np.random.default_rng(e).permutation(train)[: 11 * 128] for e in range(3)]
    ).reshape(-1, 128)
    model = _MLP((64, 32, 10), "relu")
    params, state, losses = _train(model, getattr(tekfax, preset)(0.1), x, y, batches)
    accuracy = np.mean(np.argmax(model.apply({"params": params}, x[test]), -1) == y[test])
    assert np.all(np.isfinite(losses)) and int(tekfax.skipped_steps(state)) == 0
    assert accuracy > 0.9, accuracy


@pytest.mark.parametrize("preset", PRESETS)
def test_the_defaults_are_the_documented_ones_and_the_opt_out_is_bare(preset):
    factory = getattr(tekfax, preset)
    params = _MLP((3,), "relu").init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
    guarded, bare = factory(1e-2).init(params), factory(1e-2, skip_non_finite=False).init(params)
    assert isinstance(guarded, SkipNonFiniteState) and int(guarded.skipped) == 0
    assert isinstance(bare, tuple) and not isinstance(bare, SkipNonFiniteState)
    kron = tekfax.kronecker.find_kronecker_state(guarded)
    assert kron is not None
    defaults = {k: factory.__signature__.parameters[k].default for k in FULL_DEFAULTS}
    assert defaults == FULL_DEFAULTS


def test_adaptive_damping_is_opt_in_and_obj_fn_is_ignored_when_off():
    """The capture and the two updates with adaptive damping off are jitted (run op by op,
    they compile dozens of small programs); each update is its own program."""
    x, y = _digits()
    x, y = x[:32], y[:32]
    model = _MLP((8, 10), "tanh")
    params = model.init(jax.random.key(0), x)["params"]
    out = jit(
        lambda p: tekfax.loss_and_curvature(
            lambda q: model.apply({"params": q}, x), p, y, rng=jax.random.key(1)
        )
    )(params)

    def obj_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    off = tekfax.kfac(0.1)
    plain = jit(lambda o, p: off.update(o.grads, off.init(p), p, stats=o.stats)[0])(out, params)
    ignored = jit(
        lambda o, p: off.update(o.grads, off.init(p), p, stats=o.stats, obj_fn=obj_fn)[0]
    )(out, params)
    chex.assert_trees_all_equal(plain, ignored)

    on = tekfax.kfac(0.1, damping=1e-2, adaptive_damping=True)
    state = on.init(params)
    assert float(tekfax.current_damping(state)) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="obj_fn"):
        on.update(out.grads, state, params, stats=out.stats)
    update = jit(lambda s: on.update(out.grads, s, params, stats=out.stats, obj_fn=obj_fn)[1])
    for _ in range(5):  # the first adjustment is on the fifth step
        state = update(state)
    assert float(tekfax.current_damping(state)) != pytest.approx(1e-2)
    with pytest.raises(ValueError, match="nu"):
        tekfax.tkfac(0.1, nu=1.0, adaptive_damping=True)
