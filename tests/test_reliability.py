"""Reliability: low precision, state round-trips and input validation (the robustness panel:
tests/test_robustness.py)."""

from __future__ import annotations

import functools

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax
from tekfax.experiments import checkpoint
from tests.conftest import CASES, PRESETS, jit, make_optimizer
from tests.conftest import INTERVALS as SHARED_INTERVALS
from tests.models import MLP, ConvNet

N, CLASSES = 16, 4
# The shared cases with this file's explicit overrides for its ConvNet runs: a smaller step,
# nu = 1 for the nu variants, and a refresh every third step (so the round-trip test's
# continuation, steps 4 to 6, crosses the refresh on step 6).
LR, NU = 0.05, 1.0
INTERVALS = {**SHARED_INTERVALS, "eigen_every": 3}
OPTIMIZERS = {
    **{
        case: functools.partial(
            make_optimizer, case, LR, **INTERVALS, **({"nu": NU} if "nu" in hyper else {})
        )
        for case, (_, hyper) in CASES.items()
    },
    "guarded-kfac": lambda: tekfax.skip_non_finite(make_optimizer("kfac", LR, **INTERVALS)),
    "eadam": lambda: tekfax.eadam(1e-2),
}
KRONECKER = {"kfac", "ekfac", "tkfac", "tekfac", "tkfac-nu", "tekfac-nu", "guarded-kfac"}
CONV = ConvNet(kernel_size=(3, 3), channels=(3,), num_classes=CLASSES)
X_SHAPE = (N, 5, 5, 2)


@functools.cache  # each batch is drawn once per process, not once per test and step
def _batch(k: int, dtype=jnp.float32):
    kx, ky, kr = jax.random.split(jax.random.key(300 + k), 3)
    x = jax.random.normal(kx, X_SHAPE, dtype)
    # A learnable rule: the label is the quadrant of the mean of the first two channels.
    m = x.astype(jnp.float32).mean(axis=(1, 2))
    y = (m[:, 0] > 0).astype(jnp.int32) * 2 + (m[:, 1] > 0).astype(jnp.int32)
    return x, y, kr


@functools.cache
def _step(name: str):
    opt = OPTIMIZERS[name]()

    @jax.jit
    def step(params, state, x, y, rng):
        def logits_fn(p):
            return CONV.apply({"params": p}, x)

        if name in KRONECKER:
            out = tekfax.loss_and_curvature(logits_fn, params, y, rng=rng)
            loss, grads, extra = out.loss, out.grads, {"stats": out.stats}
        else:
            loss, grads = jax.value_and_grad(
                lambda p: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y).mean()
            )(params)
            extra = {}
        updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, loss, updates

    return opt, step


def _params(dtype=jnp.float32):
    params = CONV.init(jax.random.key(0), jnp.zeros((1, *X_SHAPE[1:])))["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def _train(name, params, state, steps, start=0, dtype=jnp.float32):
    _, step = _step(name)
    losses = []
    for k in range(start, start + steps):
        params, state, loss, updates = step(params, state, *_batch(k, dtype))
        losses.append(float(loss))
    return params, state, losses, updates


# --- low precision ---------------------------------------------------------------------


LOW_PRECISION = {
    name: functools.partial(getattr(tekfax, name), 0.02, damping=0.1, **INTERVALS)
    for name in PRESETS
}


@functools.cache
def _held_out():
    """512 held-out examples (x, y), drawn once."""
    x = jnp.concatenate([_batch(10_000 + k)[0] for k in range(32)])
    y = jnp.concatenate([_batch(10_000 + k)[1] for k in range(32)])
    return x, y


@jit  # one compiled program for every test, not the model's operations one by one
def _float32_loss(p32, x, y):
    logits = CONV.apply({"params": p32}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _eval_loss(params) -> float:
    """Loss of the float32 model with these parameters on 512 held-out examples."""
    p32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return float(_float32_loss(p32, *_held_out()))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(LOW_PRECISION))
def test_low_precision_params_train_with_float32_factors(name, dtype):
    OPTIMIZERS[f"low-{name}"] = LOW_PRECISION[name]
    KRONECKER.add(f"low-{name}")
    params = _params(dtype)
    opt, _ = _step(f"low-{name}")
    start = _eval_loss(params)
    params, state, losses, updates = _train(f"low-{name}", params, opt.init(params), 20, 0, dtype)
    assert all(np.isfinite(losses))
    assert _eval_loss(params) < 0.8 * start
    chex.assert_tree_all_finite(params)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
    chex.assert_trees_all_equal_dtypes(updates, params)
    kron = tekfax.kronecker.find_kronecker_state(state)
    assert kron.ema_weight.dtype == jnp.float32
    for layer_name, layer in kron.layers.items():
        for field, value in layer._asdict().items():
            if value is not None:
                assert value.dtype == jnp.float32, (layer_name, field)
                chex.assert_tree_all_finite(value)
    momentum = state.inner_state[1].trace["Conv_0"]["kernel"]  # the guarded chain
    assert momentum.dtype == jnp.dtype(dtype)  # momentum: param dtype


# --- state round-trips -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_round_trips_and_training_continues_identically(name):
    opt, _ = _step(name)
    params = _params()
    params, state, _, _ = _train(name, params, opt.init(params), 4)

    data = tekfax.state_to_bytes(state)
    restored = tekfax.state_from_bytes(opt.init(params), data)
    via_flax = flax.serialization.from_bytes(opt.init(params), flax.serialization.to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal(jax.tree.map(jnp.asarray, via_flax), state)

    want = _train(name, params, state, 3, start=4)
    got = _train(name, params, restored, 3, start=4)
    chex.assert_trees_all_equal(got[0], want[0])  # params, bit for bit
    chex.assert_trees_all_equal(got[1], want[1])  # state
    assert got[2] == want[2]  # losses


def test_restoring_into_an_optimizer_with_another_state_names_the_field():
    params = _params()
    kfac = tekfax.kfac(0.05, damping=1e-2, **INTERVALS)
    cases = [
        (tekfax.ekfac(0.05, damping=1e-2, **INTERVALS), kfac, params, r"Conv_0/rescale"),
        (tekfax.tkfac(0.05, damping=1e-2, **INTERVALS), kfac, params, r"Conv_0/delta"),
        (tekfax.skip_non_finite(kfac), kfac, params, r"inner_state"),
    ]
    wider = ConvNet(kernel_size=(3, 3), channels=(4,), num_classes=CLASSES)
    wide_params = wider.init(jax.random.key(0), jnp.zeros((1, *X_SHAPE[1:])))["params"]
    cases.append((kfac, kfac, wide_params, r"Conv_0/factor_out: .*shape \(4, 4\).*\(3, 3\)"))
    for saved_opt, target_opt, saved_params, match in cases:
        data = tekfax.state_to_bytes(saved_opt.init(saved_params))
        with pytest.raises(ValueError, match=match):
            tekfax.state_from_bytes(target_opt.init(params), data)
    with pytest.raises(TypeError, match="data"):
        tekfax.state_from_bytes(kfac.init(params), "not bytes")

    # The tool's checkpoints name the first differing leaf too.
    leaves = [np.asarray(x) for x in jax.tree.leaves(kfac.init(wide_params))]
    with pytest.raises(ValueError, match=r"layers.*Conv_0"):
        checkpoint.restore(
            {"params": {}, "batch_stats": {}, "opt_state": leaves, "jax_key": None},
            {},
            {},
            kfac.init(params),
        )


# --- input validation --------------------------------------------------------------------


def _capture_args():
    params = MLP(features=(CLASSES,)).init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    x = jnp.ones((N, 3))
    y = jnp.zeros((N,), jnp.int32)

    def logits_fn(p):
        return MLP(features=(CLASSES,)).apply({"params": p}, x)

    return logits_fn, params, y


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


HYPERPARAMETER_ERRORS = [
    ({"learning_rate": -0.1}, ValueError, "learning_rate"),
    ({"learning_rate": "0.1"}, TypeError, "learning_rate"),
    ({"damping": float("nan")}, ValueError, "damping"),
    ({"damping": 0.0}, ValueError, "damping"),
    ({"damping": "1e-3"}, TypeError, "damping"),
    ({"damping": jnp.ones(2)}, TypeError, "damping"),
    ({"nu": -1.0}, ValueError, "nu"),
    ({"momentum": 1.0}, ValueError, "momentum"),
    ({"momentum": None}, TypeError, "momentum"),
    ({"ema": 1.0}, ValueError, "ema"),
    ({"rescale_ema": -0.1}, ValueError, "rescale_ema"),
    ({"eigen_every": 2.5}, TypeError, "eigen_every"),
    ({"curvature_every": True}, TypeError, "curvature_every"),
    ({"rescale_every": 0}, ValueError, "rescale_every"),
    ({"conv_rescale": "per_pixel"}, ValueError, "conv_rescale"),
    ({"norm_constraint": 0.0}, ValueError, "norm_constraint"),
    ({"pi_adjusted": "yes"}, TypeError, "pi_adjusted"),
]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"), HYPERPARAMETER_ERRORS, ids=[e[2] for e in HYPERPARAMETER_ERRORS]
)
def test_hyperparameters_are_validated_by_name(preset, kwargs, exc, match):
    full = {"learning_rate": 0.1, "damping": 1e-3, **INTERVALS, **kwargs}
    _raises(exc, match, getattr(tekfax, preset), **full)
    if "learning_rate" not in kwargs and "momentum" not in kwargs:
        full.pop("learning_rate")
        _raises(exc, match, getattr(tekfax, f"scale_by_{preset}"), **full)


def test_other_public_functions_validate_their_inputs():
    _raises(ValueError, "estimator", tekfax.scale_by_kronecker, estimator="foo", damping=1e-3)
    _raises(TypeError, "eigen_corrected", tekfax.scale_by_kronecker, eigen_corrected=1, damping=1)
    _raises(ValueError, "b1", tekfax.scale_by_eadam, b1=1.0)
    _raises(ValueError, "b2", tekfax.scale_by_eadam, b2=-0.5)
    _raises(ValueError, "eps", tekfax.scale_by_eadam, eps=float("nan"))
    _raises(ValueError, "learning_rate", tekfax.eadam, 0.0)
    _raises(TypeError, "probes", lambda: tekfax.tag_layers(probes=5).__enter__())
    _raises(TypeError, "inner", tekfax.skip_non_finite, "adam")
    _raises(ValueError, "skip_non_finite", tekfax.skipped_steps, ())
    _raises(ValueError, "opt_state", tekfax.stats_needed, optax.adam(1e-3).init({}))
    _raises(ValueError, "opt_state", tekfax.diagnostics.approx_fisher_blocks, None)
    _raises(ValueError, "opt_state", tekfax.diagnostics.damped_fisher_blocks, (1, 2))


def test_capture_validates_its_inputs():
    logits_fn, params, y = _capture_args()
    rng = jax.random.key(0)
    lac = tekfax.loss_and_curvature
    _raises(TypeError, "logits_fn", lac, 123, params, y, rng=rng)
    _raises(ValueError, "loss", lac, logits_fn, params, y, loss="mse", rng=rng)
    _raises(ValueError, "fisher", lac, logits_fn, params, y, fisher="true", rng=rng)
    _raises(ValueError, "rng", lac, logits_fn, params, y)
    _raises(TypeError, "rng", lac, logits_fn, params, y, rng=0)
    _raises(ValueError, "num_samples", lac, logits_fn, params, y, rng=rng, num_samples=0)
    _raises(TypeError, "has_aux", lac, logits_fn, params, y, rng=rng, has_aux="yes")
    _raises(ValueError, "has_aux", lac, logits_fn, params, y, rng=rng, has_aux=True)
    _raises(TypeError, "compute_stats", lac, logits_fn, params, y, rng=rng, compute_stats="x")
    _raises(ValueError, r"targets has shape \(3,\)", lac, logits_fn, params, y[:3], rng=rng)
    _raises(TypeError, "integer labels", lac, logits_fn, params, y.astype(float), rng=rng)
    _raises(ValueError, "targets", lac, logits_fn, params, y, loss="squared_error", rng=rng)

    exact = tekfax.diagnostics.exact_fisher_blocks
    _raises(ValueError, "fisher", exact, logits_fn, params, y, fisher="foo")
    _raises(ValueError, "targets", exact, logits_fn, params, y[:2], fisher="empirical")
    blocks = exact(logits_fn, params, y, fisher="empirical")
    errors = tekfax.diagnostics.approximation_errors
    _raises(TypeError, "exact_blocks", errors, blocks, 5)
    _raises(ValueError, "Dense_0", errors, {"Dense_0": jnp.ones((2, 2))}, blocks)


def test_update_validates_state_stats_and_gradients():
    logits_fn, params, y = _capture_args()
    out = tekfax.loss_and_curvature(logits_fn, params, y, fisher="empirical")
    opt = tekfax.scale_by_kfac(damping=1e-3, **INTERVALS)
    state = opt.init(params)
    _raises(ValueError, "stats=", opt.update, out.grads, state, params)
    _raises(ValueError, "stats", opt.update, out.grads, state, params, stats={})
    _raises(TypeError, "stats", opt.update, out.grads, state, params, stats={"Dense_0": 1})
    _raises(TypeError, "state", opt.update, out.grads, (state,), params, stats=out.stats)
    wider = MLP(features=(CLASSES + 1,)).init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    _raises(ValueError, "Dense_0.*gradient", opt.update, wider, state, params, stats=out.stats)
    _raises(ValueError, "params", opt.init, {"scale": jnp.ones(3)})
