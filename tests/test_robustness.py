"""The robustness panel (tekfax.experiments.robustness): grid cells, divergence, the table."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import optax
import pytest

import tekfax
from tekfax import losses
from tekfax.experiments import robustness as rb
from tekfax.experiments.data import load_dataset
from tekfax.experiments.models import create_model, init_variables

TASK = rb.TASKS["digits-mlp"]
STEPS, EVALS = 6, 2


@pytest.fixture(scope="module")
def data():
    return rb.task_data(TASK, load_dataset("digits"), STEPS, seed=0)


MODEL = create_model("mlp", 10, (8, 8, 1))


def _optimizer(name, lr, damping):
    return tekfax.kfac(lr, damping=damping) if name == "kfac" else optax.adam(lr)


@functools.partial(jax.jit, static_argnums=0)
def _reference_step(name, params, state, x, y, key, lr, damping):
    """One plain step; lr and damping are arguments, so every cell shares one compilation."""
    opt = _optimizer(name, lr, damping)

    def logits_fn(p):
        return MODEL.apply({"params": p}, x)

    if name == "kfac":
        out = tekfax.loss_and_curvature(logits_fn, params, y, rng=key)
        updates, state = opt.update(out.grads, state, params, stats=out.stats)
        value = out.loss
    else:
        loss_fn = lambda p: losses.mean_loss("softmax_cross_entropy", logits_fn(p), y)  # noqa: E731
        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value


def _reference(data, name, lr, damping):
    """One cell trained by a plain Python loop of jitted steps: no inject_hyperparams, scan or
    vmap."""
    key = jax.random.key(0)
    params = init_variables(MODEL, (8, 8, 1), jax.random.fold_in(key, 0))["params"]
    state = _optimizer(name, lr, damping).init(params)
    step_key = jax.random.fold_in(key, 1)
    values = []
    for t, idx in enumerate(np.asarray(data.batches)):
        x, y, t_key = data.x_train[idx], data.t_train[idx], jax.random.fold_in(step_key, t)
        params, state, value = _reference_step(name, params, state, x, y, t_key, lr, damping)
        values.append(value)
    logits = MODEL.apply({"params": params}, data.x_test)
    accuracy = 100.0 * np.mean(np.argmax(logits, -1) == np.asarray(data.t_test))
    return np.asarray(values), accuracy


# Kronecker cells are not vmapped on CPU: batched eigh under vmap deadlocks XLA:CPU, so
# run_grid maps them there (the "auto" batching); vmap is covered by the first-order case.
@pytest.mark.parametrize("name,batching", [("adam", "vmap"), ("kfac", "map")])
def test_grid_cells_equal_single_runs(data, name, batching):
    """Every cell of the one-program grid run equals its own plain training loop."""
    cells = rb.make_cells(name, lrs=[0.01, 0.1], values=[1e-2, 0.3])
    run = rb.run_grid(TASK, name, data, cells, evals=EVALS, batching=batching)
    for i in range(len(cells.learning_rate)):
        lr, value = float(cells.learning_rate[i]), float(cells.value[i])
        values, accuracy = _reference(data, name, lr, value)
        chunks = values.reshape(EVALS, -1).mean(axis=1)
        np.testing.assert_allclose(run.result.train_loss[i], chunks, rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(run.result.metric[i, -1], accuracy, atol=0.3)


def test_a_diverging_cell_is_counted_and_leaves_the_others_alone(data):
    lrs = [0.03, 1e6]
    cells = rb.make_cells("adam", lrs=lrs)
    run = rb.run_grid(TASK, "adam", data, cells, evals=EVALS)
    alone = rb.run_grid(TASK, "adam", data, rb.make_cells("adam", lrs=lrs[:1]), evals=EVALS)
    assert run.result.diverged.tolist() == [False, True]
    # the same up to float rounding (a batch of 2 cells vs 1)
    np.testing.assert_allclose(run.result.train_loss[0], alone.result.train_loss[0], rtol=1e-6)
    np.testing.assert_allclose(run.result.metric[0], alone.result.metric[0], atol=1e-4)
    row = rb.summarise(run, accuracy=True)
    assert (row.cells, row.diverged_pct, row.near_best_pct) == (2, 50.0, 50.0)
    assert row.best_lr == pytest.approx(0.03) and row.best_value is None


def test_panel_table_and_json(tmp_path, capsys):
    out = tmp_path / "panel.json"
    argv = ["--tasks", "digits-mlp", "--optimizers", "adam", "kfac", "tkfac-new"]
    argv += ["--steps", "4", "--evals", "2", "--lrs", "0.01", "1e6"]
    argv += ["--dampings", "0.1", "0.3", "--nus", "10", "100", "--json", str(out)]
    assert rb.main(argv) == 0
    table = capsys.readouterr().out
    header = "| optimizer | cells | diverged | near-best | near Adam's best | best (cell) | "
    header += "Adam: diverged / near-best / best |"
    assert header in table
    for name in ("Adam", "KFAC", "TKFAC-new"):
        assert f"| {name} | " in table
    panel = json.loads(out.read_text())
    assert panel["config"]["steps"] == 4 and panel["config"]["lrs"] == [0.01, 1e6]
    rows = {r["optimizer"]: r for r in panel["summary"]}
    assert rows["adam"]["cells"] == 2 and rows["kfac"]["cells"] == 4 == rows["tkfac-new"]["cells"]
    # lr 1e6 diverges for Adam; the Kronecker presets' trust region bounds every step
    for grid in panel["cells"]:
        for cell in grid["cells"]:
            first_order = grid["optimizer"] == "adam"
            want = first_order and cell["learning_rate"] > 1
            assert cell["diverged"] == want, (grid["optimizer"], cell)
            assert len(cell["metric"]) == 2
    assert {g["axis"] for g in panel["cells"]} == {None, "damping", "nu"}
    adam_best = rows["adam"]["best"]
    for grid in panel["cells"]:  # near Adam's best: recomputed from the cells
        near = [not c["diverged"] and c["metric"][-1] >= adam_best - 1 for c in grid["cells"]]
        assert rows[grid["optimizer"]]["near_adam_pct"] == pytest.approx(100 * np.mean(near))
