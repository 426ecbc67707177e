"""EAdam (Yuan & Gao 2020): Adam with epsilon accumulated inside v (docs/algorithms.md, section 6).

The moments and bias corrections are optax's own tree helpers
(:func:`optax.tree_utils.tree_update_moment`,
:func:`optax.tree_utils.tree_update_moment_per_elem_norm`,
:func:`optax.tree_utils.tree_bias_correction`), the ones :func:`optax.scale_by_adam` uses;
EAdam differs from Adam only in where eps goes: into v on every step, not into the
denominator.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from tekfax.validation import check_learning_rate, check_number


class ScaleByEAdamState(NamedTuple):
    """count (int32), first moment mu and second moment nu (eps accumulated inside nu)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _widen(tree: optax.Updates) -> optax.Updates:
    """Every leaf in float32 or wider, so the bias corrections never round in low precision."""
    return jax.tree_util.tree_map(lambda t: t.astype(jnp.promote_types(t.dtype, jnp.float32)), tree)


def scale_by_eadam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """EAdam's rescaling: m_hat / sqrt(v_hat), with eps added to v every step.

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2 + eps;  update = m_hat / sqrt(v_hat),
    with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t), and no further eps
    (docs/algorithms.md, section 6). The moments keep the parameters' dtype; the bias
    corrections and the ratio are computed in float32 or wider and cast back.

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the second moment on every step.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByEAdamState`.

    Example:
      >>> opt = optax.chain(tekfax.scale_by_eadam(), optax.scale_by_learning_rate(1e-3))
      >>> opt_state = opt.init(params)
      >>> updates, opt_state = opt.update(grads, opt_state)
      >>> opt_state[0].count, opt_state[0].nu["Dense_1"]["bias"].dtype
      (Array(1, dtype=int32), dtype('float32'))

    References:
      Yuan & Gao, "EAdam optimizer: how epsilon impact Adam", https://arxiv.org/abs/2011.02150
    """
    check_number("b1", b1, 0.0, 1.0, allow_none=False)
    check_number("b2", b2, 0.0, 1.0, allow_none=False)
    check_number("eps", eps, 0.0, allow_none=False)

    def init_fn(params):
        zeros = otu.tree_zeros_like(params)
        return ScaleByEAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        mu = otu.tree_update_moment(updates, state.mu, b1, 1)
        nu = otu.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2)
        nu = jax.tree_util.tree_map(lambda v: v + eps, nu)  # EAdam: eps inside v, every step.
        count = optax.safe_int32_increment(state.count)
        mu_hat = otu.tree_bias_correction(_widen(mu), b1, count)
        nu_hat = otu.tree_bias_correction(_widen(nu), b2, count)
        new = jax.tree_util.tree_map(
            lambda m, m_hat, v_hat: (m_hat / jnp.sqrt(v_hat)).astype(m.dtype), mu, mu_hat, nu_hat
        )
        return new, ScaleByEAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def eadam(
    learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """EAdam optimizer: ``optax.chain(scale_by_eadam(b1, b2, eps), scale_by_learning_rate(lr))``.

    Defaults are the paper's: alpha = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8.

    Example:
      >>> opt = tekfax.eadam(learning_rate=1e-3)
      >>> updates, opt_state = opt.update(grads, opt.init(params))
      >>> params = optax.apply_updates(params, updates)

    References:
      https://arxiv.org/abs/2011.02150
    """
    check_learning_rate("learning_rate", learning_rate)
    return optax.chain(scale_by_eadam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))
