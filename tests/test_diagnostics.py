"""Tests for tekfax.diagnostics: exact and approximate Fisher blocks and their errors.

References are independent of tekfax: per-example gradients from tests/reference.py
(``jax.vmap(jax.grad)`` of one example's loss), and per-example Jacobians with the output
distributions' Fisher matrices written out here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import tekfax
from tekfax.diagnostics import (
    approx_fisher_blocks,
    approximation_errors,
    exact_fisher_blocks,
)
from tekfax.losses import sample_targets
from tests import _formulas as fm
from tests import reference

f64 = pytest.mark.usefixtures("x64")
RTOL = 1e-10
LOSSES = ["softmax_cross_entropy", "sigmoid_binary_cross_entropy", "squared_error"]


def _targets(loss: str, y: jax.Array, num_classes: int) -> jax.Array:
    """Data targets of the right kind for ``loss`` (integer labels for softmax)."""
    if loss == "softmax_cross_entropy":
        return y
    onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float64)
    return onehot if loss == "sigmoid_binary_cross_entropy" else 2.0 * onehot - 0.5


@functools.cache
def _exact_fn(model_key, loss, fisher, num_samples):
    _, logits_fn, _, _, _ = fm.problem(model_key)

    def blocks(p, t, key):
        return exact_fisher_blocks(
            logits_fn, p, t, loss=loss, fisher=fisher, rng=key, num_samples=num_samples
        )

    return fm.jit(blocks)


def _exact_blocks(
    model_key, targets, loss="softmax_cross_entropy", fisher="empirical", rng=None, num_samples=1
):
    """exact_fisher_blocks on the model's batch (jitted once per configuration), flat."""
    params = fm.problem(model_key)[2]
    return fm.flat(_exact_fn(model_key, loss, fisher, num_samples)(params, targets, rng))


@functools.cache
def _reference_fn(model_key, loss):
    model, _, _, x, _ = fm.problem(model_key)
    return fm.jit(lambda p, t: reference.per_example_grads(model, p, x, t, loss))


def _reference_blocks(model_key, targets, loss="softmax_cross_entropy"):
    grads = _reference_fn(model_key, loss)(fm.problem(model_key)[2], targets)
    return {name: reference.fisher_block(g) for name, g in grads.items()}


def _per_example_jacobians(model_key) -> dict[str, np.ndarray]:
    """J_n = d f(x_n) / d theta_layer, (N, C, P), per layer of a flat model (an MLP)."""
    model, _, params, x, _ = fm.problem(model_key)

    def one(p, xi):
        return model.apply({"params": p}, xi[None])[0]

    jac = fm.jit(jax.vmap(jax.jacrev(one), in_axes=(None, 0)))(params, x)
    # Leaves are (N, C, *shape); ravel each (example, output) slice like ravel_pytree.
    ravel = jax.vmap(jax.vmap(lambda layer: ravel_pytree(layer)[0]))
    return {name: np.asarray(ravel(layer), np.float64) for name, layer in jac.items()}


@f64
@pytest.mark.parametrize(
    "model_key, loss",
    [
        ("zoo", "softmax_cross_entropy"),
        ("mlp_no_bias", "softmax_cross_entropy"),
        ("mlp", "sigmoid_binary_cross_entropy"),
        ("mlp", "squared_error"),
    ],
)
def test_exact_empirical_blocks_match_per_example_reference(model_key, loss):
    """fisher="empirical": the blocks are E_n[g_n g_n^T] of tests/reference.py, same order."""
    targets = _targets(loss, fm.problem(model_key)[4], 3)
    got = _exact_blocks(model_key, targets, loss=loss)
    want = _reference_blocks(model_key, targets, loss)
    assert set(got) == set(want)
    for name in want:
        fm.assert_close(got[name], want[name], RTOL, err_msg=name)


@f64
def test_exact_sampled_blocks_use_the_capture_labels():
    """fisher="sampled" with rng: the same labels as loss_and_curvature, so the same F.

    Checked twice: against the reference with labels drawn as documented
    (tekfax.losses.sample_targets with the keys jax.random.split(rng, num_samples)), and
    against the brute
    force F = E_n[g_n g_n^T], g_n = sum_t a_t (x) u_t, from the captured statistics.
    """
    model_key, num_samples = "zoo", 2
    _, logits_fn, params, x, y = fm.problem(model_key)
    rng = jax.random.key(11)
    got = _exact_blocks(model_key, y, fisher="sampled", rng=rng, num_samples=num_samples)

    logits = logits_fn(params)
    want = None
    for key in jax.random.split(rng, num_samples):
        labels = sample_targets("softmax_cross_entropy", key, logits)
        blocks = _reference_blocks(model_key, labels)
        want = blocks if want is None else {k: want[k] + v for k, v in blocks.items()}
    out = fm.capture_fn(model_key, "sampled", num_samples)(params, x, y, rng)
    for name, leaf in fm.flat(out.stats).items():
        fm.assert_close(got[name], want[name] / num_samples, RTOL, err_msg=name)
        fm.assert_close(got[name], fm.fisher_np(*fm.layer_mats(leaf)), RTOL, err_msg=name)
    # A different key gives a different matrix (the labels really are sampled).
    other = _exact_blocks(
        model_key, y, fisher="sampled", rng=jax.random.key(12), num_samples=num_samples
    )
    assert not all(np.allclose(other[k], got[k]) for k in got)


def _output_fisher(loss: str, logits: np.ndarray) -> np.ndarray:
    """E_y[r r^T] per example, r = d l / d f, written out for each loss."""
    if loss == "softmax_cross_entropy":
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        return np.stack([np.diag(q) - np.outer(q, q) for q in p])
    if loss == "sigmoid_binary_cross_entropy":
        p = 1.0 / (1.0 + np.exp(-logits))
        return np.stack([np.diag(q * (1 - q)) for q in p])
    return np.broadcast_to(np.eye(logits.shape[1]), (logits.shape[0],) + 2 * logits.shape[1:])


def _sampled_residuals(loss: str, logits: jax.Array, key: jax.Array, draws: int) -> np.ndarray:
    """r = d l / d f at labels drawn from the model, (draws, N, C)."""
    keys = jax.random.split(key, draws)
    if loss == "softmax_cross_entropy":
        labels = jax.vmap(lambda k: jax.random.categorical(k, logits, axis=-1))(keys)
        r = jax.nn.softmax(logits, -1)[None] - jax.nn.one_hot(labels, logits.shape[-1])
    elif loss == "sigmoid_binary_cross_entropy":
        p = jax.nn.sigmoid(logits)
        r = p[None] - jax.vmap(lambda k: jax.random.bernoulli(k, p))(keys)
    else:  # y = f + N(0, I)
        r = -jax.vmap(lambda k: jax.random.normal(k, logits.shape))(keys)
    return np.asarray(r, np.float64)


@f64
@pytest.mark.parametrize("loss", LOSSES)
def test_expected_fisher_is_jacobian_sandwich_and_monte_carlo_limit(loss):
    """fisher="expected" = E_n[J_n^T H_n J_n], and the mean of many sampled Fishers."""
    model_key = "mlp"
    _, logits_fn, params, _, y = fm.problem(model_key)
    targets = _targets(loss, y, 3)
    got = _exact_blocks(model_key, targets, loss=loss, fisher="expected")
    jac = _per_example_jacobians(model_key)
    logits = logits_fn(params)
    h = _output_fisher(loss, np.asarray(logits, np.float64))
    draws = 20000
    r = _sampled_residuals(loss, logits, jax.random.key(5), draws)
    for name, j in jac.items():
        want = np.einsum("ncp,ncd,ndq->pq", j, h, j) / j.shape[0]
        fm.assert_close(got[name], want, RTOL, err_msg=name)
        # Monte Carlo: per-draw F_k = E_n[g g^T], g = J_n^T r_nk; |mean - F| within 6 s.e.
        g = np.einsum("ncp,knc->knp", j, r)
        per_draw = np.einsum("knp,knq->kpq", g, g) / j.shape[0]
        mean, se = per_draw.mean(0), per_draw.std(0) / np.sqrt(draws)
        assert np.all(np.abs(mean - got[name]) <= 6 * se + 1e-12), name
        assert np.linalg.norm(mean - got[name]) < 0.05 * np.linalg.norm(got[name])


@f64
def test_sampled_blocks_average_the_label_draws():
    """exact_fisher_blocks(sampled, num_samples=S) = (1/S) sum_k J^T r_k r_k^T J, same keys."""
    model_key, num_samples = "mlp", 4
    _, logits_fn, params, _, y = fm.problem(model_key)
    rng = jax.random.key(3)
    got = _exact_blocks(model_key, y, fisher="sampled", rng=rng, num_samples=num_samples)
    logits = logits_fn(params)
    keys = jax.random.split(rng, num_samples)
    labels = np.stack([sample_targets("softmax_cross_entropy", k, logits) for k in keys])
    r = np.asarray(jax.nn.softmax(logits, -1), np.float64)[None] - np.eye(3)[labels]
    for name, j in _per_example_jacobians(model_key).items():
        g = np.einsum("ncp,knc->knp", j, r)
        want = np.einsum("knp,knq->pq", g, g) / (num_samples * j.shape[0])
        fm.assert_close(got[name], want, RTOL, err_msg=name)


@f64
@pytest.mark.parametrize("preset", ["kfac", "tekfac"])
def test_approximation_errors_are_frobenius_norms(preset):
    state, _, _ = fm.one_update("zoo", preset)
    exact = _exact_blocks("zoo", fm.problem("zoo")[4])
    exact_tree = tekfax.capture.nest_by_name(exact)
    approx, damped = fm.approx_blocks(state), fm.damped_blocks(state)
    errors = fm.jit(approximation_errors, static_argnames="damped")
    from_state = fm.flat(errors(state, exact_tree))
    from_damped = fm.flat(errors(state, exact_tree, damped=True))
    from_blocks = fm.flat(errors(fm.jit(approx_fisher_blocks)(state), exact_tree))
    assert set(from_state) == set(exact) == set(approx)
    for name in exact:
        want = np.linalg.norm(np.asarray(exact[name]) - np.asarray(approx[name]))
        fm.assert_close(from_state[name], want, RTOL, err_msg=name)
        fm.assert_close(from_blocks[name], want, RTOL, err_msg=name)
        want_damped = np.linalg.norm(np.asarray(exact[name]) - np.asarray(damped[name]))
        fm.assert_close(from_damped[name], want_damped, RTOL, err_msg=name)
    # The optimizer state may be wrapped (a chain with momentum and learning rate).
    chained = (state, optax.TraceState(trace={}), optax.EmptyState())
    fm.assert_close(fm.flat(errors(chained, exact_tree))["head"], from_state["head"], RTOL)


@f64
def test_blocks_are_ordered_like_ravel_pytree_bias_first():
    """Bias entries come first, then the kernel row-major (per-example grads by jax.grad).

    The approximate blocks use the same ordering: for a Dense layer (T = 1) the bias block
    of F is E[u u^T] = G, and KFAC's is A[0, 0] G = G because the bias input is 1.
    """
    model, logits_fn, params, x, y = fm.problem("mlp")
    exact = _exact_blocks("mlp", y)

    def example_loss(p, xi, yi):
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, xi[None]), yi[None]
        ).sum()

    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)
    for name, g in grads.items():
        d_out = g["bias"].shape[-1]
        bias = np.asarray(g["bias"], np.float64)  # (N, d_out)
        kernel = np.asarray(g["kernel"], np.float64).reshape(len(bias), -1)  # row-major
        fm.assert_close(exact[name][:d_out, :d_out], bias.T @ bias / len(bias), RTOL)
        fm.assert_close(exact[name][d_out:, d_out:], kernel.T @ kernel / len(bias), RTOL)
        fm.assert_close(exact[name][:d_out, d_out:], bias.T @ kernel / len(bias), RTOL)

    state = fm.one_update("zoo", "kfac")[0]
    approx, exact = fm.approx_blocks(state), _exact_blocks("zoo", fm.problem("zoo")[4])
    for name in ("dense", "head"):
        d_out = state.layers[name].factor_out.shape[0]
        # Loose tolerance: a mis-ordering would be an O(1) difference.
        fm.assert_close(approx[name][:d_out, :d_out], exact[name][:d_out, :d_out], 1e-6)
        assert not np.allclose(approx[name][-d_out:, -d_out:], exact[name][:d_out, :d_out])
