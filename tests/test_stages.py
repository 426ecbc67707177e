"""Each stage of ``scale_by_kronecker``, alone, against a dense numpy reference.

The stages are pure functions over named per-layer state (docs/algorithms.md, sections 3-5):
curvature estimate (moving averages, rejecting a non-finite batch), eigenbasis refresh,
rescale (S), damping and preconditioning. Here each one is called directly on random
inputs in float64 and checked against the formula written out with dense matrices
(Kronecker products, ``numpy.linalg``), independently of the other stages.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax
from tekfax import curvature, damping, eigenbasis, precondition, rescale
from tekfax.curvature import Factors
from tekfax.eigenbasis import Eigenbasis
from tekfax.guard import find_guard_state
from tekfax.hyperparams import Hyperparams
from tekfax.kronecker import LayerCurvature, find_kronecker_state, schedule
from tests.conftest import jit
from tests.models import MLP

pytestmark = pytest.mark.usefixtures("x64")
RTOL = 1e-10
LAMBDA, NU = 1e-2, 8.0  # nu between the layers' deltas: beta > 1 for some rules
# name -> (d_in, d_out, is_conv); "dead" has all-zero factors (delta = 0).
LAYERS = {
    "conv": (4, 3, True),
    "dense": (5, 2, False),
    "dense2": (5, 2, False),
    "dead": (3, 2, False),
}


def _psd(rng, d, rank=None):
    x = rng.normal(size=(d, rank or d + 2))
    return x @ x.T / x.shape[1]


def _factors(seed=0) -> dict[str, Factors]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (d_in, d_out, _) in LAYERS.items():
        scale = 0.0 if name == "dead" else 1.0
        out[name] = Factors(
            jnp.asarray(scale * _psd(rng, d_in)), jnp.asarray(scale * _psd(rng, d_out))
        )
    return out


def _kron_basis(b: Eigenbasis) -> np.ndarray:
    """Q = Q_in (x) Q_out: kernel layout (d_in, d_out) flattens row-major to vec."""
    return np.kron(np.asarray(b.q_in), np.asarray(b.q_out))


def _assert_close(got, want, rtol=RTOL, atol=1e-12):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)


# --- 1. curvature estimate ---------------------------------------------------------------


def test_moving_average_rejects_a_non_finite_batch_and_bias_corrects():
    decay = 0.9
    batches = [_factors(seed) for seed in range(4)]
    batches[2] = dict(
        batches[2],
        dense=Factors(batches[2]["dense"].inp.at[0, 0].set(jnp.nan), batches[2]["dense"].out),
    )
    sums = {k: Factors(jnp.zeros_like(f.inp), jnp.zeros_like(f.out)) for k, f in batches[0].items()}
    weight = jnp.zeros([], jnp.float64)
    for batch in batches:
        sums, accepted = curvature.moving_average(sums, batch, decay)
        weight = curvature.ema_weight(weight, accepted, decay)
        assert bool(accepted) == (batch is not batches[2])
    kept = [batches[i] for i in (0, 1, 3)]  # the NaN batch is left out of every layer
    coefficients = [(1 - decay) * decay ** (len(kept) - 1 - i) for i in range(len(kept))]
    _assert_close(weight, sum(coefficients))
    for k in sums:
        est = curvature.estimate(sums[k], weight)
        for side in (0, 1):
            want = sum(c * np.asarray(b[k][side]) for c, b in zip(coefficients, kept, strict=True))
            _assert_close(est[side], want / sum(coefficients))


def test_estimate_before_any_batch_is_zero():
    zero = Factors(jnp.zeros((2, 2)), jnp.zeros((1, 1)))
    est = curvature.estimate(zero, jnp.zeros([]))
    assert np.all(np.asarray(est.inp) == 0) and np.all(np.isfinite(np.asarray(est.out)))


# --- 2. eigenbasis refresh ---------------------------------------------------------------


@pytest.mark.parametrize("with_trace", [False, True])
def test_refresh_reproduces_the_estimates(with_trace):
    estimates = _factors(1)
    bases = eigenbasis.refresh(estimates, with_trace)
    assert set(bases) == set(estimates)
    for k, b in bases.items():
        assert isinstance(b, Eigenbasis)
        for q, eig, m in (
            (b.q_in, b.eig_in, estimates[k].inp),
            (b.q_out, b.eig_out, estimates[k].out),
        ):
            q, eig = np.asarray(q), np.asarray(eig)
            assert np.all(eig >= 0)
            _assert_close(q.T @ q, np.eye(len(eig)), atol=1e-12)
            _assert_close(q @ np.diag(eig) @ q.T, m, atol=1e-12)
        if with_trace:
            _assert_close(b.delta, np.trace(np.asarray(estimates[k].inp)))
        else:
            assert b.delta is None


# --- 3. rescale --------------------------------------------------------------------------


@pytest.mark.parametrize("tkfac", [False, True])
def test_rescale_reinitialises_to_the_uncorrected_diagonal_on_refresh(tkfac):
    estimates = _factors(2)
    bases = eigenbasis.refresh(estimates, tkfac)
    for k, b in bases.items():
        d_in, d_out, _ = LAYERS[k]
        a, g = np.asarray(estimates[k].inp), np.asarray(estimates[k].out)
        block = np.kron(a, g)  # KFAC: A (x) G; TKFAC: M_Phi (x) M_Psi / delta
        if tkfac:
            block = block / np.trace(a) if np.trace(a) > 0 else 0 * block
        q = _kron_basis(b)
        s_init = np.diag(q.T @ block @ q).reshape(d_in, d_out)
        garbage = jnp.full((d_in, d_out), 7.0)
        batch = jnp.asarray(np.random.default_rng(3).random((d_in, d_out)))
        _assert_close(rescale.update(garbage, batch, b, jnp.array(True), 1.0), s_init, atol=1e-12)
        got = rescale.update(garbage, batch, b, jnp.array(True), 0.75)
        _assert_close(got, 0.75 * s_init + 0.25 * np.asarray(batch), atol=1e-12)
        # Not a refresh: the old S decays; a non-finite batch is rejected.
        _assert_close(rescale.update(garbage, batch, b, jnp.array(False), 0.5), 3.5 + 0.5 * batch)
        nan = batch.at[0, 0].set(jnp.nan)
        _assert_close(rescale.update(garbage, nan, b, jnp.array(False), 0.5), garbage)


# --- 4. damping --------------------------------------------------------------------------


def _tilde(deltas: dict, nu: float) -> dict:
    """TKFAC Eq. 15-16 / TEKFAC Eq. 3.4: conv max(nu, delta); dense beta max(nu, delta)."""
    ratios = [max(nu, d) / d for k, d in deltas.items() if LAYERS[k][2] and d > 0]
    beta = max([1.0] + ratios)
    return {k: max(nu, d) * (1.0 if LAYERS[k][2] else beta) for k, d in deltas.items()}


def _dense_damped(rule: str, estimates: dict, bases: dict, s: dict) -> dict:
    """The damped block of every layer, written with dense matrices (section 4)."""
    root, out = math.sqrt(LAMBDA), {}
    mats = {k: (np.asarray(f.inp), np.asarray(f.out)) for k, f in estimates.items()}
    if rule in ("kfac_nu", "tkfac_nu"):
        if rule == "kfac_nu":
            deltas = {k: np.trace(a) * np.trace(g) for k, (a, g) in mats.items()}
            units = {
                k: (a / np.trace(a), g / np.trace(g)) if np.trace(a) > 0 else (0 * a, 0 * g)
                for k, (a, g) in mats.items()
            }
        else:
            deltas = {k: np.trace(a) for k, (a, _) in mats.items()}
            units = {
                k: (a / d, g / d) if d > 0 else (0 * a, 0 * g)
                for (k, (a, g)), d in zip(mats.items(), deltas.values(), strict=True)
            }
        tilde = _tilde(deltas, NU)
        for k, (phi, psi) in units.items():
            t = tilde[k]
            out[k] = np.kron(
                np.sqrt(t) * phi + t / len(phi) * np.eye(len(phi)),
                np.sqrt(t) * psi + t / len(psi) * np.eye(len(psi)),
            )
        return out
    if rule in ("ekfac", "ekfac_nu"):
        blocks = {
            k: _kron_basis(b) @ np.diag(np.asarray(s[k]).ravel()) @ _kron_basis(b).T
            for k, b in bases.items()
        }
        if rule == "ekfac":
            return {k: m + LAMBDA * np.eye(len(m)) for k, m in blocks.items()}
        deltas = {k: np.trace(m) for k, m in blocks.items()}
        tilde = _tilde(deltas, NU)
        return {
            k: (tilde[k] / deltas[k] if deltas[k] > 0 else 0.0) * m
            + tilde[k] / len(m) * np.eye(len(m))
            for k, m in blocks.items()
        }
    for k, (a, g) in mats.items():
        eye_a, eye_g = np.eye(len(a)), np.eye(len(g))
        if rule == "tkfac":  # sqrt(delta) Phi = M_Phi / sqrt(delta)
            d = np.trace(a)
            a, g = (a / np.sqrt(d), g / np.sqrt(d)) if d > 0 else (0 * a, 0 * g)
        pi = 1.0
        if rule == "kfac_pi" and np.trace(a) > 0 and np.trace(g) > 0:
            pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
        out[k] = np.kron(a + pi * root * eye_a, g + root / pi * eye_g)
    return out


RULES = {  # rule -> (estimator, eigen_corrected, adaptive, pi_adjusted)
    "kfac": ("kfac", False, False, False),
    "kfac_pi": ("kfac", False, False, True),
    "tkfac": ("tkfac", False, False, False),
    "kfac_nu": ("kfac", False, True, False),
    "tkfac_nu": ("tkfac", False, True, False),
    "ekfac": ("kfac", True, False, False),
    "ekfac_nu": ("kfac", True, True, False),
}


@pytest.mark.parametrize("rule", RULES)
def test_damped_eigenvalues_are_those_of_the_dense_damped_block(rule):
    estimator, corrected, adaptive, pi_adjusted = RULES[rule]
    estimates = _factors(4)
    bases = eigenbasis.refresh(estimates, estimator == "tkfac")
    rng = np.random.default_rng(5)
    s = {
        k: jnp.asarray(rng.random((d_in, d_out)) * (k != "dead")) if corrected else None
        for k, (d_in, d_out, _) in LAYERS.items()
    }
    is_conv = {k: v[2] for k, v in LAYERS.items()}
    got = damping.choose_rule(estimator, corrected, adaptive, pi_adjusted)(
        bases, s, is_conv, LAMBDA, NU if adaptive else None
    )
    want = _dense_damped(rule, estimates, bases, s)
    for k, b in bases.items():
        q = _kron_basis(b)
        d = np.asarray(got[k]).ravel()
        assert got[k].dtype == b.eig_in.dtype
        _assert_close(np.sort(d), np.linalg.eigvalsh(want[k]), atol=1e-12)
        _assert_close(q @ np.diag(d) @ q.T, want[k], atol=1e-12)


# --- 5. preconditioning ------------------------------------------------------------------


@pytest.mark.parametrize("kappa", [None, 1e-3])
def test_precondition_equals_a_dense_solve(kappa):
    rng = np.random.default_rng(6)
    bases = eigenbasis.refresh(_factors(7), False)
    grads = {k: jnp.asarray(rng.normal(size=LAYERS[k][:2])) for k in bases}
    damped = {k: jnp.asarray(0.1 + rng.random(LAYERS[k][:2])) for k in bases}
    lr = 0.3
    got = precondition.precondition_layers(grads, bases, damped, kappa, lr)
    solved = {}
    for k, b in bases.items():
        q = _kron_basis(b)
        block = q @ np.diag(np.asarray(damped[k]).ravel()) @ q.T
        solved[k] = np.linalg.solve(block, np.asarray(grads[k]).ravel()).reshape(LAYERS[k][:2])
    scale = 1.0
    if kappa is not None:
        vg = sum(np.vdot(solved[k], np.asarray(grads[k])) for k in bases) * lr**2
        scale = min(1.0, np.sqrt(kappa / vg))
        assert scale < 1.0  # the clip is active here
    for k in bases:
        _assert_close(got[k], scale * solved[k], rtol=1e-9, atol=1e-12)


# --- the schedule and the named views of the state ---------------------------------------


def test_schedule_runs_each_stage_on_its_steps():
    hp = Hyperparams(curvature_every=3, eigen_every=4, rescale_every=2)
    for count in range(13):
        due = schedule(jnp.array(count), hp)
        assert bool(due.curvature) == (count % 3 == 0)
        assert bool(due.eigen) == (count % 4 == 0)
        assert bool(due.rescale) == (count % 4 == 0 or count % 2 == 0)


def test_layer_state_gives_named_views_and_keeps_its_flat_layout():
    opt = tekfax.scale_by_tekfac(damping=LAMBDA)
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    layer = opt.init(params).layers["Dense_0"]
    assert LayerCurvature._fields == (
        "factor_in",
        "factor_out",
        "q_in",
        "eig_in",
        "q_out",
        "eig_out",
        "delta",
        "rescale",
        "damped",
        "peak_mean",
        "inv_in",
        "inv_out",
    )
    assert layer.factors == Factors(layer.factor_in, layer.factor_out)
    assert layer.basis == Eigenbasis(
        layer.q_in, layer.eig_in, layer.q_out, layer.eig_out, layer.delta
    )
    assert layer.inverses is None  # eigen-corrected: preconditioned in the eigenbasis


def test_state_lookups_find_the_outermost_state_or_name_the_fix():
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    inner = tekfax.skip_non_finite(optax.inject_hyperparams(tekfax.kfac)(0.1, damping=LAMBDA))
    state = optax.chain(optax.identity(), tekfax.skip_non_finite(inner)).init(params)
    assert find_guard_state(state) is state[1]
    assert find_kronecker_state(state).layers["Dense_0"].factor_in.shape == (4, 4)
    assert find_guard_state(optax.sgd(0.1).init(params)) is None
    with pytest.raises(ValueError, match="no tekfax Kronecker state"):
        find_kronecker_state(optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="skip_non_finite"):
        tekfax.skipped_steps(optax.sgd(0.1).init(params))
    jax.tree.map(np.asarray, state)  # still a plain pytree


FLOOR_R, FLOOR_SMALL = 0.5, 1e-8
FLOOR_PRESETS = ("kfac", "tkfac", "ekfac", "tekfac")
FLOOR_SCALES = (1.0, 3.0, 0.1)  # the peak holds when curvature shrinks


def _floor_opt(preset, adaptive):
    return getattr(tekfax, f"scale_by_{preset}")(
        **({"nu": FLOOR_SMALL} if adaptive else {"damping": FLOOR_SMALL}),
        damping_floor=FLOOR_R,
        curvature_every=1,
        eigen_every=1,
        rescale_every=1,
    )


@functools.cache
def _floor_runs():
    """{(preset, adaptive): (states, blocks)}, stacked over the steps, of every floor case.

    All eight optimizers take their steps (a ``lax.scan``) inside one compiled program; the
    un-damped blocks are ``approx_fisher_blocks`` of each step's state, in the same program.
    """
    model = MLP(features=(2,))
    params = model.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(np.stack([scale * rng.normal(size=(6, 3)) for scale in FLOOR_SCALES]))
    cases = [(preset, adaptive) for preset in FLOOR_PRESETS for adaptive in (False, True)]

    def run_all(params, xs):
        runs = {}
        for preset, adaptive in cases:
            opt = _floor_opt(preset, adaptive)

            def step(state, inputs, opt=opt):
                x, key = inputs
                out = tekfax.loss_and_curvature(
                    lambda p: model.apply({"params": p}, x), params, jnp.arange(6) % 2, rng=key
                )
                _, state = opt.update(out.grads, state, params, stats=out.stats)
                return state, (state, tekfax.diagnostics.approx_fisher_blocks(state))

            keys = jax.vmap(jax.random.key)(jnp.arange(len(FLOOR_SCALES)))
            runs[f"{preset}-{adaptive}"] = jax.lax.scan(step, opt.init(params), (xs, keys))[1]
        return runs

    runs = jit(run_all)(params, xs)
    return {case: runs[f"{case[0]}-{case[1]}"] for case in cases}


@pytest.mark.parametrize("adaptive", [False, True], ids=["lambda", "nu"])
@pytest.mark.parametrize("preset", FLOOR_PRESETS)
def test_relative_floor_raises_lambda_to_r_times_the_peak_mean_eigenvalue(preset, adaptive):
    """D equals the plain rule at lambda_eff = max(lambda, r max_t tr(F_hat_t)/dim) (with
    ``nu``: at nu_eff = max(nu, r max_t tr(F_hat_t))), the trace of each step's undamped block
    computed densely from the state. The eight cases' three steps run in one compiled
    program (the same updates as one at a time: only the compilation is shared)."""
    r, small = FLOOR_R, FLOOR_SMALL
    rule = damping.choose_rule(
        "tkfac" if preset.startswith("t") else "kfac", preset.endswith("ekfac"), adaptive
    )
    states, blocks = _floor_runs()[preset, adaptive]
    peak = 0.0
    for step in range(len(FLOOR_SCALES)):
        state = jax.tree.map(lambda v, step=step: v[step], states)
        ((name, layer),) = state.layers.items()
        block = np.asarray(blocks[name][step])
        peak = max(peak, np.trace(block) / block.shape[0])
        _assert_close(layer.peak_mean, peak, rtol=1e-8)
        basis, s, conv = {name: layer.basis}, {name: layer.rescale}, {name: False}
        if adaptive:
            want = rule(basis, s, conv, None, max(small, r * peak * block.shape[0]))
        else:
            want = rule(basis, s, conv, max(small, r * peak), None)
        _assert_close(layer.damped, want[name], rtol=1e-8)
