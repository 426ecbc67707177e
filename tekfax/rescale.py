"""Rescale: the eigenvalue-corrected diagonal S of EKFAC/TEKFAC (ALGORITHMS.md section 2).

S is held in kernel layout, (d_in, d_out): S[i, o] = E_n[(Q_in^T gradW_n^T Q_out)[i, o]^2],
the transpose of the paper's (d_out, d_in) matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

CONV_RESCALE = ("per_example", "per_location")

# Elements of per-example projected gradients held at once (float32: 64 MiB per chunk).
_CHUNK_ELEMENTS = 1 << 24


def per_location(ap: jax.Array, up: jax.Array) -> jax.Array:
    """S = E_n[sum_t ((Q_in^T a_t)^2) ((Q_out^T u_t)^2)^T] = diag(Q^T F1 Q).

    For T = 1 this is also the exact per-example S: gradW_n = u a^T has rank one (section 8).
    """
    samples, n = up.shape[:2]
    return jnp.einsum("nti,snto->io", ap * ap, up * up) / (samples * n)


def _per_example_sum(
    a: jax.Array, u: jax.Array, q_in: jax.Array, q_out: jax.Array, project_first: bool
) -> jax.Array:
    """sum over a chunk of examples and samples of (Q_in^T a_n^T u_n Q_out)^2."""
    if project_first:  # (Q_in^T A_n^T)(U_n Q_out): cheap when T is small.
        proj = jnp.einsum("nti,snto->snio", a @ q_in, u @ q_out)
    else:  # Q_in^T (A_n^T U_n) Q_out: cheap when T is large.
        grads = jnp.einsum("nti,snto->snio", a, u)
        proj = jnp.einsum("ji,snjp,po->snio", q_in, grads, q_out)
    return jnp.sum(proj * proj, axis=(0, 1))


def per_example(a: jax.Array, u: jax.Array, q_in: jax.Array, q_out: jax.Array) -> jax.Array:
    """S = E_n[(Q_in^T gradW_n^T Q_out)^2] with gradW_n = sum_t u_t a_t^T (exact EKFAC S).

    The batch is processed in chunks so at most ``_CHUNK_ELEMENTS`` projected per-example
    gradients are alive at once; each chunk projects first or multiplies first, whichever
    costs fewer flops (section 8).
    """
    samples, n, t, d_out = u.shape
    d_in = a.shape[-1]
    project_first = t * (d_in * d_in + d_out * d_out + d_in * d_out) <= (
        t * d_in * d_out + d_in * d_in * d_out + d_in * d_out * d_out
    )
    num_chunks = -(-n // max(1, min(n, _CHUNK_ELEMENTS // (samples * d_in * d_out))))
    chunk = -(-n // num_chunks)  # equal chunks: no padding when num_chunks divides n
    pad = num_chunks * chunk - n  # zero examples contribute nothing to the sum
    # Chunk k holds examples k, k + num_chunks, ...: the batch axis stays the within-chunk
    # axis, so a batch sharded over devices stays sharded inside the scan.
    a = jnp.pad(a, ((0, pad), (0, 0), (0, 0))).reshape(chunk, num_chunks, t, d_in)
    a = jnp.moveaxis(a, 1, 0)
    u = jnp.pad(u, ((0, 0), (0, pad), (0, 0), (0, 0)))
    u = jnp.moveaxis(u.reshape(samples, chunk, num_chunks, t, d_out), 2, 0)

    def body(total, chunk_data):
        a_c, u_c = chunk_data
        return total + _per_example_sum(a_c, u_c, q_in, q_out, project_first), None

    total, _ = lax.scan(body, jnp.zeros((d_in, d_out), a.dtype), (a, u))
    return total / (samples * n)


def batch_rescale(
    a: jax.Array, u: jax.Array, q_in: jax.Array, q_out: jax.Array, mode: str
) -> jax.Array:
    """S_batch for one layer; ``mode`` matters only when T > 1 (convolutions, sequences)."""
    if a.shape[1] == 1 or mode == "per_location":
        return per_location(a @ q_in, u @ q_out)
    return per_example(a, u, q_in, q_out)
