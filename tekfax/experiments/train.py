"""One training run: (model, dataset, optimizer, hyperparameters, seed) -> per-epoch records.

Every optimizer is guarded by :func:`tekfax.skip_non_finite` (the Kronecker presets by
their default, the first-order ones by a wrapper): a step with a non-finite
gradient, statistic or result is skipped (parameters and optimizer state unchanged) and
counted; the count is shown in the progress bar and recorded as ``skipped_steps``.

Divergence: a run *diverged* at the first epoch whose mean training loss (over its finite
batches) is not finite (no batch was finite) or exceeds :data:`DIVERGENCE_FACTOR` times the
run's initial loss, the loss of its first finite step, computed before any update
(:func:`has_diverged`). Training stops after that epoch; ``RunResult.diverged_epoch`` names it.

The jitted train step uses :func:`tekfax.loss_and_curvature` (statistics only on the steps
that consume them, ``compute_stats=tekfax.stats_needed(opt_state)``) for the Kronecker
optimizers and ``jax.value_and_grad`` for the first-order ones. Numeric hyperparameters are
step arguments, so runs that differ only in them share one compilation (cached per process).

Data parallelism: with a ``mesh`` (:func:`tekfax.sharding.data_mesh`), every batch is
sharded over its ``data`` axis and params and optimizer state are replicated; under
``jax.jit`` the statistics stay global-batch statistics, so the run matches one device's up
to float rounding. With several processes (``jax.distributed.initialize``) every process
runs ``train`` on the same data and saves the checkpoints, which orbax writes once.

Checkpoints: after the last epoch (or a divergence), and after any epoch that ends at least
:data:`CHECKPOINT_SECONDS` after the previous save; with several processes after every epoch,
so that all of them agree on when to save without comparing clocks. A save costs about 0.2 s
on a 2-core CPU (orbax writes a folder and renames it): saving after each of the default
comparison's 8 x 20 epochs took 32 of its 64 s when its steps came from the compilation
cache. An interrupted run loses at most that many seconds of training.

Sequence tasks (a :mod:`.models` sequence model on a token dataset): the optimizers see
tekfax's loss, summed over the L positions of a sequence and averaged over the batch, but the
records average over tokens: ``train_loss`` and ``test_loss`` are nats per token, and the
accuracies are the fractions of tokens predicted right (:func:`positions_per_example`).

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
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tekfax
from tekfax import losses, sharding
from tekfax.experiments import checkpoint, optimizers
from tekfax.experiments.data import Dataset, iterate_batches
from tekfax.experiments.models import create_model, init_variables, is_sequence_model, model_loss
from tekfax.experiments.progress import ProgressBar

EVAL_CHUNK = 500
TIMING_FIELDS = ("epoch_seconds", "eval_seconds", "cumulative_seconds", "images_per_second")
DIVERGENCE_FACTOR = 10.0
CHECKPOINT_SECONDS = 60.0  # least time between two checkpoints of a run (module docstring)


def has_diverged(train_loss: float, initial_loss: float | None) -> bool:
    """Whether an epoch's mean training loss means the run diverged (see the module docstring).

    Example:
      >>> from tekfax.experiments.train import has_diverged
      >>> has_diverged(float("nan"), 2.3), has_diverged(357.0, 2.3), has_diverged(0.4, 2.3)
      (True, True, False)
    """
    if not math.isfinite(train_loss):
        return True
    return initial_loss is not None and train_loss > DIVERGENCE_FACTOR * abs(initial_loss)


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
    steps: int = 0
    initial_loss: float | None = None

    @property
    def diverged_epoch(self) -> int | None:
        """The epoch (from 1) at which divergence was detected, or None."""
        return len(self.records) if self.diverged else None


_STEPS: dict[tuple, Callable] = {}
_PARAM_INITS: dict[tuple, Callable] = {}
_OPT_INITS: dict[tuple, Callable] = {}
_EVALS: dict[tuple, Callable] = {}


def _variables(params: Any, batch_stats: Any) -> dict:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _guarded(name: str, numeric: Any, static: dict, boundaries: dict) -> Any:
    """The optimizer, guarded by :func:`tekfax.skip_non_finite`: a NaN batch is skipped.

    The Kronecker presets guard themselves by default; the first-order ones are wrapped here.
    """
    opt = optimizers.make_optimizer(name, numeric, static, boundaries)
    return tekfax.skip_non_finite(opt) if name in optimizers.FIRST_ORDER else opt


def _init_optimizer(name: str, static: dict, params: Any, numeric: dict) -> Any:
    return _guarded(name, numeric, static, {}).init(params)


def _correct(loss: str, logits: jax.Array, targets: jax.Array) -> jax.Array:
    if loss != "softmax_cross_entropy":
        return jnp.zeros([], jnp.int32)
    return jnp.sum(jnp.argmax(logits, -1) == targets).astype(jnp.int32)


STEP_OPTIMIZATION_LEVEL = 1
"""XLA:CPU's backend (LLVM) optimisation level for the tool's training steps; XLA's is 3."""


def step_compiler_options(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """The ``compiler_options`` of the tool's jitted training step.

    On a CPU backend, :data:`STEP_OPTIMIZATION_LEVEL`, unless ``XLA_FLAGS`` in ``environ``
    sets the level itself; elsewhere none (docs/algorithms.md, section 8). The level sets
    how long LLVM spends on each of a Kronecker step's several hundred fused kernels; the
    products and ``eigh`` are library calls it does not touch. Measured on the 2-core CPU
    with the classic fusion emitters (:func:`.compare.fast_cpu_compilation`): the digits
    CNN's TEKFAC step compiles in 2.1 s instead of 3.3 s, the MNIST auto-encoder's KFAC step
    in 4.3 s instead of 5.7 s, whose mean step stays within 1%. Level 0 doubles the step.
    GPUs keep XLA's level, which there also sets every kernel's code (not measured). The
    tool's choice for its own steps, like :mod:`.compare`'s settings; the library never
    sets it.

    Example:
      >>> from tekfax.experiments.train import step_compiler_options
      >>> step_compiler_options({"XLA_FLAGS": ""})  # on this CPU
      {'xla_backend_optimization_level': 1}
      >>> step_compiler_options({"XLA_FLAGS": "--xla_backend_optimization_level=0"})
      {}
    """
    return cpu_compiler_options(STEP_OPTIMIZATION_LEVEL, environ)


INIT_OPTIMIZATION_LEVEL = 0
"""XLA:CPU's backend optimisation level for the tool's one-shot initialisation programs.

They run once per run, so their compilation is all they cost: at level 0 the digits
auto-encoder's initial weights compile in 1.3 s instead of 3.3 s at XLA's default, ResNet20's
in 2.4 s instead of 8.6 s, and the default ``tekfax-compare`` run's eight optimizer states in
0.8 s instead of 3.3 s (2-core CPU). The level changes how the initialisers' floating point
is vectorised, so the weights differ in rounding from those of
:func:`.models.init_variables` compiled at XLA's default level.
"""


def cpu_compiler_options(level: int, environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """``{"xla_backend_optimization_level": level}`` on a CPU backend, else ``{}``.

    ``{}`` too when ``XLA_FLAGS`` in ``environ`` sets the level itself: the user's wins.

    Example:
      >>> from tekfax.experiments.train import cpu_compiler_options
      >>> cpu_compiler_options(0, {"XLA_FLAGS": ""})  # on this CPU
      {'xla_backend_optimization_level': 0}
      >>> cpu_compiler_options(0, {"XLA_FLAGS": "--xla_backend_optimization_level=2"})
      {}
    """
    if jax.default_backend() != "cpu" or "xla_backend_optimization_level" in environ.get(
        "XLA_FLAGS", ""
    ):
        return {}
    return {"xla_backend_optimization_level": level}


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

    return jax.jit(
        step,
        out_shardings=None if mesh is None else sharding.replicated(mesh),
        compiler_options=step_compiler_options(),
    )


def _make_eval(model, loss: str) -> Callable:
    @jax.jit
    def evaluate(params, batch_stats, x, y, mask):
        logits = model.apply(_variables(params, batch_stats), x, train=False)
        per_example = losses.per_example_loss(loss, logits.astype(jnp.float32), y)
        if loss == "softmax_cross_entropy":  # right predictions per example (tokens of a row)
            correct = (jnp.argmax(logits, -1) == y).reshape(y.shape[0], -1).sum(axis=1)
        else:
            correct = mask
        return jnp.sum(per_example * mask), jnp.sum(correct * mask)

    return evaluate


def positions_per_example(loss: str, y: np.ndarray) -> int:
    """Predictions per example, which the losses and accuracies are averaged over.

    L for next-token targets ``y`` of shape (N, L) (the loss of tekfax sums over them), 1
    for class labels (N,) and for the auto-encoder, whose loss stays per image.

    Example:
      >>> import numpy as np
      >>> from tekfax.experiments.train import positions_per_example
      >>> positions_per_example("softmax_cross_entropy", np.zeros((4, 16), np.int32))
      16
      >>> positions_per_example("softmax_cross_entropy", np.zeros(4, np.int32))
      1
    """
    if loss != "softmax_cross_entropy":
        return 1
    return math.prod(np.shape(y)[1:])


def targets_for(loss: str, dataset: Dataset, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Labels, or for the auto-encoder its flattened inputs on the [0, 1] pixel scale."""
    if loss == "softmax_cross_entropy":
        return y
    return dataset.unnormalize(x).reshape(len(x), -1)


def evaluate(
    fn: Callable, params: Any, batch_stats: Any, dataset: Dataset, loss: str, mesh=None
) -> tuple[float, float | None]:
    """Mean loss and accuracy (None unless classification) on the test split, in chunks.

    For next-token targets both are per token (:func:`positions_per_example`). With a
    ``mesh`` each chunk (padded to a multiple of the device count) is sharded.
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
    count = len(x) * positions_per_example(loss, y)
    accuracy = total_correct / count if loss == "softmax_cross_entropy" else None
    return total_loss / count, accuracy


def _numeric_args(numeric: Mapping[str, float]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in sorted(numeric.items())}


def _skipped(opt_state: Any) -> int:
    """The guard's count of skipped steps, read on the host (also across processes)."""
    return int(sharding.to_host(tekfax.skipped_steps(opt_state)))


def _fetch(values: list) -> np.ndarray:
    """Step outputs to the host; replicated arrays spanning processes are read locally."""
    return np.asarray([sharding.to_host(v) for v in values])


class _Plan(NamedTuple):
    """What stays fixed during a run."""

    model: Any
    loss: str
    numeric: dict[str, float]
    static: dict[str, Any]
    steps_per_epoch: int
    boundaries: dict[int, float]
    identity: dict
    positions: int = 1


class _State(NamedTuple):
    """What each train step updates."""

    params: Any
    batch_stats: Any
    opt_state: Any


class _Progress(NamedTuple):
    """Where the run stands: the finished epochs' records and the counters."""

    records: list[dict]
    epoch: int
    step: int
    diverged: bool
    initial_loss: float | None = None


class _Programs(NamedTuple):
    """The compiled train step and evaluation, and the seconds spent compiling them."""

    train_step: Callable | None
    eval_fn: Callable | None
    compile_seconds: float


class _EpochRun(NamedTuple):
    """One epoch's passes over the batches, before evaluation."""

    state: _State
    step: int
    losses: list
    correct: list
    seconds: float


def _usable_mesh(config: RunConfig, mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh | None:
    """The mesh to train over: None for one device in one process."""
    if mesh is not None and mesh.size == 1 and jax.process_count() == 1:
        return None
    if mesh is not None and config.batch_size % mesh.size:
        raise ValueError(
            f"batch size {config.batch_size} is not a multiple of the {mesh.size} devices."
        )
    return mesh


def _plan(config: RunConfig, dataset: Dataset) -> _Plan:
    """The model, loss, split hyperparameters and the learning-rate schedule's boundaries."""
    if is_sequence_model(config.model) != dataset.is_sequence:
        kind = "token sequences" if is_sequence_model(config.model) else "images"
        raise ValueError(f"model {config.model!r} needs {kind}; dataset {dataset.name!r} differs.")
    model = create_model(config.model, dataset.num_classes, dataset.input_shape)
    numeric, static = optimizers.split(config.hparams)
    steps_per_epoch = len(dataset.x_train) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch size {config.batch_size} exceeds the {len(dataset.x_train)} training examples."
        )
    boundaries = optimizers.step_boundaries(config.lr_decay_every, steps_per_epoch, config.epochs)
    loss = model_loss(config.model)
    identity = config.identity(dataset)
    positions = positions_per_example(loss, dataset.y_train)
    return _Plan(model, loss, numeric, static, steps_per_epoch, boundaries, identity, positions)


def _init_state(config: RunConfig, dataset: Dataset, plan: _Plan) -> tuple[_State, jax.Array]:
    """Fresh params, batch statistics and optimizer state, and the key of the train steps."""
    key = jax.random.key(config.seed)
    model_key = (config.model, dataset.num_classes, dataset.input_shape)
    # One program per model and per optimizer, not hundreds of eager ops; each runs once.
    once = cpu_compiler_options(INIT_OPTIMIZATION_LEVEL)
    if model_key not in _PARAM_INITS:
        init = functools.partial(init_variables, plan.model, dataset.input_shape)
        _PARAM_INITS[model_key] = jax.jit(init, compiler_options=once)
    variables = _PARAM_INITS[model_key](jax.random.fold_in(key, 0))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    opt_key = (*model_key, config.optimizer, tuple(sorted(plan.static.items())))
    if opt_key not in _OPT_INITS:
        init = functools.partial(_init_optimizer, config.optimizer, dict(plan.static))
        _OPT_INITS[opt_key] = jax.jit(init, compiler_options=once)
    opt_state = _OPT_INITS[opt_key](params, _numeric_args(plan.numeric))
    return _State(params, batch_stats, opt_state), jax.random.fold_in(key, 1)


def _resume(
    path: str | os.PathLike, plan: _Plan, epochs: int, state: _State
) -> tuple[_State, jax.Array, _Progress]:
    """The state, key and progress saved in the checkpoint at ``path`` (of this same run)."""
    payload = checkpoint.read(path)
    if payload["run"] != plan.identity:
        raise ResumeError(
            f"{path} belongs to another run:\n  {payload['run']}\nthis run:\n  {plan.identity}"
        )
    if payload["epoch"] > epochs:
        raise ResumeError(f"{path} is at epoch {payload['epoch']}, past --epochs {epochs}.")
    *restored, key = checkpoint.restore(payload, *state)
    extra = payload["extra"]
    diverged, initial = bool(extra.get("diverged", False)), extra.get("initial_loss")
    progress = _Progress(payload["records"], payload["epoch"], payload["step"], diverged, initial)
    return _State(*restored), key, progress


def _programs(
    config: RunConfig,
    dataset: Dataset,
    plan: _Plan,
    state: _State,
    key: jax.Array,
    mesh: jax.sharding.Mesh | None,
    pending: bool,
) -> _Programs:
    """The (cached) train step and evaluation, compiled now when epochs are pending."""
    cache_key = (config.model, dataset.num_classes, dataset.input_shape, plan.loss)
    step_key = (*cache_key, config.optimizer, config.batch_size)
    step_key += (tuple(sorted(plan.static.items())), tuple(sorted(plan.boundaries.items())), mesh)
    compile_seconds = 0.0
    if pending and (step_key not in _STEPS or cache_key not in _EVALS):
        tic = time.perf_counter()
        make = functools.partial(_make_step, plan.model, plan.loss, config.optimizer)
        train_step = _STEPS.setdefault(step_key, make(plan.static, plan.boundaries, mesh))
        eval_fn = _EVALS.setdefault(cache_key, _make_eval(plan.model, plan.loss))
        # a real batch: all-zero inputs make degenerate factors whose eigh is slow
        x0 = dataset.x_train[: config.batch_size]
        y0 = targets_for(plan.loss, dataset, x0, dataset.y_train[: config.batch_size])
        if mesh is not None:
            x0, y0 = sharding.shard_batch(mesh, (x0, y0))
        args = _numeric_args(plan.numeric)
        jax.block_until_ready(train_step(*state, args, x0, y0, key, np.int32(0)))
        evaluate(eval_fn, state.params, state.batch_stats, dataset, plan.loss, mesh)
        compile_seconds = time.perf_counter() - tic
    return _Programs(_STEPS.get(step_key), _EVALS.get(cache_key), compile_seconds)


def _run_batches(
    config: RunConfig,
    dataset: Dataset,
    plan: _Plan,
    train_step: Callable,
    state: _State,
    key: jax.Array,
    step: int,
    epoch: int,
    bar: ProgressBar,
    mesh: jax.sharding.Mesh | None,
) -> _EpochRun:
    """One pass over the shuffled batches of epoch ``epoch``, redrawing ``bar`` when due."""
    rng = np.random.default_rng((config.seed, epoch))
    args = _numeric_args(plan.numeric)
    losses, correct = [], []
    loss_sum, correct_sum, fetched = 0.0, 0.0, 0
    classification = plan.loss == "softmax_cross_entropy"
    tic = time.perf_counter()
    x, y = dataset.x_train, dataset.y_train
    batches = iterate_batches(x, y, config.batch_size, rng, dataset.augment)
    for i, (xb, yb) in enumerate(batches):
        yb = targets_for(plan.loss, dataset, xb, yb)
        if mesh is not None:
            xb, yb = sharding.shard_batch(mesh, (xb, yb))
        *new_state, value, batch_correct = train_step(*state, args, xb, yb, key, np.int32(step))
        state, step = _State(*new_state), step + 1
        losses.append(value)
        correct.append(batch_correct)
        if bar.due():  # fetch the running numbers only for a redraw
            loss_sum += float(np.sum(_fetch(losses[fetched:])))
            correct_sum += float(np.sum(_fetch(correct[fetched:])))
            fetched = i + 1
            seen = fetched * config.batch_size
            accuracy = correct_sum / (seen * plan.positions) if classification else None
            rate = seen / (time.perf_counter() - tic)
            loss_now = loss_sum / (fetched * plan.positions)
            bar.update(fetched, loss_now, accuracy, rate, _skipped(state.opt_state))
    jax.block_until_ready(state.params)
    return _EpochRun(state, step, losses, correct, time.perf_counter() - tic)


def _epoch_record(
    config: RunConfig,
    dataset: Dataset,
    plan: _Plan,
    eval_fn: Callable,
    run: _EpochRun,
    epoch: int,
    learning_rate: float,
    cumulative: float,
    mesh: jax.sharding.Mesh | None,
) -> dict:
    """The epoch's record: train metrics of ``run``, test metrics, learning rate and timing."""
    # Skipped (non-finite) batches are left out; an epoch with no finite batch diverged.
    epoch_losses = np.asarray(_fetch(run.losses), np.float64) / plan.positions
    finite = np.isfinite(epoch_losses)
    train_loss = float(np.mean(epoch_losses[finite])) if finite.any() else math.nan
    seen = len(run.losses) * config.batch_size
    train_accuracy = None
    if plan.loss == "softmax_cross_entropy":
        train_accuracy = float(np.sum(_fetch(run.correct))) / (seen * plan.positions)
    tic = time.perf_counter()
    params, batch_stats = run.state.params, run.state.batch_stats
    test_loss, test_accuracy = evaluate(eval_fn, params, batch_stats, dataset, plan.loss, mesh)
    return {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "learning_rate": learning_rate,
        "epoch_seconds": run.seconds,
        "eval_seconds": time.perf_counter() - tic,
        "cumulative_seconds": cumulative + run.seconds,
        "images_per_second": seen / run.seconds,
        "skipped_steps": _skipped(run.state.opt_state),
    }


def _close_bar(bar: ProgressBar, record: dict, steps: int, diverged: bool) -> None:
    """The epoch's final line: train metrics, then the test metric (and divergence)."""
    if record["test_accuracy"] is None:
        note = f"test loss {record['test_loss']:.4f}"
    else:
        note = f"test acc {100 * record['test_accuracy']:.2f}%"
    note += " (diverged)" if diverged else ""
    rate = record["images_per_second"]
    args = (record["train_loss"], record["train_accuracy"], rate, note, record["skipped_steps"])
    bar.close(steps, *args)


def _host_state(state: _State, mesh: jax.sharding.Mesh | None) -> _State:
    """The state on the host (replicated arrays spanning processes are read locally)."""
    if mesh is None:
        return state
    return _State(*jax.tree_util.tree_map(sharding.to_host, tuple(state)))


def _save_due(config: RunConfig, done: _Progress, saved_at: float, seconds: float | None) -> bool:
    """Whether to checkpoint the epoch just finished (module docstring: Checkpoints)."""
    if done.epoch >= config.epochs or done.diverged or jax.process_count() > 1:
        return True
    least = CHECKPOINT_SECONDS if seconds is None else seconds
    return time.perf_counter() - saved_at >= least


def _save(path, state: _State, key: jax.Array, seed: int, plan: _Plan, progress: _Progress):
    """Checkpoints the finished epoch (every process calls it; orbax writes once)."""
    checkpoint.save(
        path,
        params=state.params,
        batch_stats=state.batch_stats,
        opt_state=state.opt_state,
        key=key,
        seed=seed,
        epoch=progress.epoch,
        step=progress.step,
        records=progress.records,
        run=plan.identity,
        extra={"diverged": progress.diverged, "initial_loss": progress.initial_loss},
    )


def _train_epoch(
    config: RunConfig,
    dataset: Dataset,
    plan: _Plan,
    programs: _Programs,
    state: _State,
    key: jax.Array,
    progress: _Progress,
    bar: ProgressBar,
    mesh: jax.sharding.Mesh | None,
) -> tuple[_State, _Progress]:
    """Trains and evaluates epoch ``progress.epoch``; returns the new state and progress."""
    epoch, records = progress.epoch, progress.records
    learning_rate = optimizers.learning_rate_at(
        plan.numeric["learning_rate"], progress.step, plan.boundaries
    )
    run = _run_batches(
        config, dataset, plan, programs.train_step, state, key, progress.step, epoch, bar, mesh
    )
    cumulative = records[-1]["cumulative_seconds"] if records else 0.0
    record = _epoch_record(
        config, dataset, plan, programs.eval_fn, run, epoch, learning_rate, cumulative, mesh
    )
    initial = progress.initial_loss
    if initial is None:
        values = np.asarray(_fetch(run.losses), np.float64) / plan.positions
        finite = [v for v in values if math.isfinite(v)]
        initial = float(finite[0]) if finite else None
    diverged = has_diverged(record["train_loss"], initial)
    _close_bar(bar, record, len(run.losses), diverged)
    return run.state, _Progress([*records, record], epoch + 1, run.step, diverged, initial)


def train(
    config: RunConfig,
    dataset: Dataset,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_seconds: float | None = None,
    label: str | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> RunResult:
    """Trains one run, evaluating after every epoch and checkpointing (see the module).

    Args:
      config: model, optimizer, resolved hyperparameters, seed, epochs, batch size and the
        step schedule (learning rate x0.1 every ``lr_decay_every`` epochs).
      dataset: trains on its train split, reports loss and accuracy on its test split.
      checkpoint_path: the folder of the run's checkpoint (None: no checkpoint).
      resume: continue from ``checkpoint_path`` if it holds one (it must be the same run).
      checkpoint_seconds: the least time between two checkpoints before the last epoch;
        None: :data:`CHECKPOINT_SECONDS`, 0: after every epoch.
      label: progress-bar prefix. progress: show the bar. stream: its stream (stderr).
      mesh: train data-parallel over this one-axis mesh (``config.batch_size`` must be a
        multiple of its size); None (or one device) trains on the default device.
    """
    mesh = _usable_mesh(config, mesh)
    label = label or f"{config.optimizer} seed {config.seed}"
    plan = _plan(config, dataset)
    state, train_key = _init_state(config, dataset, plan)
    done = _Progress([], 0, 0, False)
    if resume and checkpoint_path is not None and checkpoint.exists(checkpoint_path):
        state, train_key, done = _resume(checkpoint_path, plan, config.epochs, state)
    resumed_from, host_state, key = done.epoch, state, train_key
    if mesh is not None:
        state = _State(*sharding.replicate(mesh, tuple(state)))
        key = sharding.replicate(mesh, train_key)
    pending = done.epoch < config.epochs and not done.diverged
    programs = _programs(config, dataset, plan, state, key, mesh, pending)
    saved_at = time.perf_counter()
    while done.epoch < config.epochs and not done.diverged:
        steps, epochs = plan.steps_per_epoch, config.epochs
        bar = ProgressBar(label, done.epoch + 1, epochs, steps, stream, progress)
        state, done = _train_epoch(config, dataset, plan, programs, state, key, done, bar, mesh)
        host_state = _host_state(state, mesh)
        if checkpoint_path is not None and _save_due(config, done, saved_at, checkpoint_seconds):
            _save(checkpoint_path, host_state, train_key, config.seed, plan, done)
            saved_at = time.perf_counter()
    return RunResult(
        config,
        done.records,
        *host_state,
        programs.compile_seconds,
        done.diverged,
        resumed_from,
        _skipped(state.opt_state),
        done.step,
        done.initial_loss,
    )
