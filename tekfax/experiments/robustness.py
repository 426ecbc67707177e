"""The robustness panel: every optimizer over a learning-rate x damping grid, on three tasks.

For each (task, optimizer) every cell of the grid trains from the same initial parameters on
the same batches, and all cells run as one jitted program, ``jax.vmap`` over the cells
(``jax.lax.map`` for the Kronecker optimizers on CPU, where a batched ``eigh`` under vmap
deadlocks XLA:CPU's thread pool; ``--batching`` overrides the choice): the learning rate
and the damping (or ``nu``) enter through ``optax.inject_hyperparams``, so they are traced
arrays of the optimizer state. A cell whose loss or parameters become non-finite
is frozen at its last finite state (``jnp.where``) and marked diverged; it cannot touch the
other cells. A cell also counts as diverged when the mean training loss of any stretch of
the run exceeds ``factor`` times its first batch's loss.

* Optimizers: the eight of ``tekfax-compare`` (:mod:`.optimizers`), built from the library
  presets with their defaults; ``extra`` keyword arguments (``norm_constraint``,
  ``eigen_every``, ...) go to every Kronecker preset, to compare candidate defaults.
* Grid: :data:`LR_GRID` x the papers' damping grid, the nu grid for ``tkfac-new``
  (docs/algorithms.md, section 7); the first-order optimizers get the learning rates only.
* Tasks (:data:`TASKS`): the digits MLP and CNN (metric: test accuracy, in %), and the deep
  auto-encoder 784-1000-500-250-30 and its mirror of KFAC and TKFAC on ``mnist5k`` (sigmoid
  cross-entropy; metric: the test reconstruction loss).

Per optimizer and task, :func:`summarise` reports the percentage of diverged cells, the
percentage of cells within 1 accuracy point (or 5% of the loss) of the grid's best final
metric, and the best cell; :func:`format_table` sets them beside Adam's.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tekfax
from tekfax import losses
from tekfax.curvature import all_finite
from tekfax.experiments import optimizers
from tekfax.experiments.data import Dataset, load_dataset
from tekfax.experiments.models import create_model, init_variables, model_loss
from tekfax.experiments.train import targets_for

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DIVERGENCE_FACTOR = 2.0
NEAR_ACCURACY_POINTS = 1.0
NEAR_LOSS_FRACTION = 0.05
_SGD_MOMENTUM = 0.9


class Task(NamedTuple):
    """One problem of the panel."""

    name: str
    dataset: str
    model: str
    batch_size: int
    steps: int


TASKS = {
    "digits-mlp": Task("digits-mlp", "digits", "mlp", 128, 2000),
    "digits-cnn": Task("digits-cnn", "digits", "cnn", 128, 2000),
    "mnist5k-autoencoder": Task("mnist5k-autoencoder", "mnist5k", "autoencoder", 250, 2000),
}


class Cells(NamedTuple):
    """The grid, one entry per cell: learning rate and damping (or nu; NaN if first-order)."""

    learning_rate: np.ndarray
    value: np.ndarray


class CellResult(NamedTuple):
    """What one cell (or, with a leading axis, every cell) of a grid run records.

    Attributes:
      diverged: non-finite loss or parameters, or a stretch's mean loss above the factor.
      initial_loss: the first batch's training loss.
      train_loss: mean training loss of each of the ``evals`` stretches of the run.
      metric: the test metric after each stretch (accuracy in %, or reconstruction loss).
    """

    diverged: Any
    initial_loss: Any
    train_loss: Any
    metric: Any


class Summary(NamedTuple):
    """One optimizer on one task: the panel's row."""

    task: str
    optimizer: str
    cells: int
    diverged_pct: float
    near_best_pct: float
    best: float | None
    best_lr: float | None
    best_value: float | None
    seconds: float
    near_adam_pct: float | None = None  # cells within the near-best margin of Adam's best


def grid_axis(name: str) -> str | None:
    """The swept hyperparameter besides the learning rate: ``"damping"``, ``"nu"`` or None.

    Example:
      >>> from tekfax.experiments.robustness import grid_axis
      >>> grid_axis("adam"), grid_axis("tekfac"), grid_axis("tkfac-new")
      (None, 'damping', 'nu')
    """
    if name in optimizers.FIRST_ORDER:
        return None
    return "nu" if name == "tkfac-new" else "damping"


def make_cells(
    name: str, lrs: Sequence[float] = LR_GRID, values: Sequence[float] | None = None
) -> Cells:
    """Every (learning rate, damping or nu) pair of ``name``'s grid, learning rate outermost.

    Example:
      >>> from tekfax.experiments.robustness import make_cells
      >>> cells = make_cells("kfac", lrs=[0.01, 0.1], values=[1e-3, 1e-1])
      >>> cells.learning_rate.tolist(), cells.value.round(4).tolist()
      ([0.01, 0.01, 0.1, 0.1], [0.001, 0.1, 0.001, 0.1])
    """
    axis = grid_axis(name)
    if axis is None:
        values = [math.nan]
    elif values is None:
        values = optimizers.NU_GRID if axis == "nu" else optimizers.DAMPING_GRID
    lr, value = np.meshgrid(np.asarray(lrs, np.float64), np.asarray(values, np.float64))
    return Cells(lr.T.ravel(), value.T.ravel())


def optimizer_factory(name: str, extra: Mapping[str, Any] | None = None) -> Callable:
    """``(learning_rate, value) -> optimizer`` for ``name``, both traced hyperparameters.

    The preset is wrapped in ``optax.inject_hyperparams``, so its state carries the cell's
    learning rate and damping (or nu) as arrays. ``extra`` goes to the Kronecker presets.

    Example:
      >>> from tekfax.experiments.robustness import optimizer_factory
      >>> make = optimizer_factory("kfac", {"norm_constraint": 1e-3})
      >>> state = make(0.1, 1e-3).init(params)
      >>> sorted(state.hyperparams)
      ['learning_rate', 'value']
    """
    extra = dict(extra or {})
    if name == "sgdm":
        return optax.inject_hyperparams(
            lambda learning_rate, value: optax.sgd(learning_rate, momentum=_SGD_MOMENTUM),
            static_args=("value",),
        )
    if name in ("adam", "eadam"):
        first = optax.adam if name == "adam" else tekfax.eadam
        return optax.inject_hyperparams(
            lambda learning_rate, value: first(learning_rate), static_args=("value",)
        )
    preset = getattr(tekfax, optimizers.KRONECKER[name])
    axis = grid_axis(name)
    return optax.inject_hyperparams(
        lambda learning_rate, value: preset(learning_rate, **{axis: value}, **extra)
    )


class TaskData(NamedTuple):
    """One task's arrays: targets are labels, or the auto-encoder's [0, 1] pixels."""

    x_train: jax.Array
    t_train: jax.Array
    x_test: jax.Array
    t_test: jax.Array
    batches: jax.Array  # (steps, batch) indices into the training split


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """The first ``steps`` batches of shuffled epochs, as in ``tekfax-compare``.

    Epoch ``e`` is ``np.random.default_rng((seed, e)).permutation(n)``, cut into whole
    batches. Example:
      >>> from tekfax.experiments.robustness import batch_indices
      >>> batch_indices(10, 4, steps=3, seed=0).shape
      (3, 4)
    """
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rows = [
        np.random.default_rng((seed, e)).permutation(n)[: per_epoch * batch_size]
        for e in range(epochs)
    ]
    return np.concatenate(rows).reshape(-1, batch_size)[:steps].astype(np.int32)


def task_data(task: Task, dataset: Dataset, steps: int, seed: int) -> TaskData:
    """The task's arrays on the device and its batch indices.

    Example:
      >>> from tekfax.experiments import robustness as rb
      >>> from tekfax.experiments.data import load_dataset
      >>> task = rb.TASKS["digits-mlp"]
      >>> data = rb.task_data(task, load_dataset("digits"), steps=4, seed=0)
      >>> data.batches.shape, data.x_train.shape, data.t_test.shape
      ((4, 128), (1437, 8, 8, 1), (360,))
    """
    loss = model_loss(task.model)
    targets = functools.partial(targets_for, loss, dataset)
    return TaskData(
        jnp.asarray(dataset.x_train),
        jnp.asarray(targets(dataset.x_train, dataset.y_train)),
        jnp.asarray(dataset.x_test),
        jnp.asarray(targets(dataset.x_test, dataset.y_test)),
        jnp.asarray(batch_indices(len(dataset.x_train), task.batch_size, steps, seed)),
    )


class _Carry(NamedTuple):
    """What each step of one cell updates."""

    params: Any
    opt_state: Any
    alive: jax.Array


def _make_step(model: Any, loss: str, opt: Any, kronecker: bool, data: TaskData, key: jax.Array):
    """One training step of one cell; a non-finite loss or result freezes the cell."""

    def step(carry: _Carry, t: jax.Array) -> tuple[_Carry, jax.Array]:
        idx = data.batches[t]
        x, y = data.x_train[idx], data.t_train[idx]

        def logits_fn(p):
            return model.apply({"params": p}, x, train=True)

        def objective(p):
            return losses.mean_loss(loss, logits_fn(p), y)

        if kronecker:
            out = tekfax.loss_and_curvature(
                logits_fn,
                carry.params,
                y,
                loss=loss,
                rng=jax.random.fold_in(key, t),
                compute_stats=tekfax.stats_needed(carry.opt_state),
            )
            value, grads = out.loss, out.grads
            # obj_fn and value feed adaptive damping (``--set adaptive_damping=True``);
            # the presets ignore them otherwise.
            extra = {"stats": out.stats, "obj_fn": objective, "value": out.loss}
        else:
            value, grads = jax.value_and_grad(objective)(carry.params)
            extra = {}
        updates, opt_state = opt.update(grads, carry.opt_state, carry.params, **extra)
        params = optax.apply_updates(carry.params, updates)
        ok = carry.alive & jnp.isfinite(value) & all_finite(params)
        new, old = (params, opt_state), (carry.params, carry.opt_state)
        params, opt_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        return _Carry(params, opt_state, ok), jnp.where(carry.alive, value, jnp.nan)

    return step


def _metric(model: Any, loss: str, params: Any, data: TaskData) -> jax.Array:
    """Test accuracy in % (classification), or the mean test reconstruction loss."""
    logits = model.apply({"params": params}, data.x_test, train=False)
    if loss == "softmax_cross_entropy":
        return 100.0 * jnp.mean(jnp.argmax(logits, -1) == data.t_test)
    return jnp.mean(losses.per_example_loss(loss, logits, data.t_test))


def make_train_cell(
    task: Task,
    name: str,
    data: TaskData,
    evals: int,
    extra: Mapping[str, Any] | None = None,
    seed: int = 0,
    factor: float = DIVERGENCE_FACTOR,
) -> Callable[[jax.Array, jax.Array], CellResult]:
    """``(learning_rate, value) -> CellResult``: one cell's whole run, a pure function.

    The run is ``evals`` stretches of ``len(data.batches) // evals`` steps, each followed by
    a test evaluation. ``jax.vmap`` of it trains every cell of a grid in one program.

    Example:
      >>> from tekfax.experiments import robustness as rb
      >>> from tekfax.experiments.data import load_dataset
      >>> task = rb.TASKS["digits-mlp"]
      >>> data = rb.task_data(task, load_dataset("digits"), steps=4, seed=0)
      >>> cell = rb.make_train_cell(task, "adam", data, evals=2)
      >>> result = jax.jit(cell)(jnp.float32(0.01), jnp.float32(jnp.nan))
      >>> result.metric.shape, bool(result.diverged)
      ((2,), False)
    """
    model = create_model(task.model, 10, tuple(data.x_train.shape[1:]))
    loss = model_loss(task.model)
    key = jax.random.key(seed)
    params0 = init_variables(model, tuple(data.x_train.shape[1:]), jax.random.fold_in(key, 0))
    params0 = params0["params"]
    make_opt = optimizer_factory(name, extra)
    kronecker = optimizers.is_kronecker(name)
    length = len(data.batches) // evals

    def train_cell(learning_rate: jax.Array, value: jax.Array) -> CellResult:
        opt = make_opt(learning_rate, value)
        step = _make_step(model, loss, opt, kronecker, data, jax.random.fold_in(key, 1))

        def stretch(carry, start):
            carry, values = jax.lax.scan(step, carry, start + jnp.arange(length))
            return carry, (values, jnp.mean(values), _metric(model, loss, carry.params, data))

        carry = _Carry(params0, opt.init(params0), jnp.asarray(True))
        carry, (values, train_loss, metric) = jax.lax.scan(
            stretch, carry, length * jnp.arange(evals)
        )
        initial = values[0, 0]
        blown = ~jnp.isfinite(train_loss) | (train_loss > factor * initial)
        return CellResult(~carry.alive | jnp.any(blown), initial, train_loss, metric)

    return train_cell


class GridRun(NamedTuple):
    """Every cell of one optimizer on one task (host arrays, one row per cell)."""

    task: str
    optimizer: str
    cells: Cells
    result: CellResult
    seconds: float


def run_grid(
    task: Task,
    name: str,
    data: TaskData,
    cells: Cells,
    evals: int = 10,
    extra: Mapping[str, Any] | None = None,
    seed: int = 0,
    factor: float = DIVERGENCE_FACTOR,
    batching: str = "auto",
) -> GridRun:
    """Trains every cell of ``cells`` in one jitted program; ``seconds`` includes compiling.

    ``batching="vmap"`` runs the cells side by side (``jax.vmap``); ``"map"`` one after the
    other inside the program (``jax.lax.map``), which keeps the periodic stages' ``lax.cond``
    (under ``vmap`` they run every step) and avoids batched CPU eigh, which was seen to
    deadlock XLA:CPU's thread pool. ``"auto"``: ``"map"`` for a Kronecker optimizer on CPU,
    ``"vmap"`` otherwise.

    Example:
      >>> from tekfax.experiments import robustness as rb
      >>> from tekfax.experiments.data import load_dataset
      >>> task = rb.TASKS["digits-mlp"]
      >>> data = rb.task_data(task, load_dataset("digits"), steps=4, seed=0)
      >>> run = rb.run_grid(task, "adam", data, rb.make_cells("adam", lrs=[1e-3, 1e6]), evals=1)
      >>> run.result.diverged.tolist()
      [False, True]
    """
    if batching == "auto":
        on_cpu = jax.default_backend() == "cpu"
        batching = "map" if on_cpu and optimizers.is_kronecker(name) else "vmap"
    cell = make_train_cell(task, name, data, evals, extra, seed, factor)
    if batching == "vmap":
        program = jax.vmap(cell)
    elif batching == "map":

        def program(lr: jax.Array, value: jax.Array) -> CellResult:
            return jax.lax.map(lambda args: cell(*args), (lr, value))

    else:
        raise ValueError(f"batching must be 'auto', 'vmap' or 'map', got {batching!r}.")
    tic = time.perf_counter()
    result = jax.jit(program)(jnp.asarray(cells.learning_rate), jnp.asarray(cells.value))
    result = CellResult(*(np.asarray(field) for field in result))
    return GridRun(task.name, name, cells, result, time.perf_counter() - tic)


def _near_best(metric: np.ndarray, ok: np.ndarray, best: float, accuracy: bool) -> np.ndarray:
    if accuracy:
        return ok & (metric >= best - NEAR_ACCURACY_POINTS)
    return ok & (metric <= best * (1.0 + NEAR_LOSS_FRACTION))


def summarise(run: GridRun, accuracy: bool) -> Summary:
    """The panel's row for one grid run; the best is over the non-diverged cells' final
    metric (highest accuracy, or lowest loss).

    Example:
      >>> import numpy as np
      >>> from tekfax.experiments import robustness as rb
      >>> cells = rb.Cells(np.array([0.1, 1.0]), np.array([1e-3, 1e-3]))
      >>> result = rb.CellResult(np.array([False, True]), None, None, np.array([[90.0], [10.0]]))
      >>> row = rb.summarise(rb.GridRun("digits-mlp", "kfac", cells, result, 1.0), accuracy=True)
      >>> row.diverged_pct, row.near_best_pct, row.best, row.best_lr
      (50.0, 50.0, 90.0, 0.1)
    """
    final = run.result.metric[:, -1]
    ok = ~run.result.diverged & np.isfinite(final)
    n = len(final)
    best = best_lr = best_value = None
    near = 0.0
    if ok.any():
        score = final if accuracy else -final
        i = int(np.argmax(np.where(ok, score, -np.inf)))
        best, best_lr = float(final[i]), float(run.cells.learning_rate[i])
        value = float(run.cells.value[i])
        best_value = None if math.isnan(value) else value
        near = 100.0 * float(np.mean(_near_best(final, ok, best, accuracy)))
    diverged = 100.0 * float(np.mean(run.result.diverged))
    row = (n, diverged, near, best, best_lr, best_value, run.seconds)
    return Summary(run.task, run.optimizer, *row)


def near_reference(run: GridRun, reference: float | None, accuracy: bool) -> float | None:
    """% of ``run``'s cells whose final metric is near ``reference`` (Adam's best) or better.

    The same margin as near-best: 1 accuracy point, or 5% of the loss. Unlike near-best, the
    reference does not depend on the grid's own size (the best of 70 noisy cells is higher
    than the best of 7), so it compares grids of different sizes fairly.

    Example:
      >>> import numpy as np
      >>> from tekfax.experiments import robustness as rb
      >>> cells = rb.Cells(np.array([0.1, 1.0]), np.array([1e-3, 1e-3]))
      >>> result = rb.CellResult(np.array([False, False]), None, None, np.array([[97.], [90.]]))
      >>> rb.near_reference(rb.GridRun("digits-mlp", "kfac", cells, result, 1.0), 97.5, True)
      50.0
    """
    if reference is None:
        return None
    final = run.result.metric[:, -1]
    ok = ~run.result.diverged & np.isfinite(final)
    return 100.0 * float(np.mean(_near_best(final, ok, reference, accuracy)))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _best_text(row: Summary, accuracy: bool) -> str:
    if row.best is None:
        return "-"
    best = f"{row.best:.1f}%" if accuracy else f"{row.best:.4g}"
    cell = f"lr {row.best_lr:g}" + ("" if row.best_value is None else f", {row.best_value:g}")
    return f"{best} ({cell})"


def format_table(rows: Sequence[Summary], accuracies: Mapping[str, bool]) -> str:
    """Markdown: one table per task, one row per optimizer, Adam's figures beside each.

    Columns: cells, % diverged, % near the grid's best, % near Adam's best
    (:func:`near_reference`), the best final metric and its cell, and Adam's % diverged /
    % near-best / best.

    Example:
      >>> from tekfax.experiments import robustness as rb
      >>> rows = [rb.Summary("digits-mlp", "adam", 7, 0.0, 42.9, 97.5, 3e-3, None, 1.0, 42.9),
      ...         rb.Summary("digits-mlp", "kfac", 70, 10.0, 50.0, 98.1, 0.03, 0.01, 9.0, 60.0)]
      >>> print(rb.format_table(rows, {"digits-mlp": True}).splitlines()[-1])
      | KFAC | 70 | 10% | 50% | 60% | 98.1% (lr 0.03, 0.01) | 0% / 43% / 97.5 |
    """
    lines = []
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        accuracy = accuracies[task]
        adam = next((r for r in mine if r.optimizer == "adam"), None)
        what = "test accuracy" if accuracy else "test reconstruction loss"
        lines += [
            f"**{task}** (final {what}; near-best: within "
            + (f"{NEAR_ACCURACY_POINTS:g} point" if accuracy else f"{NEAR_LOSS_FRACTION:.0%}")
            + " of the grid's best)",
            "",
            "| optimizer | cells | diverged | near-best | near Adam's best | best (cell) | "
            "Adam: diverged / near-best / best |",
            "|---|---|---|---|---|---|---|",
        ]
        ref = "-"
        if adam is not None:
            ref = f"{adam.diverged_pct:.0f}% / {adam.near_best_pct:.0f}% / {_fmt(adam.best)}"
        for r in mine:
            name = optimizers.DISPLAY_NAMES.get(r.optimizer, r.optimizer)
            lines.append(
                f"| {name} | {r.cells} | {r.diverged_pct:.0f}% | {r.near_best_pct:.0f}% | "
                f"{_pct(r.near_adam_pct)} | {_best_text(r, accuracy)} | {ref} |"
            )
        lines.append("")
    return "\n".join(lines)


def to_json(runs: Sequence[GridRun], rows: Sequence[Summary], config: Mapping) -> dict:
    """The panel as a JSON-ready dict: ``config``, the rows, and every cell's figures.

    Example:
      >>> import numpy as np
      >>> from tekfax.experiments import robustness as rb
      >>> cells = rb.Cells(np.array([0.1]), np.array([np.nan]))
      >>> result = rb.CellResult(np.array([False]), np.array([2.3]), np.array([[0.5]]),
      ...                        np.array([[90.0]]))
      >>> run = rb.GridRun("digits-mlp", "adam", cells, result, 1.0)
      >>> panel = rb.to_json([run], [rb.summarise(run, True)], {"steps": 4})
      >>> panel["cells"][0]["cells"][0]["value"], panel["summary"][0]["best"]
      (None, 90.0)
    """

    def cell(run: GridRun, i: int) -> dict:
        value = float(run.cells.value[i])
        return {
            "learning_rate": float(run.cells.learning_rate[i]),
            "value": None if math.isnan(value) else value,
            "diverged": bool(run.result.diverged[i]),
            "initial_loss": float(run.result.initial_loss[i]),
            "train_loss": [float(v) for v in run.result.train_loss[i]],
            "metric": [float(v) for v in run.result.metric[i]],
        }

    return {
        "config": dict(config),
        "summary": [r._asdict() for r in rows],
        "cells": [
            {"task": run.task, "optimizer": run.optimizer, "axis": grid_axis(run.optimizer)}
            | {"cells": [cell(run, i) for i in range(len(run.cells.learning_rate))]}
            for run in runs
        ],
    }


class PanelConfig(NamedTuple):
    """What a panel run sweeps; ``values`` maps ``"damping"``/``"nu"`` to its grid."""

    tasks: Sequence[str]
    optimizers: Sequence[str]
    steps: int | None = None  # None: each task's own length
    lrs: Sequence[float] = LR_GRID
    values: Mapping[str, Sequence[float]] = {}
    extra: Mapping[str, Any] = {}
    evals: int = 10
    seed: int = 0
    factor: float = DIVERGENCE_FACTOR
    batching: str = "auto"


def run_panel(
    config: PanelConfig, report: Callable[[str], None] = print
) -> tuple[list[GridRun], list[Summary]]:
    """Every (task, optimizer) grid of ``config``; ``report`` gets one line per grid.

    Example:
      >>> from tekfax.experiments import robustness as rb
      >>> config = rb.PanelConfig(["digits-mlp"], ["sgdm"], steps=2, lrs=[0.01], evals=1)
      >>> runs, rows = rb.run_panel(config, report=lambda line: None)
      >>> rows[0].cells, rows[0].diverged_pct
      (1, 0.0)
    """
    runs, rows = [], []
    for task_name in config.tasks:
        task = TASKS[task_name]
        steps = config.steps or task.steps
        evals = max(1, min(config.evals, steps))
        steps = -(-steps // evals) * evals
        data = task_data(task, load_dataset(task.dataset), steps, config.seed)
        accuracy = model_loss(task.model) == "softmax_cross_entropy"
        for name in config.optimizers:
            axis = grid_axis(name)
            cells = make_cells(name, config.lrs, config.values.get(axis) if axis else None)
            extra = config.extra if optimizers.is_kronecker(name) else None
            run = run_grid(
                task, name, data, cells, evals, extra, config.seed, config.factor, config.batching
            )
            row = summarise(run, accuracy)
            runs.append(run)
            rows.append(row)
            report(
                f"{task_name} {name}: {row.cells} cells x {steps} steps in {run.seconds:.0f} s, "
                f"{row.diverged_pct:.0f}% diverged, best {_fmt(row.best)}"
            )
        _compare_with_adam(runs, rows, task_name, accuracy)
    return runs, rows


def _compare_with_adam(runs: list, rows: list, task: str, accuracy: bool) -> None:
    """Fills each of ``task``'s rows' ``near_adam_pct`` in place, when Adam was run."""
    adam = next((r for r in rows if r.task == task and r.optimizer == "adam"), None)
    for i, (run, row) in enumerate(zip(runs, rows, strict=True)):
        if row.task == task and adam is not None:
            rows[i] = row._replace(near_adam_pct=near_reference(run, adam.best, accuracy))


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.replace("-", "_"), value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="TASK")
    add("--optimizers", nargs="+", default=list(optimizers.OPTIMIZERS), metavar="NAME")
    add("--steps", type=int, help="steps per cell (default: each task's, 2000)")
    add("--lrs", nargs="+", type=float, default=list(LR_GRID))
    add("--dampings", nargs="+", type=float, default=list(optimizers.DAMPING_GRID))
    add("--nus", nargs="+", type=float, default=list(optimizers.NU_GRID))
    add("--norm-constraint", type=float, help="norm_constraint of every Kronecker preset")
    add("--set", nargs="+", type=_assignment, default=[], metavar="KEY=VALUE",
        help="more Kronecker preset arguments, e.g. eigen_every=20 ema=0.9")  # fmt: skip
    add("--evals", type=int, default=10, help="test evaluations per run (default 10)")
    add("--seed", type=int, default=0)
    add("--divergence-factor", type=float, default=DIVERGENCE_FACTOR)
    add("--batching", choices=("auto", "vmap", "map"), default="auto")
    add("--json", help="write the panel (rows and every cell) to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python scripts/robustness.py``: runs the panel, prints its table, writes the JSON."""
    args = _parser().parse_args(argv)
    unknown = set(args.optimizers) - set(optimizers.OPTIMIZERS)
    if unknown or (args.steps is not None and args.steps < 1):
        _parser().error(f"unknown optimizers {sorted(unknown)}" if unknown else "--steps < 1")
    extra = dict(args.set)
    if args.norm_constraint is not None:
        extra["norm_constraint"] = args.norm_constraint
    config = PanelConfig(
        args.tasks, args.optimizers, args.steps, args.lrs,
        {"damping": args.dampings, "nu": args.nus}, extra, args.evals, args.seed,
        args.divergence_factor, args.batching,
    )  # fmt: skip
    tic = time.perf_counter()
    runs, rows = run_panel(config, report=lambda line: print(line, file=sys.stderr))
    accuracies = {t: model_loss(TASKS[t].model) == "softmax_cross_entropy" for t in args.tasks}
    print(format_table(rows, accuracies))
    print(f"{sum(len(r.cells.learning_rate) for r in runs)} cells in "
          f"{time.perf_counter() - tic:.0f} s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(runs, rows, config._asdict()), f, indent=1)
    return 0
