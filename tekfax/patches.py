"""Layer matrices: inputs a_{n,t} and output gradients u_{n,t} (ALGORITHMS.md section 1).

Conventions used everywhere in tekfax:

* a layer's gradient is held in *kernel layout*, a (d_in, d_out) matrix whose rows are the
  kernel's input features flattened row-major (for a convolution: kernel offsets, then input
  channels) with the bias as row 0. It is gradW^T in the notation of ALGORITHMS.md.
* the homogeneous 1 is *prepended* to every input vector rather than appended. The algebra is
  unchanged under that permutation, and it makes ``matrix.ravel()`` equal to
  ``jax.flatten_util.ravel_pytree({"bias": b, "kernel": k})[0]``, the ordering the
  diagnostics promise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tekfax.tagging import LayerMeta


def _patch_indices(spatial: tuple[int, ...], meta: LayerMeta) -> tuple[np.ndarray, tuple[int, ...]]:
    """Static gather indices of im2col: (T, prod(kernel)) flat positions in the padded input.

    Output location o and kernel offset k read padded position o * stride + k * dilation on
    every spatial axis; the padded shape is returned with them.
    """
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(spatial, meta.padding, strict=True))
    rank = len(spatial)
    out = tuple(
        (p - (k - 1) * d - 1) // s + 1
        for p, k, d, s in zip(padded, meta.kernel_size, meta.dilation, meta.strides, strict=True)
    )
    place = np.cumprod((1,) + padded[:0:-1])[::-1]  # row-major place value of each axis
    index = np.zeros(out + meta.kernel_size, np.int64)
    for axis in range(rank):  # Broadcast one (out, kernel) grid per spatial axis.
        grid = np.arange(out[axis])[:, None] * meta.strides[axis] + (
            np.arange(meta.kernel_size[axis])[None, :] * meta.dilation[axis]
        )
        shape = [1] * (2 * rank)
        shape[axis], shape[rank + axis] = out[axis], meta.kernel_size[axis]
        index = index + grid.reshape(shape) * place[axis]
    return index.reshape(math.prod(out), math.prod(meta.kernel_size)), padded


def _conv_patches(inputs: jax.Array, meta: LayerMeta) -> jax.Array:
    """im2col: (N, ..., *spatial, c_in) -> (N, T, prod(kernel) * c_in), offsets major.

    One gather with indices fixed at trace time. ``lax.conv_general_dilated_patches`` would
    compute the same patches as a convolution with a one-hot kernel, prod(kernel) * c_in
    times more flops; on the digits CNN it was 2-3x slower on CPU (scripts/bench.py).
    """
    rank = len(meta.kernel_size)
    n = inputs.shape[0]
    x = inputs.reshape((-1,) + inputs.shape[-rank - 1 :])
    index, padded = _patch_indices(x.shape[1:-1], meta)
    pads = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in meta.padding] + [(0, 0, 0)]
    x = lax.pad(x, jnp.zeros((), x.dtype), pads).reshape(x.shape[0], -1, x.shape[-1])
    patches = jnp.take(x, jnp.asarray(index, jnp.int32), axis=1)  # (B, T, prod(kernel), C)
    return patches.reshape(n, -1, index.shape[1] * meta.in_features)


def input_matrix(inputs: jax.Array, meta: LayerMeta) -> jax.Array:
    """a_{n,t}: (N, T, d_in), with a leading 1 when the layer has a bias."""
    if meta.is_conv:
        a = _conv_patches(inputs, meta)
    else:
        a = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    if meta.has_bias:
        a = jnp.concatenate([jnp.ones(a.shape[:-1] + (1,), a.dtype), a], axis=-1)
    return a


def output_matrix(out_grads: jax.Array) -> jax.Array:
    """u_{n,t}: (num_samples, N, T, d_out) from (num_samples, N, ..., d_out)."""
    return out_grads.reshape(out_grads.shape[0], out_grads.shape[1], -1, out_grads.shape[-1])


# Elements of per-example intermediates held at once by :func:`sum_over_examples` (float32:
# 16 MiB). Bounds the statistics' memory: im2col alone is prod(kernel) times a conv's input.
CHUNK_ELEMENTS = 1 << 22


def count_chunks(n: int, per_example: int) -> int:
    """Chunks :func:`sum_over_examples` splits n examples into (scan iterations)."""
    return -(-n // max(1, min(n, CHUNK_ELEMENTS // max(per_example, 1))))


def sum_over_examples(
    fn: Callable[[jax.Array, jax.Array], Any],
    inputs: jax.Array,
    out_grads: jax.Array,
    meta: LayerMeta,
    dtype: jnp.dtype,
    per_example: int,
) -> Any:
    """``fn(a, u)`` of a whole batch, streamed over chunks of examples to bound memory.

    ``fn`` maps layer matrices a (n, T, d_in) and u (S, n, T, d_out) of n examples to a
    pytree that is a sum over the examples divided by n, as every statistic of sections 2-3
    is. The batch is cut into chunks of at most ``CHUNK_ELEMENTS / per_example`` examples
    (``per_example``: elements ``fn`` holds per example); each chunk's im2col is built inside
    a ``lax.scan``, padding examples are zero rows (bias included), and the chunk results are
    combined with weights chunk / N. One chunk calls ``fn`` directly.
    """
    n = inputs.shape[0]
    num_chunks = count_chunks(n, per_example)
    if num_chunks == 1:
        return fn(input_matrix(inputs, meta).astype(dtype), output_matrix(out_grads).astype(dtype))
    chunk = -(-n // num_chunks)  # balanced chunks, at most num_chunks - 1 padding examples
    pad = num_chunks * chunk - n
    # Chunk k holds examples k, k + num_chunks, ...: the batch axis stays the within-chunk
    # axis, so a batch sharded over devices stays sharded inside the scan (no gather).
    x = jnp.pad(inputs, [(0, pad)] + [(0, 0)] * (inputs.ndim - 1))
    x = jnp.moveaxis(x.reshape((chunk, num_chunks) + inputs.shape[1:]), 1, 0)
    g = jnp.pad(out_grads, [(0, 0), (0, pad)] + [(0, 0)] * (out_grads.ndim - 2))
    g = jnp.moveaxis(g.reshape((g.shape[0], chunk, num_chunks) + g.shape[2:]), 2, 0)
    real = (jnp.arange(num_chunks * chunk) < n).reshape(chunk, num_chunks).T.astype(dtype)

    def matrices(x_c, g_c, real_c):
        a = input_matrix(x_c, meta).astype(dtype) * real_c[:, None, None]
        return a, output_matrix(g_c).astype(dtype)

    def body(total, data):
        part = fn(*matrices(*data))
        return jax.tree_util.tree_map(jnp.add, total, part), None

    shapes = jax.eval_shape(lambda d: fn(*matrices(*d)), (x[0], g[0], real[0]))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = lax.scan(body, zeros, (x, g, real))
    return jax.tree_util.tree_map(lambda t: t * (chunk / n), total)


def locations(out_grads: jax.Array) -> int:
    """T: output locations per example (spatial positions times leading axes)."""
    return math.prod(out_grads.shape[2:-1])


def grad_matrix(layer_grads: Mapping[str, jax.Array], dtype: jnp.dtype) -> jax.Array:
    """A layer's {"bias", "kernel"} gradient as a (d_in, d_out) matrix, bias in row 0."""
    kernel = layer_grads["kernel"]
    rows = kernel.reshape(-1, kernel.shape[-1]).astype(dtype)
    if "bias" in layer_grads:
        rows = jnp.concatenate([layer_grads["bias"].reshape(1, -1).astype(dtype), rows], axis=0)
    return rows


def matrix_to_grads(matrix: jax.Array, like: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Inverse of :func:`grad_matrix`, casting back to the dtypes of ``like``."""
    kernel = like["kernel"]
    out = {}
    if "bias" in like:
        out["bias"] = matrix[0].reshape(like["bias"].shape).astype(like["bias"].dtype)
        matrix = matrix[1:]
    out["kernel"] = matrix.reshape(kernel.shape).astype(kernel.dtype)
    return out
