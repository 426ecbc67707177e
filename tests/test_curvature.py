"""Tests for tekfax.curvature and tekfax.eigenbasis (docs/algorithms.md, sections 2 and 3).

The approximate blocks the optimizer holds are compared with the section 2 formulas computed
here in plain numpy from the layer matrices a and u, and with brute-force F1 and the exact
Fisher of tests/reference.py. Exactness tests run in float64 with tight tolerances; a
separate float32 test uses a loose one.
"""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from tekfax.curvature import kfac_factors, tkfac_moments
from tekfax.eigenbasis import eigh_psd
from tests import _formulas as fm
from tests.conftest import examples

f64 = pytest.mark.usefixtures("x64")
RTOL = 1e-10  # float64: a handful of roundings on tiny matrices


@f64
@pytest.mark.parametrize("preset", ["kfac", "tkfac"])
def test_bias_corrected_estimate_equals_first_batch_exactly(preset):
    """Section 3: after the first update factor / ema_weight is the batch statistic itself.

    The weight after one update is 1 - eps; in float64 it must be exact to rounding, so the
    held estimate equals the batch factor to ~1e-15, not to float32's 1e-8.
    """
    state, _, out = fm.one_update("zoo", preset)
    for name, leaf in fm.flat(out.stats).items():
        a, u = fm.layer_mats(leaf)
        want_in, want_out = fm.kfac_np(a, u) if preset == "kfac" else fm.tkfac_np(a, u)
        got_in, got_out = fm.held_estimates(state, name)
        fm.assert_close(got_in, want_in, RTOL, err_msg=name)
        fm.assert_close(got_out, want_out, RTOL, err_msg=name)


@f64
@pytest.mark.parametrize("name", list(fm.ZOO_LAYERS))
def test_kfac_block_is_kron_of_batch_factors(name):
    """F_KFAC = A (x) G with A = E_n[(1/T) sum_t a a^T], G = E_n[sum_t u u^T]."""
    state, _, out = fm.one_update("zoo", "kfac")
    a, u = fm.layer_mats(fm.flat(out.stats)[name])
    assert a.shape[1] == fm.ZOO_LAYERS[name]
    big_a, big_g = fm.kfac_np(a, u)
    block = fm.approx_blocks(state)[name]
    fm.assert_close(block, np.kron(big_a, big_g), RTOL)
    # The cached eigendecomposition is that of the held factor estimates.
    est_in, est_out = fm.held_estimates(state, name)
    layer = state.layers[name]
    fm.assert_close(fm.eigen_block(layer.q_in, np.eye(1), layer.eig_in), est_in, RTOL)
    fm.assert_close(fm.eigen_block(np.eye(1), layer.q_out, layer.eig_out), est_out, RTOL)


@f64
@pytest.mark.parametrize("name", list(fm.ZOO_LAYERS))
def test_tkfac_block_and_trace_identities(name):
    """F_TKFAC = M_Phi (x) M_Psi / delta; tr Phi = tr Psi = 1; tr F_TKFAC = delta = tr F1."""
    state, _, out = fm.one_update("zoo", "tkfac")
    a, u = fm.layer_mats(fm.flat(out.stats)[name])
    m_phi, m_psi = fm.tkfac_np(a, u)
    f1 = fm.f1_np(a, u)
    delta = np.trace(f1)
    # delta = E_n[sum_t |a_t|^2 |u_t|^2] = tr F1 = tr M_Phi = tr M_Psi.
    fm.assert_close(delta, np.mean(np.einsum("nt,snt->sn", (a * a).sum(-1), (u * u).sum(-1))), RTOL)
    fm.assert_close(np.trace(m_phi), delta, RTOL)
    fm.assert_close(np.trace(m_psi), delta, RTOL)

    layer = state.layers[name]
    block = fm.approx_blocks(state)[name]
    fm.assert_close(layer.delta, delta, RTOL)
    fm.assert_close(block, np.kron(m_phi, m_psi) / delta, RTOL)
    fm.assert_close(np.trace(block), delta, RTOL)
    est_in, est_out = fm.held_estimates(state, name)
    fm.assert_close(np.trace(est_in) / float(layer.delta), 1.0, RTOL)  # tr Phi
    fm.assert_close(np.trace(est_out) / float(layer.delta), 1.0, RTOL)  # tr Psi
    if fm.ZOO_LAYERS[name] == 1:  # T = 1: F1 = F, so the trace is the exact Fisher's.
        exact = fm.exact_fisher("zoo")[name]
        fm.assert_close(f1, exact, RTOL)
        fm.assert_close(np.trace(block), np.trace(exact), RTOL)


@f64
@pytest.mark.parametrize("preset", ["kfac", "tkfac"])
def test_moving_average_is_bias_corrected(preset):
    """Section 3: estimate_k = sum_i eps^(k-i) (1-eps) M_i / sum_i eps^(k-i) (1-eps)."""
    eps, steps = 0.95, 3  # EXACT: default ema 0.95, curvature_every=1, eigen_every=1
    states, _, outs = fm.run("zoo", preset, fm.EXACT, seeds=tuple(range(steps)))
    stats = [fm.flat(out.stats) for out in outs]
    formula = fm.kfac_np if preset == "kfac" else fm.tkfac_np
    for name in stats[0]:
        batches = [formula(*fm.layer_mats(s[name])) for s in stats]
        weights = [eps ** (steps - 1 - i) * (1 - eps) for i in range(steps)]
        want_in = sum(w * b[0] for w, b in zip(weights, batches, strict=True)) / sum(weights)
        want_out = sum(w * b[1] for w, b in zip(weights, batches, strict=True)) / sum(weights)
        got_in, got_out = fm.held_estimates(states[-1], name)
        fm.assert_close(got_in, want_in, RTOL, err_msg=name)
        fm.assert_close(got_out, want_out, RTOL, err_msg=name)
        if preset == "tkfac":  # tr M_Phi = tr M_Psi survives the moving average exactly.
            layer = states[-1].layers[name]
            fm.assert_close(np.trace(layer.factor_in), np.trace(layer.factor_out), 1e-13)
            fm.assert_close(layer.delta, np.trace(got_in), RTOL, err_msg=name)


@f64
@pytest.mark.parametrize("preset", ["kfac", "tkfac"])
def test_schedules_update_factors_and_eigenbasis_on_their_steps(preset):
    """curvature_every=2, eigen_every=3: factors move on even steps, the basis on 0, 3, 6."""
    eps, steps = 0.95, 7
    config = (("damping", 1e-3), ("ema", eps), ("curvature_every", 2), ("eigen_every", 3))
    states, _, outs = fm.run("mlp", preset, config, seeds=tuple(range(steps)))
    stats = [fm.flat(out.stats) for out in outs]
    formula = fm.kfac_np if preset == "kfac" else fm.tkfac_np
    for name in stats[0]:
        raw_in = np.zeros_like(np.asarray(states[0].layers[name].factor_in))
        raw_w = 0.0
        for k, state in enumerate(states):
            layer = state.layers[name]
            prev = states[k - 1].layers[name] if k else None
            if k % 2 == 0:  # M <- eps M + (1 - eps) M_batch, un-corrected running sum.
                raw_in = eps * raw_in + (1 - eps) * formula(*fm.layer_mats(stats[k][name]))[0]
                raw_w = eps * raw_w + (1 - eps)
            fm.assert_close(layer.factor_in, raw_in, RTOL, err_msg=f"{name} step {k}")
            fm.assert_close(state.ema_weight, raw_w, 1e-6, err_msg=f"step {k}")
            if prev is not None and k % 2 == 1:
                np.testing.assert_array_equal(layer.factor_in, prev.factor_in)
                np.testing.assert_array_equal(layer.factor_out, prev.factor_out)
                assert state.ema_weight == states[k - 1].ema_weight
            if k % 3 == 0:  # refresh: the basis diagonalises the current estimates.
                est_in, est_out = fm.held_estimates(state, name)
                fm.assert_close(fm.eigen_block(layer.q_in, np.eye(1), layer.eig_in), est_in, RTOL)
                fm.assert_close(
                    fm.eigen_block(np.eye(1), layer.q_out, layer.eig_out), est_out, RTOL
                )
                if preset == "tkfac":
                    fm.assert_close(layer.delta, np.trace(est_in), RTOL)
                if prev is not None:  # the factors did change since the last refresh
                    assert not np.allclose(layer.eig_in, states[k - 3].layers[name].eig_in)
            else:
                for field in ("q_in", "eig_in", "q_out", "eig_out", "delta"):
                    if getattr(layer, field) is not None:
                        np.testing.assert_array_equal(getattr(layer, field), getattr(prev, field))
        # Step 0 always refreshes: the identity basis and zero eigenvalues of init are gone.
        first = states[0].layers[name]
        assert np.all(np.asarray(first.eig_in) >= 0) and np.sum(first.eig_in) > 0


@examples(5)  # numpy only, cheap: five times the profile's count
@given(
    n=st.integers(2, 6),
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0.0, 2.0),
)
def test_tkfac_and_kfac_error_bounds_theorem_4(n, d_in, d_out, seed, spread):
    """TKFAC Theorem 4 for one Dense layer (T = 1), both inequalities, brute-force F."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        # Per-example scales spread over orders of magnitude make the bound's max matter.
        a = rng.normal(size=(n, d_in)) * 10.0 ** (spread * rng.uniform(-1, 1, (n, 1)))
        u = rng.normal(size=(n, d_out)) * 10.0 ** (spread * rng.uniform(-1, 1, (n, 1)))
        f = sum(np.kron(np.outer(a[i], a[i]), np.outer(u[i], u[i])) for i in range(n)) / n
        a_j, u_j = jnp.asarray(a[:, None, :]), jnp.asarray(u[None, :, None, :])
        m_phi, m_psi = (np.asarray(m) for m in tkfac_moments(a_j, u_j))
        big_a, big_g = (np.asarray(m) for m in kfac_factors(a_j, u_j))
        f_tkfac = np.kron(m_phi, m_psi) / np.trace(m_phi)
        f_kfac = np.kron(big_a, big_g)

        tr_l, tr_g = np.sum(a * a, axis=1), np.sum(u * u, axis=1)  # tr Lambda_i, tr Gamma_i
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        c = 2.0 * (n - 1) / n
        bound_t = c * max(np.sqrt(tr_l[i] * tr_l[j] * tr_g[i] * tr_g[j]) for i, j in pairs)
        bound_k = c * max((tr_l[i] + tr_l[j]) * (tr_g[i] + tr_g[j]) / 4 for i, j in pairs)
        slack = 1e-9 * np.linalg.norm(f)
        assert np.linalg.norm(f - f_tkfac) <= bound_t * (1 + 1e-9) + slack
        assert np.linalg.norm(f - f_kfac) <= bound_k * (1 + 1e-9) + slack
        # TKFAC's trace matches the exact one (T = 1), KFAC's need not.
        fm.assert_close(np.trace(f_tkfac), np.trace(f), 1e-12)


@pytest.mark.parametrize("dtype, noise, tol", [("float64", 1e-12, 1e-10), ("float32", 1e-6, 1e-4)])
def test_eigh_psd_on_asymmetric_rank_deficient_factor(dtype, noise, tol):
    """Eigenvalues clipped to >= 0; the basis reconstructs the symmetrised matrix."""
    with jax.enable_x64(dtype == "float64"):
        rng = np.random.default_rng(3)
        b = rng.normal(size=(6, 3))
        null = np.linalg.svd(b.T)[2][-1]  # a null vector of the rank-3 Gram matrix b b^T
        r = rng.normal(size=(6, 6))
        # Rounding-noise Gram matrix: symmetric noise and a slightly negative direction...
        sym = b @ b.T + noise * (r + r.T) - 10 * noise * np.outer(null, null)
        assert np.linalg.eigvalsh(sym).min() < 0
        # ...plus an antisymmetric drift that symmetrisation must remove.
        drift = 1e-4 * (r - r.T)
        values, vectors = eigh_psd(jnp.asarray(sym + drift, dtype))
        assert values.dtype == jnp.dtype(dtype) and vectors.dtype == jnp.dtype(dtype)
        values, vectors = np.asarray(values, np.float64), np.asarray(vectors, np.float64)
        assert np.all(values >= 0)
        scale = np.abs(sym).max()
        np.testing.assert_allclose(vectors.T @ vectors, np.eye(6), atol=tol)
        np.testing.assert_allclose(
            (vectors * values) @ vectors.T, sym, atol=tol * scale + 40 * noise
        )
        want = np.clip(np.linalg.eigvalsh(sym), 0, None)
        np.testing.assert_allclose(values, want, atol=tol * scale)


def test_tkfac_blocks_float32():
    """The TKFAC block formulas hold in float32 with a loose tolerance (dead layer: 0 block)."""
    state, _, out = fm.one_update("dampnet", "tkfac", dtype_name="float32")
    blocks = fm.approx_blocks(state)
    for name, leaf in fm.flat(out.stats).items():
        assert blocks[name].dtype == jnp.float32
        a, u = fm.layer_mats(leaf)
        m_phi, m_psi = fm.tkfac_np(a, u)
        delta = np.trace(fm.f1_np(a, u))
        want = np.kron(m_phi, m_psi) / delta if delta > 0 else np.zeros_like(blocks[name])
        fm.assert_close(blocks[name], want, 1e-4, err_msg=name)
        fm.assert_close(np.trace(blocks[name]), delta, 1e-4, err_msg=name)
        layer = state.layers[name]
        fm.assert_close(np.trace(layer.factor_in), np.trace(layer.factor_out), 1e-5)
    assert float(state.layers["dead"].delta) == 0.0
