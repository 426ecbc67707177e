"""Each kernel of a statistics pass timed plain and inside ``lax.cond``: why CPU masks it.

``tekfax.loss_and_curvature`` runs the sampled-label backward pass only on steps that use
statistics. On GPUs and TPUs it skips the pass with ``lax.cond``. On CPU, for a model with
a convolution, it runs the pass on every step and masks it instead
(``tekfax.capture.run_if_needed``, docs/algorithms.md, section 8), because XLA:CPU runs some
convolutions far slower inside a conditional's branch than outside it. This script shows
which: it times, jitted on the default device, a matrix product, a 3x3 convolution, the
convolution's input gradient (what the sampled pass computes through every layer above the
first) and its kernel gradient, each plainly and as the taken branch of a ``lax.cond``,
and prints the medians as a table. Run it on a new jax release or backend to check whether
the masking still pays.

    python scripts/bench_conditional.py                     # batch 128, 32x32, 16 channels
    python scripts/bench_conditional.py --batch 256 --size 8 --channels 32
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from bench_eigh import header, median_ms
from jax import lax

from tekfax.experiments.compare import single_threaded_lapack


def conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """A stride-1 'SAME' convolution, NHWC inputs and HWIO kernel (Flax's layout)."""
    layout = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=layout)


def kernels(batch: int, size: int, channels: int) -> dict:
    """name -> (function of one argument, its argument): the operations timed."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, size, size, channels))
    w = jax.random.normal(keys[1], (3, 3, channels, channels))
    y = jax.random.normal(keys[2], (batch, size, size, channels))
    m = jax.random.normal(keys[0], (1024, 1024))
    return {
        "matrix product 1024 x 1024": (lambda a: a @ a, m),
        "convolution": (lambda a: conv(a, w), x),
        "convolution, input gradient": (lambda g: jax.vjp(lambda a: conv(a, w), x)[1](g)[0], y),
        "convolution, kernel gradient": (lambda g: jax.vjp(lambda k: conv(x, k), w)[1](g)[0], y),
    }


def in_cond(fn):
    """``fn`` as a branch of a ``lax.cond`` whose other branch returns zeros, jitted.

    It takes ``(flag, arg)``: the flag is an argument, so XLA cannot drop the conditional.
    """

    def zeros(arg):
        shape = jax.eval_shape(fn, arg)
        return jnp.zeros(shape.shape, shape.dtype)

    return jax.jit(lambda flag_arg: lax.cond(flag_arg[0], fn, zeros, flag_arg[1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="height and width of the images")
    parser.add_argument("--channels", type=int, default=16, help="input and output channels")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    single_threaded_lapack()
    shape = f"{args.size}x{args.size}x{args.channels}"
    print(header(f"batch {args.batch}, {shape}, 3x3 kernel; median of {args.repeats}\n"))
    print("| operation | plain (ms) | inside lax.cond (ms) | cond / plain |")
    print("|---|---|---|---|")
    flag = jnp.array(True)
    for name, (fn, arg) in kernels(args.batch, args.size, args.channels).items():
        plain = median_ms(jax.jit(fn), arg, args.repeats)
        branched = median_ms(in_cond(fn), (flag, arg), args.repeats)
        print(f"| {name} | {plain:.2f} | {branched:.2f} | {branched / plain:.2f}x |")


if __name__ == "__main__":
    main()
