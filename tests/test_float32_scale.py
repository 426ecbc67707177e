"""float32 at input scales 1e-20 .. 1e20: the Kronecker optimizers stay finite and bounded.

Training runs: a small ReLU model whose three first layers (a 2-D convolution, a 1-D
convolution and a Dense layer) all read the scaled input, then a Dense head, trained for
three steps by each preset with the trust region on and momentum 0. ReLU keeps the
gradients as large as the inputs (a saturated tanh would zero them), so at scale 1e20 the
first batch's factors overflow and are dropped, and the step after it must still be no
larger than the trust region allows. Checked at every step: every array of the optimizer
state and every update is finite, the loss is finite, and the step obeys the trust region.

The trust-region check. With momentum 0 the update is u = -alpha c P(g), c the KL-clip
factor, and the damped block the step was taken with is C = Q diag(vec D) Q^T, Q = Q_in (x)
Q_out, from the state (what ``tekfax.diagnostics.damped_fisher_blocks`` builds). Since
C P(g) = g, u^T C u = alpha^2 c^2 <P(g), g> <= kappa. It is computed here in float64 as
sum D (Q_in^T U Q_out)^2 per layer, which is exact for the float64 numbers, but the float32
step itself carries rounding: u = u* + e with |e| <= gamma |u| (two matrix products of inner
dimensions d_in and d_out, and a basis orthonormal to float32 precision), so by the triangle
inequality sqrt(u^T C u) <= sqrt(kappa (1 + TOL)) + sqrt(sum_l max D_l gamma_l^2 |u_l|^2).
The allowance is negligible unless D spans more than about 1e10: at scale 1e10 without a
damping floor D spans 1e23, the step's components along the large-D directions are float32
rounding noise of ~1e-7 |u|, and u^T C u exceeds kappa by up to 1e8 from rounding alone (the
damping floor the presets may set by default keeps D's span near 1e4). Where the allowance
is small and the clip binds, the quadratic must also reach kappa: the clip is not 0.

Unit tests compare the overflow-safe formulas with float64 numpy references at extreme
scales: the TKFAC diagonal, the moments and S when a^2 overflows but the products fit, the
preconditioner at gradients near the float maximum, the KL-clip scale when its quadratic
overflows, and the guarded re-initialisation of S.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import tekfax
from tekfax import curvature, precondition, rescale
from tekfax.eigenbasis import Eigenbasis
from tekfax.kronecker import find_kronecker_state
from tekfax.patches import grad_matrix
from tests.conftest import INTERVALS, PRESETS, jit

SCALES = (1e-20, 1e-10, 1.0, 1e10, 1e20)
STEPS = 3
LEARNING_RATE = 1.0  # large, so the trust region binds at every scale
DAMPING = 1e-3
KAPPA = 1e-3
TOL = 1e-3  # float32 sums of a few hundred terms, and the square roots of the clip
EPS32 = float(np.finfo(np.float32).eps)
TINY32 = float(np.finfo(np.float32).tiny)
MAX32 = float(np.finfo(np.float32).max)


class Branches(nn.Module):
    """Conv 2-D, Conv 1-D and Dense layers, each on the input, then a Dense head."""

    @nn.compact
    def __call__(self, x):  # (N, 4, 4, 1)
        n = x.shape[0]
        conv2 = nn.relu(nn.Conv(2, (2, 2), padding="VALID")(x)).reshape(n, -1)
        conv1 = nn.relu(nn.Conv(2, (3,), padding="VALID")(x.reshape(n, 4, 4))).reshape(n, -1)
        dense = nn.relu(nn.Dense(3)(x.reshape(n, -1)))
        return nn.Dense(3)(jnp.concatenate([conv2, conv1, dense], axis=1))


@functools.cache
def _trained(preset: str, fisher: str = "empirical", **overrides):
    """Grads, updates, states and losses of every step at every scale: (scales, steps, ...).

    The empirical Fisher: a softmax saturated by a large input scale puts all its mass on
    one label, so the sampled label is that label and the sampled Fisher is exactly 0 in
    float32, which would leave the factors empty exactly where they are largest.
    """
    model = Branches()
    kx, ky, kp, kr = jax.random.split(jax.random.key(0), 4)
    x0 = jax.random.normal(kx, (6, 4, 4, 1), jnp.float32)
    y = jax.random.randint(ky, (6,), 0, 3)
    params0 = model.init(kp, x0)["params"]
    # The kwargs are explicit: the presets' defaults are not what this test is about.
    kwargs = {
        "damping": DAMPING,
        "norm_constraint": KAPPA,
        "momentum": 0.0,
        "skip_non_finite": False,  # check the optimizer itself, not the guard around it
        **INTERVALS,
    }
    opt = getattr(tekfax, preset)(LEARNING_RATE, **{**kwargs, **overrides})

    def one_scale(scale):
        x = x0 * scale

        def step(carry, t):
            params, state = carry
            out = tekfax.loss_and_curvature(
                lambda p: model.apply({"params": p}, x), params, y, fisher=fisher, rng=kr
            )
            updates, state = opt.update(out.grads, state, params, stats=out.stats)
            params = optax.apply_updates(params, updates)
            return (params, state), (out.grads, updates, state, out.loss)

        return lax.scan(step, (params0, opt.init(params0)), jnp.arange(STEPS))[1]

    trace = jit(lambda s: lax.map(one_scale, s))(jnp.asarray(SCALES, jnp.float32))
    return jax.tree_util.tree_map(np.asarray, trace)


def _finite(tree) -> bool:
    return all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def _select(tree, i: int, t: int):
    return jax.tree_util.tree_map(lambda v: v[i, t], tree)


def _kl_and_allowance(grads, updates, state) -> tuple[float, float, float]:
    """(u^T C u, the rounding allowance on its square root, alpha^2 <P(g), g>) in float64."""
    kl = allowance_sq = quadratic = 0.0
    for name, layer in find_kronecker_state(state).layers.items():
        path = name.split("/")
        g_tree, u_tree = grads, updates
        for key in path:
            g_tree, u_tree = g_tree[key], u_tree[key]
        g = np.asarray(grad_matrix(g_tree, jnp.float32), np.float64)
        u = np.asarray(grad_matrix(u_tree, jnp.float32), np.float64)
        q_in, q_out = (np.asarray(q, np.float64) for q in (layer.q_in, layer.q_out))
        d = np.asarray(layer.damped, np.float64)
        kl += float(np.sum(d * (q_in.T @ u @ q_out) ** 2))
        quadratic += LEARNING_RATE**2 * float(np.sum((q_in.T @ g @ q_out) ** 2 / d))
        gamma = 4 * (u.shape[0] + u.shape[1]) * EPS32
        allowance_sq += float(np.max(d)) * (gamma * float(np.linalg.norm(u))) ** 2
    return kl, float(np.sqrt(allowance_sq)), quadratic


@pytest.mark.parametrize("preset", PRESETS)
def test_state_updates_and_loss_stay_finite_at_every_scale(preset):
    grads, updates, states, losses = _trained(preset)
    for i, scale in enumerate(SCALES):
        for t in range(STEPS):
            where = f"scale {scale:g}, step {t}"
            assert _finite(_select(states, i, t)), f"non-finite state at {where}"
            assert _finite(_select(updates, i, t)), f"non-finite update at {where}"
            assert np.isfinite(losses[i, t]), f"non-finite loss at {where}"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_step_is_within_the_trust_region(preset):
    grads, updates, states, _ = _trained(preset)
    binding = 0
    for i, scale in enumerate(SCALES):
        for t in range(STEPS):
            kl, allowance, quadratic = _kl_and_allowance(
                *(_select(tree, i, t) for tree in (grads, updates, states))
            )
            where = f"scale {scale:g}, step {t}: u^T C u = {kl:.3g}, allowance {allowance:.3g}"
            assert np.sqrt(kl) <= np.sqrt(KAPPA * (1 + TOL)) + allowance, where
            if allowance < 1e-3 * np.sqrt(KAPPA) and quadratic > 2 * KAPPA:
                binding += 1  # the clip binds: the step reaches the trust region's edge
                assert np.sqrt(kl) >= np.sqrt(KAPPA * (1 - TOL)) - allowance, where
    assert binding >= STEPS * 2  # the tight two-sided check ran on several scales


# --- unit tests against float64 references ----------------------------------------------


@pytest.mark.parametrize("scale", [1e-35, 1e-20, 1.0, 1e20, 1e35])
def test_tkfac_diagonal_matches_float64_at_extreme_scales(scale):
    """outer(eig M_Phi, eig M_Psi) / delta when the outer product alone over/underflows."""
    rng = np.random.default_rng(1)
    p_in, p_out = rng.random(4), rng.random(3)
    eig_in = scale * p_in / p_in.sum()  # eigenvalues of PSD moments of trace delta
    eig_out = scale * p_out / p_out.sum()
    want = np.outer(eig_in, eig_out) / scale
    got = jit(curvature.eigen_diagonal)(
        *(jnp.asarray(v, jnp.float32) for v in (eig_in, eig_out, scale))
    )
    got = np.asarray(got, np.float64)
    normal = want >= 4 * TINY32  # below that the result may flush to 0
    np.testing.assert_allclose(got[normal], want[normal], rtol=1e-6)
    assert np.all(np.isfinite(got)) and np.all(got[~normal] <= 4 * TINY32)
    np.testing.assert_array_equal(  # KFAC's diagonal is the plain outer product
        curvature.eigen_diagonal(jnp.ones(2), jnp.full(3, 2.0), None), np.full((2, 3), 2.0)
    )


def test_moments_and_s_are_exact_when_a_squared_overflows():
    """a ~ 1e25 (a^2 = 1e50 > float32 max), u ~ 1e-20: M_Phi, M_Psi and S are ~1e10."""
    rng = np.random.default_rng(2)
    samples, n, t, d_in, d_out = 2, 3, 2, 3, 2
    a = rng.normal(size=(n, t, d_in)) * 1e25
    u = rng.normal(size=(samples, n, t, d_out)) * 1e-20
    u[:, 0] = 0.0  # a saturated unit: no output gradient at all
    q_in = np.linalg.qr(rng.normal(size=(d_in, d_in)))[0]
    q_out = np.linalg.qr(rng.normal(size=(d_out, d_out)))[0]
    u_sq = np.mean(np.sum(u**2, -1), 0)  # (n, t)
    a_sq = np.sum(a**2, -1)
    m_phi = np.einsum("nt,nti,ntj->ij", u_sq, a, a) / n
    m_psi = np.einsum("nt,snti,sntj->ij", a_sq, u, u) / (samples * n)
    grads = np.einsum("nti,snto->snio", a, u)  # per-example gradients, summed over t
    s_exact = np.mean((q_in.T @ grads @ q_out) ** 2, axis=(0, 1))
    ap, up = a @ q_in, u @ q_out
    s_location = np.einsum("nti,snto->io", ap**2, up**2) / (samples * n)

    def f32(*vs):
        return tuple(jnp.asarray(v, jnp.float32) for v in vs)

    got_phi, got_psi = jit(curvature.tkfac_moments)(*f32(a, u))
    got_exact = jit(rescale.per_example)(*f32(a, u, q_in, q_out))
    got_location = jit(rescale.per_location)(*f32(ap, up))
    for got, want in [
        (got_phi, m_phi),
        (got_psi, m_psi),
        (got_exact, s_exact),
        (got_location, s_location),
    ]:
        scale = np.max(np.abs(want))
        assert 1e8 < scale < 1e12  # representable, though a^2 is not
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-5 * scale)


def test_precondition_is_finite_for_gradients_near_the_float_maximum():
    """Q^T g Q overflows when |g|_F exceeds the float maximum; here P(g) = g / 10 fits."""
    g = np.full((4, 3), 0.5 * MAX32)
    hadamard = 0.5 * np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    q_out = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
    d = np.full((4, 3), 10.0)  # a constant D: P(g) = g / 10 in any basis
    got = jit(precondition.precondition)(
        *(jnp.asarray(v, jnp.float32) for v in (g, hadamard, q_out, d))
    )
    np.testing.assert_allclose(np.asarray(got, np.float64), g / 10, rtol=1e-5)


@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e19])
def test_clip_scale_matches_float64_when_the_quadratic_overflows(magnitude):
    """g ~ 1e19, P(g) = g / 1e-3: <P(g), g> ~ 1e41 overflows float32; the scale ~ 1e-21 fits."""
    rng = np.random.default_rng(4)
    grads = {k: magnitude * rng.normal(size=(3, 2)) for k in ("a", "b")}
    pre = {k: g / 1e-3 for k, g in grads.items()}
    lr = 0.5
    quadratic = lr**2 * sum(np.vdot(pre[k], grads[k]) for k in grads)
    want = min(1.0, np.sqrt(KAPPA / quadratic))
    got = float(
        jit(precondition.norm_constraint_scale)(
            {k: jnp.asarray(v, jnp.float32) for k, v in pre.items()},
            {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()},
            KAPPA,
            lr,
        )
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got**2 * quadratic <= KAPPA * (1 + 1e-5)


def test_clip_scale_sums_layers_of_very_different_magnitudes_as_float64_does():
    """Each layer's <P(g), g> is scaled by its own power of two: 1e38 beside 1e-38 is exact."""
    rng = np.random.default_rng(5)
    grads = {"big": 1e19 * rng.normal(size=(3, 2)), "small": 1e-19 * rng.normal(size=(2, 4))}
    pre = {"big": grads["big"] * 3.0, "small": grads["small"] / 1e-3}
    quadratic = sum(np.vdot(pre[k], grads[k]) for k in grads)
    want = np.sqrt(KAPPA / quadratic)
    as32 = {k: jnp.asarray(v, jnp.float32) for k, v in pre.items()}
    got = jit(precondition.norm_constraint_scale)(
        as32, {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}, KAPPA, 1.0
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    parts = {
        k: precondition.scaled_inner(as32[k], jnp.asarray(g, jnp.float32)) for k, g in grads.items()
    }
    # |u / U|, |v / V| < 4 term by term: the sum is bounded by its count, never overflows
    assert all(abs(float(parts[k].total)) < 16 * g.size for k, g in grads.items())
    assert [int(p.exponent) % 2 for p in parts.values()] == [0, 0]  # even: sqrt(2^E) exact


def test_clip_scale_is_zero_not_nan_for_non_finite_inputs():
    g = {"a": jnp.array([[1.0, jnp.inf]])}
    assert float(precondition.norm_constraint_scale(g, g, KAPPA, 1.0)) == 0.0


def test_rescale_update_never_takes_a_non_finite_initial_diagonal():
    """S_init = outer(1e30, 1e30) overflows: S restarts from the batch, or keeps the old S."""
    huge = Eigenbasis(jnp.eye(2), jnp.full(2, 1e30), jnp.eye(1), jnp.full(1, 1e30), None)
    old, batch = jnp.full((2, 1), 3.0), jnp.array([[1.0], [2.0]])
    nan = batch.at[0, 0].set(jnp.nan)
    yes, no = jnp.array(True), jnp.array(False)
    update = jit(rescale.update)
    np.testing.assert_array_equal(update(old, batch, huge, yes, 0.9), batch)
    np.testing.assert_array_equal(update(old, nan, huge, yes, 0.9), old)
    # Not a refresh: S_init is unused, S decays as usual.
    np.testing.assert_allclose(update(old, batch, huge, no, 0.5), 0.5 * (old + batch))
    # TKFAC: eigenvalues 1e20 with delta 2e20 (S_init = 5e19) fit, so S_init is taken.
    tkfac = huge._replace(eig_in=jnp.full(2, 1e20), eig_out=jnp.full(1, 1e20), delta=2e20)
    got = jit(rescale.update)(old, batch, tkfac, yes, 0.5)
    np.testing.assert_allclose(got, 0.5 * (5e19 + batch), rtol=1e-6)
