"""tekfax.skip_non_finite: NaN/Inf batches mid-run are skipped and poison nothing.

The Kronecker presets are guarded by default (``skip_non_finite=True``), so they are tested
as they come; Adam is wrapped in :func:`tekfax.skip_non_finite`.

The reference for a run with bad batches is the same run with those batches left out: a
skipped step must leave parameters and optimizer state exactly as they were, so the two
runs end bit for bit equal. Batches carry their own Fisher key, so leaving one out does not
shift the labels the others sample.

The guard takes one of two forms by backend (:func:`tekfax.guard.skips_under_cond`); the
tests run the CPU form, and the form of the other backends where ``under_cond`` says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax
from tekfax.experiments import compare
from tekfax.experiments.data import iterate_batches, load_dataset
from tests.conftest import INTERVALS, PRESETS, jit, make_optimizer
from tests.models import MLP

N, D_IN, CLASSES = 16, 3, 4
MODEL = MLP(features=(5, CLASSES))
KRONECKER = ("kfac", "ekfac", "tkfac", "tekfac", "tkfac-nu")  # shared cases, one nu variant
OPTIMIZERS = {
    **{case: functools.partial(make_optimizer, case, skip_non_finite=True) for case in KRONECKER},
    "adam": lambda: optax.adam(1e-2),
}
STEPS = 7
BAD = {2: np.nan, 4: np.inf, 5: -np.inf}  # step -> value written into one input entry


def _batch(k: int, bad=None):
    kx, ky, kr = jax.random.split(jax.random.key(200 + k), 3)
    x = jax.random.normal(kx, (N, D_IN))
    if bad is not None:
        x = x.at[3, 1].set(bad)
    return x, jax.random.randint(ky, (N,), 0, CLASSES), kr


def _params():
    return MODEL.init(jax.random.key(0), jnp.zeros((1, D_IN)))["params"]


@jit
def _capture(params, x, y, rng):
    """The capture of one batch, jitted once for the tests that call it outside a step (run
    op by op, it compiles dozens of small programs)."""
    return tekfax.loss_and_curvature(lambda p: MODEL.apply({"params": p}, x), params, y, rng=rng)


@functools.cache
def _step(name: str, under_cond: bool, guarded: bool = True):
    """(optimizer, jitted step) of a case, guarded (as tested) or bare (the reference)."""
    kron = name in KRONECKER
    if kron:
        opt = OPTIMIZERS[name]() if guarded else OPTIMIZERS[name](skip_non_finite=False)
    else:
        opt = tekfax.skip_non_finite(OPTIMIZERS[name]()) if guarded else OPTIMIZERS[name]()

    @jax.jit
    def step(params, state, x, y, rng):
        if kron:
            out = tekfax.loss_and_curvature(
                lambda p: MODEL.apply({"params": p}, x), params, y, rng=rng
            )
            updates, state = opt.update(out.grads, state, params, stats=out.stats)
        else:
            grads = jax.grad(
                lambda p: optax.softmax_cross_entropy_with_integer_labels(
                    MODEL.apply({"params": p}, x), y
                ).mean()
            )(params)
            updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    def traced_in_form(*args):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tekfax.guard, "skips_under_cond", lambda: under_cond)
            return step(*args)

    return opt, traced_in_form


def _train(name: str, schedule, under_cond: bool = False):
    """Runs ``schedule``, a list of (batch index, bad value or None), in one guard form."""
    opt, step = _step(name, under_cond)
    params = _params()
    state = opt.init(params)
    history = []
    for k, bad in schedule:
        before = (params, state)
        params, state, updates = step(params, state, *_batch(k, bad))
        history.append((before, params, state, updates))
    return params, state, history


@pytest.mark.parametrize(
    "name, under_cond",
    [(name, False) for name in OPTIMIZERS] + [(name, True) for name in ("kfac", "tekfac", "adam")],
)
def test_nan_and_inf_batches_mid_run_poison_nothing(name, under_cond):
    dirty = [(k, BAD.get(k)) for k in range(STEPS)]
    clean = [(k, None) for k in range(STEPS) if k not in BAD]
    params, state, history = _train(name, dirty, under_cond)
    want_params, want_state, _ = _train(name, clean, under_cond)

    chex.assert_tree_all_finite((params, state.inner_state))
    chex.assert_trees_all_equal(params, want_params)
    chex.assert_trees_all_equal(state.inner_state, want_state.inner_state)
    assert int(tekfax.skipped_steps(state)) == len(BAD) and int(want_state.skipped) == 0
    for k, ((before_params, before_state), after_params, after_state, updates) in enumerate(
        history
    ):
        skipped = k in BAD
        assert bool(after_state.last_finite) is not skipped
        if skipped:  # zero updates, parameters and inner state exactly as before
            chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
            chex.assert_trees_all_equal(after_params, before_params)
            chex.assert_trees_all_equal(after_state.inner_state, before_state.inner_state)
    assert [int(h[2].consecutive) for h in history] == [0, 0, 1, 0, 1, 2, 0]
    if name in KRONECKER:  # the helpers see through the wrapper
        assert int(tekfax.diagnostics.approx_fisher_blocks(state)["Dense_0"].shape[0]) == 20
        assert bool(tekfax.stats_needed(state))


@pytest.mark.parametrize("name", ["kfac", "tekfac", "adam"])
def test_guard_changes_nothing_on_finite_runs(name):
    """On clean batches the guarded optimizer equals the bare one (``skip_non_finite=False``).

    Both run the same jitted step function, each its own compiled program.
    """
    params, state, _ = _train(name, [(k, None) for k in range(4)])
    opt, bare_step = _step(name, under_cond=False, guarded=False)
    bare_params = _params()
    bare_state = opt.init(bare_params)
    for k in range(4):
        bare_params, bare_state, _ = bare_step(bare_params, bare_state, *_batch(k))
    chex.assert_trees_all_close(params, bare_params, rtol=1e-4, atol=1e-5)
    if name in KRONECKER:  # eigenvectors are basis-dependent in float32; the blocks are not
        blocks = tekfax.diagnostics.approx_fisher_blocks
        chex.assert_trees_all_close(blocks(state), blocks(bare_state), rtol=1e-4, atol=1e-5)
    else:
        chex.assert_trees_all_close(state.inner_state, bare_state, rtol=1e-5, atol=1e-6)


def test_non_finite_stats_alone_are_left_out_of_the_curvature():
    """Finite gradients with an Inf statistic: the step is applied with the old curvature.

    The guard does not re-read the statistics; the preconditioner's stages reject them, so
    the factors and their weight stay those of the first step, and the step is taken.
    """
    opt = tekfax.skip_non_finite(tekfax.scale_by_kfac(damping=1e-2, **INTERVALS))
    params = _params()
    x, y, rng = _batch(0)
    out = _capture(params, x, y, rng)
    leaf = out.stats["Dense_0"]
    leaf = leaf.replace(out_grads=leaf.out_grads.at[0, 0, 0].set(jnp.inf))
    poisoned = {**out.stats, "Dense_0": leaf}
    update = jax.jit(opt.update)
    _, first = update(out.grads, opt.init(params), params, stats=out.stats)
    updates, new = update(out.grads, first, params, stats=poisoned)
    assert int(new.skipped) == 0
    for name, layer in new.inner_state.layers.items():
        chex.assert_trees_all_equal(layer.factors, first.inner_state.layers[name].factors)
    assert float(new.inner_state.ema_weight) == float(first.inner_state.ema_weight)
    chex.assert_tree_all_finite(updates)
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


def test_non_finite_inner_result_is_skipped_and_counted_consecutively():
    """Finite inputs, NaN produced inside the inner transformation (from its step 2 on)."""
    inner = optax.scale_by_schedule(lambda count: jnp.where(count >= 2, jnp.nan, 1.0))
    opt = tekfax.skip_non_finite(inner)
    update = jax.jit(opt.update)
    grads = {"w": jnp.ones(3)}
    state = opt.init(grads)
    flags = []
    for _ in range(5):
        updates, state = update(grads, state)
        flags.append((bool(state.last_finite), int(state.consecutive), float(updates["w"][0])))
    assert flags == [(True, 0, 1.0), (True, 0, 1.0), (False, 1, 0.0), (False, 2, 0.0)] + [
        (False, 3, 0.0)
    ]
    assert int(tekfax.skipped_steps(state)) == 3
    assert int(state.inner_state.count) == 2  # the inner count never moved past the NaN


def test_finite_gradients_with_a_non_finite_result_keep_the_kronecker_state():
    """The Kronecker state guards itself: it keeps the finite batch; the rest is reverted."""
    nan_after_first = optax.scale_by_schedule(lambda count: jnp.where(count >= 1, jnp.nan, 1.0))
    inner = optax.chain(tekfax.scale_by_kfac(damping=1e-2, **INTERVALS), optax.trace(0.9))
    opt = tekfax.skip_non_finite(optax.chain(inner, nan_after_first))
    params = _params()
    x, y, rng = _batch(0)
    out = _capture(params, x, y, rng)
    update = jax.jit(opt.update)
    _, first = update(out.grads, opt.init(params), params, stats=out.stats)
    updates, second = update(out.grads, first, params, stats=out.stats)
    assert (int(second.skipped), bool(second.last_finite)) == (1, False)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, out.grads))
    (kron_1, trace_1), schedule_1 = first.inner_state
    (kron_2, trace_2), schedule_2 = second.inner_state
    assert (int(kron_1.count), int(kron_2.count)) == (1, 2)  # the Kronecker state moved on
    chex.assert_tree_all_finite(kron_2)
    chex.assert_trees_all_equal((trace_2, schedule_2), (trace_1, schedule_1))  # reverted


def test_compiles_once_composes_in_chain_and_inject_hyperparams():
    traces = []
    guarded = tekfax.skip_non_finite(
        optax.inject_hyperparams(tekfax.kfac)(learning_rate=0.1, damping=1e-2, **INTERVALS)
    )
    opt = optax.chain(guarded, optax.clip(10.0))  # the extra arg reaches the inner preset

    @jax.jit
    def step(params, state, x, y, rng):
        traces.append(1)
        out = tekfax.loss_and_curvature(lambda p: MODEL.apply({"params": p}, x), params, y, rng=rng)
        updates, state = opt.update(out.grads, state, params, stats=out.stats)
        return optax.apply_updates(params, updates), state

    params = _params()
    state = opt.init(params)
    for k in range(STEPS):
        params, state = step(params, state, *_batch(k, BAD.get(k)))
    assert len(traces) == 1
    assert int(tekfax.skipped_steps(state)) == len(BAD)
    hyper = state[0].inner_state.hyperparams
    assert float(hyper["damping"]) == pytest.approx(1e-2)
    chex.assert_tree_all_finite(params)


def test_scale_by_kronecker_keeps_non_finite_statistics_out_of_its_averages():
    """Defence in depth without the wrapper: a NaN/overflowing batch factor or S is dropped."""
    for preset in PRESETS:
        opt = getattr(tekfax, f"scale_by_{preset}")(damping=1e-2, **INTERVALS)
        update = jax.jit(opt.update)
        params = _params()
        x, y, rng = _batch(0)
        out = _capture(params, x, y, rng)
        _, first = update(out.grads, opt.init(params), params, stats=out.stats)
        x2, y2, rng2 = _batch(1, np.nan)
        bad = _capture(params, x2, y2, rng2)
        p_grads, second = update(out.grads, first, params, stats=bad.stats)  # finite grads
        assert float(second.ema_weight) == float(first.ema_weight), preset
        for name, layer in second.layers.items():
            chex.assert_trees_all_equal(layer.factor_in, first.layers[name].factor_in)
            chex.assert_trees_all_equal(layer.factor_out, first.layers[name].factor_out)
            if layer.rescale is not None:  # step 1 is no refresh: S stays as it was
                chex.assert_trees_all_equal(layer.rescale, first.layers[name].rescale)
        chex.assert_tree_all_finite((p_grads, second))


@pytest.mark.parametrize("preset", PRESETS)
def test_scale_by_kronecker_keeps_its_whole_state_on_non_finite_gradients(preset):
    """Unguarded: a NaN gradient runs no stage and keeps the count, even on a due step."""
    opt = getattr(tekfax, f"scale_by_{preset}")(damping=1e-2, curvature_every=1, eigen_every=1)
    update = jax.jit(opt.update)
    params = _params()
    x, y, rng = _batch(0)
    out = _capture(params, x, y, rng)
    _, first = update(out.grads, opt.init(params), params, stats=out.stats)
    x2, y2, rng2 = _batch(1)  # finite statistics of another batch, every stage due
    other = _capture(params, x2, y2, rng2)
    grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), other.grads)
    p_grads, second = update(grads, first, params, stats=other.stats)
    chex.assert_trees_all_equal(second, first)
    assert not all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(p_grads))
    _, taken = update(other.grads, first, params, stats=other.stats)  # the same step, finite
    assert int(taken.count) == 2 and float(taken.ema_weight) != float(first.ema_weight)


def test_arguments_are_validated():
    with pytest.raises(TypeError, match="inner"):
        tekfax.skip_non_finite(lambda g: g)
    with pytest.raises(ValueError, match="skip_non_finite"):
        tekfax.skipped_steps(optax.adam(1e-3).init({"w": jnp.ones(2)}))


# --- the tool: tekfax-compare skips NaN batches and reports them ----------------------------


def test_compare_tool_skips_nan_batches_and_reports_them(tmp_path, monkeypatch, capsys):
    digits = load_dataset("digits")
    poisoned = np.array([5, 700, 1200])  # training examples with a NaN pixel
    x_train = digits.x_train.copy()
    x_train[poisoned, 0, 0, 0] = np.nan
    monkeypatch.setattr(
        compare, "load_dataset", lambda *a, **k: dataclasses.replace(digits, x_train=x_train)
    )
    # Independent count: the batches of epoch 1 (seed 0) that hold a poisoned example.
    index = np.arange(len(x_train))
    batches = iterate_batches(index, index, 128, np.random.default_rng((0, 0)), digits.augment)
    expected = sum(bool(np.isin(yb, poisoned).any()) for _, yb in batches)
    assert expected >= 1

    out = tmp_path / "nan"
    flags = ["--model", "mlp", "--optimizers", "sgdm", "kfac", "--epochs", "1", "--no-plots"]
    assert compare.main(["--output", str(out), *flags, "--lr", "kfac=0.03"]) == 0
    err = capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    for run in results["runs"]:
        name = run["optimizer"]
        assert run["skipped_steps"] == expected and not run["diverged"], name
        record = run["records"][0]
        assert record["skipped_steps"] == expected
        assert np.isfinite(record["train_loss"]) and record["test_accuracy"] > 0.5, name
        assert re.search(rf"^{name} seed 0 epoch 1/1 .* img/s {expected} skipped \|", err, re.M)
        assert results["summary"][name]["skipped_steps"] == expected
        # The tool warns: on stderr, in results.json and under the table.
        line = f"warning: {name} seed 0 skipped {expected} of 11 steps (non-finite gradient"
        assert run["warning"].startswith(line) and f"tekfax-compare: {run['warning']}" in err
        assert f"- {run['warning']}\n" in (out / "table.md").read_text()
    assert results["warnings"] == [run["warning"] for run in results["runs"]]


class _CountingTransform:
    """An optax transformation (updates times 2, an int32 step count) counting its traces."""

    def __init__(self):
        self.traces = 0

    def build(self) -> optax.GradientTransformation:
        def update(updates, state, params=None):
            self.traces += 1
            return jax.tree.map(lambda u: 2 * u, updates), state + 1

        return optax.GradientTransformation(lambda p: jnp.zeros([], jnp.int32), update)


@pytest.mark.parametrize("under_cond", [False, True])
@pytest.mark.parametrize("bad", [False, True])
def test_guard_traces_the_inner_update_once_and_reverts_its_state(bad, under_cond, monkeypatch):
    monkeypatch.setattr(tekfax.guard, "skips_under_cond", lambda: under_cond)
    counting = _CountingTransform()
    opt = tekfax.skip_non_finite(counting.build())
    grads = {"w": jnp.array([1.0, jnp.nan if bad else 2.0])}
    updates, state = jax.jit(opt.update)(grads, opt.init(grads))
    assert counting.traces == 1
    jaxpr = str(jax.make_jaxpr(opt.update)(grads, opt.init(grads)))
    assert ("cond[" in jaxpr) is under_cond  # the form asked for is the one traced
    want = [0.0, 0.0] if bad else [2.0, 4.0]
    np.testing.assert_array_equal(updates["w"], want)
    assert int(state.inner_state) == (0 if bad else 1) and int(state.skipped) == int(bad)


def test_conditional_stand_in_gets_run_shapes_in_either_trace_order(monkeypatch):
    """Should lax.cond trace its false branch first, eval_shape supplies the shapes."""
    from tekfax import conditional

    def run():
        return {"a": jnp.ones((2, 3), jnp.float32), "b": jnp.arange(4)}

    real_cond = jax.lax.cond

    def false_first(pred, true_fun, false_fun):
        false_fun(), true_fun()  # trace the stand-in before run
        return real_cond(pred, true_fun, false_fun)

    for cond in (real_cond, false_first):
        monkeypatch.setattr(conditional.lax, "cond", cond)
        out = jax.jit(lambda p: conditional.cond_shaped_like(p, run, conditional.zeros_shaped))(
            jnp.array(False)
        )
        assert out["a"].shape == (2, 3) and out["b"].dtype == jnp.arange(4).dtype
        assert not out["a"].any() and not out["b"].any()
