"""Outputs of ``tekfax-compare``: results.json, results.csv, PNG curves and the Markdown table.

Timing conventions: ``epoch_seconds`` is the training time of one epoch (compilation is done
and timed before the first epoch, evaluation is timed apart as ``eval_seconds``);
``cumulative_seconds`` adds the epochs' training times, and "seconds to target" reads it at the
first epoch whose test metric reaches the target.

Sequence tasks: losses are nats per token and accuracies token accuracies (see
:mod:`tekfax.experiments.train`); their table adds the final test loss next to the accuracy.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from tekfax.experiments.optimizers import DISPLAY_NAMES
from tekfax.experiments.train import DIVERGENCE_FACTOR

CSV_FIELDS = (
    "optimizer",
    "seed",
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "learning_rate",
    "epoch_seconds",
    "eval_seconds",
    "cumulative_seconds",
    "images_per_second",
    "skipped_steps",
)
PLOTS = ("curves_epoch.png", "curves_seconds.png")
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "tekfax", "numpy")


def environment() -> dict:
    """Library versions, Python, and the JAX device kind and platform."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = jax.devices()[0]
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": {
            "platform": device.platform,
            "device_kind": device.device_kind,
            "count": jax.device_count(),
        },
        "cpu_count": os.cpu_count(),
    }


def jsonable(value: Any) -> Any:
    """Strict-JSON copy: NaN and infinities become None, NumPy scalars Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, payload: Mapping) -> None:
    """Writes ``payload`` as strict, indented JSON (atomically)."""
    tmp = pathlib.Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_csv(path: str | os.PathLike, runs: Sequence[Mapping]) -> None:
    """One row per (run, epoch) of the final runs."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for run in runs:
            for record in run["records"]:
                row = {"optimizer": run["optimizer"], "seed": run["seed"], **record}
                writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_FIELDS})


def run_warning(entry: Mapping, label: str | None = None) -> str | None:
    """The warning line of a run entry that skipped steps or diverged; None for a healthy run.

    ``entry`` is a run of ``results.json`` (``optimizer``, ``seed``, ``epochs``, ``steps``,
    ``skipped_steps``, ``diverged``, ``initial_loss`` and ``records``); ``label`` replaces
    ``"<optimizer> seed <seed>"``. Divergence follows
    :func:`tekfax.experiments.train.has_diverged`.

    Example:
      >>> from tekfax.experiments.report import run_warning
      >>> run = {"optimizer": "kfac", "seed": 0, "epochs": 20, "steps": 22, "skipped_steps": 3,
      ...        "diverged": True, "initial_loss": 2.3, "records": [{}, {"train_loss": 357.0}]}
      >>> print(run_warning(run))
      warning: kfac seed 0 skipped 3 of 22 steps (non-finite gradient or update; not applied)
      and diverged at epoch 2 of 20 (training loss 357 > 10 x its initial loss 2.3); training
      stopped there
      >>> run_warning({**run, "skipped_steps": 0, "diverged": False}) is None
      True
    """
    problems = []
    skipped = int(entry.get("skipped_steps") or 0)
    if skipped:
        problems.append(
            f"skipped {skipped} of {entry.get('steps', '?')} steps "
            "(non-finite gradient or update; not applied)"
        )
    if entry.get("diverged"):
        records = entry["records"]
        loss = records[-1].get("train_loss") if records else None
        if loss is None or not math.isfinite(loss):
            why = "training loss not finite"
        else:
            why = f"training loss {loss:.3g} > {DIVERGENCE_FACTOR:g} x its initial loss "
            why += f"{float(entry.get('initial_loss') or math.nan):.3g}"
        problems.append(
            f"diverged at epoch {len(records)} of {entry['epochs']} ({why}); training stopped there"
        )
    if not problems:
        return None
    label = label or f"{entry['optimizer']} seed {entry['seed']}"
    return f"warning: {label} " + " and ".join(problems)


def metric_of(classification: bool) -> tuple[str, bool]:
    """``(record key, higher is better)`` of the headline test metric."""
    return ("test_accuracy", True) if classification else ("test_loss", False)


def _first_reaching(records: Sequence[Mapping], key: str, target: float, higher: bool):
    for record in records:
        value = record.get(key)
        if value is not None and math.isfinite(value):
            if (value >= target) if higher else (value <= target):
                return record
    return None


def summarize(
    runs: Sequence[Mapping], names: Sequence[str], classification: bool, target: float | None
) -> dict[str, dict]:
    """Per optimizer: final test metric mean/std over seeds, time per epoch, time to target.

    Mean and std (sample standard deviation, ddof 1; 0 for one seed) are over the seeds
    that did not diverge; ``diverged`` counts the others. ``test_loss`` is the mean final
    test loss over the same seeds (NaN when the records have none).
    """
    key, higher = metric_of(classification)
    summary = {}
    for name in names:
        mine = [run for run in runs if run["optimizer"] == name]
        finals = [run["records"][-1][key] if run["records"] else None for run in mine]
        finals = np.array([math.nan if v is None else v for v in finals], np.float64)
        epoch_seconds = [r["epoch_seconds"] for run in mine for r in run["records"]]
        reached = []
        if target is not None:
            for run in mine:
                hit = _first_reaching(run["records"], key, target, higher)
                if hit is not None:
                    reached.append((hit["epoch"], hit["cumulative_seconds"]))
        healthy = np.isfinite(finals) & ~np.array([bool(r.get("diverged")) for r in mine])
        ok = finals[healthy]
        test_losses = [
            run["records"][-1].get("test_loss") if run["records"] else None for run in mine
        ]
        test_losses = np.array([math.nan if v is None else v for v in test_losses], np.float64)
        test_losses = test_losses[healthy]
        summary[name] = {
            "metric": key,
            "seeds": len(mine),
            "final": finals.tolist(),
            "mean": float(np.mean(ok)) if len(ok) else math.nan,
            "test_loss": float(np.mean(test_losses)) if len(test_losses) else math.nan,
            "std": float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0,
            "diverged": len(mine) - len(ok),
            "skipped_steps": sum(int(run.get("skipped_steps") or 0) for run in mine),
            "epoch_seconds": float(np.mean(epoch_seconds)) if epoch_seconds else math.nan,
            "target": target,
            "reached": len(reached),
            "epochs_to_target": float(np.mean([e for e, _ in reached])) if reached else None,
            "seconds_to_target": float(np.mean([s for _, s in reached])) if reached else None,
        }
    return summary


def _mean_std(entry: Mapping, scale: float, digits: int) -> str:
    if not math.isfinite(entry["mean"]):
        return "diverged"
    text = f"{scale * entry['mean']:.{digits}f}"
    if entry["seeds"] > 1:
        text += f" ± {scale * entry['std']:.{digits}f}"
    return text + (f" ({entry['diverged']} diverged)" if entry["diverged"] else "")


def _to_target(entry: Mapping, field: str, digits: int) -> str:
    if entry[field] is None:
        return "-"
    text = f"{entry[field]:.{digits}f}"
    return (
        text
        if entry["reached"] == entry["seeds"]
        else f"{text} ({entry['reached']}/{entry['seeds']})"
    )


def _optimizer_rows(
    summary: Mapping[str, Mapping], what: str, target_text: str, loss_column: bool
) -> list[str]:
    """The per-optimizer table; ``loss_column`` adds the final test loss per token."""
    scale, digits = (100.0, 2) if "accuracy" in what else (1.0, 4)
    lines = [
        f"| optimizer | {what} | "
        + ("test loss (nats/token) | " if loss_column else "")
        + f"time / epoch (s) | epochs to {target_text} | seconds to {target_text} |",
        "|---|---|---|---|---|" + ("---|" if loss_column else ""),
    ]
    for name, entry in summary.items():
        loss = f"| {entry.get('test_loss', math.nan):.4f} " if loss_column else ""
        lines.append(
            f"| {DISPLAY_NAMES[name]} | {_mean_std(entry, scale, digits)} {loss}"
            f"| {entry['epoch_seconds']:.3f} | {_to_target(entry, 'epochs_to_target', 1)} "
            f"| {_to_target(entry, 'seconds_to_target', 2)} |"
        )
    return lines


def format_table(
    summary: Mapping[str, Mapping],
    *,
    dataset: str,
    model: str,
    epochs: int,
    batch_size: int,
    classification: bool,
    target: float | None,
    warnings: Sequence[str] = (),
    per_token: bool = False,
    irreducible_loss: float | None = None,
) -> str:
    """The papers' Table 3 row (data, model, one column per optimizer) and a per-optimizer table.

    ``warnings`` (lines of :func:`run_warning`) are listed under the tables. ``per_token``
    (a sequence task) names the token accuracy, adds a column of the final test loss per
    token and a line with ``irreducible_loss``, when known.
    """
    names = list(summary)
    seeds = max((entry["seeds"] for entry in summary.values()), default=0)
    scale, digits, what = (
        (100.0, 2, "test accuracy (%)") if classification else (1.0, 4, "test loss")
    )
    if per_token and classification:
        what = "test token accuracy (%)"
    if target is None:
        target_text = "target"
    else:
        target_text = f"{100 * target:g}%" if classification else f"loss {target:g}"
    lines = [
        f"{dataset} / {model}, batch {batch_size}, {epochs} epochs, {seeds} seed(s): {what} "
        "after the last epoch, mean ± std over seeds",
        "",
        "| data | model | " + " | ".join(DISPLAY_NAMES[n] for n in names) + " |",
        "|---|---|" + "---|" * len(names),
        f"| {dataset} | {model} | "
        + " | ".join(_mean_std(summary[n], scale, digits) for n in names)
        + " |",
        "",
        *_optimizer_rows(summary, what, target_text, per_token and classification),
    ]
    if per_token and irreducible_loss is not None:
        lines += ["", f"Irreducible test loss: {irreducible_loss:.4f} nats/token."]
    if warnings:
        lines += ["", "Notes:", *(f"- {line}" for line in warnings)]
    return "\n".join(lines) + "\n"


def _mean_curve(runs: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean cumulative seconds and mean ``key`` over seeds (common epochs only)."""
    length = min(len(run["records"]) for run in runs)

    def column(field: str) -> np.ndarray:
        values = [[r[field] for r in run["records"][:length]] for run in runs]
        return np.array(values, np.float64).mean(axis=0)

    return np.arange(1, length + 1), column("cumulative_seconds"), column(key)


def plot_curves(
    out_dir: str | os.PathLike,
    runs: Sequence[Mapping],
    names: Sequence[str],
    classification: bool,
    title: str,
) -> list[pathlib.Path]:
    """``curves_epoch.png`` and ``curves_seconds.png``: test metric and training loss.

    One line per optimizer, the mean over its seeds. Needs matplotlib (Agg backend).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    key, _ = metric_of(classification)
    label = "test accuracy (%)" if classification else "test loss"
    scale = 100.0 if classification else 1.0
    paths = []
    for filename, x_label in zip(PLOTS, ("epoch", "training seconds"), strict=True):
        fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in names:
            mine = [run for run in runs if run["optimizer"] == name and run["records"]]
            if not mine:
                continue
            epochs, seconds, metric = _mean_curve(mine, key)
            _, _, train_loss = _mean_curve(mine, "train_loss")
            x = epochs if filename == PLOTS[0] else seconds
            ax_metric.plot(x, scale * metric, marker=".", label=DISPLAY_NAMES[name])
            ax_loss.plot(x, np.where(train_loss > 0, train_loss, np.nan), marker=".")
        ax_metric.set(xlabel=x_label, ylabel=label, title=f"{title}: {label}")
        ax_loss.set(xlabel=x_label, ylabel="training loss", yscale="log")
        ax_loss.set_title(f"{title}: training loss")
        ax_metric.legend(fontsize="small")
        for ax in (ax_metric, ax_loss):
            ax.grid(alpha=0.3)
            if filename == PLOTS[0]:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        path = pathlib.Path(out_dir) / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
