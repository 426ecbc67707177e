"""Preconditioning in the eigenbasis and the optional norm constraint (ALGORITHMS.md s. 5)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def precondition(
    grad: jax.Array, q_in: jax.Array, q_out: jax.Array, damped: jax.Array
) -> jax.Array:
    """P(gradW) = Q_out [(Q_out^T gradW Q_in) / S~] Q_in^T, written in kernel layout.

    ``grad`` and ``damped`` are (d_in, d_out), so this computes Q_in [(Q_in^T g Q_out) / D]
    Q_out^T. For KFAC and TKFAC with factored damping D is an outer product and this equals
    G_hat^{-1} gradW A_hat^{-1}.
    """
    return q_in @ ((q_in.T @ grad @ q_out) / damped) @ q_out.T


def norm_constraint_scale(
    preconditioned: Mapping[str, jax.Array],
    grads: Mapping[str, jax.Array],
    kappa: jax.Array,
    learning_rate: jax.Array,
) -> jax.Array:
    """min(1, sqrt(kappa / (alpha^2 sum_l <P(g_l), g_l>))) (Ba et al. 2017, the "KL clip")."""
    vg = sum(jnp.vdot(preconditioned[k], grads[k]) for k in preconditioned)
    vg = jnp.abs(vg) * jnp.square(learning_rate)
    return jnp.where(vg > 0, jnp.minimum(1.0, jnp.sqrt(kappa / jnp.where(vg > 0, vg, 1.0))), 1.0)
