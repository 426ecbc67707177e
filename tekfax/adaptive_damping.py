"""Levenberg-Marquardt adaptive damping (Martens & Grosse 2015, section 6.5).

:func:`adaptive_damping` wraps a transformation that contains a
:func:`tekfax.scale_by_kronecker` (a preset ``scale_by_*``, a full optimizer, a chain) and
owns its damping lambda. Every ``interval`` steps it compares the loss reduction that the
step actually achieved on the current batch with the reduction predicted by the damped
quadratic model :func:`quadratic_model`, and moves lambda by the Levenberg-Marquardt rule
(docs/algorithms.md, section 9). The other steps do no extra work (``lax.cond``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tekfax.conditional import cond
from tekfax.kronecker import ScaleByKroneckerState, find_kronecker_state
from tekfax.layers import find_layers, leaf_paths
from tekfax.patches import grad_matrix
from tekfax.states import find_outermost
from tekfax.validation import check_interval, check_number

GOOD_RATIO = 0.75
"""rho above this decreases lambda (Martens & Grosse 2015, section 6.5)."""
BAD_RATIO = 0.25
"""rho below this (or not finite, or a non-negative predicted change) increases lambda."""
NEUTRAL_RATIO = 0.5
"""What a step too small to measure counts as: lambda stays (:func:`reduction_ratio`)."""

MISSING_OBJ_FN = (
    "tekfax: adaptive_damping needs the keyword argument obj_fn= on every update: a "
    "function params -> scalar loss on the same batch as the gradients, e.g. "
    "obj_fn=lambda p: loss(logits_fn(p), y). It is traced on every step (lax.cond) and "
    "called on the steps where the damping is adjusted."
)


class AdaptiveDampingState(NamedTuple):
    """State of :func:`adaptive_damping`.

    Attributes:
      inner_state: the wrapped transformation's state.
      damping: lambda, passed to the inner Kronecker preconditioner on the next update.
      count: number of updates so far (int32).
      rho: the reduction ratio of the last adjustment; 0 before the first one. An outcome
        without a ratio records what it counts as (:func:`reduction_ratio`): 0 when invalid
        (not finite, or M(Delta) >= 0), 1/2 when too small to measure. rho is always
        finite, so :func:`tekfax.skip_non_finite` around the wrapper never sees a NaN in
        the state.
    """

    inner_state: Any
    damping: jax.Array
    count: jax.Array
    rho: jax.Array


def _untagged_pairs(grads: Any, delta: Any, layers: Mapping[str, Any]) -> list:
    """(g, delta) leaf pairs that are not the kernel or bias of a layer in ``layers``."""
    paths, delta_leaves, treedef = leaf_paths(delta)
    grad_leaves = treedef.flatten_up_to(grads)
    return [
        (g, d)
        for path, d, g in zip(paths, delta_leaves, grad_leaves, strict=True)
        if not path
        or "/".join(path[:-1]) not in layers
        or path[-1] not in ("kernel", "bias", "embedding")
    ]


def quadratic_model(grads: Any, delta: Any, kron_state: Any) -> jax.Array:
    """M(Delta) - M(0) = g^T Delta + 1/2 Delta^T C Delta, C the preconditioner's damped blocks.

    C is block-diagonal: for every layer of the Kronecker state, the damped block the last
    update inverted, (Q_in (x) Q_out) diag(vec D) (Q_in (x) Q_out)^T, so that layer's
    curvature term is sum(D * (Q_in^T Delta Q_out)^2) with Delta in kernel layout (bias in
    row 0); the identity for every other parameter, which passes through the preconditioner
    unchanged (docs/algorithms.md, sections 5 and 9). Computed in the statistics' precision
    (float32 or wider).

    Args:
      grads: the gradients g, a tree like the params.
      delta: the step Delta (what ``optax.apply_updates`` adds), the same tree.
      kron_state: a ``ScaleByKroneckerState`` or any optimizer state containing one; its
        ``damped`` D and eigenbases define C.

    Returns:
      The predicted change of the loss, a scalar.

    Example:
      >>> from tekfax.adaptive_damping import quadratic_model
      >>> opt = tekfax.scale_by_kfac(damping=1e-3)
      >>> p_grad, opt_state = opt.update(grads, opt.init(params), params, stats=out.stats)
      >>> delta = jax.tree.map(lambda p: -0.1 * p, p_grad)
      >>> bool(quadratic_model(grads, delta, opt_state) < 0)
      True
    """
    state = find_kronecker_state(kron_state)
    delta_layers, grad_layers = find_layers(delta), find_layers(grads)
    total = jnp.zeros([], jnp.float32)
    for name, layer in state.layers.items():
        if name not in delta_layers or name not in grad_layers:
            raise ValueError(
                f"tekfax: quadratic_model: layer '{name}' of the Kronecker state is missing "
                "from grads or delta; pass trees shaped like the params opt.init saw."
            )
        dtype = layer.damped.dtype
        d_out = layer.factor_out.shape[0]
        d = grad_matrix(delta_layers[name], dtype, d_out)
        g = grad_matrix(grad_layers[name], dtype, d_out)
        projected = layer.q_in.T @ d @ layer.q_out
        total = total + jnp.vdot(g, d) + 0.5 * jnp.sum(layer.damped * jnp.square(projected))
    for g, d in _untagged_pairs(grads, delta, state.layers):
        dtype = jnp.promote_types(jnp.result_type(d), jnp.float32)
        d, g = jnp.asarray(d, dtype), jnp.asarray(g, dtype)
        total = total + jnp.vdot(g, d) + 0.5 * jnp.vdot(d, d)
    return total


def reduction_ratio(before: jax.Array, after: jax.Array, predicted: jax.Array) -> jax.Array:
    """rho = (after - before) / predicted: the actual over the predicted change of the loss.

    Two kinds of outcome do not give a ratio (docs/algorithms.md, section 9):

    - *invalid*: ``predicted`` >= 0 (the model predicts no decrease) or the ratio is not
      finite (e.g. the loss overflowed at the new point). rho = 0: lambda increases.
    - *unmeasurable*: ``after == before``, or |predicted| <= eps |before| with eps the
      loss's machine epsilon: the step is below the precision the loss is computed in,
      so the ratio would be rounding noise. rho = 1/2: lambda stays.

    Example:
      >>> from tekfax.adaptive_damping import reduction_ratio
      >>> [float(reduction_ratio(1.0, 0.0, p)) for p in (-1.0, 0.0)]
      [1.0, 0.0]
      >>> float(reduction_ratio(1.0, 1.0, -1e-3))   # no measurable change
      0.5
    """
    before, after, predicted = jnp.asarray(before), jnp.asarray(after), jnp.asarray(predicted)
    valid = (predicted < 0) & jnp.isfinite(predicted)
    rho = (after - before) / jnp.where(valid, predicted, -1.0)
    valid = valid & jnp.isfinite(rho)
    eps = jnp.finfo(jnp.result_type(before, float)).eps
    unmeasurable = (after == before) | (jnp.abs(predicted) <= eps * jnp.abs(before))
    return jnp.where(valid, jnp.where(unmeasurable, NEUTRAL_RATIO, rho), 0.0)


def adjust_damping(
    damping: jax.Array,
    rho: jax.Array,
    omega: jax.Array | float,
    min_damping: float,
    max_damping: float,
) -> jax.Array:
    """lambda * omega if rho > 3/4, lambda / omega if rho < 1/4 (or NaN), clamped.

    docs/algorithms.md, section 9 (Martens & Grosse 2015, section 6.5).

    Example:
      >>> from tekfax.adaptive_damping import adjust_damping
      >>> [float(adjust_damping(1.0, r, 0.5, 0.1, 1.5)) for r in (1.0, 0.5, 0.0)]
      [0.5, 1.0, 1.5]
    """
    damping, rho = jnp.asarray(damping), jnp.asarray(rho)
    good, bad = rho > GOOD_RATIO, ~(rho >= BAD_RATIO)
    new = jnp.where(good, damping * omega, jnp.where(bad, damping / omega, damping))
    return jnp.clip(new, min_damping, max_damping).astype(damping.dtype)


class _Rule(NamedTuple):
    interval: int
    omega: float
    min_damping: float
    max_damping: float


def _check_args(initial_damping, interval, decay, min_damping, max_damping) -> None:
    check_number("initial_damping", initial_damping, 0.0, low_inclusive=False, allow_none=False)
    check_interval("interval", interval)
    check_number("decay", decay, 0.0, 1.0, low_inclusive=False, allow_none=False)
    check_number("min_damping", min_damping, 0.0, low_inclusive=False, allow_none=False)
    check_number("max_damping", max_damping, 0.0, low_inclusive=False, allow_none=False)
    bounds = (float(min_damping), float(max_damping))
    if bounds[0] > bounds[1]:
        raise ValueError(
            f"tekfax: min_damping ({bounds[0]}) must not exceed max_damping ({bounds[1]})."
        )
    traced = isinstance(initial_damping, jax.Array)  # optax.inject_hyperparams passes arrays
    if not traced and not bounds[0] <= float(initial_damping) <= bounds[1]:
        raise ValueError(
            f"tekfax: initial_damping ({float(initial_damping)}) must lie in "
            f"[min_damping, max_damping] = [{bounds[0]}, {bounds[1]}]."
        )


def _check_inner_state(inner_state: Any) -> None:
    find_outermost(
        inner_state,
        ScaleByKroneckerState,
        missing="tekfax: adaptive_damping(inner) needs an inner transformation containing a "
        "tekfax Kronecker preconditioner (scale_by_kfac, tekfax.kfac, scale_by_kronecker, "
        "...), whose damping it adapts; the inner state holds none.",
    )


class _Step(NamedTuple):
    """What one update saw and produced: the inputs of the reduction ratio."""

    grads: Any
    delta: Any
    params: Any
    new_inner: Any


def _adjusted(
    rule: _Rule, state: AdaptiveDampingState, step: _Step, obj_fn: Callable, value: Any
) -> tuple[jax.Array, jax.Array]:
    """(lambda, rho) after this step: adjusted on due steps, else unchanged (lax.cond)."""

    def adjust():
        predicted = quadratic_model(step.grads, step.delta, step.new_inner)
        before = obj_fn(step.params) if value is None else value
        after = obj_fn(optax.apply_updates(step.params, step.delta))
        rho = reduction_ratio(before, after, predicted).astype(state.rho.dtype)
        return adjust_damping(state.damping, rho, *rule[1:]), rho

    due = (state.count + 1) % rule.interval == 0
    return cond(due, adjust, lambda: (state.damping, state.rho))


def _init_fn(inner: optax.GradientTransformationExtraArgs, initial_damping: float):
    """The init of :func:`adaptive_damping`: inner's state, which must hold a Kronecker one."""

    def init_fn(params: Any) -> AdaptiveDampingState:
        inner_state = inner.init(params)
        _check_inner_state(inner_state)
        dtype = jnp.result_type(float)
        return AdaptiveDampingState(
            inner_state=inner_state,
            damping=jnp.asarray(initial_damping, dtype),
            count=jnp.zeros([], jnp.int32),
            rho=jnp.zeros([], dtype),
        )

    return init_fn


def _update_fn(inner: optax.GradientTransformationExtraArgs, rule: _Rule):
    """The update of :func:`adaptive_damping`: inner's update at lambda, then the rule."""

    def update_fn(updates, state, params=None, *, obj_fn=None, value=None, **extra):
        if obj_fn is None:
            raise ValueError(MISSING_OBJ_FN)
        if params is None:
            raise ValueError("tekfax: adaptive_damping needs params to evaluate obj_fn.")
        if "damping" in extra:
            raise ValueError("tekfax: adaptive_damping sets damping= itself; do not pass it.")
        delta, new_inner = inner.update(
            updates, state.inner_state, params, damping=state.damping, **extra
        )
        step = _Step(updates, delta, params, new_inner)
        damping, rho = _adjusted(rule, state, step, obj_fn, value)
        count = optax.safe_int32_increment(state.count)
        return delta, AdaptiveDampingState(new_inner, damping, count, rho)

    return update_fn


def adaptive_damping(
    inner: optax.GradientTransformation,
    *,
    initial_damping: float,
    interval: int = 5,
    decay: float = 0.95,
    min_damping: float = 1e-8,
    max_damping: float = 1e2,
) -> optax.GradientTransformationExtraArgs:
    """Levenberg-Marquardt damping for a Kronecker preconditioner inside ``inner``.

    Each update passes the current lambda to ``inner`` as ``damping=`` (in place of the
    preconditioner's ``damping`` hyperparameter; the ``nu`` rules ignore it) and returns
    inner's update Delta unchanged. On the last of every ``interval`` steps it computes
    rho = (h(w + Delta) - h(w)) / M(Delta), h = ``obj_fn`` and M the preconditioner's damped
    quadratic model (:func:`quadratic_model`), and sets lambda <- omega lambda if
    rho > 3/4, lambda / omega if rho < 1/4, omega = decay ** interval, clamped to
    [min_damping, max_damping]. A rho that is not finite, or M(Delta) >= 0, counts as
    rho < 1/4; a change too small to measure keeps lambda (:func:`reduction_ratio`).
    docs/algorithms.md, section 9.

    ``update(updates, state, params, *, obj_fn, value=None, **extra)``: ``obj_fn`` maps
    params to the scalar loss on the batch of ``updates`` (like ``optax.contrib.sophia``'s);
    ``value``, optional, is that loss at ``params``, computed the same way, which saves one
    of the two calls of ``obj_fn`` on an adjustment step. Neither goes on to ``inner``; the
    other extra arguments (``stats=``) do.

    Args:
      inner: a transformation containing a ``scale_by_kronecker``, e.g.
        ``optax.chain(tekfax.scale_by_kfac(damping=1e-3), optax.trace(0.9),
        optax.scale_by_learning_rate(0.1))`` or ``tekfax.kfac(0.1)``.
      initial_damping: lambda at step 0, in [min_damping, max_damping].
      interval: T_1, the steps between adjustments (5 in the paper).
      decay: the per-step factor; omega = decay ** interval ((19/20)^5 in the paper).
      min_damping, max_damping: the range lambda is clamped to.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`AdaptiveDampingState`.

    Example:
      >>> from tekfax.adaptive_damping import adaptive_damping, current_damping
      >>> inner = optax.chain(tekfax.scale_by_kfac(damping=1e-3),
      ...                     optax.scale_by_learning_rate(0.1))
      >>> opt = adaptive_damping(inner, initial_damping=1e-2, interval=1)
      >>> def obj_fn(p):
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y).mean()
      >>> @jax.jit  # as in a training step
      ... def update(opt_state):
      ...     return opt.update(grads, opt_state, params, stats=out.stats, obj_fn=obj_fn)
      >>> updates, opt_state = update(opt.init(params))
      >>> bool(opt_state.rho > 0.75), current_damping(opt_state)  # lambda * 0.95
      (True, Array(0.0095, dtype=float32))

    References:
      Martens & Grosse 2015, section 6.5 (https://arxiv.org/abs/1503.05671); kfac-jax's
      ``use_adaptive_damping``.
    """
    _check_args(initial_damping, interval, decay, min_damping, max_damping)
    rule = _Rule(interval, decay**interval, min_damping, max_damping)
    inner = optax.with_extra_args_support(inner)
    return optax.GradientTransformationExtraArgs(
        _init_fn(inner, initial_damping), _update_fn(inner, rule)
    )


def find_adaptive_damping_state(opt_state: Any) -> AdaptiveDampingState:
    """The outermost ``AdaptiveDampingState`` inside an optimizer state.

    Example:
      >>> from tekfax.adaptive_damping import adaptive_damping, find_adaptive_damping_state
      >>> opt = optax.chain(adaptive_damping(tekfax.kfac(0.1), initial_damping=1e-3))
      >>> int(find_adaptive_damping_state(opt.init(params)).count)
      0
    """
    return find_outermost(
        opt_state,
        AdaptiveDampingState,
        missing="tekfax: opt_state holds no adaptive_damping state; build the optimizer with "
        "adaptive_damping=True or tekfax.adaptive_damping(...).",
    )


def current_damping(opt_state: Any) -> jax.Array:
    """lambda of the :func:`adaptive_damping` state inside ``opt_state`` (any nesting).

    Example:
      >>> from tekfax.adaptive_damping import adaptive_damping, current_damping
      >>> opt = adaptive_damping(tekfax.kfac(0.1), initial_damping=1e-3)
      >>> current_damping(opt.init(params))
      Array(0.001, dtype=float32)
    """
    return find_adaptive_damping_state(opt_state).damping
