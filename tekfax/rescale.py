"""Rescale: the eigenvalue-corrected diagonal S of EKFAC/TEKFAC (ALGORITHMS.md section 2).

S is held in kernel layout, (d_in, d_out): S[i, o] = E_n[(Q_in^T gradW_n^T Q_out)[i, o]^2],
the transpose of the paper's (d_out, d_in) matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONV_RESCALE = ("per_example", "per_location")


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


def project_first(t: int, d_in: int, d_out: int) -> bool:
    """Whether projecting a and u before the product costs fewer flops (section 8)."""
    return t * (d_in * d_in + d_out * d_out + d_in * d_out) <= (
        t * d_in * d_out + d_in * d_in * d_out + d_in * d_out * d_out
    )


def per_example(a: jax.Array, u: jax.Array, q_in: jax.Array, q_out: jax.Array) -> jax.Array:
    """S = E_n[(Q_in^T gradW_n^T Q_out)^2] with gradW_n = sum_t u_t a_t^T (exact EKFAC S).

    Projects first or multiplies first, whichever costs fewer flops. Memory is bounded by the
    caller streaming chunks of examples (:func:`tekfax.patches.sum_over_examples`).
    """
    samples, n, t, d_out = u.shape
    first = project_first(t, a.shape[-1], d_out)
    return _per_example_sum(a, u, q_in, q_out, first) / (samples * n)


def elements_per_example(samples: int, t: int, d_in: int, d_out: int, mode: str) -> int:
    """Elements :func:`batch_rescale` holds per example (for chunking the batch)."""
    matrices = t * (d_in + samples * d_out)
    if t == 1 or mode == "per_location":
        return 2 * matrices
    return matrices + 2 * samples * d_in * d_out


def batch_rescale(
    a: jax.Array, u: jax.Array, q_in: jax.Array, q_out: jax.Array, mode: str
) -> jax.Array:
    """S_batch for one layer; ``mode`` matters only when T > 1 (convolutions, sequences)."""
    if a.shape[1] == 1 or mode == "per_location":
        return per_location(a @ q_in, u @ q_out)
    return per_example(a, u, q_in, q_out)
