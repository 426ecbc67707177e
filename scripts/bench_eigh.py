"""Batched against one-by-one ``eigh`` per factor size: the data behind BATCHED_EIGH_MAX.

The eigen refresh groups same-shaped Kronecker factors. On an NVIDIA GPU it decomposes a
group in one batched call only up to ``tekfax.eigenbasis.BATCHED_EIGH_MAX`` wide, and one
matrix per call above it, because cuSOLVER's batched kernel loses to single calls on large
matrices (docs/algorithms.md, section 3). This script times, on the default device, a
jitted ``jnp.linalg.eigh`` of one random symmetric positive definite float32 matrix, of a
batch of ``--batch`` such matrices, and ``--batch`` single calls, and prints the median
of ``--repeats`` runs of each as a table. Run it on new hardware to check the threshold.

    python scripts/bench_eigh.py                         # d = 31, 251, 501, 785, 1001
    python scripts/bench_eigh.py --sizes 256 384 512 --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tekfax.eigenbasis import BATCHED_EIGH_MAX
from tekfax.experiments.compare import single_threaded_lapack


def median_ms(fn, x, repeats: int) -> float:
    """Median wall time of ``fn(x)`` in ms, after one untimed call (compilation)."""
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def header(details: str) -> str:
    """The first line of a benchmark's output: device, jax version, then ``details``."""
    device = jax.devices()[0]
    return f"device: {device.platform} ({device.device_kind}); jax {jax.__version__}; {details}"


def spd(d: int, seed: int) -> np.ndarray:
    """A random symmetric positive definite (d, d) float32 matrix, like a Kronecker factor."""
    b = np.random.default_rng(seed).standard_normal((d, 2 * d)).astype(np.float32)
    return b @ b.T / (2 * d) + 1e-3 * np.eye(d, dtype=np.float32)


def row(d: int, batch: int, repeats: int) -> dict[str, float]:
    """Times of one, a batch of ``batch``, and ``batch`` single calls, for size d."""
    eigh = jax.jit(jnp.linalg.eigh)
    stack = jnp.asarray(np.stack([spd(d, seed) for seed in range(batch)]))
    singles = jax.jit(lambda s: [jnp.linalg.eigh(m) for m in s])
    return {
        "one": median_ms(eigh, stack[0], repeats),
        "batched": median_ms(eigh, stack, repeats),
        "singles": median_ms(singles, stack, repeats),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[31, 251, 501, 785, 1001])
    parser.add_argument("--batch", type=int, default=2, help="matrices per batched call")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    single_threaded_lapack()
    print(header(f"BATCHED_EIGH_MAX = {BATCHED_EIGH_MAX}; median of {args.repeats}\n"))
    b = args.batch
    print(f"| d | one call (ms) | batch of {b} (ms) | {b} single calls (ms) | faster |")
    print("|---|---|---|---|---|")
    for d in args.sizes:
        t = row(d, b, args.repeats)
        faster = "batched" if t["batched"] < t["singles"] else "single calls"
        print(f"| {d} | {t['one']:.2f} | {t['batched']:.2f} | {t['singles']:.2f} | {faster} |")


if __name__ == "__main__":
    main()
