"""The presets and aliases follow optax's conventions (docs/api.md, the scale_by_* split).

Every test runs for the four presets and for the trace-adaptive (``nu``) variants of TKFAC and
TEKFAC. References are built by hand from the pieces the contract names: the full alias is
``chain(scale_by_X, trace(momentum), scale_by_learning_rate(lr))``, so P(g) comes from
``scale_by_X`` and momentum and learning rate are applied in NumPy.

Most tests use a one-layer softmax regression so that each jitted update compiles quickly.
The cases and ``INTERVALS`` are the shared ones of ``conftest.py``: statistics on every step,
refreshes on steps 0 and 2 of the sequences.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax
from tests import _formulas as fm
from tests.conftest import CASES, DAMPING, EXACT, INTERVALS, PRESETS, make_optimizer, make_scale_by
from tests.conftest import LEARNING_RATE as LR
from tests.models import MLP

TAU = 0.9
STEPS = 3  # with the shared INTERVALS: refreshes on steps 0 and 2 of the sequences
N, D_IN, CLASSES = 16, 3, 4
# float32, programs that round differently: relative to each array's scale
# (tests/_formulas.assert_trees_close).
RTOL = 1e-5
MODEL = MLP(features=(CLASSES,))

all_cases = pytest.mark.parametrize("case", list(CASES))
all_presets = pytest.mark.parametrize("preset", PRESETS)


_scale_by = make_scale_by


def _alias(case: str, learning_rate=LR, **overrides) -> optax.GradientTransformationExtraArgs:
    return make_optimizer(case, learning_rate, **{"momentum": TAU, **overrides})


def _capture(params, x, y, rng):
    return tekfax.loss_and_curvature(lambda p: MODEL.apply({"params": p}, x), params, y, rng=rng)


def _batch(k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    kx, ky, kr = jax.random.split(jax.random.key(100 + k), 3)
    x = jax.random.normal(kx, (N, D_IN)) * (1.0 + k)
    return x, jax.random.randint(ky, (N,), 0, CLASSES), kr


@functools.cache
def _data():
    """Fixed params and STEPS + 1 different (grads, stats) pairs at those params."""
    params = MODEL.init(jax.random.key(0), jnp.zeros((1, D_IN)))["params"]
    capture = jax.jit(_capture)
    batches = []
    for k in range(STEPS + 1):
        out = capture(params, *_batch(k))
        batches.append((out.grads, out.stats))
    return params, batches


@functools.cache
def _jitted(case: str, kind: str):
    """(optimizer, jitted update) shared between tests: kind is "scale_by" or "alias"."""
    opt = _scale_by(case) if kind == "scale_by" else _alias(case)
    return opt, jax.jit(opt.update)


def _run(update, state, steps: int = STEPS):
    params, batches = _data()
    updates = []
    for grads, stats in batches[:steps]:
        u, state = update(grads, state, params, stats=stats)
        updates.append(u)
    return updates, state


@functools.cache
def _preconditioned(case: str) -> list:
    """P(g_k) of scale_by_X over the sequence, as float64 NumPy trees."""
    params, _ = _data()
    opt, update = _jitted(case, "scale_by")
    updates, _ = _run(update, opt.init(params))
    return [jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), u) for u in updates]


def _tree_vdot(a, b) -> float:
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return float(
        sum(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in leaves)
    )


def _assert_trees_differ(a, b):
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)]) for t in (a, b))
    assert np.max(np.abs(a - b)) > 1e-3 * np.max(np.abs(b)), "expected the updates to differ"


# --- extra arguments -------------------------------------------------------------------


@all_cases
@pytest.mark.parametrize("kind", ["scale_by", "alias"])
def test_update_without_stats_says_how_to_get_them(case, kind):
    params, batches = _data()
    opt = _scale_by(case) if kind == "scale_by" else _alias(case)
    state = opt.init(params)
    with pytest.raises(ValueError, match="loss_and_curvature") as info:
        opt.update(batches[0][0], state, params)
    assert "stats=" in str(info.value)


@all_cases
@pytest.mark.parametrize("kind", ["scale_by", "alias"])
def test_other_extra_args_are_accepted_and_ignored(case, kind):
    """Extra keyword arguments leave the traced computation identical."""
    params, batches = _data()
    opt = _scale_by(case) if kind == "scale_by" else _alias(case)
    grads, stats = batches[0]
    state = opt.init(params)

    def trace(**extra_args):
        def update(grads, state, stats):
            return opt.update(grads, state, params, stats=stats, **extra_args)

        return str(jax.make_jaxpr(update)(grads, state, stats))

    assert trace(foo=1, bar=jnp.ones(3), loss=jnp.zeros(())) == trace()


# --- composition -----------------------------------------------------------------------


def _run_all(opts: dict, steps: int = STEPS) -> dict:
    """:func:`_run` for several optimizers (case -> optimizer) through one jitted update.

    The cases are independent programs; tracing and compiling them together pays the fixed
    per-program cost once instead of once per case. Returns case -> updates per step.
    """

    @jax.jit
    def update(grads, states, params, stats):
        return {c: opt.update(grads, states[c], params, stats=stats) for c, opt in opts.items()}

    def pairs(grads, states, params, stats):
        out = update(grads, states, params, stats)
        return {c: u for c, (u, _) in out.items()}, {c: st for c, (_, st) in out.items()}

    params, _ = _data()
    updates, _ = _run(pairs, {c: opt.init(params) for c, opt in opts.items()}, steps)
    return {c: [u[c] for u in updates] for c in opts}


CHAIN_WEIGHT_DECAY = 0.3


def _chain_max_norm() -> float:
    _, batches = _data()
    return 0.5 * min(float(optax.tree.norm(g)) for g, _ in batches[:STEPS])


@functools.cache
def _chain_updates() -> dict:
    """case -> updates of chain(clip, scale_by_X, add_decayed_weights) over the sequence."""
    chains = {
        case: optax.chain(
            optax.clip_by_global_norm(_chain_max_norm()),
            _scale_by(case),
            optax.add_decayed_weights(CHAIN_WEIGHT_DECAY),
        )
        for case in CASES
    }
    return _run_all(chains)


@all_cases
def test_composes_in_chain_like_the_pieces_by_hand(case):
    params, batches = _data()
    max_norm, weight_decay = _chain_max_norm(), CHAIN_WEIGHT_DECAY
    chain_updates = _chain_updates()[case]  # every case's chain in one jitted program

    pre, update = _jitted(case, "scale_by")
    pre_state = pre.init(params)
    for k, (grads, stats) in enumerate(batches[:STEPS]):
        norm = float(optax.tree.norm(grads))
        assert norm > max_norm  # the clip is active
        clipped = jax.tree_util.tree_map(lambda g, n=norm: g * (max_norm / n), grads)
        p_grads, pre_state = update(clipped, pre_state, params, stats=stats)
        expected = jax.tree_util.tree_map(lambda u, p: u + weight_decay * p, p_grads, params)
        fm.assert_trees_close(chain_updates[k], expected, RTOL)


@all_cases
def test_alias_is_preconditioner_then_momentum_then_learning_rate(case):
    params, _ = _data()
    opt, update = _jitted(case, "alias")
    updates, _ = _run(update, opt.init(params))
    momentum = jax.tree_util.tree_map(np.zeros_like, _preconditioned(case)[0])
    for k, p_grads in enumerate(_preconditioned(case)):
        momentum = jax.tree_util.tree_map(lambda m, p: TAU * m + p, momentum, p_grads)
        expected = jax.tree_util.tree_map(lambda m: -LR * m, momentum)
        fm.assert_trees_close(updates[k], expected, RTOL)


# --- hyperparameters -------------------------------------------------------------------


@all_cases
def test_inject_hyperparams_matches_plain_and_follows_changes(case):
    preset, hyper = CASES[case]
    (damping_name,) = hyper
    params, batches = _data()
    injected = optax.inject_hyperparams(getattr(tekfax, preset))(
        learning_rate=LR, momentum=TAU, **INTERVALS, **EXACT, **hyper
    )
    inject_update = jax.jit(injected.update)
    state = injected.init(params)
    assert {"learning_rate", "momentum", damping_name} <= set(state.hyperparams)

    plain, plain_update = _jitted(case, "alias")
    plain_updates, plain_state = _run(plain_update, plain.init(params))
    inject_updates, state = _run(inject_update, state)
    for got, expected in zip(inject_updates, plain_updates, strict=True):
        fm.assert_trees_close(got, expected, RTOL)
    fm.assert_trees_close(state.inner_state, plain_state, RTOL)

    @jax.jit
    def rebuilt_update(values, grads, opt_state, stats):
        """A new optimizer constructed with the hyperparameters ``values``."""
        opt = getattr(tekfax, preset)(
            values["learning_rate"],
            momentum=values["momentum"],
            **INTERVALS,
            **EXACT,
            **{damping_name: values[damping_name]},
        )
        return opt.update(grads, opt_state, params, stats=stats)

    grads, stats = batches[STEPS]
    unchanged, _ = inject_update(grads, state, params, stats=stats)
    base = {"learning_rate": LR, "momentum": TAU, damping_name: hyper[damping_name]}
    for name, value in [
        (damping_name, 10 * hyper[damping_name]),
        ("learning_rate", 0.03),
        ("momentum", 0.5),
    ]:
        hyperparams = dict(state.hyperparams)
        hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
        got, _ = inject_update(grads, state._replace(hyperparams=hyperparams), params, stats=stats)
        values = {k: jnp.asarray(v, jnp.float32) for k, v in {**base, name: value}.items()}
        expected, _ = rebuilt_update(values, grads, state.inner_state, stats)
        fm.assert_trees_close(got, expected, RTOL)
        _assert_trees_differ(got, unchanged)


@functools.cache
def _scheduled_updates() -> dict:
    """case -> updates of the alias with the learning rate LR * 0.5**k over the sequence."""
    schedule = optax.exponential_decay(LR, transition_steps=1, decay_rate=0.5)
    return _run_all({case: _alias(case, learning_rate=schedule) for case in CASES})


@all_cases
def test_learning_rate_schedule_is_evaluated_at_the_step(case):
    updates = _scheduled_updates()[case]  # every case's alias in one jitted program
    momentum = jax.tree_util.tree_map(np.zeros_like, _preconditioned(case)[0])
    for k, p_grads in enumerate(_preconditioned(case)):
        momentum = jax.tree_util.tree_map(lambda m, p: TAU * m + p, momentum, p_grads)
        lr_k = LR * 0.5**k
        expected = jax.tree_util.tree_map(lambda m, lr=lr_k: -lr * m, momentum)
        fm.assert_trees_close(updates[k], expected, RTOL)


# --- compilation -----------------------------------------------------------------------


def _train_all(opts: dict, params, steps: int, traces: list, dtype=None) -> list:
    """Trains every optimizer (case -> alias) from ``params`` on batches 0, 1, ... with ONE
    jitted train step that holds all the cases (each case its own params and state): the
    fixed per-program cost of tracing and compiling is paid once, not once per case.

    ``traces`` gets one entry each time the step is traced. ``dtype`` casts the inputs.
    Returns, per step, case -> (params, opt_state, loss, updates) after that step.
    """

    @jax.jit
    def train_step(params, opt_states, x, y, rng):
        traces.append(None)  # runs only while tracing
        result = {}
        for c, opt in opts.items():
            out = _capture(params[c], x, y, rng)
            updates, opt_state = opt.update(out.grads, opt_states[c], params[c], stats=out.stats)
            result[c] = (optax.apply_updates(params[c], updates), opt_state, out.loss, updates)
        return result

    params = {c: params for c in opts}
    opt_states = {c: opt.init(params[c]) for c, opt in opts.items()}
    history = []
    for k in range(steps):
        x, y, rng = _batch(k)
        result = train_step(params, opt_states, x if dtype is None else x.astype(dtype), y, rng)
        params = {c: r[0] for c, r in result.items()}
        opt_states = {c: r[1] for c, r in result.items()}
        history.append(result)
    return history


_TRAIN_TRACES: list = []


@functools.cache
def _trained() -> list:
    """Every case's alias trained for counts 0..3 (refreshes on 0 and 2) in one train step."""
    opts = {case: _alias(case) for case in CASES}
    return _train_all(opts, _data()[0], 2 * INTERVALS["eigen_every"], _TRAIN_TRACES)


@all_cases
def test_jitted_train_step_compiles_once_across_refreshes(case):
    """One jitted train step holds every case: were any case's state to change structure or
    dtype across a refresh, the shared step would be traced again."""
    bases = []
    for result in _trained():  # counts 0..3: refreshes on 0 and 2
        _, opt_state, loss, _ = result[case]
        assert np.isfinite(float(loss))
        bases.append(np.asarray(opt_state[0].layers["Dense_0"].q_in))
    assert len(_TRAIN_TRACES) == 1
    assert int(opt_state[0].count) == 2 * INTERVALS["eigen_every"]
    np.testing.assert_array_equal(bases[1], bases[0])  # no refresh on count 1
    assert not np.array_equal(bases[2], bases[1])  # refresh on count 2


# --- state -----------------------------------------------------------------------------


def _check_state_node(node, where: str):
    """Asserts ``node`` is an array, a NamedTuple or a str-keyed dict of such nodes.

    Dicts appear where a state mirrors a tree: the per-layer map of ScaleByKroneckerState and
    optax's params-shaped momentum trace.
    """
    if isinstance(node, jax.Array):
        return
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        for field in node._fields:
            value = getattr(node, field)
            if value is not None:  # an optional field a preset does not use
                _check_state_node(value, f"{where}.{field}")
    elif isinstance(node, dict):
        for key, value in node.items():
            assert isinstance(key, str), f"{where}: non-string key {key!r}"
            _check_state_node(value, f"{where}[{key!r}]")
    else:
        raise AssertionError(f"{where} is a {type(node).__name__}, not a NamedTuple or array")


@all_cases
def test_state_is_namedtuples_of_arrays_and_round_trips(case):
    params, batches = _data()
    opt, update = _jitted(case, "alias")
    _, state = _run(update, opt.init(params))
    assert isinstance(state, tuple)
    for i, member in enumerate(state):
        assert hasattr(member, "_fields"), f"chain state {i} is not a NamedTuple"
        _check_state_node(member, f"state[{i}]")

    kron = state[0]
    assert isinstance(kron, tekfax.ScaleByKroneckerState)
    assert kron.count.dtype == jnp.int32 and int(kron.count) == STEPS
    preset = CASES[case][0]
    for layer in kron.layers.values():
        assert isinstance(layer, tekfax.LayerCurvature)
        assert (layer.rescale is not None) == (preset in ("ekfac", "tekfac"))
        assert (layer.delta is not None) == (preset in ("tkfac", "tekfac"))

    leaves, treedef = jax.tree_util.tree_flatten(state)
    restored = jax.tree_util.tree_unflatten(treedef, [np.array(x) for x in leaves])
    assert jax.tree_util.tree_structure(restored) == treedef
    chex.assert_trees_all_equal(restored, state)
    grads, stats = batches[STEPS]
    expected = update(grads, state, params, stats=stats)
    got = update(grads, restored, params, stats=stats)
    chex.assert_trees_all_equal(got, expected)


@functools.cache
def _trained_bfloat16() -> list:
    """Every case's alias trained for 4 steps from bfloat16 params, in one train step."""
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), _data()[0])
    opts = {case: _alias(case) for case in CASES}
    return _train_all(opts, params, 4, [], dtype=jnp.bfloat16)


@all_cases
def test_bfloat16_params_keep_float32_statistics(case):
    for result in _trained_bfloat16():
        params, opt_state, loss, updates = result[case]
        assert np.isfinite(float(loss))
        chex.assert_trees_all_equal_dtypes(updates, params)
        chex.assert_tree_all_finite(updates)
    chex.assert_tree_all_finite(params)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params))
    for name, layer in opt_state[0].layers.items():
        for field, value in layer._asdict().items():
            if value is not None:
                assert jnp.promote_types(value.dtype, jnp.float32) == value.dtype, (name, field)
                chex.assert_tree_all_finite(value)


# --- parameters outside tagged layers --------------------------------------------------


class _HandMadeLinear(nn.Module):
    """A kernel/bias pair applied by hand: shaped like a Dense layer but never tagged."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.normal(0.1), (self.features,))
        return x @ kernel + bias


class _MixedModel(nn.Module):
    @nn.compact
    def __call__(self, tokens, x):
        h = jnp.concatenate([nn.Embed(7, 3)(tokens).mean(axis=1), x], axis=-1)
        h = nn.BatchNorm(use_running_average=False)(_HandMadeLinear(5)(h))
        h = jnp.tanh(h) * self.param("scale", nn.initializers.ones, (5,))
        return nn.Dense(CLASSES)(h)


UNTAGGED = (
    ("BatchNorm_0", "scale"),
    ("BatchNorm_0", "bias"),
    ("scale",),
    ("_HandMadeLinear_0", "kernel"),
    ("_HandMadeLinear_0", "bias"),
)
TAGGED = (("Dense_0", "kernel"), ("Dense_0", "bias"), ("Embed_0", "embedding"))


@functools.cache
def _mixed_data():
    model = _MixedModel()
    k1, k2, k3, k4 = jax.random.split(jax.random.key(3), 4)
    tokens = jax.random.randint(k1, (N, 2), 0, 7)
    x = jax.random.normal(k2, (N, D_IN))
    y = jax.random.randint(k3, (N,), 0, CLASSES)
    variables = model.init(jax.random.key(4), tokens, x)

    @jax.jit
    def capture(params):
        def logits_fn(p):
            return model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                tokens,
                x,
                mutable=["batch_stats"],
            )

        return tekfax.loss_and_curvature(logits_fn, params, y, rng=k4, has_aux=True)

    return variables["params"], capture(variables["params"])


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@functools.cache
def _mixed_updates() -> dict:
    """case -> P(g) of scale_by_X's first update on the mixed model, all in one jit."""
    params, out = _mixed_data()
    opts = {case: _scale_by(case) for case in CASES}

    @jax.jit
    def update(grads, states, params, stats):
        return {c: opt.update(grads, states[c], params, stats=stats)[0] for c, opt in opts.items()}

    states = {c: opt.init(params) for c, opt in opts.items()}
    return update(out.grads, states, params, out.stats)


@all_cases
def test_parameters_outside_tagged_layers_pass_through(case):
    params, out = _mixed_data()
    assert set(out.stats) == {"Dense_0", "Embed_0"}
    p_grads = _mixed_updates()[case]
    for path in UNTAGGED:
        np.testing.assert_array_equal(_leaf(p_grads, path), _leaf(out.grads, path), str(path))
    for path in TAGGED:
        assert not np.allclose(_leaf(p_grads, path), _leaf(out.grads, path)), path


# --- errors ----------------------------------------------------------------------------


def _factories(preset: str):
    return (
        getattr(tekfax, f"scale_by_{preset}"),
        functools.partial(getattr(tekfax, preset), LR),
    )


@all_presets
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"damping": None}, "damping"),
        ({"damping": None, "nu": None}, "damping"),
        ({"damping": -1e-3}, "damping"),
        ({"damping": DAMPING, "conv_rescale": "per_pixel"}, "conv_rescale"),
        ({"damping": DAMPING, "ema": 1.0}, "ema"),
        ({"damping": DAMPING, "rescale_ema": 1.0}, "rescale_ema"),
        ({"damping": DAMPING, "eigen_every": 0}, "eigen_every"),
        ({"damping": DAMPING, "curvature_every": 0}, "curvature_every"),
        ({"damping": DAMPING, "rescale_every": 0}, "rescale_every"),
        ({"damping": DAMPING, "norm_constraint": -1.0}, "norm_constraint"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()) or "none",
)
def test_invalid_hyperparameters_raise(preset, kwargs, match):
    for factory in _factories(preset):
        with pytest.raises(ValueError, match=match):
            factory(**kwargs)


@pytest.mark.parametrize("preset", ["ekfac", "tkfac", "tekfac"])
def test_pi_adjusted_is_kfac_only(preset):
    for factory in _factories(preset):
        with pytest.raises(ValueError, match="pi_adjusted"):
            factory(damping=DAMPING, pi_adjusted=True)
    for factory in _factories("kfac"):
        factory(damping=DAMPING, pi_adjusted=True)


@all_cases
def test_stats_from_another_model_name_the_layer(case):
    params, batches = _data()
    grads, stats = batches[0]
    opt = _scale_by(case)

    renamed = {"head": params["Dense_0"]}  # the state knows 'head', the stats 'Dense_0'
    with pytest.raises(ValueError, match="Dense_0"):
        opt.update(grads, opt.init(renamed), params, stats=stats)

    wider = MLP(features=(CLASSES + 1,)).init(jax.random.key(0), jnp.zeros((1, D_IN)))["params"]
    with pytest.raises(ValueError, match="Dense_0"):
        opt.update(grads, opt.init(wider), params, stats=stats)


# --- norm constraint -------------------------------------------------------------------
#
# The KL clip (docs/algorithms.md, section 5) scales P(g) by c = min(1, sqrt(kappa / q)), where
# q = alpha^2 sum_l <P(g_l), g_l>. The damped block F~ solves F~ P(g) = g, so the clipped step
# Delta = -alpha c P(g) has the quadratic Delta^T F~ Delta = alpha^2 c^2 <P(g), g> = c^2 q,
# which equals kappa whenever the clip is active.


@all_cases
def test_norm_constraint_clips_the_quadratic_to_kappa(case):
    params, batches = _data()
    opt, update = _jitted(case, "scale_by")
    _, state = _run(update, opt.init(params), steps=1)
    grads, stats = batches[1]
    free, free_state = update(grads, state, params, stats=stats)
    quadratic = LR**2 * _tree_vdot(free, grads)  # q
    assert quadratic > 0

    @jax.jit
    def constrained(kappa, state):
        opt = _scale_by(case, norm_constraint=kappa, learning_rate=LR)
        return opt.update(grads, state, params, stats=stats)

    kappa = 1e-2 * quadratic
    clipped, clipped_state = constrained(kappa, state)
    scale = _tree_vdot(clipped, grads) / _tree_vdot(free, grads)  # c
    assert 0 < scale < 1
    fm.assert_trees_close(clipped, jax.tree_util.tree_map(lambda u: scale * u, free), RTOL)
    np.testing.assert_allclose(scale**2 * quadratic, kappa, rtol=1e-4)
    fm.assert_trees_close(clipped_state, free_state, RTOL)

    loose, _ = constrained(1e2 * quadratic, state)
    fm.assert_trees_close(loose, free, RTOL)


@all_cases
def test_alias_norm_constraint_uses_its_learning_rate(case):
    params, batches = _data()
    grads, stats = batches[0]
    pre, update = _jitted(case, "scale_by")
    free, _ = update(grads, pre.init(params), params, stats=stats)
    quadratic = LR**2 * _tree_vdot(free, grads)

    @jax.jit
    def first_update(kappa):
        opt = _alias(case, norm_constraint=kappa)
        return opt.update(grads, opt.init(params), params, stats=stats)[0]

    kappa = 1e-2 * quadratic
    updates = first_update(kappa)  # -alpha c P(g) on the first step
    scale = -_tree_vdot(updates, grads) / (LR * _tree_vdot(free, grads))
    fm.assert_trees_close(updates, jax.tree_util.tree_map(lambda u: -LR * scale * u, free), RTOL)
    np.testing.assert_allclose(scale**2 * quadratic, kappa, rtol=1e-4)
