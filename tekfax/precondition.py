"""Preconditioning in the eigenbasis and the optional norm constraint (docs/algorithms.md, s. 5).

Both are safe in float32 at any gradient scale: a gradient is scaled by a power of two before
it is projected, and the KL clip's quadratic is summed with its largest factors taken out,
so neither overflows unless its true result does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from tekfax.curvature import power_of_two

if TYPE_CHECKING:
    from tekfax.eigenbasis import Eigenbasis


def _eigen_coordinates(
    grad: jax.Array, q_in: jax.Array, q_out: jax.Array, damped: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m, Y / m, X / m): Y = Q_in^T g Q_out, X = Y / D; m >= 1 a power of two near max|g|.

    Dividing by m (exact) keeps the projection's sums finite when g is near the float
    maximum; m >= 1 so that neither Y / m nor X / m is larger than Y or X.
    """
    m = jnp.maximum(power_of_two(jnp.max(jnp.abs(grad))), 1.0)
    y = q_in.T @ (grad / m) @ q_out
    return m, y, y / damped


def precondition(
    grad: jax.Array, q_in: jax.Array, q_out: jax.Array, damped: jax.Array
) -> jax.Array:
    """P(gradW) = Q_out [(Q_out^T gradW Q_in) / S~] Q_in^T, written in kernel layout.

    ``grad`` and ``damped`` are (d_in, d_out), so this computes Q_in [(Q_in^T g Q_out) / D]
    Q_out^T. For KFAC and TKFAC with factored damping D is an outer product and this equals
    G_hat^{-1} gradW A_hat^{-1}. docs/algorithms.md, section 5 (EKFAC, George et al. 2018).
    The gradient is scaled by a power of two around the projections (the same bits in the
    normal range), so Q_in^T g Q_out stays finite for any finite g, and the division by D
    overflows only when the true eigen-coordinates (X = Q_in^T P(g) Q_out) do.

    Example:
      >>> from tekfax.precondition import precondition
      >>> precondition(jnp.ones((2, 1)), jnp.eye(2), jnp.eye(1), jnp.array([[2.0], [4.0]]))
      Array([[0.5 ],
             [0.25]], dtype=float32)
    """
    m, _, x = _eigen_coordinates(grad, q_in, q_out, damped)
    return (q_in @ x @ q_out.T) * m


def norm_constraint_scale(
    preconditioned: Mapping[str, jax.Array],
    grads: Mapping[str, jax.Array],
    kappa: jax.Array,
    learning_rate: jax.Array,
) -> jax.Array:
    """min(1, sqrt(kappa / (alpha^2 sum_l <P(g_l), g_l>))) (Ba et al. 2017, the "KL clip").

    docs/algorithms.md, section 5. The sum is taken as M_p M_g sum_l <P(g_l) / M_p, g_l / M_g>
    with M_p, M_g even powers of two within a factor 4 of max |P(g)| and max |g| over all
    layers, and the scale as sqrt(kappa) / (alpha sqrt(sum) sqrt(M_p) sqrt(M_g)) (the last
    two exact), so nothing overflows: when the quadratic itself exceeds the float maximum the
    scale is its true, tiny value (or 0 below the smallest float), and alpha^2 scale^2
    <P(g), g> <= kappa up to rounding whenever P(g) is finite. Non-finite inputs give 0,
    never NaN; a zero quadratic gives 1.

    Example:
      >>> from tekfax.precondition import norm_constraint_scale
      >>> g = {"Dense_0": jnp.ones((2, 2))}
      >>> float(norm_constraint_scale(g, g, 1.0, 1.0))
      0.5
      >>> huge = {"Dense_0": jnp.full((2, 2), 1e20)}  # <g, g> = 4e40 overflows float32
      >>> float(norm_constraint_scale(huge, huge, 1.0, 1.0))
      4.999999841327613e-21
    """
    keys = list(preconditioned)
    top_p = jnp.max(jnp.stack([jnp.max(jnp.abs(preconditioned[k])) for k in keys]))
    top_g = jnp.max(jnp.stack([jnp.max(jnp.abs(grads[k])) for k in keys]))
    finite = jnp.isfinite(top_p) & jnp.isfinite(top_g)
    # Units are even powers of two, at least the smallest normal float: exact square roots.
    tiny = jnp.finfo(top_p.dtype).tiny
    root_p = power_of_two(jnp.sqrt(jnp.where(finite, jnp.maximum(top_p, tiny), 1.0)))
    root_g = power_of_two(jnp.sqrt(jnp.where(finite, jnp.maximum(top_g, tiny), 1.0)))
    total = sum(
        jnp.vdot(preconditioned[k] / (root_p * root_p), grads[k] / (root_g * root_g)) for k in keys
    )
    denominator = jnp.abs(learning_rate) * jnp.sqrt(jnp.abs(total)) * root_p * root_g
    positive = denominator > 0
    scale = jnp.sqrt(kappa) / jnp.where(positive, denominator, 1.0)
    return jnp.where(finite, jnp.where(positive, jnp.minimum(1.0, scale), 1.0), 0.0)


def precondition_layers(
    grads: Mapping[str, jax.Array],
    bases: Mapping[str, Eigenbasis],
    damped: Mapping[str, jax.Array],
    norm_constraint: jax.Array | None = None,
    learning_rate: jax.Array | float = 1.0,
) -> dict[str, jax.Array]:
    """P(grad) of every layer, scaled by the KL clip when ``norm_constraint`` is given.

    Each layer's result is solve(damped block, grad) with the damped block
    (Q_in (x) Q_out) diag(vec D) (Q_in (x) Q_out)^T (docs/algorithms.md, section 5). The
    clip's quadratic <P(g), g> is taken in the eigenbasis, as sum (Q_in^T g Q_out)^2 / D: a
    sum of non-negative terms, so it cannot cancel in float32 the way <P(g), g> can when D
    spans many orders of magnitude (:func:`norm_constraint_scale` keeps it from overflowing).

    Example:
      >>> from tekfax.eigenbasis import Eigenbasis
      >>> from tekfax.precondition import precondition_layers
      >>> basis = Eigenbasis(jnp.eye(1), jnp.ones(1), jnp.eye(2), jnp.ones(2), None)
      >>> precondition_layers({"Dense_0": jnp.ones((1, 2))}, {"Dense_0": basis},
      ...                     {"Dense_0": jnp.full((1, 2), 2.0)}, norm_constraint=0.25)
      {'Dense_0': Array([[0.25, 0.25]], dtype=float32)}
    """
    parts = {
        k: _eigen_coordinates(g, bases[k].q_in, bases[k].q_out, damped[k]) for k, g in grads.items()
    }
    pre = {k: (bases[k].q_in @ x @ bases[k].q_out.T) * m for k, (m, _, x) in parts.items()}
    if norm_constraint is None:
        return pre
    # <P(g), g> = <X, Y> for orthonormal Q; X Y = Y^2 / D >= 0 term by term.
    xs = {k: x * m for k, (m, _, x) in parts.items()}
    ys = {k: y * m for k, (m, y, _) in parts.items()}
    scale = norm_constraint_scale(xs, ys, norm_constraint, learning_rate)
    return {k: v * scale.astype(v.dtype) for k, v in pre.items()}
