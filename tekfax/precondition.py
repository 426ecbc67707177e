"""Preconditioning and the optional norm constraint (docs/algorithms.md, section 5).

Two forms of the same P(g): in the eigenbasis (:func:`precondition_layers`, 4 matrix
products per layer, any D; EKFAC/TEKFAC), and with cached damped inverse factors
(:func:`precondition_factored`, 2 products; KFAC/TKFAC, whose D is an outer product).
Both are safe in float32 at any gradient scale: a gradient is scaled by a power of two before
it is multiplied, and the KL clip's quadratic is summed with its largest factors taken out,
so neither overflows unless its true result does.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from tekfax.conditional import cond
from tekfax.curvature import power_of_two

if TYPE_CHECKING:
    from tekfax.damping import FactoredDamping
    from tekfax.eigenbasis import Eigenbasis


def _unit(grad: jax.Array) -> jax.Array:
    """m >= 1, a power of two near max|g|: g / m is exact and its products stay finite."""
    return jnp.maximum(power_of_two(jnp.max(jnp.abs(grad))), 1.0)


def _eigen_coordinates(
    grad: jax.Array, q_in: jax.Array, q_out: jax.Array, damped: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m, Y / m, X / m): Y = Q_in^T g Q_out, X = Y / D; m >= 1 a power of two near max|g|.

    Dividing by m (exact) keeps the projection's sums finite when g is near the float
    maximum; m >= 1 so that neither Y / m nor X / m is larger than Y or X.
    """
    m = _unit(grad)
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


class ScaledInner(NamedTuple):
    """<u, v> = ``total`` * 2^``exponent``, stored so that neither part overflows.

    ``total`` is sum (u / U)(v / V) for even powers of two U <= max |u| < 4 U and likewise V,
    so |total| < 16 times the number of terms; ``exponent`` = log2(U V) (int32, even);
    ``finite`` is False when u or v holds a non-finite value (then the rest is unused).
    """

    total: jax.Array
    exponent: jax.Array
    finite: jax.Array


def _exponent(m: jax.Array) -> jax.Array:
    """log2 m for a normal power of two m, as int32 (``log2`` rounded: exact, and fewer
    operations than ``frexp``, which also handles subnormals)."""
    return jnp.round(jnp.log2(m)).astype(jnp.int32)


def _even_unit(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(U, log2 U, finite): U an even power of two within a factor 4 of max |x|, >= tiny."""
    top = jnp.max(jnp.abs(x))
    finite = jnp.isfinite(top)
    tiny = jnp.finfo(top.dtype).tiny
    root = power_of_two(jnp.sqrt(jnp.where(finite, jnp.maximum(top, tiny), 1.0)))
    return root * root, 2 * _exponent(root), finite


def scaled_inner(u: jax.Array, v: jax.Array, exponent: jax.Array | int = 0) -> ScaledInner:
    """<u, v> * 2^``exponent`` as a :class:`ScaledInner`: finite for any finite u and v.

    Each array is divided by its own unit (exact), so a layer's sum cannot overflow however
    large its entries, nor lose its small terms to another layer's scale; ``exponent`` (even)
    carries a power of two the arrays were divided by before.

    Example:
      >>> from tekfax.precondition import scaled_inner
      >>> q = scaled_inner(jnp.full((2, 2), 3.0), jnp.ones((2, 2)))
      >>> float(q.total * 2.0 ** q.exponent)
      12.0
    """
    unit_u, log_u, finite_u = _even_unit(u)
    unit_v, log_v, finite_v = _even_unit(v)
    finite = finite_u & finite_v
    total = jnp.vdot(u / unit_u, v / unit_v)
    return ScaledInner(total, jnp.where(finite, log_u + log_v + exponent, 0), finite)


def clip_scale(parts: list[ScaledInner], kappa: jax.Array, learning_rate: jax.Array) -> jax.Array:
    """min(1, sqrt(kappa / (alpha^2 |sum_l q_l|))) from each layer's quadratic q_l.

    docs/algorithms.md, section 5. The parts are summed relative to the largest exponent E
    (exact powers of two), and the scale is sqrt(kappa) / (alpha sqrt(sum)) times 2^(-E / 2)
    (``ldexp``, exact), so nothing overflows: when the quadratic itself exceeds the float
    maximum the scale is its true, tiny value (or 0 below the smallest float). Non-finite
    inputs give 0, never NaN; a zero quadratic gives 1.

    Example:
      >>> from tekfax.precondition import clip_scale, scaled_inner
      >>> big, small = jnp.full((2, 2), 1e20), jnp.full((2, 2), 1e-20)
      >>> parts = [scaled_inner(big, big), scaled_inner(small, small)]  # 4e40 + 4e-40
      >>> float(clip_scale(parts, 1.0, 1.0))
      4.999999841327613e-21
    """
    finite = functools.reduce(jnp.logical_and, [p.finite for p in parts])
    top = functools.reduce(jnp.maximum, [p.exponent for p in parts])
    total = sum(jnp.ldexp(p.total, p.exponent - top) for p in parts)
    denominator = jnp.abs(learning_rate) * jnp.sqrt(jnp.abs(total))
    positive = denominator > 0
    root = jnp.sqrt(kappa) / jnp.where(positive, denominator, 1.0)
    scale = jnp.ldexp(root, -(top // 2))
    return jnp.where(finite, jnp.where(positive, jnp.minimum(1.0, scale), 1.0), 0.0)


def norm_constraint_scale(
    preconditioned: Mapping[str, jax.Array],
    grads: Mapping[str, jax.Array],
    kappa: jax.Array,
    learning_rate: jax.Array,
) -> jax.Array:
    """min(1, sqrt(kappa / (alpha^2 sum_l <P(g_l), g_l>))) (Ba et al. 2017, the "KL clip").

    docs/algorithms.md, section 5. Each layer's <P(g_l), g_l> is a :func:`scaled_inner`, and
    :func:`clip_scale` combines them, so nothing overflows: alpha^2 scale^2 <P(g), g> <= kappa
    up to rounding whenever P(g) is finite. Non-finite inputs give 0, never NaN; a zero
    quadratic gives 1.

    Example:
      >>> from tekfax.precondition import norm_constraint_scale
      >>> g = {"Dense_0": jnp.ones((2, 2))}
      >>> float(norm_constraint_scale(g, g, 1.0, 1.0))
      0.5
      >>> huge = {"Dense_0": jnp.full((2, 2), 1e20)}  # <g, g> = 4e40 overflows float32
      >>> float(norm_constraint_scale(huge, huge, 1.0, 1.0))
      4.999999841327613e-21
    """
    parts = [scaled_inner(preconditioned[k], grads[k]) for k in preconditioned]
    return clip_scale(parts, kappa, learning_rate)


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
    # <P(g), g> = <X, Y> m^2 for orthonormal Q; X Y = Y^2 / D >= 0 term by term.
    quadratics = [scaled_inner(x, y, 2 * _exponent(m)) for m, y, x in parts.values()]
    scale = clip_scale(quadratics, norm_constraint, learning_rate)
    return {k: v * scale.astype(v.dtype) for k, v in pre.items()}


class DampedInverses(NamedTuple):
    """The damped factors' inverses of one layer: P(g) = inp g out (docs/algorithms.md, s. 5).

    ``inp`` = Q_in diag(1 / d_in) Q_in^T, (d_in, d_in); ``out`` = Q_out diag(1 / d_out)
    Q_out^T, (d_out, d_out), for a factored D = outer(d_in, d_out).
    """

    inp: jax.Array
    out: jax.Array


def _inverse(q: jax.Array, d: jax.Array) -> jax.Array:
    # 1 / d at most the float maximum, so a zero d keeps inf out of the cached inverse.
    return (q * jnp.minimum(1.0 / d, jnp.finfo(d.dtype).max)) @ q.T


def damped_inverses(basis: Eigenbasis, pair: FactoredDamping) -> DampedInverses:
    """Q_in diag(1 / d_in) Q_in^T and Q_out diag(1 / d_out) Q_out^T for D = outer(d_in, d_out).

    Their Kronecker product is the inverse of the damped block (Q_in (x) Q_out) diag(vec D)
    (Q_in (x) Q_out)^T; computing them costs d_in^3 + d_out^3 (docs/algorithms.md, s. 5).

    Example:
      >>> from tekfax.damping import FactoredDamping
      >>> from tekfax.eigenbasis import Eigenbasis
      >>> from tekfax.precondition import damped_inverses
      >>> basis = Eigenbasis(jnp.eye(2), jnp.ones(2), jnp.eye(1), jnp.ones(1), None)
      >>> damped_inverses(basis, FactoredDamping(jnp.array([2.0, 4.0]), jnp.array([0.5])))
      DampedInverses(inp=Array([[0.5 , 0.  ],
             [0.  , 0.25]], dtype=float32), out=Array([[2.]], dtype=float32))
    """
    return DampedInverses(_inverse(basis.q_in, pair.inp), _inverse(basis.q_out, pair.out))


INVERSE_TOLERANCE = 1e-3
"""Largest eps (kappa_in + kappa_out) at which a layer is preconditioned with its inverse
factors (docs/algorithms.md, section 5): the step is then within about 0.1% of the exact one
in the damped block's norm."""


def inverses_are_accurate(damped: jax.Array) -> jax.Array:
    """Whether eps (kappa_in + kappa_out) <= :data:`INVERSE_TOLERANCE` for a factored D.

    kappa_in = max d_in / min d_in, read off D's first column (D = outer(d_in, d_out)), and
    kappa_out off its first row. An inverse factor rounded to float precision holds each
    direction's 1 / d to within eps / min d, so Inv_in g Inv_out is within about
    eps (kappa_in + kappa_out) of P(g) in the damped block's norm (docs/algorithms.md,
    section 5); the eigenbasis form divides each coordinate by its own D and has no such
    term. False for a zero or non-finite D.

    Example:
      >>> from tekfax.precondition import inverses_are_accurate
      >>> bool(inverses_are_accurate(jnp.outer(jnp.array([1.0, 10.0]), jnp.array([2.0]))))
      True
      >>> bool(inverses_are_accurate(jnp.outer(jnp.array([1.0, 1e8]), jnp.array([2.0]))))
      False
    """
    col, row = damped[:, 0], damped[0, :]
    kappa = jnp.max(col) / jnp.min(col) + jnp.max(row) / jnp.min(row)
    return jnp.finfo(damped.dtype).eps * kappa <= INVERSE_TOLERANCE


def _with_inverses(grad: jax.Array, inverses: DampedInverses, clip: bool) -> tuple:
    """(P(g),) = (Inv_in g Inv_out,); with ``clip`` also sum P(g) * g (:func:`scaled_inner`)."""
    m = _unit(grad)
    pre = (inverses.inp @ (grad / m) @ inverses.out) * m
    return (pre, scaled_inner(pre, grad)) if clip else (pre,)


def _in_eigenbasis(grad: jax.Array, basis: Eigenbasis, damped: jax.Array, clip: bool) -> tuple:
    """(P(g),) in the eigenbasis; with ``clip`` also sum Z^2, Z = Y / sqrt(D)."""
    m, y, x = _eigen_coordinates(grad, basis.q_in, basis.q_out, damped)
    pre = (basis.q_in @ x @ basis.q_out.T) * m
    # |Y / sqrt(D)| = sqrt(|X| |Y|): finite whenever X and Y are.
    z = y / jnp.sqrt(damped)
    return (pre, scaled_inner(z, z, 2 * _exponent(m))) if clip else (pre,)


def precondition_factored(
    grads: Mapping[str, jax.Array],
    bases: Mapping[str, Eigenbasis],
    damped: Mapping[str, jax.Array],
    inverses: Mapping[str, DampedInverses],
    norm_constraint: jax.Array | None = None,
    learning_rate: jax.Array | float = 1.0,
) -> dict[str, jax.Array]:
    """P(grad) = Inv_in g Inv_out of every layer, scaled by the KL clip when asked.

    For D = outer(d_in, d_out) and the :func:`damped_inverses` of the same basis, the same
    result as :func:`precondition_layers` in 2 matrix products per layer instead of 4
    (docs/algorithms.md, section 5). The gradient is divided by the same power of two m as
    there (exact), so the products stay finite when g is near the float maximum. When any
    layer's factors are too ill-conditioned for its float precision
    (:func:`inverses_are_accurate` is False), every layer is preconditioned in the
    eigenbasis instead: one ``lax.cond`` for the whole step rather than one per layer, since
    XLA:GPU copies each conditional's predicate to the host and waits for it (ResNet20 on an
    H100: 0.26-0.36 ms a step saved). The two forms agree up to rounding, so a
    well-conditioned layer loses only the two products it saves.

    The clip's quadratic of a layer with inverses is <P(g), g> = sum P(g) * g, taken inside
    the branch (:func:`scaled_inner`; the scale uses the sum's absolute value), so
    no full-size array leaves the branch but P(g). The eigenbasis form sums Y^2 / D, a
    sum of non-negative terms, but needs Y = Q_in^T g Q_out, the two products saved here.
    In float32 the terms of sum P(g) * g have either sign and carry the inverses' rounding,
    a relative error of up to about eps (kappa_in + kappa_out), which the accuracy check
    bounds; with ill-conditioned factors it could reach or exceed the sum itself. A layer
    preconditioned in the eigenbasis adds sum (Y / sqrt(D))^2, non-negative terms.

    Example:
      >>> from tekfax.eigenbasis import Eigenbasis
      >>> from tekfax.precondition import DampedInverses, precondition_factored
      >>> basis = Eigenbasis(jnp.eye(1), jnp.ones(1), jnp.eye(2), jnp.ones(2), None)
      >>> inv = DampedInverses(jnp.full((1, 1), 0.5), jnp.eye(2))
      >>> precondition_factored({"Dense_0": jnp.ones((1, 2))}, {"Dense_0": basis},
      ...                       {"Dense_0": jnp.full((1, 2), 2.0)}, {"Dense_0": inv},
      ...                       norm_constraint=0.25)
      {'Dense_0': Array([[0.25, 0.25]], dtype=float32)}
    """
    clip = norm_constraint is not None
    accurate = functools.reduce(jnp.logical_and, [inverses_are_accurate(damped[k]) for k in grads])
    parts = cond(
        accurate,
        lambda: {k: _with_inverses(g, inverses[k], clip) for k, g in grads.items()},
        lambda: {k: _in_eigenbasis(g, bases[k], damped[k], clip) for k, g in grads.items()},
    )
    pre = {k: p[0] for k, p in parts.items()}
    if not clip:
        return pre
    scale = clip_scale([p[1] for p in parts.values()], norm_constraint, learning_rate)
    return {k: v * scale.astype(v.dtype) for k, v in pre.items()}
