"""One training run: (model, dataset, optimizer, hyperparameters, seed) -> per-epoch records.

Every optimizer is wrapped in :func:`tekfax.skip_non_finite`: a step with a non-finite
gradient, statistic or result is skipped (parameters and optimizer state unchanged) and
counted; the count is shown in the progress bar and recorded as ``skipped_steps``.

The jitted train step uses :func:`tekfax.loss_and_curvature` (statistics only on the steps
that consume them, ``compute_stats=tekfax.stats_needed(opt_state)``) for the Kronecker
optimizers and ``jax.value_and_grad`` for the first-order ones. Numeric hyperparameters are
step arguments, so runs that differ only in them share one compilation (cached per process).

Data parallelism: with a ``mesh`` (:func:`tekfax.sharding.data_mesh`), every batch is
sharded over its ``data`` axis and params and optimizer state are replicated; under
``jax.jit`` the statistics stay global-batch statistics, so the run matches one device's up
to float rounding. With several processes (``jax.distributed.initialize``) every process
runs ``train`` on the same data and process 0 writes the checkpoints.

Determinism: epoch ``e`` shuffles with ``np.random.default_rng((seed, e))`` and step ``t``
samples the Fisher's labels with ``jax.random.fold_in(key, t)``, so a run resumed from its
checkpoint ends bit-for-bit where the uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tekfax
from tekfax import losses, sharding
from tekfax.experiments import checkpoint, optimizers
from tekfax.experiments.data import Dataset, iterate_batches
from tekfax.experiments.models import create_model, init_variables, model_loss
from tekfax.experiments.progress import ProgressBar

EVAL_CHUNK = 500
TIMING_FIELDS = ("epoch_seconds", "eval_seconds", "cumulative_seconds", "images_per_second")


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed by this run."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What one run trains; ``hparams`` are resolved (see :mod:`.optimizers`)."""

    model: str
    optimizer: str
    hparams: Mapping[str, Any]
    seed: int = 0
    epochs: int = 1
    batch_size: int = 128
    lr_decay_every: int | None = None

    def identity(self, dataset: Dataset) -> dict:
        """Everything but ``epochs``: a checkpoint only resumes the same run."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "hparams": dict(self.hparams),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "lr_decay_every": self.lr_decay_every,
            "dataset": dataset.name,
            "num_train": len(dataset.x_train),
        }


@dataclasses.dataclass
class RunResult:
    """Records (one dict per epoch) and final state of a run."""

    config: RunConfig
    records: list[dict]
    params: Any
    batch_stats: Any
    opt_state: Any
    compile_seconds: float
    diverged: bool
    resumed_from_epoch: int
    skipped_steps: int = 0


_STEPS: dict[tuple, Callable] = {}
_PARAM_INITS: dict[tuple, Callable] = {}
_OPT_INITS: dict[tuple, Callable] = {}
_EVALS: dict[tuple, Callable] = {}


def _variables(params: Any, batch_stats: Any) -> dict:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _guarded(name: str, numeric: Any, static: dict, boundaries: dict) -> Any:
    """The optimizer wrapped in :func:`tekfax.skip_non_finite`: a NaN batch is skipped."""
    return tekfax.skip_non_finite(optimizers.make_optimizer(name, numeric, static, boundaries))


def _init_optimizer(name: str, static: dict, params: Any, numeric: dict) -> Any:
    return _guarded(name, numeric, static, {}).init(params)


def _correct(loss: str, logits: jax.Array, targets: jax.Array) -> jax.Array:
    if loss != "softmax_cross_entropy":
        return jnp.zeros([], jnp.int32)
    return jnp.sum(jnp.argmax(logits, -1) == targets).astype(jnp.int32)


def _make_step(model, loss: str, name: str, static: dict, boundaries: dict, mesh=None) -> Callable:
    def step(params, batch_stats, opt_state, numeric, x, y, key, index):
        opt = _guarded(name, numeric, static, boundaries)

        def logits_fn(p):
            if batch_stats:
                logits, new = model.apply(
                    _variables(p, batch_stats), x, train=True, mutable=["batch_stats"]
                )
                new = new["batch_stats"]
            else:
                logits, new = model.apply(_variables(p, batch_stats), x, train=True), batch_stats
            return logits, (new, _correct(loss, logits, y))

        if optimizers.is_kronecker(name):
            out = tekfax.loss_and_curvature(
                logits_fn,
                params,
                y,
                loss=loss,
                fisher=static["fisher"],
                rng=jax.random.fold_in(key, index),
                has_aux=True,
                compute_stats=tekfax.stats_needed(opt_state),
            )
            value, grads, (new_stats, correct) = out.loss, out.grads, out.aux
            updates, opt_state = opt.update(grads, opt_state, params, stats=out.stats)
        else:

            def loss_fn(p):
                logits, aux = logits_fn(p)
                return losses.mean_loss(loss, logits, y), aux

            (value, (new_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, value, correct

    return jax.jit(step, out_shardings=None if mesh is None else sharding.replicated(mesh))


def _make_eval(model, loss: str) -> Callable:
    @jax.jit
    def evaluate(params, batch_stats, x, y, mask):
        logits = model.apply(_variables(params, batch_stats), x, train=False)
        per_example = losses.per_example_loss(loss, logits.astype(jnp.float32), y)
        correct = (jnp.argmax(logits, -1) == y) if loss == "softmax_cross_entropy" else mask
        return jnp.sum(per_example * mask), jnp.sum(correct * mask)

    return evaluate


def targets_for(loss: str, dataset: Dataset, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Labels, or for the auto-encoder its flattened inputs on the [0, 1] pixel scale."""
    if loss == "softmax_cross_entropy":
        return y
    return dataset.unnormalize(x).reshape(len(x), -1)


def evaluate(
    fn: Callable, params: Any, batch_stats: Any, dataset: Dataset, loss: str, mesh=None
) -> tuple[float, float | None]:
    """Mean loss and accuracy (None unless classification) on the test split, in chunks.

    With a ``mesh`` each chunk (padded to a multiple of the device count) is sharded.
    """
    x, y = dataset.x_test, targets_for(loss, dataset, dataset.x_test, dataset.y_test)
    ways = 1 if mesh is None else mesh.size
    chunk = -(-min(EVAL_CHUNK, len(x)) // ways) * ways
    total_loss, total_correct = 0.0, 0.0
    for start in range(0, len(x), chunk):
        xb, yb = x[start : start + chunk], y[start : start + chunk]
        mask = np.ones(chunk, np.float32)
        if len(xb) < chunk:
            pad = chunk - len(xb)
            mask[len(xb) :] = 0.0
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad, *yb.shape[1:]), yb.dtype)])
        if mesh is not None:
            xb, yb, mask = sharding.shard_batch(mesh, (xb, yb, mask))
        batch_loss, batch_correct = fn(params, batch_stats, xb, yb, mask)
        total_loss += float(sharding.to_host(batch_loss))
        total_correct += float(sharding.to_host(batch_correct))
    accuracy = total_correct / len(x) if loss == "softmax_cross_entropy" else None
    return total_loss / len(x), accuracy


def _numeric_args(numeric: Mapping[str, float]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in sorted(numeric.items())}


def _skipped(opt_state: Any) -> int:
    """The guard's count of skipped steps, read on the host (also across processes)."""
    return int(sharding.to_host(tekfax.skipped_steps(opt_state)))


def _fetch(values: list) -> np.ndarray:
    """Step outputs to the host; replicated arrays spanning processes are read locally."""
    return np.asarray([sharding.to_host(v) for v in values])


def train(
    config: RunConfig,
    dataset: Dataset,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    label: str | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> RunResult:
    """Trains one run, evaluating and checkpointing after every epoch.

    Args:
      config: model, optimizer, resolved hyperparameters, seed, epochs, batch size and the
        step schedule (learning rate x0.1 every ``lr_decay_every`` epochs).
      dataset: trains on its train split, reports loss and accuracy on its test split.
      checkpoint_path: where to write the checkpoint after each epoch (None: no checkpoint).
      resume: continue from ``checkpoint_path`` if it exists (it must be the same run).
      label: progress-bar prefix. progress: show the bar. stream: its stream (stderr).
      mesh: train data-parallel over this one-axis mesh (``config.batch_size`` must be a
        multiple of its size); None (or one device) trains on the default device.
    """
    if mesh is not None and mesh.size == 1 and jax.process_count() == 1:
        mesh = None
    if mesh is not None and config.batch_size % mesh.size:
        raise ValueError(
            f"batch size {config.batch_size} is not a multiple of the {mesh.size} devices."
        )
    label = label or f"{config.optimizer} seed {config.seed}"
    loss = model_loss(config.model)
    input_shape = dataset.input_shape
    model = create_model(config.model, dataset.num_classes, input_shape)
    numeric, static = optimizers.split(config.hparams)
    steps_per_epoch = len(dataset.x_train) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch size {config.batch_size} exceeds the {len(dataset.x_train)} training examples."
        )
    boundaries = optimizers.step_boundaries(config.lr_decay_every, steps_per_epoch, config.epochs)

    key = jax.random.key(config.seed)
    model_key = (config.model, dataset.num_classes, input_shape)
    if model_key not in _PARAM_INITS:  # one program per model, not hundreds of eager ops
        _PARAM_INITS[model_key] = jax.jit(functools.partial(init_variables, model, input_shape))
    variables = _PARAM_INITS[model_key](jax.random.fold_in(key, 0))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    opt_key = (*model_key, config.optimizer, tuple(sorted(static.items())))
    if opt_key not in _OPT_INITS:
        _OPT_INITS[opt_key] = jax.jit(
            functools.partial(_init_optimizer, config.optimizer, dict(static))
        )
    opt_state = _OPT_INITS[opt_key](params, _numeric_args(numeric))
    train_key = jax.random.fold_in(key, 1)
    records: list[dict] = []
    start_epoch, step, diverged = 0, 0, False
    identity = config.identity(dataset)
    if resume and checkpoint_path is not None and os.path.exists(checkpoint_path):
        payload = checkpoint.read(checkpoint_path)
        if payload["run"] != identity:
            raise ResumeError(
                f"{checkpoint_path} belongs to another run:\n  {payload['run']}\n"
                f"this run:\n  {identity}"
            )
        if payload["epoch"] > config.epochs:
            raise ResumeError(
                f"{checkpoint_path} is at epoch {payload['epoch']}, past --epochs {config.epochs}."
            )
        params, batch_stats, opt_state, train_key = checkpoint.restore(
            payload, params, batch_stats, opt_state
        )
        records, start_epoch, step = payload["records"], payload["epoch"], payload["step"]
        diverged = bool(payload["extra"].get("diverged", False))
    resumed_from = start_epoch
    host_state = (params, batch_stats, opt_state)
    if mesh is not None:
        params, batch_stats, opt_state = sharding.replicate(mesh, host_state)
    step_key_array = train_key if mesh is None else sharding.replicate(mesh, train_key)

    cache_key = (config.model, dataset.num_classes, input_shape, loss, config.optimizer)
    step_key = (*cache_key, config.batch_size, tuple(sorted(static.items())))
    step_key += (tuple(sorted(boundaries.items())), mesh)
    args = _numeric_args(numeric)
    compile_seconds = 0.0
    pending = start_epoch < config.epochs and not diverged
    if pending and (step_key not in _STEPS or cache_key[:4] not in _EVALS):
        tic = time.perf_counter()
        train_step = _STEPS.setdefault(
            step_key, _make_step(model, loss, config.optimizer, static, boundaries, mesh)
        )
        eval_fn = _EVALS.setdefault(cache_key[:4], _make_eval(model, loss))
        # a real batch: all-zero inputs make degenerate factors whose eigh is slow
        x0 = dataset.x_train[: config.batch_size]
        y0 = targets_for(loss, dataset, x0, dataset.y_train[: config.batch_size])
        if mesh is not None:
            x0, y0 = sharding.shard_batch(mesh, (x0, y0))
        jax.block_until_ready(
            train_step(params, batch_stats, opt_state, args, x0, y0, step_key_array, np.int32(0))
        )
        evaluate(eval_fn, params, batch_stats, dataset, loss, mesh)
        compile_seconds = time.perf_counter() - tic
    train_step, eval_fn = _STEPS.get(step_key), _EVALS.get(cache_key[:4])

    cumulative = records[-1]["cumulative_seconds"] if records else 0.0
    for epoch in range(start_epoch, config.epochs):
        if diverged:
            break
        rng = np.random.default_rng((config.seed, epoch))
        lr_now = optimizers.learning_rate_at(numeric["learning_rate"], step, boundaries)
        bar = ProgressBar(label, epoch + 1, config.epochs, steps_per_epoch, stream, progress)
        batch_losses, batch_correct = [], []
        loss_sum, correct_sum, fetched = 0.0, 0.0, 0
        tic = time.perf_counter()
        batches = iterate_batches(
            dataset.x_train, dataset.y_train, config.batch_size, rng, dataset.augment
        )
        for i, (xb, yb) in enumerate(batches):
            yb = targets_for(loss, dataset, xb, yb)
            if mesh is not None:
                xb, yb = sharding.shard_batch(mesh, (xb, yb))
            params, batch_stats, opt_state, value, correct = train_step(
                params, batch_stats, opt_state, args, xb, yb, step_key_array, np.int32(step)
            )
            step += 1
            batch_losses.append(value)
            batch_correct.append(correct)
            if bar.due():
                loss_sum += float(np.sum(_fetch(batch_losses[fetched:])))
                correct_sum += float(np.sum(_fetch(batch_correct[fetched:])))
                fetched = i + 1
                seen = fetched * config.batch_size
                accuracy = correct_sum / seen if loss == "softmax_cross_entropy" else None
                rate = seen / (time.perf_counter() - tic)
                skipped = _skipped(opt_state)
                bar.update(fetched, loss_sum / fetched, accuracy, rate, skipped)
        jax.block_until_ready(params)
        epoch_seconds = time.perf_counter() - tic
        # Skipped (non-finite) batches are left out; an epoch with no finite batch diverged.
        epoch_losses = np.asarray(_fetch(batch_losses), np.float64)
        finite = np.isfinite(epoch_losses)
        train_loss = float(np.mean(epoch_losses[finite])) if finite.any() else math.nan
        skipped = _skipped(opt_state)
        seen = len(batch_losses) * config.batch_size
        train_accuracy = (
            float(np.sum(_fetch(batch_correct))) / seen if loss == "softmax_cross_entropy" else None
        )
        tic = time.perf_counter()
        test_loss, test_accuracy = evaluate(eval_fn, params, batch_stats, dataset, loss, mesh)
        eval_seconds = time.perf_counter() - tic
        cumulative += epoch_seconds
        diverged = not math.isfinite(train_loss)
        records.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_accuracy": train_accuracy,
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                "learning_rate": lr_now,
                "epoch_seconds": epoch_seconds,
                "eval_seconds": eval_seconds,
                "cumulative_seconds": cumulative,
                "images_per_second": seen / epoch_seconds,
                "skipped_steps": skipped,
            }
        )
        test_text = (
            f"test loss {test_loss:.4f}"
            if test_accuracy is None
            else f"test acc {100 * test_accuracy:.2f}%"
        )
        bar.close(
            len(batch_losses),
            train_loss,
            train_accuracy,
            seen / epoch_seconds,
            test_text + (" (diverged)" if diverged else ""),
            skipped,
        )
        if mesh is not None:
            host_state = jax.tree_util.tree_map(sharding.to_host, (params, batch_stats, opt_state))
        else:
            host_state = (params, batch_stats, opt_state)
        if checkpoint_path is not None and jax.process_index() == 0:
            checkpoint.save(
                checkpoint_path,
                params=host_state[0],
                batch_stats=host_state[1],
                opt_state=host_state[2],
                key=train_key,
                seed=config.seed,
                epoch=epoch + 1,
                step=step,
                records=records,
                run=identity,
                extra={"diverged": diverged},
            )
    return RunResult(
        config,
        records,
        *host_state,
        compile_seconds,
        diverged,
        resumed_from,
        _skipped(opt_state),
    )
