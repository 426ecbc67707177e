"""tekfax.conditional: ``lax.cond`` and ``lax.while_loop`` when traced, Python when eager."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax
from tekfax import eigenbasis
from tekfax.conditional import cond, while_loop
from tests.conftest import INTERVALS
from tests.models import MLP, setup

STEPS = 4  # statistics on every step, refreshes on steps 0 and 2: steps 2-3 repeat 0-1
# float32, and the eager steps run op by op where the jitted ones are fused.
RTOL, ATOL = 1e-4, 1e-6


def _branches(calls: list) -> tuple:
    def true_fn():
        calls.append(True)
        return jnp.ones(2)

    def false_fn():
        calls.append(False)
        return jnp.zeros(2)

    return true_fn, false_fn


@pytest.mark.parametrize("pred", [True, False])
def test_eager_cond_calls_only_the_taken_branch(pred):
    calls = []
    out = cond(jnp.array(pred), *_branches(calls))
    assert calls == [pred]
    np.testing.assert_array_equal(out, np.full(2, float(pred)))


def test_traced_cond_is_lax_cond():
    """Under jit both branches are traced once into one ``cond`` and the flag picks at run
    time."""
    calls = []
    step = jax.jit(lambda p: cond(p, *_branches(calls)))
    for pred in (True, False):
        np.testing.assert_array_equal(step(jnp.array(pred)), np.full(2, float(pred)))
    assert sorted(calls) == [False, True]
    jaxpr = jax.make_jaxpr(lambda p: cond(p, *_branches([])))(jnp.array(True))
    assert any(eqn.primitive.name == "cond" for eqn in jaxpr.jaxpr.eqns)


def test_while_loop_eager_and_traced_count_alike():
    loop = functools.partial(while_loop, lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2.0))
    eager = loop((jnp.array(0), jnp.array(1.0)))
    traced = jax.jit(loop)((jnp.array(0), jnp.array(1.0)))
    assert (int(eager[0]), float(eager[1])) == (int(traced[0]), float(traced[1])) == (3, 8.0)
    jaxpr = jax.make_jaxpr(loop)((jnp.array(0), jnp.array(1.0)))
    assert any(eqn.primitive.name == "while" for eqn in jaxpr.jaxpr.eqns)


def test_eager_eigendecomposition_retries_like_the_jitted_one():
    """The retry loop called eagerly: a NaN factor gets (0, I), a finite one its eigenpairs,
    bit for bit as under jit."""
    root = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    factors = {"ok": jnp.asarray(root @ root.T), "bad": jnp.full((5, 5), jnp.nan)}
    eager = eigenbasis.eigh_psd_grouped(factors)
    jitted = jax.jit(eigenbasis.eigh_psd_grouped)(factors)
    for got, want in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(got, want)
    values, vectors = eager["bad"]
    np.testing.assert_array_equal(values, np.zeros(5))
    np.testing.assert_array_equal(vectors, np.eye(5))
    assert np.all(np.asarray(eager["ok"][0]) > 0)


def _step(opt, logits_fn, y):
    def step(params, opt_state, key):
        out = tekfax.loss_and_curvature(
            logits_fn, params, y, rng=key, compute_stats=tekfax.stats_needed(opt_state)
        )
        updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        return optax.apply_updates(params, updates), opt_state

    return step


@pytest.mark.parametrize("preset", ["kfac", "tekfac"])
def test_eager_steps_equal_jitted_and_compile_nothing_once_warm(preset, caplog):
    """Four training steps of the full optimizer called eagerly equal the same steps under
    ``jax.jit``; steps 2 and 3, whose stages steps 0 and 1 already ran, compile no program
    (``lax.cond`` called eagerly compiled its branches again on every call)."""
    logits_fn, params, _, y = setup(MLP(features=(5, 4)), (16, 7), 4)
    opt = getattr(tekfax, preset)(0.1, **INTERVALS)
    step = _step(opt, logits_fn, y)
    keys = [jax.random.key(i) for i in range(STEPS)]
    eager = (params, opt.init(params))
    for key in keys[:2]:
        eager = step(*eager, key)
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        for key in keys[2:]:
            eager = step(*eager, key)
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert not compiled, compiled
    jitted = (params, opt.init(params))
    jit_step = jax.jit(step)
    for key in keys:
        jitted = jit_step(*jitted, key)
    for got, want in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
