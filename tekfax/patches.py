"""Layer matrices: inputs a_{n,t} and output gradients u_{n,t} (docs/algorithms.md, section 1).

Conventions used everywhere in tekfax:

* a layer's gradient is held in *kernel layout*, a (d_in, d_out) matrix whose rows are the
  kernel's input features flattened row-major (for a convolution: kernel offsets, then input
  channels) with the bias as row 0. It is gradW^T in the notation of docs/algorithms.md.
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

from tekfax.layers import layer_dims
from tekfax.modules import LayerMeta


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
    times more flops; it was 2-3x slower on CPU (BENCHMARKS.md, "What changed").
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
    """a_{n,t}: (N, T, d_in), with a leading 1 when the layer has a bias.

    Example:
      >>> st = out.stats["Dense_0"]
      >>> a = tekfax.patches.input_matrix(st.inputs, st.meta)
      >>> a.shape, bool((a[..., 0] == 1).all())
      ((8, 1, 5), True)
    """
    if meta.is_conv:
        a = _conv_patches(inputs, meta)
    else:
        a = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    if meta.has_bias:
        a = jnp.concatenate([jnp.ones(a.shape[:-1] + (1,), a.dtype), a], axis=-1)
    return a


def output_matrix(out_grads: jax.Array) -> jax.Array:
    """u_{n,t}: (num_samples, N, T, d_out) from (num_samples, N, ..., d_out).

    Example:
      >>> tekfax.patches.output_matrix(out.stats["Dense_0"].out_grads).shape
      (1, 8, 1, 16)
    """
    return out_grads.reshape(out_grads.shape[0], out_grads.shape[1], -1, out_grads.shape[-1])


# Elements of per-example intermediates held at once by :func:`sum_over_examples` (float32:
# 16 MiB). Bounds the statistics' memory: im2col alone is prod(kernel) times a conv's input.
CHUNK_ELEMENTS = 1 << 22


def chunking(n: int, per_example: int) -> tuple[int, int, int]:
    """(blocks, chunk, chunks): how :func:`sum_over_examples` streams n examples.

    The batch is viewed as ``blocks`` = gcd(n, device count) contiguous blocks, one per
    device when the batch is sharded over the devices; each block is cut into ``chunks``
    chunks of ``chunk`` examples, so blocks * chunk <= ``CHUNK_ELEMENTS / per_example`` (or
    chunk = 1). With several blocks, chunk divides the block (no padding, nothing moves
    between devices); on one device a batch size with no fitting divisor gets balanced
    chunks, the last one padded.

    Example:
      >>> tekfax.patches.chunking(8, per_example=100)      # one chunk
      (1, 8, 1)
      >>> tekfax.patches.chunking(1000, per_example=1 << 14)   # <= 256 examples a chunk
      (1, 250, 4)
    """
    target = max(1, min(n, CHUNK_ELEMENTS // max(per_example, 1)))
    if target == n:
        return 1, n, 1
    blocks = math.gcd(n, jax.device_count())
    rows = n // blocks
    budget = max(1, target // blocks)
    chunk = max(k for k in range(1, rows + 1) if rows % k == 0 and k <= budget)
    if blocks > 1 or 2 * chunk >= budget:
        return blocks, chunk, rows // chunk
    chunks = -(-rows // budget)
    return 1, -(-rows // chunks), chunks


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
    is. See :func:`chunking` for the cut (``per_example``: elements ``fn`` holds per
    example). A ``lax.scan`` over the chunks builds each chunk's im2col and accumulates
    ``fn`` per block (``vmap``), so with the batch sharded over devices every device sums its
    own examples and the blocks are added once at the end: one all-reduce per statistic,
    however many chunks. Padding examples are zero rows (bias included); results are
    weighted chunk / N. One chunk calls ``fn`` directly.

    Example:
      >>> st = out.stats["Dense_0"]
      >>> def factor_a(a, u):       # A = sum_n a_n a_n^T / N over locations
      ...     return jnp.einsum("ntd,nte->de", a, a) / a.shape[0]
      >>> a_factor = tekfax.patches.sum_over_examples(
      ...     factor_a, st.inputs, st.out_grads, st.meta, jnp.float32, per_example=25)
      >>> a_factor.shape
      (5, 5)
    """
    n = inputs.shape[0]
    blocks, chunk, chunks = chunking(n, per_example)
    if chunks == 1 and blocks == 1:
        return fn(input_matrix(inputs, meta).astype(dtype), output_matrix(out_grads).astype(dtype))
    pad = chunks * chunk - n // blocks

    def split(v: jax.Array, axis: int) -> jax.Array:
        """(..., n, ...) -> (chunks, ..., blocks, chunk, ...) along the batch ``axis``."""
        v = v.reshape(v.shape[:axis] + (blocks, n // blocks) + v.shape[axis + 1 :])
        v = jnp.pad(v, [(0, 0)] * (axis + 1) + [(0, pad)] + [(0, 0)] * (v.ndim - axis - 2))
        v = v.reshape(v.shape[: axis + 1] + (chunks, chunk) + v.shape[axis + 2 :])
        return jnp.moveaxis(v, axis + 1, 0)

    x, g = split(inputs, 0), split(out_grads, 1)
    real = split(jnp.ones((n,), dtype), 0)  # 0 on padding examples

    def block_fn(x_b, g_b, real_b):
        a = input_matrix(x_b, meta).astype(dtype) * real_b[:, None, None]
        return fn(a, output_matrix(g_b).astype(dtype))

    per_block = jax.vmap(block_fn, in_axes=(0, 1, 0))

    def body(total, data):
        return jax.tree_util.tree_map(jnp.add, total, per_block(*data)), None

    shapes = jax.eval_shape(per_block, x[0], g[0], real[0])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = lax.scan(body, zeros, (x, g, real))
    return jax.tree_util.tree_map(lambda t: jnp.sum(t, axis=0) * (chunk / n), total)


def locations(out_grads: jax.Array) -> int:
    """T: output locations per example (spatial positions times leading axes).

    Example:
      >>> tekfax.patches.locations(out.stats["Dense_0"].out_grads)    # a Dense layer: 1
      1
    """
    return math.prod(out_grads.shape[2:-1])


def grad_matrix(
    layer_grads: Mapping[str, jax.Array], dtype: jnp.dtype, d_out: int | None = None
) -> jax.Array:
    """A layer's {"bias", "kernel"} gradient as a (d_in, d_out) matrix, bias in row 0.

    The kernel is read row-major with ``d_out`` columns (:func:`tekfax.layers.layer_dims`:
    by default the bias's size, or the kernel's last axis without a bias).

    Example:
      >>> m = tekfax.patches.grad_matrix(grads["Dense_0"], jnp.float32)
      >>> m.shape, bool((m[0] == grads["Dense_0"]["bias"]).all())
      ((5, 16), True)
    """
    d_out = layer_dims(layer_grads, d_out)[1]
    rows = layer_grads["kernel"].reshape(-1, d_out).astype(dtype)
    if "bias" in layer_grads:
        rows = jnp.concatenate([layer_grads["bias"].reshape(1, -1).astype(dtype), rows], axis=0)
    return rows


def matrix_to_grads(matrix: jax.Array, like: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Inverse of :func:`grad_matrix`, casting back to the dtypes of ``like``.

    Example:
      >>> m = tekfax.patches.grad_matrix(grads["Dense_0"], jnp.float32)
      >>> back = tekfax.patches.matrix_to_grads(m, grads["Dense_0"])
      >>> bool((back["kernel"] == grads["Dense_0"]["kernel"]).all())
      True
    """
    kernel = like["kernel"]
    out = {}
    if "bias" in like:
        out["bias"] = matrix[0].reshape(like["bias"].shape).astype(like["bias"].dtype)
        matrix = matrix[1:]
    out["kernel"] = matrix.reshape(kernel.shape).astype(kernel.dtype)
    return out
