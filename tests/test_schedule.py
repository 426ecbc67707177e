"""Statistics only when consumed (stats_needed / compute_stats) and the eigh fallbacks."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax
from tekfax import eigenbasis
from tests.conftest import PRESETS, jit
from tests.models import MLP, setup

SCHEDULE = dict(curvature_every=3, eigen_every=4, rescale_every=2)
# The suite compiles at XLA optimisation level 0 (tests/conftest.py); bit-identity of the
# programs with and without statistics skipping is a property of the levels users run: XLA's
# default, 3, for every preset, and tekfax-compare's on CPU, 1
# (tekfax.experiments.train.step_compiler_options), for the preset with every stage.
# level -> the presets compiled at it; a level's presets share one program per variant
# (compiling at level 3 costs several seconds a program; they share no state or arithmetic).
USER_LEVELS = {3: PRESETS, 1: ("tekfac",)}


def _expected_needs(step: int, eigen_corrected: bool) -> bool:
    refresh = step % SCHEDULE["eigen_every"] == 0
    rescale = refresh or step % SCHEDULE["rescale_every"] == 0
    return step % SCHEDULE["curvature_every"] == 0 or (eigen_corrected and rescale)


@pytest.mark.parametrize("level", list(USER_LEVELS))
def test_skipping_unused_statistics_changes_nothing(level):
    """Nine steps of each preset with the statistics computed on every step, and with
    ``compute_stats=stats_needed(opt_state)``: the params end bit for bit equal.

    The presets compiled at one level run side by side in one jitted step (each on its own
    params and state), one program with skipping and one without. One hidden layer is
    enough: its output gradients are the backpropagated ones that skipping leaves out.
    """
    names = USER_LEVELS[level]
    model = MLP(features=(5, 4))
    logits_fn, params, x, y = setup(model, (16, 7), 4)
    opts = {name: getattr(tekfax, name)(0.05, damping=0.1, **SCHEDULE) for name in names}
    traces = []

    def make_step(skip):
        @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": level})
        def step(params, opt_states, key):
            traces.append(skip)
            new = {}
            for name, opt in opts.items():
                needed = tekfax.stats_needed(opt_states[name])
                out = tekfax.loss_and_curvature(
                    lambda p: model.apply({"params": p}, x),
                    params[name],
                    y,
                    rng=key,
                    compute_stats=needed if skip else True,
                )
                updates, state = opt.update(
                    out.grads, opt_states[name], params[name], stats=out.stats
                )
                new[name] = (optax.apply_updates(params[name], updates), state, needed)
            return new

        return step

    results = {}
    for skip in (False, True):
        step = make_step(skip)
        p = {name: params for name in names}
        state = {name: opt.init(params) for name, opt in opts.items()}
        needs = {name: [] for name in names}
        for i in range(9):
            new = step(p, state, jax.random.key(i))
            for name, (p[name], state[name], needed) in new.items():
                needs[name].append(bool(needed))
        results[skip] = p
        for name in names:
            want = [_expected_needs(i, name in ("ekfac", "tekfac")) for i in range(9)]
            assert needs[name] == want, name
    assert traces == [False, True]  # one compilation each, whatever the schedule
    chex.assert_trees_all_equal(results[False], results[True])
    del logits_fn


def test_compute_stats_false_zeroes_sampled_out_grads():
    """Both captures run in one jitted program (run op by op, they compile dozens)."""
    logits_fn, params, _, y = setup(MLP(), (8, 5), 4)

    @jit
    def run(params, key):
        out = tekfax.loss_and_curvature(logits_fn, params, y, rng=key, compute_stats=False)
        return out, tekfax.loss_and_curvature(logits_fn, params, y, rng=key)

    out, full = run(params, jax.random.key(0))
    chex.assert_trees_all_equal(out.grads, full.grads)
    for layer in out.stats.values():
        assert not np.any(np.asarray(layer.out_grads))
    assert any(np.any(np.asarray(layer.out_grads)) for layer in full.stats.values())


def test_stats_needed_rejects_other_optimizers():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="no tekfax Kronecker state"):
        tekfax.stats_needed(optax.adam(1e-3).init(params))


def test_grouped_eigh_equals_per_matrix_eigh():
    rng = np.random.default_rng(0)
    mats = {}
    for i, d in enumerate([3, 5, 3, 4, 5, 3]):
        b = rng.standard_normal((d, d + 2)).astype(np.float32)
        mats[i] = jnp.asarray(b @ b.T)
    grouped = eigenbasis.eigh_psd_grouped(mats)
    for key, m in mats.items():
        values, vectors = grouped[key]
        ref_values, _ = np.linalg.eigh(np.asarray(m, np.float64))
        np.testing.assert_allclose(values, ref_values, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose((vectors * values) @ vectors.T, m, rtol=1e-4, atol=1e-4)


def _syevd_operands(d: int, platform: str) -> list[str]:
    """Operand types of the eigh custom calls in the program lowered for ``platform``."""
    stack = jax.ShapeDtypeStruct((3, d, d), jnp.float32)
    text = jax.export.export(jax.jit(eigenbasis._eigh), platforms=[platform])(stack)
    return re.findall(
        r"custom_call @\w*syevd\w*\(%[^)]*\)[^\n]*?: \((tensor<[0-9x]*f32>)", text.mlir_module()
    )


@pytest.mark.parametrize("platform", ["cuda", "cpu"])
def test_eigh_batches_only_small_factors_on_gpu(platform):
    """Lowered (not run) for a GPU: one batched call for d <= BATCHED_EIGH_MAX, one call
    per matrix above it; the CPU program decomposes matrix by matrix at every size."""
    small, large = eigenbasis.BATCHED_EIGH_MAX, eigenbasis.BATCHED_EIGH_MAX + 1
    batched_small = [f"tensor<3x{small}x{small}xf32>"]
    single = [f"tensor<{small}x{small}xf32>"]
    assert _syevd_operands(small, platform) == (batched_small if platform == "cuda" else single)
    assert _syevd_operands(large, platform) == [f"tensor<{large}x{large}xf32>"]


def test_eigh_falls_back_instead_of_returning_nan():
    good = jnp.diag(jnp.arange(1.0, 4.0))
    bad = jnp.full((3, 3), jnp.nan)
    values, vectors = jax.jit(eigenbasis.eigh_psd)(jnp.stack([good, bad]))
    np.testing.assert_allclose(values[0], [1.0, 2.0, 3.0], rtol=1e-5)
    np.testing.assert_array_equal(values[1], np.zeros(3))
    np.testing.assert_array_equal(vectors[1], np.eye(3))
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(vectors))
