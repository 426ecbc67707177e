"""KFAC-expand and KFAC-reduce for layers applied over positions (docs/algorithms.md, s. 11).

The references are independent of tekfax's statistics: the layer inputs a_{n,t} and output
gradients u_{n,t} come from a hand-written forward pass (its own im2col for the
convolution) whose pre-activations carry zero perturbations, so u = d l_n / d s_{n,t} is
``jax.grad`` with respect to them, and the factors are formed from a and u in numpy:

* expand: A = E_n[(1/T) sum_t a a^T], G = E_n[sum_t u u^T];
* reduce: A = E_n[abar abar^T], G = E_n[ubar ubar^T], abar = mean_t a, ubar = sum_t u;
  TKFAC's moments from abar and ubar as a layer with one position.

The optimizer's held estimates (factor / ema_weight) and its dense blocks
(``tekfax.diagnostics.approx_fisher_blocks``) are compared with them in float64. The
eigenvalue-corrected S must keep the exact per-example gradients under either option.
"""

from __future__ import annotations

import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax
from tekfax.curvature import batch_factors, reduce_positions, tkfac_moments
from tests import _formulas as fm
from tests.conftest import jit
from tests.models import MLP

f64 = pytest.mark.usefixtures("x64")
RTOL = 1e-10  # float64: a handful of roundings on tiny matrices
N = 7  # examples; with CHUNKED below every layer is streamed in chunks, some padded
SEQ, CONV = (4, 2), (5, 2)  # (positions, features) of the Dense and (length, channels) of the conv
# The layers of PosNet with their positions T.
LAYERS = {"seq": SEQ[0], "conv": CONV[0], "head": 1}
# Chunk budget, in elements: 3 examples of the conv's layer matrices, T (d_in + d_out) =
# 5 (7 + 2) = 45 each, so the conv runs 3 chunks of 3 (2 padding examples), the seq and head
# layers 2 chunks of 4 (1 padding example).
CHUNKED = 3 * 45
EXACT_CONFIG = {
    "damping": 1e-3,
    "curvature_every": 1,
    "eigen_every": 1,
    "rescale_every": 1,
    "rescale_ema": 0.0,  # S is this batch's S (docs/algorithms.md, section 3)
}


class PosNet(nn.Module):
    """A Dense over (N, 4, 2) and a 1-D conv (SAME, kernel 3) over (N, 5, 2), then a head."""

    @nn.compact
    def __call__(self, x):  # (N, 18)
        n = x.shape[0]
        seq = nn.Dense(3, name="seq")(x[:, :8].reshape((n,) + SEQ))
        conv = nn.Conv(2, (3,), padding="SAME", name="conv")(x[:, 8:].reshape((n,) + CONV))
        h = jnp.concatenate([jnp.tanh(seq).reshape(n, -1), jnp.tanh(conv).reshape(n, -1)], 1)
        return nn.Dense(3, name="head")(h)


def _homogeneous(x):
    return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x], axis=-1)


def _kernel_matrix(layer):
    kernel = layer["kernel"]
    return jnp.concatenate([layer["bias"][None], kernel.reshape(-1, kernel.shape[-1])], 0)


def _hand_forward(params, x, eps):
    """PosNet written out, with zero perturbations ``eps`` on every pre-activation.

    Returns (logits, {layer: a of shape (N, T, d_in)}); the conv's patches are cut here,
    kernel offsets major, then channels (the kernel's row-major flattening).
    """
    n = x.shape[0]
    mats = {"seq": _homogeneous(x[:, :8].reshape((n,) + SEQ))}
    xc = jnp.pad(x[:, 8:].reshape((n,) + CONV), ((0, 0), (1, 1), (0, 0)))
    patches = [xc[:, t : t + 3].reshape(n, -1) for t in range(CONV[0])]
    mats["conv"] = _homogeneous(jnp.stack(patches, axis=1))
    pre = {k: mats[k] @ _kernel_matrix(params[k]) + eps[k] for k in ("seq", "conv")}
    h = jnp.concatenate([jnp.tanh(v).reshape(n, -1) for v in pre.values()], axis=1)
    mats["head"] = _homogeneous(h[:, None, :])
    logits = mats["head"] @ _kernel_matrix(params["head"]) + eps["head"]
    return logits[:, 0], mats


@functools.cache
def _problem():
    """(params, x, y, logits_fn, {layer: (a, u)}) in float64, a and u from the hand pass."""
    model = PosNet()

    def build(key):
        kx, ky, kp = jax.random.split(key, 3)
        x = jax.random.normal(kx, (N, 18), jnp.float64)
        y = jax.random.randint(ky, (N,), 0, 3)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(kp, x)["params"])
        eps = {k: jnp.zeros((N, t, params[k]["bias"].shape[0])) for k, t in LAYERS.items()}

        def total_loss(e):  # sum_n l_n: its gradient in s_{n,t} is d l_n / d s_{n,t}
            logits, _ = _hand_forward(params, x, e)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

        logits, mats = _hand_forward(params, x, eps)
        flax_logits = model.apply({"params": params}, x)
        return params, x, y, mats, jax.grad(total_loss)(eps), logits, flax_logits

    params, x, y, mats, u, logits, flax_logits = jit(build)(jax.random.key(0))
    np.testing.assert_allclose(logits, flax_logits, rtol=1e-13)
    pairs = {k: (np.asarray(mats[k]), np.asarray(u[k])[None]) for k in LAYERS}

    def logits_fn(p):
        return model.apply({"params": p}, x)

    return params, x, y, logits_fn, pairs


def _expand_np(a, u):
    s, n, t, _ = u.shape
    return np.einsum("nti,ntj->ij", a, a) / (n * t), np.einsum("snto,sntp->op", u, u) / (s * n)


def _reduce_np(a, u):
    """(abar, ubar) as a layer with one position: (N, 1, d_in), (S, N, 1, d_out)."""
    return a.mean(axis=1, keepdims=True), u.sum(axis=2, keepdims=True)


def _tkfac_np(a, u):
    s, n = u.shape[:2]
    u_sq, a_sq = np.einsum("snto->snt", u * u), np.einsum("nti->nt", a * a)
    m_phi = np.einsum("snt,nti,ntj->ij", u_sq, a, a) / (s * n)
    m_psi = np.einsum("nt,snto,sntp->op", a_sq, u, u) / (s * n)
    return m_phi, m_psi


@functools.cache
def _update(preset: str, positions: str, chunk_elements: int | None = None):
    """(state, blocks) after one update of scale_by_<preset> on PosNet (empirical Fisher)."""
    params, _, y, logits_fn, _ = _problem()
    opt = getattr(tekfax, f"scale_by_{preset}")(positions=positions, **EXACT_CONFIG)

    def step(p):
        out = tekfax.loss_and_curvature(logits_fn, p, y, fisher="empirical")
        _, state = opt.update(out.grads, opt.init(p), p, stats=out.stats)
        return state, tekfax.diagnostics.approx_fisher_blocks(state)

    with mock.patch.object(
        tekfax.patches, "CHUNK_ELEMENTS", chunk_elements or tekfax.patches.CHUNK_ELEMENTS
    ):
        state, blocks = jit(step)(params)
    return state, fm.flat(jax.tree.map(np.asarray, blocks))


@f64
@pytest.mark.parametrize(
    "positions, chunk_elements", [("expand", None), ("reduce", None), ("reduce", CHUNKED)]
)
def test_kfac_factors_equal_their_definitions(positions, chunk_elements):
    """Held A, G and the block A (x) G equal expand's / reduce's definitions, layer by layer.

    Also streamed in padded chunks (``CHUNKED``): the reduction runs inside each chunk.
    """
    state, blocks = _update("kfac", positions, chunk_elements)
    for name, (a, u) in _problem()[4].items():
        assert a.shape[1] == LAYERS[name]
        pair = _reduce_np(a, u) if positions == "reduce" else (a, u)
        want_a, want_g = _expand_np(*pair)  # expand's formula on one position is reduce's
        got_a, got_g = fm.held_estimates(state, name)
        fm.assert_close(got_a, want_a, RTOL, err_msg=name)
        fm.assert_close(got_g, want_g, RTOL, err_msg=name)
        fm.assert_close(blocks[name], np.kron(want_a, want_g), RTOL, err_msg=name)
    # The two options differ on every layer with T > 1 and agree on the T = 1 head.
    expand = _update("kfac", "expand")[0]
    for name, t in LAYERS.items():
        same = np.allclose(state.layers[name].factor_out, expand.layers[name].factor_out)
        assert same == (positions == "expand" or t == 1), name


@f64
def test_tkfac_reduce_moments_and_trace_identity():
    """M_Phi, M_Psi of (abar, ubar); tr M_Phi = tr M_Psi = delta = E_n[|abar|^2 |ubar|^2]."""
    state, blocks = _update("tkfac", "reduce")
    for name, (a, u) in _problem()[4].items():
        a_bar, u_bar = _reduce_np(a, u)
        m_phi, m_psi = _tkfac_np(a_bar, u_bar)
        delta = np.mean(np.sum(a_bar**2, axis=(1, 2)) * np.sum(u_bar**2, axis=(2, 3)))
        got_phi, got_psi = fm.held_estimates(state, name)
        fm.assert_close(got_phi, m_phi, RTOL, err_msg=name)
        fm.assert_close(got_psi, m_psi, RTOL, err_msg=name)
        fm.assert_close(np.trace(got_phi), delta, RTOL, err_msg=name)
        fm.assert_close(np.trace(got_psi), delta, RTOL, err_msg=name)
        fm.assert_close(state.layers[name].delta, delta, RTOL, err_msg=name)
        fm.assert_close(blocks[name], np.kron(m_phi, m_psi) / delta, RTOL, err_msg=name)
        if LAYERS[name] > 1:  # the reduce-model's delta is not expand's tr F1
            assert not np.isclose(delta, np.trace(_tkfac_np(a, u)[0]), rtol=1e-3), name


def _rescale_np(q_in, q_out, grads):
    """E_n[(Q_in^T g_n Q_out)^2] of per-example gradients ``grads`` (S, N, d_in, d_out)."""
    return np.mean(np.einsum("ij,snik,kl->snjl", q_in, grads, q_out) ** 2, axis=(0, 1))


@f64
@pytest.mark.parametrize("preset", ["ekfac", "tekfac"])
def test_rescale_keeps_exact_per_example_gradients_under_reduce(preset):
    """S = E_n[(Q_in^T gradW_n^T Q_out)^2] with gradW_n^T = sum_t a_t u_t^T, in reduce's basis.

    The basis diagonalises reduce's factors, but S is built from the exact per-example
    gradients, not from the rank-one abar ubar^T of the reduce model (a clear gap).
    """
    state, _ = _update(preset, "reduce")
    for name, (a, u) in _problem()[4].items():
        layer = state.layers[name]
        q_in, q_out = np.asarray(layer.q_in), np.asarray(layer.q_out)
        a_bar, u_bar = _reduce_np(a, u)
        factors = _expand_np(a_bar, u_bar) if preset == "ekfac" else _tkfac_np(a_bar, u_bar)
        for q, f in zip((q_in, q_out), factors, strict=True):
            off = q.T @ f @ q  # Q diagonalises the reduce factor
            fm.assert_close(
                off - np.diag(np.diag(off)), np.zeros_like(f), RTOL, atol=RTOL * np.abs(f).max()
            )

        want = _rescale_np(q_in, q_out, np.einsum("nti,snto->snio", a, u))
        fm.assert_close(layer.rescale, want, RTOL, err_msg=name)
        if LAYERS[name] > 1:
            rank_one = _rescale_np(q_in, q_out, np.einsum("nti,snto->snio", a_bar, u_bar))
            gap = np.linalg.norm(rank_one - want) / np.linalg.norm(want)
            assert gap > 0.1, (name, gap)


def _setup(model: nn.Module, x_shape: tuple[int, ...], dtype) -> tuple:
    """(logits_fn, params) of ``model`` on a normal batch, built in one compiled call."""
    kx, kp = jax.random.split(jax.random.key(1))
    x = jit(lambda k: jax.random.normal(k, x_shape, dtype))(kx)
    params = jax.tree.map(lambda v: v.astype(dtype), jit(model.init)(kp, x)["params"])

    def logits_fn(p):
        return model.apply({"params": p}, x)

    return logits_fn, params


class SumDense(nn.Module):
    """One Dense over (N, R, d), summed over the R positions: f = W sum_r a_r."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x).sum(axis=1)


@f64
@pytest.mark.parametrize("preset", ["kfac", "tkfac"])
def test_reduce_is_exact_for_a_summed_dense_with_one_example(preset):
    """N = 1, f = sum_r W a_r, squared error: gradW = ubar abar^T, so F = reduce's block.

    Reduce's A (x) G (TKFAC: M_Phi (x) M_Psi / delta) equals the brute-force Fisher block for
    the same sampled label; expand's differs by far more than rounding.
    """
    logits_fn, params = _setup(SumDense(), (1, 5, 2), jnp.float64)
    y = jnp.zeros((1, 3), jnp.float64)
    rng = jax.random.key(2)
    opt = {
        p: getattr(tekfax, f"scale_by_{preset}")(positions=p, **EXACT_CONFIG)
        for p in ("expand", "reduce")
    }

    def blocks(prm):
        out = tekfax.loss_and_curvature(logits_fn, prm, y, loss="squared_error", rng=rng)
        exact = tekfax.diagnostics.exact_fisher_blocks(
            logits_fn, prm, y, loss="squared_error", rng=rng
        )
        approx = {
            p: tekfax.diagnostics.approx_fisher_blocks(
                o.update(out.grads, o.init(prm), prm, stats=out.stats)[1]
            )
            for p, o in opt.items()
        }
        return exact["Dense_0"], {p: b["Dense_0"] for p, b in approx.items()}

    exact, approx = jax.tree.map(np.asarray, jit(blocks)(params))
    fm.assert_close(approx["reduce"], exact, RTOL)
    gap = np.linalg.norm(approx["expand"] - exact) / np.linalg.norm(exact)
    assert gap > 0.1, gap


def test_one_position_reduce_is_expand_bit_for_bit():
    """T = 1: the reduced matrices are a and u themselves, and so are all the statistics.

    float32, on the matrices (power-of-two scalings included, extreme magnitudes too) and on
    a whole optimizer state of an MLP (every layer T = 1).
    """
    rng = np.random.default_rng(0)
    scales = 10.0 ** rng.uniform(-30, 30, (6, 1, 1))
    a = jnp.asarray(rng.normal(size=(6, 1, 4)) * scales, jnp.float32)
    u = jnp.asarray(rng.normal(size=(2, 6, 1, 3)) * scales[None], jnp.float32)
    a_bar, u_bar = jit(reduce_positions)(a, u)
    np.testing.assert_array_equal(a_bar, a)
    np.testing.assert_array_equal(u_bar, u)
    for estimator in ("kfac", "tkfac"):
        got = jit(functools.partial(batch_factors, estimator, positions="reduce"))(a, u)
        want = jit(functools.partial(batch_factors, estimator))(a, u)
        jax.tree.map(np.testing.assert_array_equal, got, want)

    logits_fn, params = _setup(MLP(features=(4, 3)), (5, 3), jnp.float32)
    y = jnp.arange(5) % 3

    def state(positions):
        opt = tekfax.scale_by_tekfac(positions=positions, **EXACT_CONFIG)
        out = tekfax.loss_and_curvature(logits_fn, params, y, rng=jax.random.key(1))
        return opt.update(out.grads, opt.init(params), params, stats=out.stats)

    jax.tree.map(
        np.testing.assert_array_equal,
        jit(state, static_argnums=0)("reduce"),
        jit(state, static_argnums=0)("expand"),
    )


def _float32_pair(scale_a: float, scale_u: float) -> tuple[np.ndarray, np.ndarray]:
    """float32-representable a (bias column 1, 7 positions) and u: (2, 7, 4), (1, 2, 7, 3)."""
    rng = np.random.default_rng(1)
    a = np.concatenate([np.ones((2, 7, 1)), rng.uniform(0.5, 1.0, (2, 7, 3)) * scale_a], -1)
    u = rng.uniform(-1.0, 1.0, (1, 2, 7, 3)) * scale_u
    return a.astype(np.float32).astype(np.float64), u.astype(np.float32).astype(np.float64)


def test_reduce_is_overflow_safe_in_float32():
    """Means and sums near the float32 maximum: finite where a plain sum overflows.

    a: 7 positions of 0.5e38..1e38, whose plain sum overflows, and the bias column, whose
    mean is exactly 1; u: +-3e38 that cancel to 1e38. Both match the float64 mean and sum.
    The factors of inputs 1e19 (A up to 1e38) match their float64 definition.
    """
    a64, _ = _float32_pair(1e38, 1.0)
    u64 = np.zeros((1, 2, 7, 3))
    u64[:, :, :4] = np.array([3e38, 3e38, -3e38, -2e38])[:, None]
    a, u = jnp.asarray(a64, jnp.float32), jnp.asarray(u64, jnp.float32)
    assert not np.isfinite(np.asarray(jnp.sum(a, axis=1))).all()  # the plain sum overflows
    a_bar, u_bar = jit(reduce_positions)(a, u)
    assert np.all(np.asarray(a_bar)[..., 0] == 1.0)
    fm.assert_close(a_bar, a64.mean(axis=1, keepdims=True), 1e-6)
    fm.assert_close(u_bar, u64.sum(axis=2, keepdims=True), 1e-6)

    a64, u64 = _float32_pair(1e19, 1e18)
    a, u = jnp.asarray(a64, jnp.float32), jnp.asarray(u64, jnp.float32)
    got = jit(functools.partial(batch_factors, "kfac", positions="reduce"))(a, u)
    for g, want in zip(got, _expand_np(*_reduce_np(a64, u64)), strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        fm.assert_close(g, want, 1e-5)


def test_moments_are_right_for_inputs_above_half_the_float32_maximum():
    """|a| = 2e38 > 2^127 and u = 2^-125: M_Phi and M_Psi (about 22) match float64.

    The squared norm |a|^2 is held as m p^2 with p a power of two capped at 2^126, so 1/p
    is a normal number: XLA computes x / p as x * (1/p) and flushes subnormals to zero, so
    p = 2^127 made |a|^2 come out 0, and M_Psi with it.
    """
    a64 = np.array([[[1.0, 2e38, -2e38]]])
    u64 = np.array([[[[2.0**-125, 0.0]]]])
    a, u = jnp.asarray(a64, jnp.float32), jnp.asarray(u64, jnp.float32)
    for got, want in zip(jit(tkfac_moments)(a, u), _tkfac_np(a64, u64), strict=True):
        fm.assert_close(got, want, 1e-5)


def test_bad_positions_raise_naming_the_argument():
    with pytest.raises(ValueError, match="positions"):
        tekfax.scale_by_kfac(damping=1e-3, positions="mean")
    with pytest.raises(ValueError, match="positions"):
        tekfax.tekfac(0.1, positions=None)
    # A static choice: inject_hyperparams keeps it out of the injectable numbers.
    opt = optax.inject_hyperparams(tekfax.kfac)(learning_rate=0.1, positions="reduce")
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    assert "positions" not in opt.init(params).hyperparams
