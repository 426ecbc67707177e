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
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from tekfax.tagging import LayerMeta


def _conv_patches(inputs: jax.Array, meta: LayerMeta) -> jax.Array:
    """im2col: (N, ..., *spatial, c_in) -> (N, T, prod(kernel) * c_in), offsets major."""
    rank = len(meta.kernel_size)
    n = inputs.shape[0]
    x = inputs.reshape((-1,) + inputs.shape[-rank - 1 :])
    x = jnp.moveaxis(x, -1, 1)  # (B, C, *spatial): lax's default layout.
    patches = lax.conv_general_dilated_patches(
        x,
        filter_shape=meta.kernel_size,
        window_strides=meta.strides,
        padding=meta.padding,
        rhs_dilation=meta.dilation,
        precision=lax.Precision.HIGHEST,
    )  # (B, C * prod(kernel), *out), channel-major features.
    b, _, *out = patches.shape
    patches = patches.reshape(b, meta.in_features, math.prod(meta.kernel_size), *out)
    patches = jnp.moveaxis(patches, (1, 2), (-1, -2))  # (B, *out, prod(kernel), C)
    return patches.reshape(n, -1, math.prod(meta.kernel_size) * meta.in_features)


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
