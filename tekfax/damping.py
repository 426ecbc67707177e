"""Damping: the damped eigenvalues D that the preconditioner divides by (ALGORITHMS.md s. 4).

Every rule returns D in kernel layout (d_in, d_out), the diagonal of the damped block in the
eigenbasis Q = Q_in (x) Q_out, so the damped block is Q diag(vec D) Q^T.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den > 0, else 0 (a dead layer has zero statistics)."""
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def pi_factor(eig_in: jax.Array, eig_out: jax.Array) -> jax.Array:
    """pi = sqrt((tr A / d_in) / (tr G / d_out)) (Martens & Grosse 2015, s. 6.3).

    1 when either trace is 0.
    """
    mean_in, mean_out = jnp.mean(eig_in), jnp.mean(eig_out)
    ok = (mean_in > 0) & (mean_out > 0)
    return jnp.where(ok, jnp.sqrt(safe_div(mean_in, mean_out)), 1.0)


def factored(
    eig_in: jax.Array, eig_out: jax.Array, damping: jax.Array, pi: jax.Array | float = 1.0
) -> jax.Array:
    """(A + pi sqrt(lambda) I) (x) (G + sqrt(lambda)/pi I) in the eigenbasis (KFAC, s. 4)."""
    root = jnp.sqrt(damping)
    return jnp.outer(eig_in + pi * root, eig_out + root / pi)


def tkfac_normal(
    eig_in: jax.Array, eig_out: jax.Array, delta: jax.Array, damping: jax.Array
) -> jax.Array:
    """(sqrt(delta) Phi + sqrt(lambda) I) (x) (sqrt(delta) Psi + sqrt(lambda) I) (TKFAC Eq. 13-14).

    ``eig_in``/``eig_out`` are eigenvalues of the moments M_Phi, M_Psi; sqrt(delta) Phi has
    eigenvalues eig(M_Phi) / sqrt(delta).
    """
    scale = safe_div(1.0, jnp.sqrt(delta))
    return factored(eig_in * scale, eig_out * scale, damping)


def trace_adaptive_factored(phi: jax.Array, psi: jax.Array, delta_tilde: jax.Array) -> jax.Array:
    """(sqrt(d~) Phi + d~/d_in I) (x) (sqrt(d~) Psi + d~/d_out I) (TKFAC_new, Eq. 15-16).

    ``phi`` and ``psi`` are the eigenvalues of the unit-trace factors Phi and Psi.
    """
    root = jnp.sqrt(delta_tilde)
    return jnp.outer(
        root * phi + delta_tilde / phi.shape[0], root * psi + delta_tilde / psi.shape[0]
    )


def rescale_fixed(s: jax.Array, damping: jax.Array) -> jax.Array:
    """S~ = S + lambda (EKFAC, TEKFAC on FNNs)."""
    return s + damping


def rescale_trace(s: jax.Array, delta_tilde: jax.Array) -> jax.Array:
    """S~ = (d~/delta) S + d~/dim, delta = tr S, dim = d_in d_out (our reading of TEKFAC Eq. 3.5).

    A dead layer (delta = 0) gets S~ = d~/dim.
    """
    return safe_div(delta_tilde, jnp.sum(s)) * s + delta_tilde / s.size


def adaptive_deltas(
    deltas: Mapping[str, jax.Array], is_conv: Mapping[str, bool], nu: jax.Array
) -> dict[str, jax.Array]:
    """delta~ per layer for the trace-adaptive rules (TKFAC Eq. 15-16, TEKFAC Eq. 3.4-3.5).

    Conv layers: delta~ = max(nu, delta). beta = max over conv layers of delta~/delta (1 when
    there is none; a dead conv layer, delta = 0, counts as ratio 1 rather than infinity).
    Dense layers: delta~ = beta * max(nu, delta).
    """
    ratios = [
        jnp.where(deltas[k] > 0, safe_div(jnp.maximum(nu, deltas[k]), deltas[k]), 1.0)
        for k in deltas
        if is_conv[k]
    ]
    beta = jnp.max(jnp.stack(ratios)) if ratios else 1.0
    return {k: jnp.maximum(nu, d) * (1.0 if is_conv[k] else beta) for k, d in deltas.items()}
