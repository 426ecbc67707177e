"""EAdam against a NumPy transcription of docs/algorithms.md, section 6.

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2 + eps;
    update = -alpha m_hat / sqrt(v_hat),  m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t).

The references run in float64 NumPy. float64 runs of tekfax use the ``x64`` fixture.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax

B1, B2, EPS = 0.9, 0.999, 1e-8
STEPS = 50
SHAPES = {"w": (3, 4), "b": (4,)}


def _random_gradients(seed: int, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    """STEPS gradient trees whose entries span three orders of magnitude."""
    rng = np.random.default_rng(seed)
    magnitude = {k: scale * 10.0 ** rng.uniform(-3, 0, s) for k, s in SHAPES.items()}
    return [
        {k: magnitude[k] * rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(STEPS)
    ]


def _numpy_eadam(grads, learning_rate=lambda step: 1e-3, b1=B1, b2=B2, eps=EPS):
    """docs/algorithms.md, section 6 in float64; returns the updates and the final (m, v)."""
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.zeros(s) for k, s in SHAPES.items()}
    updates = []
    for t, g in enumerate(grads, start=1):
        m = {k: b1 * m[k] + (1 - b1) * g[k] for k in m}
        v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 + eps for k in v}
        lr = learning_rate(t - 1)  # optax evaluates schedules at the 0-based step
        updates.append({k: -lr * (m[k] / (1 - b1**t)) / np.sqrt(v[k] / (1 - b2**t)) for k in m})
    return updates, m, v


def _numpy_eadam_authors(grads, lr, b1=B1, b2=B2, eps=EPS):
    """The authors' form: lr sqrt(1 - b2^t) / (1 - b1^t) * m / sqrt(v)."""
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.zeros(s) for k, s in SHAPES.items()}
    updates = []
    for t, g in enumerate(grads, start=1):
        m = {k: b1 * m[k] + (1 - b1) * g[k] for k in m}
        v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 + eps for k in v}
        step_size = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        updates.append({k: -step_size * m[k] / np.sqrt(v[k]) for k in m})
    return updates


def _run(opt, grads, dtype):
    params = {k: jnp.zeros(s, dtype) for k, s in SHAPES.items()}
    state = opt.init(params)
    update = jax.jit(opt.update)
    updates = []
    for g in grads:
        u, state = update(jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), g), state, params)
        updates.append(u)
    return updates, state


def _eadam_state(state) -> tekfax.ScaleByEAdamState:
    """The ScaleByEAdamState inside eadam's chain state."""
    assert isinstance(state[0], tekfax.ScaleByEAdamState)
    return state[0]


# (rtol, atol / learning rate): float32 loses digits where m cancels to nearly zero.
TOLERANCES = {"float32": (2e-5, 1e-5), "float64": (1e-10, 1e-13)}


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_matches_numpy_transcription(dtype, request):
    if dtype == "float64":
        request.getfixturevalue("x64")
    grads = _random_gradients(0)
    rtol, atol = TOLERANCES[dtype]
    lr = 3e-3
    updates, state = _run(tekfax.eadam(lr), grads, jnp.dtype(dtype))
    expected, m, v = _numpy_eadam(grads, lambda step: lr)
    for k, (got, want) in enumerate(zip(updates, expected, strict=True)):
        for name in SHAPES:
            assert got[name].dtype == jnp.dtype(dtype)
            np.testing.assert_allclose(
                got[name], want[name], rtol=rtol, atol=atol * lr, err_msg=f"step {k}"
            )
    inner = _eadam_state(state)
    assert int(inner.count) == STEPS
    for name in SHAPES:
        np.testing.assert_allclose(inner.mu[name], m[name], rtol=rtol, atol=atol)
        np.testing.assert_allclose(inner.nu[name], v[name], rtol=rtol)


@pytest.mark.usefixtures("x64")
def test_matches_the_authors_form():
    grads = _random_gradients(1)
    lr = 1e-2
    updates, _ = _run(tekfax.eadam(lr), grads, jnp.float64)
    for got, want in zip(updates, _numpy_eadam_authors(grads, lr), strict=True):
        chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-13 * lr)


@pytest.mark.usefixtures("x64")
def test_trajectory_on_a_random_quadratic():
    """Parameters follow the NumPy trajectory on f(x) = 0.5 x^T H x - c^T x, and f decreases."""
    rng = np.random.default_rng(2)
    dim = 6
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    hessian = basis @ np.diag(10.0 ** rng.uniform(-1, 1, dim)) @ basis.T
    c = rng.standard_normal(dim)
    lr = 0.05

    def f(x):
        return 0.5 * x @ hessian @ x - c @ x

    x_np = np.zeros(dim)
    x = jnp.zeros(dim, jnp.float64)
    m, v = np.zeros(dim), np.zeros(dim)
    opt = tekfax.eadam(lr)
    state = opt.init(x)
    update = jax.jit(opt.update)
    for t in range(1, STEPS + 1):
        g = hessian @ x_np - c
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g**2 + EPS
        x_np = x_np - lr * (m / (1 - B1**t)) / np.sqrt(v / (1 - B2**t))
        u, state = update(jnp.asarray(hessian) @ x - jnp.asarray(c), state, x)
        x = optax.apply_updates(x, u)
        np.testing.assert_allclose(x, x_np, rtol=1e-9, atol=1e-12, err_msg=f"step {t}")
    f_start, f_min = f(np.zeros(dim)), f(np.linalg.solve(hessian, c))
    assert f(np.asarray(x)) - f_min < 0.5 * (f_start - f_min)


@pytest.mark.usefixtures("x64")
def test_eps_accumulates_inside_v():
    """v minus its eps-free counterpart is eps (1 - b2^t) / (1 - b2), and Adam differs."""
    grads = _random_gradients(3, scale=1e-5)  # g^2 <= 1e-10, well below t * eps
    lr = 1e-3
    updates, state = _run(tekfax.eadam(lr), grads, jnp.float64)
    _, _, v_without_eps = _numpy_eadam(grads, eps=0.0)
    accumulated = EPS * (1 - B2**STEPS) / (1 - B2)
    for name in SHAPES:
        np.testing.assert_allclose(
            _eadam_state(state).nu[name] - v_without_eps[name], accumulated, rtol=1e-8
        )

    adam_updates, _ = _run(optax.adam(lr, b1=B1, b2=B2, eps=EPS), grads, jnp.float64)
    last, adam_last = updates[-1], adam_updates[-1]
    for name in SHAPES:
        ratio = np.abs(np.asarray(last[name]) / np.asarray(adam_last[name]))
        assert np.all(ratio < 0.5), "eps inside v must shrink EAdam's steps well below Adam's"


@pytest.mark.usefixtures("x64")
def test_without_eps_it_is_adam_without_eps():
    grads = _random_gradients(4)
    lr = 1e-3
    updates, _ = _run(tekfax.eadam(lr, eps=0.0), grads, jnp.float64)
    adam_updates, _ = _run(optax.adam(lr, b1=B1, b2=B2, eps=0.0), grads, jnp.float64)
    for got, want in zip(updates, adam_updates, strict=True):
        chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-13 * lr)


def test_inject_hyperparams_and_learning_rate_schedule():
    grads = _random_gradients(5)
    hyper = {"b1": 0.8, "b2": 0.99, "eps": 1e-6}
    schedule = optax.exponential_decay(1e-2, transition_steps=10, decay_rate=0.5)
    expected, _, _ = _numpy_eadam(grads, schedule, **hyper)

    plain, _ = _run(tekfax.eadam(schedule, **hyper), grads, jnp.float32)
    injected_opt = optax.inject_hyperparams(tekfax.eadam)(learning_rate=schedule, **hyper)
    injected, state = _run(injected_opt, grads, jnp.float32)
    for got_plain, got_injected, want in zip(plain, injected, expected, strict=True):
        chex.assert_trees_all_close(got_plain, want, rtol=2e-5, atol=1e-7)
        chex.assert_trees_all_close(got_injected, want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], schedule(STEPS - 1), rtol=1e-6)

    constant = optax.inject_hyperparams(tekfax.eadam)(learning_rate=3e-3, **hyper)
    injected_constant, _ = _run(constant, grads, jnp.float32)
    plain_constant, _ = _run(tekfax.eadam(3e-3, **hyper), grads, jnp.float32)
    for got, want in zip(injected_constant, plain_constant, strict=True):
        chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_update_keeps_the_parameter_dtype(dtype):
    params = {k: jnp.ones(s, dtype) for k, s in SHAPES.items()}
    opt = tekfax.eadam(1e-3)
    updates, _ = opt.update(params, opt.init(params), params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)
