"""Preconditioning in the eigenbasis and the optional norm constraint (docs/algorithms.md, s. 5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from tekfax.eigenbasis import Eigenbasis


def precondition(
    grad: jax.Array, q_in: jax.Array, q_out: jax.Array, damped: jax.Array
) -> jax.Array:
    """P(gradW) = Q_out [(Q_out^T gradW Q_in) / S~] Q_in^T, written in kernel layout.

    ``grad`` and ``damped`` are (d_in, d_out), so this computes Q_in [(Q_in^T g Q_out) / D]
    Q_out^T. For KFAC and TKFAC with factored damping D is an outer product and this equals
    G_hat^{-1} gradW A_hat^{-1}. docs/algorithms.md, section 5 (EKFAC, George et al. 2018).

    Example:
      >>> from tekfax.precondition import precondition
      >>> precondition(jnp.ones((2, 1)), jnp.eye(2), jnp.eye(1), jnp.array([[2.0], [4.0]]))
      Array([[0.5 ],
             [0.25]], dtype=float32)
    """
    return q_in @ ((q_in.T @ grad @ q_out) / damped) @ q_out.T


def norm_constraint_scale(
    preconditioned: Mapping[str, jax.Array],
    grads: Mapping[str, jax.Array],
    kappa: jax.Array,
    learning_rate: jax.Array,
) -> jax.Array:
    """min(1, sqrt(kappa / (alpha^2 sum_l <P(g_l), g_l>))) (Ba et al. 2017, the "KL clip").

    docs/algorithms.md, section 5.

    Example:
      >>> from tekfax.precondition import norm_constraint_scale
      >>> g = {"Dense_0": jnp.ones((2, 2))}
      >>> float(norm_constraint_scale(g, g, 1.0, 1.0))
      0.5
    """
    vg = sum(jnp.vdot(preconditioned[k], grads[k]) for k in preconditioned)
    vg = jnp.abs(vg) * jnp.square(learning_rate)
    return jnp.where(vg > 0, jnp.minimum(1.0, jnp.sqrt(kappa / jnp.where(vg > 0, vg, 1.0))), 1.0)


def precondition_layers(
    grads: Mapping[str, jax.Array],
    bases: Mapping[str, Eigenbasis],
    damped: Mapping[str, jax.Array],
    norm_constraint: jax.Array | None = None,
    learning_rate: jax.Array | float = 1.0,
) -> dict[str, jax.Array]:
    """P(grad) of every layer, scaled by the KL clip when ``norm_constraint`` is given.

    Each layer's result is solve(damped block, grad) with the damped block
    (Q_in (x) Q_out) diag(vec D) (Q_in (x) Q_out)^T (docs/algorithms.md, section 5).

    Example:
      >>> from tekfax.eigenbasis import Eigenbasis
      >>> from tekfax.precondition import precondition_layers
      >>> basis = Eigenbasis(jnp.eye(1), jnp.ones(1), jnp.eye(2), jnp.ones(2), None)
      >>> precondition_layers({"Dense_0": jnp.ones((1, 2))}, {"Dense_0": basis},
      ...                     {"Dense_0": jnp.full((1, 2), 2.0)}, norm_constraint=0.25)
      {'Dense_0': Array([[0.25, 0.25]], dtype=float32)}
    """
    pre = {k: precondition(g, bases[k].q_in, bases[k].q_out, damped[k]) for k, g in grads.items()}
    if norm_constraint is None:
        return pre
    scale = norm_constraint_scale(pre, grads, norm_constraint, learning_rate)
    return {k: v * scale.astype(v.dtype) for k, v in pre.items()}
