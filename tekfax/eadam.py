"""EAdam (Yuan & Gao 2020): Adam with epsilon accumulated inside v (ALGORITHMS.md s. 6)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from tekfax.validation import check_learning_rate, check_number


class ScaleByEAdamState(NamedTuple):
    """count (int32), first moment mu and second moment nu (eps accumulated inside nu)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_eadam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """EAdam's rescaling: m_hat / sqrt(v_hat), with eps added to v every step.

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2 + eps;  update = m_hat / sqrt(v_hat),
    with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t), and no further eps.

    Example:
      >>> opt = optax.chain(tekfax.scale_by_eadam(), optax.scale_by_learning_rate(1e-3))

    References:
      Yuan & Gao, "EAdam optimizer: how epsilon impact Adam", https://arxiv.org/abs/2011.02150
    """
    check_number("b1", b1, 0.0, 1.0, allow_none=False)
    check_number("b2", b2, 0.0, 1.0, allow_none=False)
    check_number("eps", eps, 0.0, allow_none=False)

    def init_fn(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return ScaleByEAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g + eps, state.nu, updates)
        count = optax.safe_int32_increment(state.count)

        def scale(m, v):  # Bias corrections in the moments' precision (float32 or wider).
            t = count.astype(jnp.promote_types(m.dtype, jnp.float32))
            return ((m / (1 - b1**t)) / jnp.sqrt(v / (1 - b2**t))).astype(m.dtype)

        new = jax.tree_util.tree_map(scale, mu, nu)
        return new, ScaleByEAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def eadam(
    learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """EAdam optimizer: ``optax.chain(scale_by_eadam(b1, b2, eps), scale_by_learning_rate(lr))``.

    Defaults are the paper's: alpha = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8.

    Example:
      >>> opt = tekfax.eadam(learning_rate=1e-3)

    References:
      https://arxiv.org/abs/2011.02150
    """
    check_learning_rate("learning_rate", learning_rate)
    return optax.chain(scale_by_eadam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))
