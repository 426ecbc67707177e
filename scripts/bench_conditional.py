"""Each kernel of a statistics pass timed plain and inside ``lax.cond``, JAX's form and tekfax's.

``tekfax.loss_and_curvature`` runs the sampled-label backward pass only on steps that use
statistics, skipping it with ``lax.cond`` on the others. That pass is a chain of
convolution input gradients, and XLA:CPU runs JAX's form of them far slower inside a
conditional's branch than outside it: JAX's input gradient reads the kernel with its
feature axes swapped, (..., out, in), and XLA:CPU transposes it into the layout of its
fast convolution only outside conditionals. Tagged convolutions therefore convolve with
``tekfax.modules.transposable_conv``, which stores the kernel swapped so that the input
gradient reads (..., in, out) (docs/algorithms.md, section 8). This script times, jitted
on the default device, a matrix product, a 3x3 convolution, its input gradient in JAX's
form and in tekfax's, and its kernel gradient, each plainly and as the taken branch of a
``lax.cond``, and prints the medians as a table. Run it on a new jax release or backend to
check whether the branch is still as fast as the plain kernel.

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
from tekfax.modules import transposable_conv


def conv(x: jax.Array, w: jax.Array, convolve=lax.conv_general_dilated) -> jax.Array:
    """A stride-1 'SAME' convolution, NHWC inputs and HWIO kernel (Flax's layout)."""
    return convolve(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


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
        "convolution, input gradient, tekfax form": (
            lambda g: jax.vjp(lambda a: conv(a, w, transposable_conv), x)[1](g)[0],
            y,
        ),
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
