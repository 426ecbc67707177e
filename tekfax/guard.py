"""Guard: skip optimizer steps whose gradients, statistics or results are not finite.

One NaN batch, an overflowing loss or a malformed input must not cost a long run its
parameters or its curvature state. :func:`skip_non_finite` wraps any optax transformation
(a tekfax preset, ``optax.adam``, a chain) like ``optax.apply_if_finite``, but it also checks
the ``stats=`` extra argument and the inner transformation's own outputs, and it never gives
up: a non-finite step returns zero updates and the old inner state, and counts the skip.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tekfax.states import find_outermost


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_non_finite`.

    Attributes:
      inner_state: the wrapped transformation's state, unchanged by skipped steps.
      skipped: total number of skipped steps (int32).
      consecutive: skipped steps since the last finite one (int32).
      last_finite: whether the last step was applied (bool).
    """

    inner_state: Any
    skipped: jax.Array
    consecutive: jax.Array
    last_finite: jax.Array


def _all_finite(tree: Any) -> jax.Array:
    """True when every inexact array leaf of ``tree`` is finite (integer leaves always are)."""
    flags = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _guarded_update(inner: optax.GradientTransformationExtraArgs):
    """The update of :func:`skip_non_finite`: zero updates and the old state when non-finite."""

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        checked = [updates, new_updates, new_inner]
        if extra_args.get("stats") is not None:
            checked.append(extra_args["stats"])
        finite = jnp.all(jnp.stack([_all_finite(tree) for tree in checked]))
        out_updates = jax.tree_util.tree_map(
            lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates
        )
        out_inner = jax.tree_util.tree_map(
            lambda new, old: jnp.where(finite, new, old), new_inner, state.inner_state
        )
        return out_updates, SkipNonFiniteState(
            inner_state=out_inner,
            skipped=state.skipped + jnp.logical_not(finite).astype(jnp.int32),
            consecutive=jnp.where(finite, 0, state.consecutive + 1).astype(jnp.int32),
            last_finite=finite,
        )

    return update_fn


def skip_non_finite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Skips every step whose inputs or results are not finite; counts the skips.

    A step is applied only when all of these are finite: the incoming updates (gradients),
    every array in the ``stats=`` extra argument (when given), and the updates and new state
    the inner transformation returns. Otherwise the step returns zero updates (so
    ``optax.apply_updates`` leaves the parameters as they were) and the *old* inner state,
    selected with ``jnp.where`` over the whole state, so the factors, eigenbases, S, moments
    and step counts are exactly those before the step. Extra arguments pass through to
    ``inner``, so the wrapper composes in ``optax.chain`` and jits with one compilation.
    Unlike ``optax.apply_if_finite`` there is no limit on consecutive skips: a run that
    only produces NaN stops moving rather than being poisoned; watch
    :func:`skipped_steps` (or ``state.consecutive``) to notice it.

    Args:
      inner: the transformation to guard, e.g. ``tekfax.kfac(...)`` or ``optax.adam(...)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`SkipNonFiniteState`.

    Example:
      >>> opt = tekfax.skip_non_finite(tekfax.kfac(1e-3, damping=1e-3))
      >>> opt_state = opt.init(params)
      >>> nan_grads = jax.tree.map(lambda g: g * jnp.nan, out.grads)
      >>> updates, opt_state = opt.update(nan_grads, opt_state, params, stats=out.stats)
      >>> int(tekfax.skipped_steps(opt_state)), float(updates["Dense_0"]["bias"].sum())
      (1, 0.0)

    References:
      ``optax.apply_if_finite``
      (https://optax.readthedocs.io/en/latest/api/optimizer_wrappers.html).
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            "tekfax: skip_non_finite(inner) needs an optax.GradientTransformation as inner, "
            f"got {type(inner).__name__}."
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> SkipNonFiniteState:
        return SkipNonFiniteState(
            inner_state=inner.init(params),
            skipped=jnp.zeros([], jnp.int32),
            consecutive=jnp.zeros([], jnp.int32),
            last_finite=jnp.ones([], jnp.bool_),
        )

    return optax.GradientTransformationExtraArgs(init_fn, _guarded_update(inner))


def find_guard_state(opt_state: Any) -> SkipNonFiniteState | None:
    """The outermost ``SkipNonFiniteState`` inside an optimizer state, or None.

    Example:
      >>> from tekfax.guard import find_guard_state
      >>> opt_state = optax.chain(tekfax.skip_non_finite(optax.sgd(0.1))).init(params)
      >>> int(find_guard_state(opt_state).skipped)
      0
    """
    return find_outermost(opt_state, SkipNonFiniteState)


def skipped_steps(opt_state: Any) -> jax.Array:
    """Total steps skipped by :func:`skip_non_finite` (an int32 array) in ``opt_state``.

    The state may be the wrapper's own or contain it (a chain, ``inject_hyperparams``).

    Example:
      >>> opt = tekfax.skip_non_finite(tekfax.tekfac(learning_rate=1e-3, damping=1e-3))
      >>> opt_state = opt.init(params)
      >>> updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
      >>> int(tekfax.skipped_steps(opt_state))
      0
    """
    found = find_guard_state(opt_state)
    if found is None:
        raise ValueError(
            "tekfax: opt_state holds no skip_non_finite state; build the optimizer as "
            "tekfax.skip_non_finite(opt) to count skipped steps."
        )
    return found.skipped
