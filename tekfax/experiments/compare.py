"""``tekfax-compare``: train several optimizers on one (model, dataset) and compare them.

Trains every selected optimizer for ``--seeds`` seeds (optionally after a small ``--grid``
search on a train/validation split) and writes into ``--output``: ``results.json`` (every
epoch of every run, the configuration with resolved hyperparameters, library versions, device,
grid results), ``results.csv`` (one row per run-epoch), ``curves_epoch.png`` and
``curves_seconds.png``, and ``table.md``, the papers' Table 3 format, also printed at the end.

    tekfax-compare                                  # all 8 optimizers, digits, small CNN
    tekfax-compare --optimizers sgdm kfac --lr kfac=0.03 --damping 0.3 --epochs 5
    tekfax-compare --model resnet20 --dataset cifar10 --data-dir ~/tfds --lr-decay-every 40
    tekfax-compare --model transformer              # next-token prediction, progressions

The sequence models (``--model transformer`` or ``transformer-onehot``) train on token
sequences: ``--dataset progressions`` (built in, their default) or ``tiny_shakespeare``. Their
losses are nats per token and their accuracies token accuracies; their defaults
(:data:`SEQUENCE_EPOCHS`, :data:`SEQUENCE_HYPERPARAMETERS`, :data:`SEQUENCE_TARGETS`) replace
the image defaults where the flags leave them unset.

Defaults are the library's except the learning rates, ``damping`` and ``nu``, which the
library leaves to the user (``optimizers.DIFFERENCES`` says why, as does ``--help``). A run
that skipped steps or diverged (:func:`tekfax.experiments.train.has_diverged`) gets a warning
line (:func:`tekfax.experiments.report.run_warning`) on stderr when it ends, under the table
and in ``results.json``.

Training is data parallel over ``--devices`` devices (default: every local device) and, with
``--coordinator``, over several processes (``jax.distributed.initialize``); process 0 writes
the outputs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from typing import Any

import jax

from tekfax import sharding
from tekfax.experiments import optimizers, report
from tekfax.experiments.data import (
    DATASETS,
    SEQUENCE_DATASETS,
    Dataset,
    DatasetNotPreparedError,
    load_dataset,
    train_val_split,
)
from tekfax.experiments.models import ALL_MODELS, is_sequence_model, model_loss
from tekfax.experiments.train import DIVERGENCE_FACTOR, ResumeError, RunConfig, RunResult, train

DEFAULT_EPOCHS = 20
DEFAULT_TARGET = 0.95
# The sequence models' defaults. On progressions 30 epochs are 180 steps of batch 128, where
# Adam reaches about 90% of the 93.95% possible; the whole default comparison then takes about
# two minutes on 2 CPU cores, compilation included.
SEQUENCE_EPOCHS = 30
SEQUENCE_DATASET = "progressions"
# Token-accuracy targets. Progressions can reach 93.95% at best (data.progressions), and
# Adam's default run passes 85% at epoch 23 of 30. For tiny_shakespeare 50% of characters is
# a guess, not measured here (no prepared copy): about what character-level models reach.
SEQUENCE_TARGETS = {"progressions": 0.85, "tiny_shakespeare": 0.5}
# Per-optimizer defaults of the sequence models, as flag -> {optimizer: value}: the best of
# lr in {0.001, 0.003, 0.01, 0.03, 0.1, 0.3} (1e-3 to 6e-3 for Adam and EAdam) after 30
# epochs on progressions, one seed. TKFAC-new does not learn this task at any of them (its
# best, lr 0.03: 13.7% token accuracy with the embedding preconditioned, nu 1 to 100 giving
# the same run). A flag given on the command line replaces them: its bare value applies to
# every optimizer, its name=value pairs to the optimizers they name.
SEQUENCE_HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "lr": {
        "sgdm": 0.01,
        "adam": 3e-3,
        "eadam": 3e-3,
        "kfac": 0.01,
        "ekfac": 0.01,
        "tkfac": 0.01,
        "tkfac-new": 0.03,
        "tekfac": 0.01,
    },
}
# config keys that may change when resuming (everything else must match the first start)
_RESUMABLE = {"epochs", "grid_epochs", "resume", "progress", "plots", "argv", "output"}
_RESUMABLE |= {"target_accuracy", "target_loss"}
# the hardware may change on resume: results then agree to float rounding, not bit for bit
_RESUMABLE |= {"devices", "processes", "coordinator", "num_processes", "process_id"}


_FLAG_HELP = {
    "learning_rate": "learning rate",
    "damping": "damping lambda",
    "nu": "trace-adaptive damping nu (a bare value sets tkfac-new only)",
    "momentum": "momentum",
    "norm_constraint": "kappa of the trust region (the KL clip)",
    "weight_decay": "L2 weight decay wd: wd * params added to the gradient first",
    "eigen_every": "eigendecomposition interval T_INV",
    "curvature_every": "factor update interval T_FIM",
    "rescale_every": "EKFAC/TEKFAC S update interval",
    "fisher": "sampled (the true Fisher) or empirical",
    "positions": "expand or reduce: KFAC-expand or KFAC-reduce for layers over positions",
}


def _flag_help(key: str) -> str:
    """The flag's help: its defaults, and the library's with the reason when they differ."""
    library = optimizers.describe(optimizers.library_default(key))
    if key in optimizers.DIFFERENCES:
        why = f"library: {library}; differs: {optimizers.DIFFERENCES[key]}"
    else:
        why = "same as the library's"
    return f"{_FLAG_HELP[key]} (defaults: {optimizers.describe_defaults(key)}; {why})"


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """What to train, for how long, and where the outputs go."""
    add = parser.add_argument
    # The default is a task where curvature matters: the deep auto-encoder, Martens & Grosse's
    # test of second-order methods, scaled to digits. On the digits CNN every optimizer is
    # within a point of the others after 3 epochs, and the run shows nothing about them.
    add(
        "--model",
        default="autoencoder",
        choices=list(ALL_MODELS),
        help="model (default: autoencoder); transformer and transformer-onehot (its token "
        "embedding written as a Dense on one-hot tokens: the same updates) read token "
        "sequences",
    )
    add(
        "--dataset",
        choices=list(DATASETS),
        help=f"dataset (default: digits; {SEQUENCE_DATASET} for the sequence models, which "
        f"take {' or '.join(SEQUENCE_DATASETS)})",
    )
    add("--data-dir", help="tensorflow_datasets directory holding the prepared dataset")
    add(
        "--optimizers",
        nargs="+",
        default=list(optimizers.OPTIMIZERS),
        metavar="NAME",
        help=f"optimizers to compare (default: all of {' '.join(optimizers.OPTIMIZERS)})",
    )
    add(
        "--epochs",
        type=int,
        help=f"default {DEFAULT_EPOCHS}, {SEQUENCE_EPOCHS} for the sequence models",
    )
    add("--batch-size", type=int, default=128, help="default 128")
    add(
        "--lr-decay-every",
        type=int,
        metavar="K",
        help="multiply the learning rate by 0.1 every K epochs (default: constant)",
    )
    add("--seeds", type=int, default=1, metavar="N", help="repeats per optimizer (default 1)")
    add("--seed", type=int, default=0, help="first seed (default 0)")
    add(
        "--target-accuracy",
        type=float,
        help=f"test accuracy for 'epochs/seconds to target', a fraction or a percentage "
        f"(default {DEFAULT_TARGET}; token accuracy "
        + ", ".join(f"{v:g} on {k}" for k, v in SEQUENCE_TARGETS.items())
        + ")",
    )
    add(
        "--target-loss",
        type=float,
        help="test loss target (auto-encoder; default: Adam's final test loss, when Adam runs)",
    )
    add("--output", help="output folder (default: runs/compare-<timestamp>)")
    add("--resume", action="store_true", help="continue the runs checkpointed in --output")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add(
        "--no-plots",
        dest="plots",
        action="store_false",
        help="write no curves_*.png (saves matplotlib's import and rendering, a few seconds)",
    )


def _add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    """Devices and processes of a data-parallel run."""
    parallel = parser.add_argument_group(
        "devices and processes (data parallel: the batch is split over every device)"
    )
    parallel.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="devices per process (default: all local devices); --batch-size must be a "
        "multiple of the total device count",
    )
    parallel.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="join a multi-process run: jax.distributed.initialize with this coordinator "
        "(process 0's address); needs --num-processes, --process-id and --output",
    )
    parallel.add_argument("--num-processes", type=int, metavar="P", help="processes in the run")
    parallel.add_argument("--process-id", type=int, metavar="I", help="this process, 0..P-1")


def _add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    """Per-optimizer hyperparameters, and the candidates of the grid search."""
    group = parser.add_argument_group("hyperparameters (value or name=value pairs)")
    for flag, (key, _) in optimizers.FLAGS.items():
        group.add_argument(f"--{flag}", nargs="+", metavar="V", help=_flag_help(key))
    grid = parser.add_argument_group("grid search")
    grid.add_argument(
        "--grid",
        action="store_true",
        help="select lr and damping/nu per optimizer by validation accuracy first",
    )
    grid.add_argument("--grid-epochs", type=int, help="epochs per candidate (default --epochs)")
    grid.add_argument(
        "--grid-fraction", type=float, default=0.1, help="validation fraction (default 0.1)"
    )
    for flag in ("lr", "damping", "nu"):
        grid.add_argument(
            f"--grid-{flag}",
            nargs="+",
            metavar="V,V",
            help=f"{flag} candidates, comma-separated (default: neighbours of the default)",
        )


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="tekfax-compare",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Per-optimizer flags take one value for all optimizers and/or name=value pairs, "
        "e.g. --lr 0.05 adam=1e-3 eadam=1e-3. Every optimizer is wrapped in "
        "tekfax.skip_non_finite; a run that skips steps or diverges (training loss not finite, "
        f"or above {DIVERGENCE_FACTOR:g} x its initial loss) gets a warning line, on stderr, "
        "under the table and in results.json.",
    )
    _add_run_flags(parser)
    _add_parallel_flags(parser)
    _add_hyperparameter_flags(parser)
    return parser


def _optimizer_names(tokens: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    names = [n for token in tokens for n in token.split(",") if n]
    for name in names:
        if name not in optimizers.OPTIMIZERS:
            parser.error(
                f"unknown optimizer {name!r}; choose from {', '.join(optimizers.OPTIMIZERS)}"
            )
    if len(set(names)) != len(names) or not names:
        parser.error("--optimizers must name each optimizer at most once")
    return names


def _resolve_task(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fills the defaults that depend on the model: dataset, epochs and accuracy target."""
    sequence = is_sequence_model(args.model)
    if args.dataset is None:
        args.dataset = SEQUENCE_DATASET if sequence else "digits"
    if (args.dataset in SEQUENCE_DATASETS) != sequence:
        kind = f"a sequence dataset ({', '.join(SEQUENCE_DATASETS)})" if sequence else "images"
        parser.error(f"--model {args.model} needs {kind}, not --dataset {args.dataset}")
    if args.epochs is None:
        args.epochs = SEQUENCE_EPOCHS if sequence else DEFAULT_EPOCHS
    if args.target_accuracy is None:
        args.target_accuracy = SEQUENCE_TARGETS.get(args.dataset, DEFAULT_TARGET)


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    _resolve_task(args, parser)
    for flag in ("epochs", "batch_size", "seeds", "grid_epochs", "lr_decay_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    if not 0 < args.grid_fraction < 1:
        parser.error("--grid-fraction must be in (0, 1)")
    if args.target_accuracy is not None and args.target_accuracy > 1:
        args.target_accuracy /= 100.0
    if args.resume and not args.output:
        parser.error("--resume needs --output, the folder of the interrupted comparison")


def _data_mesh(args: argparse.Namespace, parser: argparse.ArgumentParser) -> jax.sharding.Mesh:
    """Joins the multi-process run if asked, then the mesh of --devices per process."""
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            parser.error("--coordinator needs --num-processes and --process-id")
        if not 0 <= args.process_id < args.num_processes:
            parser.error("--process-id must be in [0, --num-processes)")
        if not args.output:
            parser.error("a multi-process run needs --output, a folder every process can read")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.num_processes is not None or args.process_id is not None:
        parser.error("--num-processes and --process-id need --coordinator")
    local = jax.local_device_count()
    per_process = local if args.devices is None else args.devices
    if not 1 <= per_process <= local:
        parser.error(
            f"--devices must be in [1, {local}]: this process has {local} "
            f"{jax.default_backend()} device(s)"
        )
    total = per_process * jax.process_count()
    if args.batch_size % total:
        parser.error(
            f"--batch-size {args.batch_size} must be a multiple of the {total} devices "
            f"({per_process} per process x {jax.process_count()} process(es))"
        )
    return sharding.data_mesh(per_process)


def _grid_overrides(name: str, args: argparse.Namespace) -> dict[str, list[float] | None]:
    values = {}
    for flag in ("lr", "damping", "nu"):
        everyone, named = optimizers.parse_grid_values(
            getattr(args, f"grid_{flag}"), f"grid-{flag}"
        )
        values[flag] = named.get(name, everyone)
    return values


def _run_entry(result: RunResult, phase: str, label: str | None = None) -> dict:
    """The run's entry in ``results.json``; its warning (if any) is also printed to stderr."""
    config = result.config
    entry = {
        "phase": phase,
        "optimizer": config.optimizer,
        "seed": config.seed,
        "hyperparameters": dict(config.hparams),
        "epochs": config.epochs,
        "compile_seconds": result.compile_seconds,
        "resumed_from_epoch": result.resumed_from_epoch,
        "diverged": result.diverged,
        "diverged_epoch": result.diverged_epoch,
        "skipped_steps": result.skipped_steps,
        "steps": result.steps,
        "initial_loss": result.initial_loss,
        "records": result.records,
    }
    entry["warning"] = report.run_warning(entry, label)
    if entry["warning"] and jax.process_index() == 0:
        print(f"tekfax-compare: {entry['warning']}", file=sys.stderr)
    return entry


def _select(candidates: list[dict], classification: bool) -> int:
    """Index of the best candidate by final validation metric (first on ties)."""
    key, higher = report.metric_of(classification)
    best, best_value = 0, None
    for i, candidate in enumerate(candidates):
        value = candidate["records"][-1][key] if candidate["records"] else None
        if value is None or value != value or candidate["diverged"]:
            continue
        if best_value is None or (value > best_value if higher else value < best_value):
            best, best_value = i, value
    return best


def _grid_search(args, names, hparams, dataset, out: pathlib.Path, classification, mesh) -> dict:
    fit, _ = train_val_split(dataset, args.grid_fraction, seed=args.seed)
    epochs = args.grid_epochs or args.epochs
    results: dict[str, Any] = {
        "fraction": args.grid_fraction,
        "split_seed": args.seed,
        "epochs": epochs,
        "num_fit": len(fit.x_train),
        "num_validation": len(fit.x_test),
        "selected_by": "validation " + report.metric_of(classification)[0].removeprefix("test_"),
        "optimizers": {},
    }
    for name in names:
        grid = _grid_overrides(name, args)
        candidates = optimizers.grid_candidates(
            name, hparams[name], grid["lr"], grid["damping"], grid["nu"]
        )
        entries = []
        for i, candidate in enumerate(candidates):
            config = RunConfig(
                args.model, name, candidate, args.seed, epochs, args.batch_size, args.lr_decay_every
            )
            shown = ", ".join(f"{k} {v:g}" for k, v in optimizers.split(candidate)[0].items())
            result = train(
                config,
                fit,
                checkpoint_path=out / "checkpoints" / f"grid-{name}-{i}",
                resume=args.resume,
                label=f"grid {name} [{shown}]",
                progress=args.progress,
                mesh=mesh,
            )
            entry = _run_entry(result, "grid", f"grid {name} [{shown}] seed {args.seed}")
            final = result.records[-1] if result.records else {}
            entry["validation_accuracy"] = final.get("test_accuracy")
            entry["validation_loss"] = final.get("test_loss")
            entries.append(entry)
        best = _select(entries, classification)
        hparams[name] = dict(candidates[best])
        results["optimizers"][name] = {
            "candidates": entries,
            "selected_index": best,
            "selected": hparams[name],
        }
    return results


def _prepare_output(args: argparse.Namespace, config: dict, parser) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(args.output or f"runs/compare-{stamp}")
    config_path = out / "config.json"
    if args.resume:
        if not config_path.exists():
            parser.error(f"--resume: {config_path} not found; nothing to resume")
        before = json.loads(config_path.read_text())
        changed = sorted(
            k
            for k in set(before) | set(config)
            if k not in _RESUMABLE and before.get(k) != config.get(k)
        )
        if changed:
            parser.error(
                f"--resume: settings differ from the interrupted run: {', '.join(changed)}"
            )
    elif (out / "checkpoints").exists():
        parser.error(
            f"{out} already holds runs; pass --resume to continue them or another --output"
        )
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(config_path, config)
    return out


def _final_runs(
    args, names, hparams, dataset, out: pathlib.Path, payload: dict, mesh
) -> list[dict]:
    runs = payload["runs"]
    for name in names:
        for seed in range(args.seed, args.seed + args.seeds):
            config = RunConfig(
                args.model,
                name,
                hparams[name],
                seed,
                args.epochs,
                args.batch_size,
                args.lr_decay_every,
            )
            result = train(
                config,
                dataset,
                checkpoint_path=out / "checkpoints" / f"{name}-seed{seed}",
                resume=args.resume,
                progress=args.progress,
                mesh=mesh,
            )
            runs.append(_run_entry(result, "final"))
            if jax.process_index() == 0:
                report.write_json(out / "results.json", payload)  # partial results so far
    return runs


def _write_outputs(args, names, payload: dict, out: pathlib.Path, classification: bool) -> str:
    target = args.target_accuracy if classification else args.target_loss
    runs = payload["runs"]
    if target is None and not classification and "adam" in names:
        # Time to Adam's final result is what a second-order method has to beat.
        adam_final = report.summarize(runs, ["adam"], classification, None)["adam"]["mean"]
        target = adam_final if math.isfinite(adam_final) else None
    summary = report.summarize(runs, names, classification, target)
    grid = payload["grid"]["optimizers"].values() if payload["grid"] else ()
    grid_runs = [entry for selection in grid for entry in selection["candidates"]]
    warnings = [run["warning"] for run in [*grid_runs, *runs] if run.get("warning")]
    dataset = payload["dataset"]
    table = report.format_table(
        summary,
        dataset=args.dataset,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        classification=classification,
        target=target,
        warnings=warnings,
        per_token=dataset["vocab_size"] is not None,
        irreducible_loss=dataset["irreducible_loss"],
    )
    payload.update(summary=summary, table=table, warnings=warnings, complete=True)
    report.write_json(out / "results.json", payload)
    report.write_csv(out / "results.csv", runs)
    (out / "table.md").write_text(table)
    if not args.plots:
        return table
    try:
        report.plot_curves(out, runs, names, classification, f"{args.dataset} / {args.model}")
    except ImportError:
        print(
            "tekfax-compare: matplotlib is not installed; skipped the plots "
            "(pip install 'tekfax[examples]').",
            file=sys.stderr,
        )
    return table


def single_threaded_lapack() -> None:
    """Runs BLAS/LAPACK single-threaded in this process (jax's CPU ``eigh`` calls SciPy's).

    OpenBLAS threads keep spinning after each eigendecomposition and take the cores from the
    XLA steps that follow. Measured on the 2-core CPU, digits CNN, KFAC with an eigenbasis
    every 5 steps: median step 8.9 -> 4.7 ms. Uses threadpoolctl (installed with
    scikit-learn); without it this does nothing. The tool owns its process, so it may; the
    library itself never changes thread settings (README, "Performance").
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    import scipy.linalg.cython_lapack  # noqa: F401  (loads the OpenBLAS that jax's eigh uses)

    threadpool_limits(limits=1, user_api="blas")


FAST_CPU_FLAG = "--xla_cpu_use_fusion_emitters=false"


def fast_cpu_compilation() -> None:
    """Adds ``--xla_cpu_use_fusion_emitters=false`` to ``XLA_FLAGS`` unless it is set there.

    XLA:CPU's newer fusion emitters compile a Kronecker training step's several hundred
    fusions one by one, slowly. Measured on the 2-core CPU, the tool's default job (digits
    auto-encoder, 8 optimizers, 20 epochs): 91 s -> 63 s in all, the same losses bit for bit,
    and a KFAC epoch 0.028 -> 0.021 s. It takes effect only before JAX starts its CPU
    backend, so :func:`main` calls it first; like :func:`single_threaded_lapack` it is the
    tool's choice for its own process, and the library never sets it.

    Example:
      >>> import os
      >>> from tekfax.experiments.compare import fast_cpu_compilation
      >>> fast_cpu_compilation()
      >>> "--xla_cpu_use_fusion_emitters=false" in os.environ.get("XLA_FLAGS", "")  # jaxlib 0.10
      True
    """
    # XLA rejects flags it does not know: only on the jaxlib releases it was measured on.
    measured = version("jaxlib").split(".")[:2] in (["0", "9"], ["0", "10"])
    flags = os.environ.get("XLA_FLAGS", "")
    if measured and "xla_cpu_use_fusion_emitters" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_CPU_FLAG}".strip()


CACHE_VARIABLE = "TEKFAX_COMPILATION_CACHE"


def compilation_cache_dir(environ: Mapping[str, str] = os.environ) -> str | None:
    """Where :func:`persistent_compilation_cache` keeps compiled steps, or None for nowhere.

    ``$TEKFAX_COMPILATION_CACHE`` if set (``off`` or empty: no cache), else
    ``$XDG_CACHE_HOME/tekfax/jax`` (``~/.cache/tekfax/jax``), read from ``environ``.

    Example:
      >>> from tekfax.experiments.compare import compilation_cache_dir
      >>> compilation_cache_dir({"TEKFAX_COMPILATION_CACHE": "off"}) is None
      True
      >>> compilation_cache_dir({"XDG_CACHE_HOME": "/tmp/cache"})
      '/tmp/cache/tekfax/jax'
    """
    chosen = environ.get(CACHE_VARIABLE)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off") else chosen
    home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "tekfax", "jax")


def persistent_compilation_cache() -> None:
    """Keeps compiled training steps on disk, so a second run skips their compilation.

    JAX's persistent compilation cache, in :func:`compilation_cache_dir`, for programs that
    took over a second to compile (the Kronecker steps; JAX's own threshold). Measured on
    the 2-core CPU: the TEKFAC step of the digits CNN, 3.5 s cold and 1.0 s from the cache
    (tracing and lowering remain). A cache configured for JAX itself
    (``JAX_COMPILATION_CACHE_DIR``) is left as it is; like :func:`fast_cpu_compilation` this
    is the tool's choice for its own process, and the library never sets it.
    """
    path = compilation_cache_dir()
    if path is not None and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", path)


def with_task_defaults(
    overrides: dict[str, list[str] | None], names: Sequence[str], model: str
) -> dict[str, list[str] | None]:
    """The flags' tokens with the sequence models' defaults put in where the flags leave room.

    For a sequence model, each flag of :data:`SEQUENCE_HYPERPARAMETERS` without a bare value
    gets ``name=value`` pairs for the selected optimizers that it does not name; an image
    model's flags are returned unchanged.

    Example:
      >>> from tekfax.experiments.compare import with_task_defaults
      >>> with_task_defaults({"lr": ["adam=1e-3"]}, ["sgdm", "adam"], "transformer")["lr"]
      ['sgdm=0.01', 'adam=1e-3']
      >>> with_task_defaults({"lr": ["0.5"]}, ["sgdm", "adam"], "transformer")["lr"]
      ['0.5']
    """
    if not is_sequence_model(model):
        return overrides
    result = dict(overrides)
    for flag, values in SEQUENCE_HYPERPARAMETERS.items():
        tokens = list(overrides.get(flag) or [])
        if any("=" not in token for token in tokens):
            continue  # a bare value sets every optimizer
        named = {token.partition("=")[0] for token in tokens}
        fill = [f"{n}={v!r}" for n, v in values.items() if n in names and n not in named]
        result[flag] = (fill + tokens) or None
    return result


def _resolve_hyperparameters(args, names: list[str], parser) -> dict[str, dict[str, Any]]:
    """Each optimizer's hyperparameters; bad values and grid flags are usage errors."""
    overrides = {flag: getattr(args, flag.replace("-", "_")) for flag in optimizers.FLAGS}
    overrides = with_task_defaults(overrides, names, args.model)
    try:
        hparams = optimizers.resolve(names, overrides)
        for name in names:  # validate the grid flags before training anything
            grid = _grid_overrides(name, args)
            optimizers.grid_candidates(name, hparams[name], grid["lr"], grid["damping"], grid["nu"])
    except optimizers.HyperparameterError as err:
        parser.error(str(err))
    return hparams


def _run_config(args, argv, names: list[str], hparams: dict, mesh) -> dict:
    """The comparison's settings as written to ``config.json`` (and checked on resume)."""
    config = dict(vars(args))
    config.update(optimizers=names, argv=list(sys.argv[1:] if argv is None else argv))
    config["hyperparameters"] = {name: dict(hparams[name]) for name in names}
    config.update(devices=mesh.size, processes=jax.process_count())
    return config


def _load(args: argparse.Namespace) -> Dataset | None:
    """The dataset, or None after printing why it cannot be loaded."""
    try:
        return load_dataset(args.dataset, args.data_dir)
    except (DatasetNotPreparedError, ImportError) as err:
        builtin = SEQUENCE_DATASET if is_sequence_model(args.model) else "digits"
        print(
            f"tekfax-compare: error: cannot load dataset {args.dataset!r}: {err}\n"
            f"(--data-dir is {args.data_dir!r}; point --data-dir at the prepared "
            f"tensorflow_datasets folder, or use --dataset {builtin}, which needs no files.)",
            file=sys.stderr,
        )
        return None


def _new_payload(config: dict, dataset: Dataset) -> dict:
    """``results.json`` before any run: settings, environment and dataset."""
    return {
        "schema_version": 1,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": config,
        "environment": report.environment(),
        "dataset": {
            "name": dataset.name,
            "num_train": len(dataset.x_train),
            "num_test": len(dataset.x_test),
            "input_shape": list(dataset.input_shape),
            "num_classes": dataset.num_classes,
            "augment": dataset.augment,
            "vocab_size": dataset.vocab_size,
            "irreducible_loss": dataset.irreducible_loss,
        },
        "grid": None,
        "runs": [],
        "complete": False,
    }


def _train_all(args, names, hparams, dataset, out, payload, classification, mesh) -> int | None:
    """The grid search (if asked) and the final runs; an exit status if they stop early."""
    try:
        if args.grid:
            payload["grid"] = _grid_search(args, names, hparams, dataset, out, classification, mesh)
            selected = {name: dict(hparams[name]) for name in names}
            payload["config"]["selected_hyperparameters"] = selected
        _final_runs(args, names, hparams, dataset, out, payload, mesh)
    except ResumeError as err:
        print(f"tekfax-compare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; continue with: tekfax-compare ... --resume --output {out}",
            file=sys.stderr,
        )
        return 130
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tekfax-compare`` and ``python -m tekfax.experiments``.

    Returns the exit status: 0, or 2 when the dataset cannot be loaded or a checkpoint
    cannot be resumed (usage errors exit through argparse with status 2).
    """
    fast_cpu_compilation()
    single_threaded_lapack()
    persistent_compilation_cache()
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    mesh = _data_mesh(args, parser)
    primary = jax.process_index() == 0
    args.progress = args.progress and primary
    names = _optimizer_names(args.optimizers, parser)
    hparams = _resolve_hyperparameters(args, names, parser)
    config = _run_config(args, argv, names, hparams, mesh)
    dataset = _load(args)
    if dataset is None:
        return 2
    out = _prepare_output(args, config, parser) if primary else pathlib.Path(args.output)
    classification = model_loss(args.model) == "softmax_cross_entropy"
    if primary:
        print(
            f"tekfax-compare: {args.dataset} ({len(dataset.x_train)} train / "
            f"{len(dataset.x_test)} test) / {args.model}, optimizers {' '.join(names)}, "
            f"{args.epochs} epochs x {args.seeds} seed(s) on {mesh.size} device(s) -> {out}",
            file=sys.stderr,
        )
    started = time.perf_counter()
    payload = _new_payload(config, dataset)
    status = _train_all(args, names, hparams, dataset, out, payload, classification, mesh)
    if status is not None:
        return status
    payload["wall_seconds"] = time.perf_counter() - started
    if not primary:
        return 0
    table = _write_outputs(args, names, payload, out, classification)
    print(table)
    print(f"wrote {out}/: results.json, results.csv, table.md, {', '.join(report.PLOTS)}")
    return 0
