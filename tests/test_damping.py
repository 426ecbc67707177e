"""Tests for tekfax.damping and the preconditioning it feeds (docs/algorithms.md, sections 4 and 5).

For every preset and damping rule, on a model with convolutions, Dense layers and a dead
layer (zero inputs, so delta = 0):

1. the preconditioned gradient equals, layer by layer, ``solve(damped_block, grad)``;
2. the damped block equals the section 4 formula, built here from the held factor
   estimates (eigen_every=1, so the cached decomposition is fresh);
3. every update is finite, the dead layer's included.

Then the unit functions of :mod:`tekfax.damping` on random inputs against direct formulas.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tekfax import damping
from tests import _formulas as fm

f64 = pytest.mark.usefixtures("x64")
RTOL = 1e-10
LAMBDA = 1e-2
BASE = (("eigen_every", 1), ("rescale_ema", 0.0))

# rule -> (preset, keyword arguments); the trace-adaptive rules (nu) are run separately.
FIXED_RULES = {
    "kfac": ("kfac", (("damping", LAMBDA),)),
    "kfac_pi_adjusted": ("kfac", (("damping", LAMBDA), ("pi_adjusted", True))),
    "tkfac_nor": ("tkfac", (("damping", LAMBDA),)),
    "ekfac": ("ekfac", (("damping", LAMBDA),)),
    "tekfac": ("tekfac", (("damping", LAMBDA),)),
}


def _is_conv(out) -> dict[str, bool]:
    return {name: leaf.meta.is_conv for name, leaf in fm.flat(out.stats).items()}


def _safe(num, den):
    return num / den if den > 0 else 0.0 * num


def _adaptive_deltas(deltas: dict, is_conv: dict, nu: float) -> tuple[dict, float]:
    """TKFAC Eq. 15-16: conv delta~ = max(nu, delta); beta = max conv delta~/delta (1 when
    there is no conv layer; a dead conv layer counts 1); dense delta~ = beta max(nu, delta)."""
    beta = max([1.0] + [max(nu, d) / d for k, d in deltas.items() if is_conv[k] and d > 0])
    tilde = {k: max(nu, d) * (1.0 if is_conv[k] else beta) for k, d in deltas.items()}
    return tilde, beta


def _eye(n):
    return np.eye(n)


def _expected_blocks(rule: str, state, is_conv: dict, nu: float | None = None) -> dict:
    """The damped block of every layer from the section 4 formulas and the held estimates."""
    blocks, deltas = {}, {}
    for name, layer in state.layers.items():
        f_in, f_out = fm.held_estimates(state, name)
        if layer.rescale is None:
            deltas[name] = np.trace(f_in)  # TKFAC: tr M_Phi (= tr M_Psi)
        else:
            deltas[name] = np.sum(np.asarray(layer.rescale, np.float64))  # tr S = tr F
    if nu is not None:
        tilde, _ = _adaptive_deltas(deltas, is_conv, nu)
    root = np.sqrt(LAMBDA)
    for name, layer in state.layers.items():
        f_in, f_out = fm.held_estimates(state, name)
        d_in, d_out = f_in.shape[0], f_out.shape[0]
        delta = deltas[name]
        if rule == "kfac":  # (A + sqrt(l) I) (x) (G + sqrt(l) I)
            blocks[name] = np.kron(f_in + root * _eye(d_in), f_out + root * _eye(d_out))
        elif rule == "kfac_pi_adjusted":  # pi = sqrt((tr A / d_in) / (tr G / d_out)), 1 if 0
            tr_a, tr_g = np.trace(f_in) / d_in, np.trace(f_out) / d_out
            pi = np.sqrt(tr_a / tr_g) if tr_a > 0 and tr_g > 0 else 1.0
            blocks[name] = np.kron(f_in + pi * root * _eye(d_in), f_out + root / pi * _eye(d_out))
        elif rule == "tkfac_nor":  # sqrt(delta) Phi = M_Phi / sqrt(delta)
            scale = _safe(1.0, np.sqrt(delta))
            blocks[name] = np.kron(
                scale * f_in + root * _eye(d_in), scale * f_out + root * _eye(d_out)
            )
        elif rule == "tkfac_new":  # Phi~ = sqrt(d~) Phi + d~/d_in I, Psi~ likewise
            phi, psi, t = _safe(f_in, delta), _safe(f_out, delta), tilde[name]
            blocks[name] = np.kron(
                np.sqrt(t) * phi + t / d_in * _eye(d_in),
                np.sqrt(t) * psi + t / d_out * _eye(d_out),
            )
        else:
            block = fm.eigen_block(layer.q_in, layer.q_out, layer.rescale)  # Q diag(S) Q^T
            dim = d_in * d_out
            if rule in ("ekfac", "tekfac"):  # S + lambda
                blocks[name] = block + LAMBDA * _eye(dim)
            else:  # S~ = (d~/delta) S + d~/dim, and d~/dim for a dead layer
                t = tilde[name]
                blocks[name] = _safe(t, delta) * block + t / dim * _eye(dim)
    return blocks


def _check_rule(rule: str, state, updates, out, nu=None, rtol=RTOL):
    """Checks 1-3 of the module docstring for every layer."""
    damped = fm.damped_blocks(state)
    expected = _expected_blocks(rule, state, _is_conv(out), nu)
    for name in state.layers:
        grad = fm.layer_grad(out.grads, name)
        update = fm.layer_grad(updates, name)
        assert np.all(np.isfinite(update)) and np.all(np.isfinite(damped[name])), name
        fm.assert_close(damped[name], expected[name], rtol, err_msg=f"{rule} {name}")
        want = np.linalg.solve(np.asarray(damped[name], np.float64), grad)
        fm.assert_close(update, want, 1e3 * rtol, err_msg=f"{rule} {name}")
    # The dead layer: zero inputs, zero gradient, zero update.
    if "dead" in state.layers:
        np.testing.assert_array_equal(fm.layer_grad(out.grads, "dead"), 0.0)
        np.testing.assert_array_equal(fm.layer_grad(updates, "dead"), 0.0)


@f64
@pytest.mark.parametrize("rule", list(FIXED_RULES))
def test_fixed_damping_solve_and_formula(rule):
    preset, kwargs = FIXED_RULES[rule]
    state, updates, out = fm.one_update("dampnet", preset, kwargs + BASE)
    assert float(state.layers["dead"].factor_in.sum()) == 0.0  # the dead layer is dead
    _check_rule(rule, state, updates, out)


@functools.cache
def _nu_update(preset: str):
    """A jitted update taking nu as an argument, so each nu reuses one compilation."""
    opt = fm.PRESETS[preset](nu=1.0, **dict(BASE))

    def update(g, s, stats, nu):
        return fm.PRESETS[preset](nu=nu, **dict(BASE)).update(g, s, stats=stats)

    return opt, fm.jit(update)


def _run_nu(model_key: str, preset: str, nu: float):
    _, _, params, _, _ = fm.problem(model_key)
    out = fm.capture_fn(model_key)(params, *fm.batch(model_key, 0), None)
    opt, update = _nu_update(preset)
    updates, state = update(out.grads, fm.jit(opt.init)(params), out.stats, jnp.asarray(nu))
    return state, updates, out


def _deltas(state) -> dict[str, float]:
    """delta per layer: tr M_Phi (TKFAC) or tr S (TEKFAC)."""
    return {
        k: float(np.sum(v.rescale)) if v.rescale is not None else float(v.delta)
        for k, v in state.layers.items()
    }


@f64
@pytest.mark.parametrize("rule, preset", [("tkfac_new", "tkfac"), ("tekfac_new", "tekfac")])
@pytest.mark.parametrize("case", ["beta_above_one", "nu_below_every_delta", "no_conv_layer"])
def test_trace_adaptive_damping_solve_and_formula(rule, preset, case):
    """TKFAC_new (Eq. 15-16) and TEKFAC_new (Eq. 3.5 reading), nu picked from the deltas."""
    model_key = "mlp" if case == "no_conv_layer" else "dampnet"
    probe, _, out = _run_nu(model_key, preset, 1.0)  # deltas do not depend on nu
    deltas, is_conv = _deltas(probe), _is_conv(out)
    live = {k: d for k, d in deltas.items() if d > 0}
    conv = [d for k, d in live.items() if is_conv[k]]
    if case == "beta_above_one":  # nu between the two live conv layers' deltas
        nu = float(np.sqrt(min(conv) * max(conv)))
    elif case == "nu_below_every_delta":
        nu = 1e-3 * min(live.values())
    else:  # between the two Dense layers' deltas
        nu = float(np.sqrt(min(live.values()) * max(live.values())))
    tilde, beta = _adaptive_deltas(deltas, is_conv, nu)
    # Both branches of max(nu, delta) are exercised where the case allows it.
    if case == "beta_above_one":  # both branches of max in conv and in Dense layers
        assert beta > 1 and min(conv) < nu < max(conv)
        dense = [d for k, d in live.items() if not is_conv[k]]
        assert min(dense) < nu < max(dense)
    elif case == "nu_below_every_delta":
        assert beta == 1 and all(tilde[k] == d for k, d in live.items())
    else:
        assert not any(is_conv.values()) and beta == 1
        assert min(live.values()) < nu < max(live.values())
    if model_key == "dampnet":
        assert deltas["dead"] == 0 and tilde["dead"] == nu
    state, updates, out = _run_nu(model_key, preset, nu)
    _check_rule(rule, state, updates, out, nu=nu)


@f64
@pytest.mark.parametrize("rule", list(FIXED_RULES) + ["tkfac_new", "tekfac_new"])
def test_dead_layer_gives_finite_updates(rule):
    """Zero inputs (delta = 0): finite, positive-definite damped block and a zero update."""
    if rule in FIXED_RULES:
        preset, kwargs = FIXED_RULES[rule]
        state, updates, out = fm.one_update("dampnet", preset, kwargs + BASE)
    else:
        state, updates, out = _run_nu("dampnet", rule.split("_")[0], 1.0)
    dead = state.layers["dead"]
    np.testing.assert_array_equal(dead.factor_in, 0.0)  # a = 0, so A = M_Phi = 0
    if dead.delta is not None:
        assert float(dead.delta) == 0.0
    if dead.rescale is not None:
        np.testing.assert_array_equal(dead.rescale, 0.0)
    block = fm.damped_blocks(state)["dead"]
    assert np.all(np.isfinite(block)) and np.linalg.eigvalsh(block).min() > 0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(updates))
    np.testing.assert_array_equal(fm.layer_grad(updates, "dead"), 0.0)


def test_damping_solve_float32():
    """float32: the update solves the damped system to a loose tolerance, dead layer finite."""
    state, updates, out = fm.one_update("dampnet", "tekfac", dtype_name="float32")
    lam = dict(fm.EXACT)["damping"]
    damped = fm.damped_blocks(state)
    for name in state.layers:
        assert damped[name].dtype == jnp.float32
        grad, update = fm.layer_grad(out.grads, name), fm.layer_grad(updates, name)
        assert np.all(np.isfinite(update))
        want = np.linalg.solve(np.asarray(damped[name], np.float64), grad)
        fm.assert_close(update, want, 1e-3, err_msg=name)
        fm.assert_close(
            damped[name],
            fm.eigen_block(
                state.layers[name].q_in, state.layers[name].q_out, state.layers[name].rescale
            )
            + lam * np.eye(len(grad)),
            1e-5,
            err_msg=name,
        )


# ----------------------------------------------------------------------------- unit functions


def _random_psd(rng, n, rank=None):
    b = rng.normal(size=(n, rank or n))
    return b @ b.T


@f64
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factored_rules_match_kronecker_formulas(seed):
    """factored / tkfac_normal / trace_adaptive_factored are eig(kron(.,.)) of section 4."""
    rng = np.random.default_rng(seed)
    d_in, d_out = 3 + seed, 2 + seed
    a, g = _random_psd(rng, d_in), _random_psd(rng, d_out, rank=1)  # G singular
    ea, qa = np.linalg.eigh(a)
    eg, qg = np.linalg.eigh(g)
    eg = np.clip(eg, 0, None)
    lam = 10.0 ** rng.uniform(-4, 0)
    root = np.sqrt(lam)

    def as_block(d):
        return fm.eigen_block(qa, qg, np.asarray(d))

    def run(fn, *args):
        return np.asarray(fn(*(jnp.asarray(x) for x in args)))

    fm.assert_close(
        as_block(run(damping.factored, ea, eg, lam)),
        np.kron(a + root * np.eye(d_in), qg @ np.diag(eg) @ qg.T + root * np.eye(d_out)),
        RTOL,
    )
    g = qg @ np.diag(eg) @ qg.T
    pi = np.sqrt((np.trace(a) / d_in) / (np.trace(g) / d_out))
    fm.assert_close(run(damping.pi_factor, ea, eg), pi, RTOL)
    fm.assert_close(
        as_block(run(damping.factored, ea, eg, lam, pi)),
        np.kron(a + pi * root * np.eye(d_in), g + root / pi * np.eye(d_out)),
        RTOL,
    )
    delta = np.trace(a)  # eig_in / eig_out are eigenvalues of M_Phi, M_Psi
    fm.assert_close(
        as_block(run(damping.tkfac_normal, ea, eg, delta, lam)),
        np.kron(
            a / np.sqrt(delta) + root * np.eye(d_in), g / np.sqrt(delta) + root * np.eye(d_out)
        ),
        RTOL,
    )
    phi, psi = ea / np.sum(ea), eg / np.sum(eg)  # unit-trace factors
    t = 10.0 ** rng.uniform(-2, 2)
    fm.assert_close(
        as_block(run(damping.trace_adaptive_factored, phi, psi, t)),
        np.kron(
            np.sqrt(t) * a / np.trace(a) + t / d_in * np.eye(d_in),
            np.sqrt(t) * g / np.trace(g) + t / d_out * np.eye(d_out),
        ),
        RTOL,
    )


@f64
def test_rescale_rules_and_guards():
    rng = np.random.default_rng(5)
    s = rng.uniform(0, 2, size=(4, 3))
    lam, t = 0.3, 7.0
    fm.assert_close(damping.rescale_fixed(jnp.asarray(s), lam), s + lam, RTOL)
    fm.assert_close(damping.rescale_trace(jnp.asarray(s), t), t / s.sum() * s + t / s.size, RTOL)
    # delta~ = delta: S + tr(S)/dim, the mean-eigenvalue damping.
    fm.assert_close(damping.rescale_trace(jnp.asarray(s), s.sum()), s + s.sum() / s.size, RTOL)
    # Dead layer: S = 0 gives S~ = delta~/dim, finite.
    fm.assert_close(damping.rescale_trace(jnp.zeros((4, 3)), t), np.full((4, 3), t / 12), RTOL)
    # safe_div and pi_factor guards.
    fm.assert_close(
        damping.safe_div(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([2.0, 0.0, -1.0])),
        [0.5, 0.0, 0.0],
        RTOL,
    )
    assert float(damping.pi_factor(jnp.zeros(3), jnp.ones(2))) == 1.0
    assert float(damping.pi_factor(jnp.ones(3), jnp.zeros(2))) == 1.0
    zero = np.asarray(damping.tkfac_normal(jnp.zeros(3), jnp.zeros(2), 0.0, lam))
    fm.assert_close(zero, np.full((3, 2), lam), RTOL)


@f64
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_adaptive_deltas_against_the_rule(seed):
    rng = np.random.default_rng(seed)
    names = [f"l{i}" for i in range(5)]
    deltas = {k: float(10.0 ** rng.uniform(-3, 1)) for k in names}
    is_conv = {k: bool(rng.integers(0, 2)) for k in names}
    if seed == 0:
        is_conv = dict.fromkeys(names, False)  # no conv layer: beta = 1
    if seed == 1:
        deltas["l0"], is_conv["l0"] = 0.0, True  # a dead conv layer
    nu = float(np.median(list(deltas.values())))
    got = damping.adaptive_deltas(
        {k: jnp.asarray(d) for k, d in deltas.items()}, is_conv, jnp.asarray(nu)
    )
    want, beta = _adaptive_deltas(deltas, is_conv, nu)
    for k in names:
        fm.assert_close(got[k], want[k], RTOL, err_msg=k)
    if seed == 0:
        assert beta == 1.0
