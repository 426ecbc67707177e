"""Independent formulas of docs/algorithms.md, sections 2-4, and shared runners for the maths tests.

Everything here is plain numpy on the layer matrices a (N, T, d_in) and u (S, N, T, d_out)
of :mod:`tekfax.patches`, in the kernel-layout ordering: a layer's ravelled parameters
(bias first, then the kernel row-major) index the pair (input i, output o) as i * d_out + o,
so a per-position gradient is ``np.kron(a_t, u_t)`` and Kronecker blocks are
``np.kron(M_in, M_out)``.

The runners cache one optimizer update per configuration, so the test modules that share a
configuration (curvature, rescale, damping) pay for it once per process.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import tekfax
from tekfax.patches import input_matrix, output_matrix
from tests import conftest, reference
from tests.models import MLP


class Zoo(nn.Module):
    """Every layer kind of the tests in one small network, so one update covers them all.

    The flat input (N, 59) is split into one input per branch. Layers, with positions T:
    ``dense`` (T = 1, tanh), ``conv1d`` (strided, SAME, T = 4), ``conv2d`` (dilated, VALID,
    T = 9), ``conv3d`` (strided, SAME, T = 12), ``seq`` (a Dense over 3 positions, T = 3),
    and the ``head`` Dense (T = 1) on all their features, concatenated.
    """

    @nn.compact
    def __call__(self, x):
        n = x.shape[0]
        ends = np.cumsum([math.prod(s) for s in ZOO_INPUTS.values()])
        xs = {
            k: x[:, end - math.prod(s) : end].reshape((n,) + s)
            for (k, s), end in zip(ZOO_INPUTS.items(), ends, strict=True)
        }
        feats = [
            nn.Dense(3, name="dense")(xs["dense"]),
            nn.Conv(2, (3,), strides=2, padding="SAME", name="conv1d")(xs["conv1d"]),
            nn.Conv(2, (2, 2), kernel_dilation=2, padding="VALID", name="conv2d")(xs["conv2d"]),
            nn.Conv(2, (2, 2, 2), strides=(2, 1, 2), padding="SAME", name="conv3d")(xs["conv3d"]),
            nn.Dense(2, name="seq")(xs["seq"]).mean(axis=1),
        ]
        h = jnp.concatenate([jnp.tanh(f).reshape(n, -1) for f in feats], axis=1)
        return nn.Dense(3, name="head")(h)


ZOO_INPUTS = {
    "dense": (3,),
    "conv1d": (7, 2),
    "conv2d": (5, 5, 1),
    "conv3d": (3, 3, 3, 1),
    "seq": (3, 2),
}
# Every layer of the zoo, with the number of positions T it sees.
ZOO_LAYERS = {"dense": 1, "conv1d": 4, "conv2d": 9, "conv3d": 12, "seq": 3, "head": 1}


class DampNet(nn.Module):
    """Conv and Dense layers for the damping rules, with one dead layer.

    ``conv2d`` (VALID, T = 9) and ``conv1d`` (strided, SAME, T = 3) are live convolutions;
    ``dead`` is a convolution without bias whose inputs are zeros, so a = 0 and delta = 0;
    ``dense`` (T = 1) and the ``head`` (T = 1) are Dense layers. Input (N, 29).
    """

    @nn.compact
    def __call__(self, x):
        n = x.shape[0]
        feats = [
            nn.Conv(2, (2, 2), padding="VALID", name="conv2d")(x[:, :16].reshape(n, 4, 4, 1)),
            nn.Conv(2, (3,), strides=2, padding="SAME", name="conv1d")(
                x[:, 16:26].reshape(n, 5, 2)
            ),
            nn.Conv(2, (2,), use_bias=False, name="dead")(jnp.zeros((n, 3, 1), x.dtype)),
            nn.Dense(3, name="dense")(x[:, 26:29]),
        ]
        h = jnp.concatenate([jnp.tanh(f).reshape(n, -1) for f in feats], axis=1)
        return nn.Dense(3, name="head")(h)


# name -> (model, x_shape, num_classes).
MODELS = {
    "zoo": (Zoo(), (3, sum(math.prod(s) for s in ZOO_INPUTS.values())), 3),
    "mlp": (MLP(features=(4, 3)), (5, 3), 3),
    "mlp_no_bias": (MLP(features=(4, 3), use_bias=False), (5, 3), 3),
    "dampnet": (DampNet(), (4, 29), 3),
}

# The preconditioners of the shared presets (the exactness runs pass their own intervals).
PRESETS = {preset: getattr(tekfax, f"scale_by_{preset}") for preset in conftest.PRESETS}

jit = conftest.jit  # jax.jit without XLA backend optimisation: quick to compile

_layer_mats = jit(
    lambda leaf: (input_matrix(leaf.inputs, leaf.meta), output_matrix(leaf.out_grads))
)
_approx_blocks = jit(tekfax.diagnostics.approx_fisher_blocks)
_damped_blocks = jit(tekfax.diagnostics.damped_fisher_blocks)
_BLOCKS: dict[int, tuple] = {}


def approx_blocks(state) -> dict[str, np.ndarray]:
    """approx_fisher_blocks(state) as a flat dict (jitted, memoised per state object)."""
    return _memo_blocks(state)[0]


def damped_blocks(state) -> dict[str, np.ndarray]:
    """damped_fisher_blocks(state) as a flat dict (jitted, memoised per state object)."""
    return _memo_blocks(state)[1]


def _memo_blocks(state):
    if id(state) not in _BLOCKS:  # the entry keeps the state alive, so ids stay unique
        blocks = tuple(
            flat(jax.tree.map(np.asarray, f(state))) for f in (_approx_blocks, _damped_blocks)
        )
        _BLOCKS[id(state)] = (state,) + blocks
    return _BLOCKS[id(state)][1:]


# The exactness settings of docs/algorithms.md, section 3: statistics, a fresh eigenbasis and S on
# every step (not the library's default intervals), with S equal to the batch S.
EXACT = (
    ("damping", 1e-3),
    ("curvature_every", 1),
    ("eigen_every", 1),
    ("rescale_every", 1),
    ("rescale_ema", 0.0),
)


# ----------------------------------------------------------------------------- formulas


def layer_mats(stats_leaf) -> tuple[np.ndarray, np.ndarray]:
    """(a, u) of one layer as float64 numpy arrays."""
    a, u = _layer_mats(stats_leaf)
    return np.asarray(a, np.float64), np.asarray(u, np.float64)


def kfac_np(a: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A = E_n[(1/T) sum_t a a^T], G = E_n[sum_t u u^T] (averaged over label samples)."""
    s, n, t, _ = u.shape
    big_a = sum(np.outer(a[i, j], a[i, j]) for i in range(n) for j in range(t)) / (n * t)
    big_g = sum(
        np.outer(u[k, i, j], u[k, i, j]) for k in range(s) for i in range(n) for j in range(t)
    ) / (s * n)
    return big_a, big_g


def tkfac_np(a: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """M_Phi = E_n[sum_t |u_t|^2 a a^T], M_Psi = E_n[sum_t |a_t|^2 u u^T]."""
    s, n, t, _ = u.shape
    m_phi = sum(
        (u[k, i, j] @ u[k, i, j]) * np.outer(a[i, j], a[i, j])
        for k in range(s)
        for i in range(n)
        for j in range(t)
    ) / (s * n)
    m_psi = sum(
        (a[i, j] @ a[i, j]) * np.outer(u[k, i, j], u[k, i, j])
        for k in range(s)
        for i in range(n)
        for j in range(t)
    ) / (s * n)
    return m_phi, m_psi


def f1_np(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """F1 = E_n[sum_t (a_t a_t^T) (x) (u_t u_t^T)], brute force."""
    s, n, t, _ = u.shape
    return sum(
        np.kron(np.outer(a[i, j], a[i, j]), np.outer(u[k, i, j], u[k, i, j]))
        for k in range(s)
        for i in range(n)
        for j in range(t)
    ) / (s * n)


def fisher_np(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """F = E_n[g_n g_n^T] with g_n = vec(sum_t u_t a_t^T) = sum_t a_t (x) u_t."""
    s, n, t, _ = u.shape
    total = 0.0
    for k in range(s):
        for i in range(n):
            g = sum(np.kron(a[i, j], u[k, i, j]) for j in range(t))
            total = total + np.outer(g, g)
    return total / (s * n)


def eigen_block(q_in, q_out, diagonal) -> np.ndarray:
    """(Q_in (x) Q_out) diag(vec D) (Q_in (x) Q_out)^T."""
    q = np.kron(np.asarray(q_in, np.float64), np.asarray(q_out, np.float64))
    return (q * np.asarray(diagonal, np.float64).reshape(1, -1)) @ q.T


def held_estimates(state, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The bias-corrected factor estimates factor / ema_weight the optimizer holds."""
    layer = state.layers[name]
    w = np.float64(state.ema_weight)
    return np.asarray(layer.factor_in, np.float64) / w, np.asarray(layer.factor_out, np.float64) / w


def flat(tree, prefix: tuple[str, ...] = ()) -> dict[str, object]:
    """{"A/B": leaf} for a nested dict of blocks or LayerStats."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, prefix + (str(k),)))
        return out
    return {"/".join(prefix): tree}


def layer_grad(grads, name: str) -> np.ndarray:
    """A layer's gradient ravelled like ravel_pytree (bias first, then kernel row-major)."""
    node = grads
    for key in name.split("/"):
        node = node[key]
    return np.asarray(ravel_pytree(node)[0], np.float64)


def assert_close(actual, expected, rtol: float, atol: float = 0.0, err_msg: str = "") -> None:
    """assert_allclose with the absolute tolerance scaled by the size of ``expected``."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=atol + rtol * scale, err_msg=err_msg
    )


def assert_trees_close(actual, expected, rtol: float) -> None:
    """:func:`assert_close` on every pair of leaves of two pytrees of one structure.

    For float32 comparisons of two programs that compute the same function but round
    differently: an entry that is a small difference of large terms carries the rounding of
    those terms, so the tolerance is relative to each array's scale, not each entry's.
    """
    jax.tree.map(lambda a, e: assert_close(a, e, rtol), actual, expected)


# ----------------------------------------------------------------------------- runners


@functools.cache
def problem(model_key: str, dtype_name: str = "float64", seed: int = 0):
    """(model, logits_fn, params, x, y) for a model of :data:`MODELS`."""
    model, x_shape, num_classes = MODELS[model_key]
    dtype = jnp.dtype(dtype_name)
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, x_shape, dtype)
    y = jax.random.randint(ky, (x_shape[0],), 0, num_classes)
    params = jit(model.init)(kp, x)["params"]
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)

    def logits_fn(p):
        return model.apply({"params": p}, x)

    return model, logits_fn, params, x, y


def batch(model_key: str, seed: int, dtype_name: str = "float64") -> tuple[jax.Array, jax.Array]:
    """A fresh batch (x, y) of the model's shape; seed 0 is the batch of :func:`problem`."""
    if seed == 0:
        return problem(model_key, dtype_name)[3:]
    _, x_shape, num_classes = MODELS[model_key]
    kx, ky = jax.random.split(jax.random.key(1000 + seed))
    x = jax.random.normal(kx, x_shape, jnp.dtype(dtype_name))
    return x, jax.random.randint(ky, (x_shape[0],), 0, num_classes)


@functools.cache
def capture_fn(model_key: str, fisher: str = "empirical", num_samples: int = 1):
    """Jitted (params, x, y, rng) -> tekfax.loss_and_curvature(...) on the model."""
    model = MODELS[model_key][0]

    def capture(params, x, y, rng):
        return tekfax.loss_and_curvature(
            lambda p: model.apply({"params": p}, x),
            params,
            y,
            fisher=fisher,
            rng=rng,
            num_samples=num_samples,
        )

    return jit(capture)


@functools.cache
def update_fn(preset: str, config: tuple = EXACT):
    """(opt, jitted update) for ``scale_by_<preset>(**dict(config))``; compiles once a shape."""
    opt = PRESETS[preset](**dict(config))
    return opt, jit(lambda g, s, p, stats: opt.update(g, s, p, stats=stats))


def run(
    model_key: str,
    preset: str,
    config: tuple = EXACT,
    seeds: tuple[int, ...] = (0,),
    dtype_name: str = "float64",
):
    """Updates on the batches ``seeds`` (empirical Fisher) with the model's fixed params.

    Returns (states, updates, outs), one entry per step.
    """
    _, _, params, _, _ = problem(model_key, dtype_name)
    opt, update = update_fn(preset, config)
    capture = capture_fn(model_key)
    state = jit(opt.init)(params)
    states, updates, outs = [], [], []
    for seed in seeds:
        x, y = batch(model_key, seed, dtype_name)
        out = capture(params, x, y, None)
        upd, state = update(out.grads, state, params, out.stats)
        states.append(state)
        updates.append(upd)
        outs.append(out)
    return states, updates, outs


@functools.cache
def one_update(model_key: str, preset: str, config: tuple = EXACT, dtype_name: str = "float64"):
    """(state, preconditioned updates, CurvatureOutput) of one update on the model's batch."""
    states, updates, outs = run(model_key, preset, config, dtype_name=dtype_name)
    return states[0], updates[0], outs[0]


@functools.cache
def exact_fisher(model_key: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Exact empirical Fisher blocks from tests/reference.py (per-example jax.vmap(jax.grad))."""
    model, _, params, _, _ = problem(model_key)
    x, y = batch(model_key, seed)
    grads = jit(lambda p, x, y: reference.per_example_grads(model, p, x, y))(params, x, y)
    return {name: reference.fisher_block(g) for name, g in grads.items()}
