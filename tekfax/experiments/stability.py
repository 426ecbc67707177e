"""Long-run stability: every optimizer on digits across the papers' damping (and nu) grid.

Each run trains the digits MLP (batch 128) through :func:`tekfax.experiments.train.train`,
the code path of ``tekfax-compare`` (every optimizer wrapped in ``tekfax.skip_non_finite``),
for about ``--steps`` steps (whole epochs of 11 steps) at the tool's default learning rates,
and reports the final training loss, whether the parameters and loss stayed finite, and how
many steps were skipped. The Kronecker optimizers run over the papers' damping grid
(docs/algorithms.md, section 7); ``tkfac-new`` (TKFAC with trace-adaptive damping) over the
nu grid.

    python scripts/stability.py                  # 2,000 steps, the full grid (minutes)
    python scripts/stability.py --steps 200 --optimizers kfac tekfac
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import numpy as np

from tekfax.experiments import optimizers
from tekfax.experiments.data import load_dataset
from tekfax.experiments.train import RunConfig, train

MODEL = "mlp"
BATCH = 128


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One run of the grid."""

    optimizer: str
    axis: str | None  # "damping", "nu" or None (first-order)
    value: float | None
    steps: int
    final_loss: float
    test_accuracy: float | None
    finite: bool
    skipped: int


def grid(name: str) -> tuple[str | None, Sequence[float | None]]:
    """The swept hyperparameter of ``name`` and its values (the papers' grids)."""
    if name in optimizers.FIRST_ORDER:
        return None, [None]
    if optimizers.DEFAULTS[name].get("nu") is not None:
        return "nu", optimizers.NU_GRID
    return "damping", optimizers.DAMPING_GRID


def run(
    names: Sequence[str],
    steps: int,
    values: dict[str, Sequence[float | None]] | None = None,
    seed: int = 0,
) -> list[Outcome]:
    """Trains every (optimizer, grid value) for ``ceil(steps / steps per epoch)`` epochs."""
    dataset = load_dataset("digits")
    per_epoch = len(dataset.x_train) // BATCH
    epochs = max(1, math.ceil(steps / per_epoch))
    outcomes = []
    for name in names:
        axis, default_values = grid(name)
        for value in (values or {}).get(name, default_values):
            hparams = dict(optimizers.DEFAULTS[name])
            if axis is not None:
                hparams[axis] = value
            config = RunConfig(MODEL, name, hparams, seed, epochs, BATCH)
            result = train(config, dataset, progress=False)
            last = result.records[-1]
            params_finite = all(
                bool(np.all(np.isfinite(np.asarray(leaf))))
                for leaf in jax.tree_util.tree_leaves(result.params)
            )
            loss = last["train_loss"]
            outcomes.append(
                Outcome(
                    optimizer=name,
                    axis=axis,
                    value=value,
                    steps=epochs * per_epoch,
                    final_loss=loss,
                    test_accuracy=last["test_accuracy"],
                    finite=params_finite and math.isfinite(loss) and not result.diverged,
                    skipped=result.skipped_steps,
                )
            )
    return outcomes


def _cell(outcome: Outcome) -> str:
    if not outcome.finite:
        return f"**diverged** ({outcome.skipped} skipped)"
    text = f"{outcome.final_loss:.3g} / {100 * outcome.test_accuracy:.1f}%"
    return text + (f" ({outcome.skipped} skipped)" if outcome.skipped else "")


def format_table(outcomes: Sequence[Outcome]) -> str:
    """Markdown: one row per optimizer, one column per grid value; cells are final train loss
    / test accuracy, ``**diverged**`` when the loss or parameters are not finite."""
    steps = outcomes[0].steps if outcomes else 0
    lines = [
        f"digits / {MODEL}, batch {BATCH}, {steps} steps, tool default learning rates; cell: "
        "final training loss / test accuracy (skipped steps)",
        "",
    ]
    for axis in ("damping", "nu", None):
        mine = [o for o in outcomes if o.axis == axis]
        if not mine:
            continue
        names = list(dict.fromkeys(o.optimizer for o in mine))
        columns = list(dict.fromkeys(o.value for o in mine))
        header = [f"{axis} = {v:g}" for v in columns] if axis else ["(no damping)"]
        lines += [
            "| optimizer | " + " | ".join(header) + " |",
            "|---|" + "---|" * len(header),
        ]
        for name in names:
            cells = {o.value: _cell(o) for o in mine if o.optimizer == name}
            lines.append(f"| {name} | " + " | ".join(cells.get(v, "-") for v in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps per run (default 2000)")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=list(optimizers.OPTIMIZERS),
        choices=list(optimizers.OPTIMIZERS),
        metavar="NAME",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    tic = time.perf_counter()
    outcomes = run(args.optimizers, args.steps, seed=args.seed)
    print(format_table(outcomes))
    diverged = [f"{o.optimizer} {o.axis}={o.value:g}" for o in outcomes if not o.finite]
    print(f"diverged: {', '.join(diverged) if diverged else 'none'}")
    print(f"{len(outcomes)} runs in {time.perf_counter() - tic:.0f} s")
    return 0
