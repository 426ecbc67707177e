"""Curvature estimate: per-batch Kronecker factors and their moving averages.

docs/algorithms.md, section 2 (one batch) and section 3 (bias-corrected moving averages).
Inputs are the layer matrices of :mod:`tekfax.patches`: a with shape (N, T, d_in) and u with shape
(num_samples, N, T, d_out); expectations over label samples are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tekfax.damping import safe_div

ESTIMATORS = ("kfac", "tkfac")


class Factors(NamedTuple):
    """One layer's Kronecker factor pair, kernel layout (bias row first).

    Attributes:
      inp: the input factor, A (KFAC) or M_Phi (TKFAC), (d_in, d_in).
      out: the output factor, G (KFAC) or M_Psi (TKFAC), (d_out, d_out).
    """

    inp: jax.Array
    out: jax.Array


def _weighted_gram(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """sum_rows w_r x_r x_r^T for x of shape (..., d), weights broadcast over the rows."""
    rows = x.reshape(-1, x.shape[-1])
    if weights is None:
        return rows.T @ rows
    return (rows * weights.reshape(-1, 1)).T @ rows


def kfac_factors(a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A = E_n[(1/T) sum_t a a^T], G = E_n[sum_t u u^T] (docs/algorithms.md, section 2).

    KFAC (Martens & Grosse 2015, Eq. 1) and KFC for convolutions (Grosse & Martens 2016).

    Example:
      >>> from tekfax.curvature import kfac_factors
      >>> a, u = jnp.ones((4, 1, 3)), jnp.ones((1, 4, 1, 2))  # (N, T, d_in), (S, N, T, d_out)
      >>> [f.shape for f in kfac_factors(a, u)]
      [(3, 3), (2, 2)]
    """
    samples, n, t, _ = u.shape
    return _weighted_gram(a) / (n * t), _weighted_gram(u) / (samples * n)


def tkfac_moments(a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """M_Phi = E_n[sum_t |u_t|^2 a a^T], M_Psi = E_n[sum_t |a_t|^2 u u^T] (TKFAC Eq. 8).

    docs/algorithms.md, section 2. tr M_Phi = tr M_Psi = delta = tr F1; the normalised
    factors are M / delta.

    Example:
      >>> from tekfax.curvature import tkfac_moments
      >>> m_phi, m_psi = tkfac_moments(jnp.ones((4, 1, 3)), jnp.ones((1, 4, 1, 2)))
      >>> float(jnp.trace(m_phi)), float(jnp.trace(m_psi))
      (6.0, 6.0)
    """
    samples, n, _, _ = u.shape
    u_sq = jnp.mean(jnp.sum(u * u, axis=-1), axis=0)  # (N, T), averaged over samples
    a_sq = jnp.sum(a * a, axis=-1)  # (N, T)
    m_phi = _weighted_gram(a, u_sq) / n
    m_psi = _weighted_gram(u, jnp.broadcast_to(a_sq, u.shape[:-1])) / (samples * n)
    return m_phi, m_psi


def batch_factors(estimator: str, a: jax.Array, u: jax.Array) -> Factors:
    """The (input, output) factor pair of one batch for ``estimator`` ("kfac" or "tkfac").

    Example:
      >>> from tekfax.curvature import batch_factors
      >>> factors = batch_factors("tkfac", jnp.ones((4, 1, 3)), jnp.ones((1, 4, 1, 2)))
      >>> float(factors.inp[0, 0])
      2.0
    """
    if estimator == "kfac":
        return Factors(*kfac_factors(a, u))
    return Factors(*tkfac_moments(a, u))


def ema(old: jax.Array, new: jax.Array, decay: jax.Array) -> jax.Array:
    """M <- eps M + (1 - eps) M_batch (docs/algorithms.md, section 3).

    Divide by the running weight (:func:`ema_weight`) to use the average.

    Example:
      >>> from tekfax.curvature import ema
      >>> float(ema(jnp.array(0.0), jnp.array(2.0), 0.75))
      0.5
    """
    return decay * old + (1.0 - decay) * new


def _all_finite(batch: Mapping[str, Factors]) -> jax.Array:
    finite = [jnp.all(jnp.isfinite(f)) for factors in batch.values() for f in factors]
    return jnp.all(jnp.stack(finite))


def moving_average(
    old: Mapping[str, Factors], batch: Mapping[str, Factors], decay: jax.Array
) -> tuple[dict[str, Factors], jax.Array]:
    """The factor running sums after one batch, and whether the batch was accepted.

    M <- eps M + (1 - eps) M_batch for every layer (docs/algorithms.md, section 3;
    Martens & Grosse 2015, section 5). A batch with any non-finite factor, in any layer
    (NaN inputs, overflow), is rejected: every sum stays as it was.

    Example:
      >>> from tekfax.curvature import Factors, moving_average
      >>> old = {"Dense_0": Factors(jnp.eye(2), jnp.eye(1))}
      >>> bad = {"Dense_0": Factors(jnp.full((2, 2), jnp.nan), jnp.eye(1))}
      >>> new, accepted = moving_average(old, bad, 0.95)
      >>> bool(accepted), bool(jnp.all(new["Dense_0"].inp == jnp.eye(2)))
      (False, True)
    """
    ok = _all_finite(batch)
    new = {
        k: Factors(
            *(
                jnp.where(ok, ema(f_old, f_new, decay), f_old)
                for f_old, f_new in zip(old[k], batch[k], strict=True)
            )
        )
        for k in batch
    }
    return new, ok


def ema_weight(weight: jax.Array, accepted: jax.Array, decay: jax.Array) -> jax.Array:
    """The bias-correction weight w <- eps w + (1 - eps) after an accepted batch.

    docs/algorithms.md, section 3: the estimate is the running sum divided by w, so the
    average is unbiased from the first batch on. A rejected batch leaves w unchanged.

    Example:
      >>> from tekfax.curvature import ema_weight
      >>> float(ema_weight(jnp.array(0.0), jnp.array(True), 0.75))
      0.25
    """
    return jnp.where(accepted, ema(weight, 1.0, decay), weight)


def estimate(factors: Factors, weight: jax.Array) -> Factors:
    """The bias-corrected factor estimate, running sum / w (docs/algorithms.md, section 3).

    w is 0 only while no batch was accepted, and then the sums are 0 too (estimate 0).

    Example:
      >>> from tekfax.curvature import Factors, estimate
      >>> estimate(Factors(jnp.full((1, 1), 0.5), jnp.zeros((1, 1))), jnp.array(0.25)).inp
      Array([[2.]], dtype=float32)
    """
    w = jnp.where(weight > 0, weight, 1.0).astype(factors.inp.dtype)
    return Factors(factors.inp / w, factors.out / w)


def eigen_diagonal(eig_in: jax.Array, eig_out: jax.Array, delta: jax.Array | None) -> jax.Array:
    """The un-corrected block's eigenvalues in kernel layout (docs/algorithms.md, section 2).

    KFAC: S_KFAC = outer(eig A, eig G). TKFAC (``delta`` given, eigenvalues of the moments):
    S_TKFAC = delta outer(eig Phi, eig Psi) = outer(eig M_Phi, eig M_Psi) / delta.

    Example:
      >>> from tekfax.curvature import eigen_diagonal
      >>> eigen_diagonal(jnp.array([1.0, 2.0]), jnp.array([3.0]), jnp.array(2.0))
      Array([[1.5],
             [3. ]], dtype=float32)
    """
    diagonal = jnp.outer(eig_in, eig_out)
    return diagonal if delta is None else safe_div(diagonal, delta)
