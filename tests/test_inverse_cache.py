"""KFAC and TKFAC precondition with cached damped inverse factors (docs/algorithms.md, s. 5).

For every factored rule (KFAC, pi-adjusted KFAC, TKFAC, and both with the trace-adaptive
``nu``), in float64 on a small MLP with fixed parameters and a new batch each step:

1. every update equals ``solve(damped block, grad)``, the block built densely from the
   state's eigenbasis and D, with and without (a never-binding) norm constraint;
2. between refreshes, with constant damping, the cached inverses are bit-identical from step
   to step and are read, not recomputed: doubling them in the state doubles the update;
3. a damping changed between two steps by ``optax.inject_hyperparams``, by a schedule or by
   the ``damping=`` extra argument takes effect on the same step, with no refresh due: the
   update is that of an optimizer built with the new value from the start, not the old one;
4. a damping drifting by a few ulps a step keeps the cache until D has moved by more than
   the tolerance from the inverses' own D, then refreshes it: D never strays further.

Then the pieces: the factored rule's vectors against the rule's D, the inverses against the
damped block, and the fallback to the eigenbasis (and its KL clip) for factors too
ill-conditioned for the float precision.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax
from tekfax import damping, eigenbasis, precondition
from tekfax.curvature import Factors
from tekfax.eigenbasis import Eigenbasis
from tekfax.hyperparams import Hyperparams
from tekfax.kronecker import DAMPING_ULPS, find_kronecker_state, schedule
from tekfax.precondition import DampedInverses
from tests.conftest import jit
from tests.models import MLP

pytestmark = pytest.mark.usefixtures("x64")
RTOL = 1e-9
LAMBDA = 1e-2
NU = 10.0  # above the small layers' traces, so the nu rules bind
# rule -> (preset, the hyperparameters that set its damping).
RULES = {
    "kfac": ("kfac", {"damping": LAMBDA}),
    "kfac_pi": ("kfac", {"damping": LAMBDA, "pi_adjusted": True}),
    "tkfac": ("tkfac", {"damping": LAMBDA}),
    "kfac_nu": ("kfac", {"nu": NU}),
    "tkfac_nu": ("tkfac", {"nu": NU}),
}
# Statistics every step; refreshes on steps 0 and 3 only, so steps 1 and 2 reuse the cache.
STATIC = {"curvature_every": 1, "eigen_every": 3, "rescale_every": 1}
STEPS = 4
KAPPA, LR = 1e-4, 0.5  # a norm constraint that binds on these batches


@functools.cache
def _batches():
    """Fixed float64 params and STEPS (grads, stats) from different inputs."""
    model = MLP(features=(5, 3))
    x0 = jnp.zeros((8, 4), jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0), x0))
    params = params["params"]

    @jit
    def capture(x, key):
        out = tekfax.loss_and_curvature(
            lambda p: model.apply({"params": p}, x), params, jnp.arange(8) % 3, rng=key
        )
        return out.grads, out.stats

    keys = jax.random.split(jax.random.key(1), 2 * STEPS)
    batches = [
        capture(jax.random.normal(keys[2 * t], (8, 4), jnp.float64), keys[2 * t + 1])
        for t in range(STEPS)
    ]
    return params, batches


def _scale_by(rule: str, **overrides):
    preset, hyper = RULES[rule]
    return getattr(tekfax, f"scale_by_{preset}")(**{**hyper, **STATIC, **overrides})


def _value_name(rule: str) -> str:
    return "nu" if "nu" in RULES[rule][1] else "damping"


def _run(update, state):
    """(updates, states) of STEPS updates from ``state`` on the shared batches."""
    _, batches = _batches()
    updates, states = [], []
    for grads, stats in batches:
        upd, state = update(grads, state, stats)
        updates.append(upd)
        states.append(state)
    return updates, states


def _layer(tree, name):
    g = tree[name]
    return np.asarray(jnp.concatenate([g["bias"][None], g["kernel"]]), np.float64)


def _dense_solve(layer, grad):
    """solve(Q diag(vec D) Q^T, vec g), Q = Q_in (x) Q_out (kernel layout, row-major vec)."""
    q = np.kron(np.asarray(layer.q_in), np.asarray(layer.q_out))
    block = q @ np.diag(np.asarray(layer.damped).ravel()) @ q.T
    return np.linalg.solve(block, grad.ravel()).reshape(grad.shape)


def _assert_solves(state, grads, updates, kappa=None):
    """Every layer's update is the dense solve, times the KL clip when ``kappa`` is set."""
    layers = find_kronecker_state(state).layers
    solved = {k: _dense_solve(v, _layer(grads, k)) for k, v in layers.items()}
    scale = 1.0
    if kappa is not None:
        quadratic = LR**2 * sum(np.vdot(solved[k], _layer(grads, k)) for k in layers)
        scale = min(1.0, np.sqrt(kappa / quadratic))
        assert scale < 1.0  # the clip binds
    for k in layers:
        np.testing.assert_allclose(_layer(updates, k), scale * solved[k], rtol=RTOL, atol=1e-12)


UNCLIPPED = 1e30  # a norm constraint that never binds: the clip factor is exactly 1


@functools.cache
def _update_fn(rule: str):
    """The jitted update of an optimizer built with damping (or nu) ``value`` and norm
    constraint ``kappa``, both traced: one compilation serves every value."""
    params, _ = _batches()

    def update(value, kappa, grads, state, stats):
        opt = _scale_by(rule, **{_value_name(rule): value}, norm_constraint=kappa, learning_rate=LR)
        return opt.update(grads, state, params, stats=stats)

    return jit(update)


def _bound(rule: str, value=None, kappa=UNCLIPPED):
    value = RULES[rule][1][_value_name(rule)] if value is None else value
    return functools.partial(_update_fn(rule), jnp.asarray(value), jnp.asarray(kappa))


@functools.cache
def _plain(rule: str, kappa=UNCLIPPED):
    """(updates, states) of STEPS updates from a fresh state."""
    params, _ = _batches()
    return _run(_bound(rule, kappa=kappa), _scale_by(rule).init(params))


@pytest.mark.parametrize("rule", RULES)
def test_every_clipped_update_is_the_scaled_dense_solve(rule):
    _, batches = _batches()
    updates, states = _plain(rule, KAPPA)
    for (grads, _), upd, state in zip(batches, updates, states, strict=True):
        _assert_solves(state, grads, upd, KAPPA)


@pytest.mark.parametrize("rule", RULES)
def test_inverses_are_cached_between_refreshes(rule):
    _, batches = _batches()
    updates, states = _plain(rule)
    for (grads, _), upd, state in zip(batches, updates, states, strict=True):
        _assert_solves(state, grads, upd)
    for name, first in states[0].layers.items():
        assert first.inv_in.shape == (first.q_in.shape[0],) * 2
        assert first.inv_out.shape == (first.q_out.shape[0],) * 2
        for t in (1, 2):  # no refresh, same damping: the very same arrays
            layer = states[t].layers[name]
            np.testing.assert_array_equal(layer.damped, first.damped)
            np.testing.assert_array_equal(layer.inv_in, first.inv_in)
            np.testing.assert_array_equal(layer.inv_out, first.inv_out)
        assert not np.array_equal(states[3].layers[name].inv_in, first.inv_in)  # refreshed
    # The cache is read, not recomputed: doubled inverses in the state double step 2.
    doubled = states[1]._replace(
        layers={k: v._replace(inv_in=2 * v.inv_in) for k, v in states[1].layers.items()}
    )
    got, state = _step(_bound(rule), doubled, 2)
    for k, layer in state.layers.items():
        np.testing.assert_array_equal(layer.inv_in, doubled.layers[k].inv_in)
        np.testing.assert_allclose(_layer(got, k), 2 * _layer(updates[2], k), rtol=1e-12)


def _step(update, state, t: int, *extra):
    """``update`` on batch ``t``: (updates, state)."""
    grads, stats = _batches()[1][t]
    return update(grads, state, stats, *extra)


def _fresh(rule: str, value: float):
    """Step 1's (update, state) of an optimizer built with damping (or nu) ``value``."""
    params, _ = _batches()
    update = _bound(rule, value)
    return _step(update, _step(update, _scale_by(rule).init(params), 0)[1], 1)


def _changed(rule: str, how: str, old: float, new: float):
    """Step 1's (update, state) when the damping (or nu) goes from ``old`` to ``new`` after
    step 0, by ``how``."""
    params, _ = _batches()
    preset, hyper = RULES[rule]
    name = _value_name(rule)
    factory = getattr(tekfax, f"scale_by_{preset}")
    kwargs = {**hyper, **STATIC, name: old}
    if how == "extra_arg":
        opt = factory(**kwargs)
        update = jit(lambda g, s, stats, d: opt.update(g, s, params, stats=stats, damping=d))
        return _step(update, _step(update, opt.init(params), 0, old)[1], 1, new)
    if how == "schedule":
        kwargs[name] = lambda count: jnp.where(count < 1, old, new)
    static = tuple(k for k in kwargs if k != name)
    opt = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    update = jit(lambda g, s, stats: opt.update(g, s, params, stats=stats))
    _, state = _step(update, opt.init(params), 0)
    if how == "inject":
        state = state._replace(hyperparams=dict(state.hyperparams, **{name: jnp.asarray(new)}))
    return _step(update, state, 1)


# Every rule through inject_hyperparams; the other two routes on two rules each (the
# change is detected on D, whichever route changed it). damping= sets lambda, not nu.
CHANGES = [(rule, "inject") for rule in RULES] + [
    ("kfac_pi", "schedule"),
    ("tkfac_nu", "schedule"),
    ("kfac", "extra_arg"),
    ("tkfac", "extra_arg"),
]


@pytest.mark.parametrize(("rule", "how"), CHANGES)
def test_a_damping_change_takes_effect_on_the_same_step(rule, how):
    assert not bool(schedule(jnp.array(1), Hyperparams(**STATIC)).eigen)  # no refresh due
    old = RULES[rule][1][_value_name(rule)]
    got, state = _changed(rule, how, old, 10 * old)
    want, want_state = _fresh(rule, 10 * old)
    stale, _ = _fresh(rule, old)
    layers = find_kronecker_state(state).layers
    for k, layer in layers.items():
        np.testing.assert_allclose(_layer(got, k), _layer(want, k), rtol=RTOL, atol=1e-14)
        assert not np.allclose(_layer(got, k), _layer(stale, k), rtol=1e-6, atol=0)
        for field in ("damped", "inv_in", "inv_out"):
            np.testing.assert_allclose(
                getattr(layer, field), getattr(want_state.layers[k], field), rtol=RTOL, atol=0
            )
    _assert_solves(state, _batches()[1][1][0], got)


def test_a_damping_drifting_by_rounding_steps_is_caught_once_it_has_moved():
    """lambda grows by a few ulps a step (count held at 1: no refresh). A step whose D is
    within DAMPING_ULPS of the cached inverses' D keeps both; the drift is measured from
    that D, not the last step's, so it is caught and D never strays beyond the tolerance."""
    eps = float(np.finfo(np.float64).eps)
    _, states = _plain("kfac")
    state, lam, kept, recomputed = states[0], LAMBDA, 0, 0
    rule = damping.choose_rule("kfac", False, False)
    for j in range(1, 9):
        lam *= 1 + j * eps
        previous = state
        _, state = _step(_bound("kfac", lam), state._replace(count=jnp.asarray(1, jnp.int32)), 1)
        for k, layer in state.layers.items():
            same = np.array_equal(layer.damped, previous.layers[k].damped)
            assert same == np.array_equal(layer.inv_in, previous.layers[k].inv_in)
            kept, recomputed = kept + same, recomputed + (not same)
            want = rule({k: layer.basis}, {k: None}, {k: False}, lam, None)[k]
            np.testing.assert_allclose(layer.damped, want, rtol=(DAMPING_ULPS + 4) * eps)
            _assert_inverts(layer)
    assert kept > 0 and recomputed > 0  # both branches ran


def _assert_inverts(layer):
    """kron(Inv_in, Inv_out) inverts the block of the state's own D."""
    q = np.kron(np.asarray(layer.q_in), np.asarray(layer.q_out))
    block = q @ np.diag(np.asarray(layer.damped).ravel()) @ q.T
    product = np.kron(np.asarray(layer.inv_in), np.asarray(layer.inv_out)) @ block
    np.testing.assert_allclose(product, np.eye(len(block)), atol=1e-12)


# --- the pieces ---------------------------------------------------------------------------


def _bases(seed: int, tkfac: bool) -> dict[str, Eigenbasis]:
    rng = np.random.default_rng(seed)
    estimates = {}
    for k, (d_in, d_out) in {"a": (4, 3), "b": (3, 2)}.items():
        x, y = rng.normal(size=(d_in, d_in + 1)), rng.normal(size=(d_out, d_out + 1))
        estimates[k] = Factors(jnp.asarray(x @ x.T), jnp.asarray(y @ y.T))
    return eigenbasis.refresh(estimates, tkfac)


@pytest.mark.parametrize("rule", RULES)
def test_factored_vectors_give_the_rules_d(rule):
    preset, hyper = RULES[rule]
    adaptive, pi = "nu" in hyper, hyper.get("pi_adjusted", False)
    bases = _bases(3, preset == "tkfac")
    args = (bases, {k: None for k in bases}, {"a": True, "b": False}, LAMBDA, NU)
    d = damping.choose_rule(preset, False, adaptive, pi)(*args)
    pairs = damping.choose_factored_rule(preset, False, adaptive, pi)(*args)
    for k, pair in pairs.items():
        assert pair.inp.shape == bases[k].eig_in.shape
        assert pair.out.shape == bases[k].eig_out.shape
        np.testing.assert_array_equal(jnp.outer(pair.inp, pair.out), d[k])
    assert damping.choose_factored_rule(preset, True, adaptive) is None  # eigen-corrected


def test_inverse_factors_invert_the_damped_block():
    basis = _bases(4, False)["a"]
    pair = damping.FactoredDamping(basis.eig_in + 0.1, basis.eig_out + 0.2)
    inv = precondition.damped_inverses(basis, pair)
    q = np.kron(np.asarray(basis.q_in), np.asarray(basis.q_out))
    block = q @ np.diag(np.asarray(pair.outer()).ravel()) @ q.T
    np.testing.assert_allclose(np.kron(inv.inp, inv.out) @ block, np.eye(len(block)), atol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_ill_conditioned_factors_fall_back_to_the_eigenbasis(dtype):
    """kappa_in = 1e8: eps kappa is about 12 in float32 (eigenbasis), 2e-8 in float64
    (inverses). Deliberately wrong (zero) inverses show which form ran."""
    rng = np.random.default_rng(5)
    q_in = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    basis = Eigenbasis(
        jnp.asarray(q_in, dtype),
        jnp.ones(3, dtype),
        jnp.eye(2, dtype=dtype),
        jnp.ones(2, dtype),
        None,
    )
    grads = {"l": jnp.asarray(rng.normal(size=(3, 2)), dtype)}
    wrong = {"l": DampedInverses(jnp.zeros((3, 3), dtype), jnp.zeros((2, 2), dtype))}
    for kappa, accurate in ((10.0, True), (1e8, dtype == jnp.float64)):
        d = {"l": jnp.outer(jnp.asarray([1.0, 2.0, kappa], dtype), jnp.ones(2, dtype))}
        assert bool(precondition.inverses_are_accurate(d["l"])) == accurate
        got = precondition.precondition_factored(grads, {"l": basis}, d, wrong)["l"]
        want = 0.0 if accurate else precondition.precondition_layers(grads, {"l": basis}, d)["l"]
        np.testing.assert_array_equal(got, want)
        if not accurate:  # the KL clip in the eigenbasis: that of precondition_layers
            kappa_clip = 1e-8  # binds
            got = precondition.precondition_factored(grads, {"l": basis}, d, wrong, kappa_clip)
            want = precondition.precondition_layers(grads, {"l": basis}, d, kappa_clip)
            rtol = 8 * float(jnp.finfo(dtype).eps)  # sum (Y / sqrt(D))^2 against sum X Y
            np.testing.assert_allclose(got["l"], want["l"], rtol=rtol)
            unclipped = precondition.precondition_layers(grads, {"l": basis}, d)["l"]
            assert np.max(np.abs(want["l"])) < 0.5 * np.max(np.abs(unclipped))  # it binds


def test_one_ill_conditioned_layer_sends_every_layer_to_the_eigenbasis():
    """One conditional per step: a well-conditioned layer beside an ill-conditioned one is
    preconditioned in the eigenbasis too (its deliberately wrong inverses are not used);
    alone, the same layer uses them."""
    rng = np.random.default_rng(6)
    q_in = jnp.asarray(np.linalg.qr(rng.normal(size=(3, 3)))[0], jnp.float32)
    f32 = jnp.float32  # the test module runs with float64 enabled
    basis = Eigenbasis(q_in, jnp.ones(3, f32), jnp.eye(2, dtype=f32), jnp.ones(2, f32), None)
    grads = {k: jnp.asarray(rng.normal(size=(3, 2)), f32) for k in ("good", "bad")}
    wrong = {k: DampedInverses(jnp.zeros((3, 3), f32), jnp.zeros((2, 2), f32)) for k in grads}
    d = {
        k: jnp.outer(jnp.asarray([1.0, 2.0, c], f32), jnp.ones(2, f32))
        for k, c in (("good", 10.0), ("bad", 1e8))
    }
    bases = {k: basis for k in grads}
    got = precondition.precondition_factored(grads, bases, d, wrong)
    want = precondition.precondition_layers(grads, bases, d)
    for k in grads:
        np.testing.assert_array_equal(got[k], want[k])
    alone = precondition.precondition_factored({"good": grads["good"]}, bases, d, wrong)
    np.testing.assert_array_equal(alone["good"], 0.0)
