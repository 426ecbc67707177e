"""What the training loop of ``tekfax-compare`` adds to its compiled step, per step.

On an H100 the tool's loop (``tekfax.experiments.train``) ran every optimizer's step about
2.4x slower than ``scripts/bench.py`` timed it (the MNIST auto-encoder: Adam 3.0 against
1.27 ms, KFAC 8.7 against 3.47 ms); on the CPU the two agree. This script times the tool's
own compiled step, in one process, fed three ways:

- ``numpy (the tool)``: as the loop feeds it: each batch gathered from the NumPy training
  set when it is due, the hyperparameters as NumPy scalars and the step index as
  ``np.int32``, converted on every call;
- ``device batches``: the batches already on the device, the scalars still NumPy;
- ``all on device``: every argument already on the device, the step's floor for the loop.

Each row is the mean over ``--steps`` steps (the last output blocked on), after
``--warmup``; the ratio is to the ``all on device`` row of the same optimizer. A gap in the
first row that the second closes points at the batch copies; one that only the third closes
points at the scalar arguments.

    python scripts/bench_loop.py                    # mnist5k auto-encoder, batch 500
    python scripts/bench_loop.py --model mlp --dataset digits --batch-size 128
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from bench_eigh import header

from tekfax.experiments import optimizers
from tekfax.experiments import train as loop
from tekfax.experiments.compare import single_threaded_lapack
from tekfax.experiments.data import iterate_batches, load_dataset

FEEDS = ("numpy (the tool)", "device batches", "all on device")


def _orders(num_train: int, batch_size: int, count: int) -> list[np.ndarray]:
    """The example indices of seed 0's first ``count`` batches, shuffled per epoch by the
    loop's generator, ``default_rng((seed, epoch))``."""
    index = np.arange(num_train)
    epochs = itertools.chain.from_iterable(
        iterate_batches(index, index, batch_size, np.random.default_rng((0, epoch)), False)
        for epoch in itertools.count()
    )
    return [idx for idx, _ in itertools.islice(epochs, count)]


def _steps(kind: str, plan, dataset, orders: list[np.ndarray]) -> Iterator[tuple]:
    """Per step (numeric, x, y, index) as ``kind`` feeds them; the NumPy feed gathers each
    batch when it is due, as the loop does, the others before (they are listed first)."""
    numeric = loop._numeric_args(plan.numeric)
    for i, idx in enumerate(orders):
        x = dataset.x_train[idx]
        y = loop.targets_for(plan.loss, dataset, x, dataset.y_train[idx])
        if kind == FEEDS[1]:
            x, y = jax.device_put((x, y))
        args = (numeric, x, y, np.int32(i))
        yield jax.device_put(args) if kind == FEEDS[2] else args


def time_feeds(name: str, dataset, args: argparse.Namespace) -> dict[str, float]:
    """Mean ms per step of optimizer ``name``'s compiled tool step under each feed."""
    hparams = {**optimizers.DEFAULTS[name], "learning_rate": args.learning_rate}
    config = loop.RunConfig(args.model, name, hparams, 0, 1, args.batch_size)
    plan = loop._plan(config, dataset)
    state, key = loop._init_state(config, dataset, plan)
    step = loop._programs(config, dataset, plan, state, key, None, True).train_step
    orders = _orders(len(dataset.x_train), args.batch_size, args.warmup + args.steps)
    result = {}
    for kind in FEEDS:
        steps = _steps(kind, plan, dataset, orders)
        if kind != FEEDS[0]:
            steps = iter(list(steps))
        for numeric, x, y, index in itertools.islice(steps, args.warmup):
            *state, _, _ = step(*state, numeric, x, y, key, index)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for numeric, x, y, index in steps:
            *state, _, _ = step(*state, numeric, x, y, key, index)
        jax.block_until_ready(state)
        result[kind] = 1e3 * (time.perf_counter() - start) / args.steps
    return result


def table(times: dict[str, dict[str, float]]) -> str:
    """Markdown rows: optimizer, feed, ms per step, ratio to that optimizer's device row.

    Example:
      >>> print(table({"adam": dict(zip(FEEDS, (3.0, 2.0, 1.5)))}).splitlines()[2])
      | adam | numpy (the tool) | 3.00 | 2.00x |
    """
    lines = ["| optimizer | feed | ms per step | x all on device |", "|---|---|---|---|"]
    for name, row in times.items():
        for kind, ms in row.items():
            lines.append(f"| {name} | {kind} | {ms:.2f} | {ms / row[FEEDS[2]]:.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="autoencoder")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--optimizers", nargs="+", default=["adam", "kfac"])
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument(
        "--steps",
        type=int,
        default=100,
        help="timed steps per feed; a multiple of eigen_every (100) holds one refresh each",
    )
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    single_threaded_lapack()
    dataset = load_dataset(args.dataset)
    times = {name: time_feeds(name, dataset, args) for name in args.optimizers}
    print(header(f"{args.model} on {args.dataset}, batch {args.batch_size}, {args.steps} steps"))
    print(table(times))


if __name__ == "__main__":
    main()
