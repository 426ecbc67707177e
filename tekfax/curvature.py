"""Curvature estimate: per-batch Kronecker factors and their moving averages.

ALGORITHMS.md section 2 (one batch) and section 3 (bias-corrected moving averages). Inputs
are the layer matrices of :mod:`tekfax.patches`: a with shape (N, T, d_in) and u with shape
(num_samples, N, T, d_out); expectations over label samples are averaged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tekfax.damping import safe_div

ESTIMATORS = ("kfac", "tkfac")


def _weighted_gram(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """sum_rows w_r x_r x_r^T for x of shape (..., d), weights broadcast over the rows."""
    rows = x.reshape(-1, x.shape[-1])
    if weights is None:
        return rows.T @ rows
    return (rows * weights.reshape(-1, 1)).T @ rows


def kfac_factors(a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A = E_n[(1/T) sum_t a a^T], G = E_n[sum_t u u^T] (section 2, KFAC/KFC)."""
    samples, n, t, _ = u.shape
    return _weighted_gram(a) / (n * t), _weighted_gram(u) / (samples * n)


def tkfac_moments(a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """M_Phi = E_n[sum_t |u_t|^2 a a^T], M_Psi = E_n[sum_t |a_t|^2 u u^T] (section 2, TKFAC).

    tr M_Phi = tr M_Psi = delta = tr F1; the normalised factors are M / delta.
    """
    samples, n, _, _ = u.shape
    u_sq = jnp.mean(jnp.sum(u * u, axis=-1), axis=0)  # (N, T), averaged over samples
    a_sq = jnp.sum(a * a, axis=-1)  # (N, T)
    m_phi = _weighted_gram(a, u_sq) / n
    m_psi = _weighted_gram(u, jnp.broadcast_to(a_sq, u.shape[:-1])) / (samples * n)
    return m_phi, m_psi


def batch_factors(estimator: str, a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (input, output) factor pair of one batch for ``estimator``."""
    if estimator == "kfac":
        return kfac_factors(a, u)
    return tkfac_moments(a, u)


def ema(old: jax.Array, new: jax.Array, decay: jax.Array) -> jax.Array:
    """M <- eps M + (1 - eps) M_batch (section 3); divide by the running weight to use it."""
    return decay * old + (1.0 - decay) * new


def eigen_diagonal(eig_in: jax.Array, eig_out: jax.Array, delta: jax.Array | None) -> jax.Array:
    """The un-corrected block's eigenvalues in kernel layout (section 2).

    KFAC: S_KFAC = outer(eig A, eig G). TKFAC (``delta`` given, eigenvalues of the moments):
    S_TKFAC = delta outer(eig Phi, eig Psi) = outer(eig M_Phi, eig M_Psi) / delta.
    """
    diagonal = jnp.outer(eig_in, eig_out)
    return diagonal if delta is None else safe_div(diagonal, delta)
