"""Guard: skip optimizer steps whose gradients or results are not finite.

One NaN batch, an overflowing loss or a malformed input must not cost a long run its
parameters or its curvature state. :func:`skip_non_finite` wraps any optax transformation
(a tekfax preset, ``optax.adam``, a chain) like ``optax.apply_if_finite``, but it also checks
the inner transformation's own outputs, and it never gives up: a non-finite step returns zero
updates and the old inner state, and counts the skip. Curvature statistics are checked where
they are consumed: the Kronecker stages reject a non-finite batch of statistics and keep
their averages, and leave their whole state as it was on non-finite gradients
(docs/algorithms.md, section 9), so a step with finite gradients but a bad ``stats=`` is
applied with the curvature of the previous batches.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tekfax.conditional import cond_shaped_like, zeros_shaped
from tekfax.curvature import all_finite
from tekfax.kronecker import ScaleByKroneckerState
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


def _guards_itself(node: Any) -> bool:
    """States whose own stages keep non-finite values out (checking them again is waste)."""
    return isinstance(node, ScaleByKroneckerState)


def _all_finite(tree: Any) -> jax.Array:
    """:func:`tekfax.curvature.all_finite` of ``tree`` without the subtrees that guard themselves.

    A ``ScaleByKroneckerState`` rejects non-finite statistics in its curvature and rescale
    stages, keeps its state on non-finite gradients and clamps D, so it stays finite.
    """
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=_guards_itself)
    return all_finite([leaf for leaf in leaves if not _guards_itself(leaf)])


def _revert(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``finite``, else ``old``; self-guarding subtrees keep ``new`` (finite)."""

    def pick(n, o):
        return n if _guards_itself(n) else jnp.where(finite, n, o)

    return jax.tree_util.tree_map(pick, new, old, is_leaf=_guards_itself)


def skips_under_cond() -> bool:
    """Whether :func:`skip_non_finite` skips the inner update under ``lax.cond``.

    Decided when the step is traced, from ``jax.default_backend()``: False on CPU, True
    elsewhere. Either form gives the same results; they differ in speed, each way on one
    backend (docs/algorithms.md, section 9, and the docstring of :func:`skip_non_finite`).

    Example:
      >>> from tekfax.guard import skips_under_cond
      >>> skips_under_cond() == (jax.default_backend() != "cpu")
      True
    """
    return jax.default_backend() != "cpu"


def _old_state_shaped(old: Any, shapes: tuple[Any, Any]) -> tuple[Any, Any]:
    """The skipped branch: zero updates and ``old`` cast to the dtypes the inner update gives."""
    return zeros_shaped(shapes[0]), jax.tree_util.tree_map(
        lambda o, s: o if o.dtype == s.dtype else o.astype(s.dtype), old, shapes[1]
    )


def _guarded_update(inner: optax.GradientTransformationExtraArgs):
    """The update of :func:`skip_non_finite` (its docstring says what is skipped and how)."""

    def update_fn(updates, state, params=None, **extra_args):
        def run():
            return inner.update(updates, state.inner_state, params, **extra_args)

        finite_in = _all_finite(updates)
        if skips_under_cond():
            new_updates, new_inner = cond_shaped_like(
                finite_in, run, lambda shapes: _old_state_shaped(state.inner_state, shapes)
            )
        else:
            new_updates, new_inner = run()
        finite = finite_in & _all_finite((new_updates, new_inner))
        return jax.tree_util.tree_map(
            lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates
        ), SkipNonFiniteState(
            inner_state=_revert(finite, new_inner, state.inner_state),
            skipped=state.skipped + jnp.logical_not(finite).astype(jnp.int32),
            consecutive=jnp.where(finite, 0, state.consecutive + 1).astype(jnp.int32),
            last_finite=finite,
        )

    return update_fn


def skip_non_finite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Skips every step whose inputs or results are not finite; counts the skips.

    A step is applied only when all of these are finite: the incoming updates (gradients),
    and the updates and new state the inner transformation returns. A skipped step returns
    zero updates (so ``optax.apply_updates`` leaves the parameters as they were) and the
    *old* inner state: moments, counts and schedules are exactly those before the step.
    A Kronecker state (``ScaleByKroneckerState``) guards itself and is neither re-read nor
    reverted: on non-finite gradients its update changes nothing (no stage runs, the count
    stays), so its factors, eigenbases and S are also exactly those before the step; on
    finite gradients it rejects non-finite ``stats=``, keeps every value it stores finite,
    and so keeps what it learnt from a finite batch whose result elsewhere was not finite.

    Only the state outside the Kronecker stages is selected: checking and selecting the
    whole Kronecker state every step cost 40 of the 148 ms of a KFAC step on the MNIST
    auto-encoder (2-core CPU). Whether non-finite gradients skip the inner update depends
    on the backend (:func:`skips_under_cond`), by measurement:

    - CPU: the inner update always runs, like ``optax.apply_if_finite``'s. Under
      ``lax.cond``, XLA:CPU copied the factors and eigenbases that the Kronecker stages' own
      conditionals pass through unchanged out of the outer conditional on every step:
      TEKFAC's mean step on the auto-encoder was 154-172 ms that way against 139-156 ms
      this way (state donated).
    - GPU and other backends: the inner update runs under ``lax.cond``. On an H100 the
      unconditional form made TEKFAC's median step 0.6-2.8 ms longer (ResNet20, batch 128:
      9.4-10.7 against 6.9-7.9 ms; the auto-encoder: 3.1-3.5 against 2.4-2.5 ms).

    Extra arguments pass through to ``inner``, so the wrapper composes in ``optax.chain``
    and jits with one compilation. Unlike ``optax.apply_if_finite`` there is no limit on
    consecutive skips: a run that only produces NaN stops moving rather than being
    poisoned; watch :func:`skipped_steps` (or ``state.consecutive``) to notice it.

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
