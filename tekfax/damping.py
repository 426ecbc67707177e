"""Damping: the damped eigenvalues D that the preconditioner divides by.

docs/algorithms.md, section 4. Every rule returns D in kernel layout (d_in, d_out), the
diagonal of the damped block in the eigenbasis Q = Q_in (x) Q_out, so the damped block is
Q diag(vec D) Q^T. :func:`choose_rule` picks one :data:`DampingRule` per optimizer, at
construction, from the estimator, the eigenvalue correction and the damping arguments.

KFAC's and TKFAC's rules are factored, D = outer(d_in, d_out): :func:`choose_factored_rule`
gives their two vectors (a :class:`FactoredDamping` per layer), from which the preconditioner
builds the damped inverse factors (docs/algorithms.md, section 5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from tekfax.eigenbasis import Eigenbasis


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den > 0, else 0 (a dead layer has zero statistics).

    Example:
      >>> from tekfax.damping import safe_div
      >>> safe_div(jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0]))
      Array([0.5, 0. ], dtype=float32)
    """
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def pi_factor(eig_in: jax.Array, eig_out: jax.Array) -> jax.Array:
    """pi = sqrt((tr A / d_in) / (tr G / d_out)) (Martens & Grosse 2015, s. 6.3).

    1 when either trace is 0. docs/algorithms.md, section 4.

    Example:
      >>> from tekfax.damping import pi_factor
      >>> float(pi_factor(jnp.array([4.0, 4.0]), jnp.array([1.0])))
      2.0
    """
    mean_in, mean_out = jnp.mean(eig_in), jnp.mean(eig_out)
    ok = (mean_in > 0) & (mean_out > 0)
    return jnp.where(ok, jnp.sqrt(safe_div(mean_in, mean_out)), 1.0)


class FactoredDamping(NamedTuple):
    """The two vectors of a factored D = outer(inp, out) (docs/algorithms.md, sections 4-5).

    ``inp`` (d_in,) and ``out`` (d_out,) are the eigenvalues of the damped input and output
    factors, so the damped block is (Q_in diag(inp) Q_in^T) (x) (Q_out diag(out) Q_out^T).

    Example:
      >>> from tekfax.damping import FactoredDamping
      >>> FactoredDamping(jnp.array([1.0, 2.0]), jnp.array([3.0])).outer()
      Array([[3.],
             [6.]], dtype=float32)
    """

    inp: jax.Array
    out: jax.Array

    def outer(self) -> jax.Array:
        """D = outer(inp, out), (d_in, d_out)."""
        return jnp.outer(self.inp, self.out)


def _factored_pair(eig_in, eig_out, damping, pi=1.0) -> FactoredDamping:
    root = jnp.sqrt(damping)
    return FactoredDamping(eig_in + pi * root, eig_out + root / pi)


def _tkfac_normal_pair(eig_in, eig_out, delta, damping) -> FactoredDamping:
    scale = safe_div(1.0, jnp.sqrt(delta))
    return _factored_pair(eig_in * scale, eig_out * scale, damping)


def _trace_adaptive_pair(phi, psi, delta_tilde) -> FactoredDamping:
    root = jnp.sqrt(delta_tilde)
    return FactoredDamping(
        root * phi + delta_tilde / phi.shape[0], root * psi + delta_tilde / psi.shape[0]
    )


def factored(
    eig_in: jax.Array, eig_out: jax.Array, damping: jax.Array, pi: jax.Array | float = 1.0
) -> jax.Array:
    """(A + pi sqrt(lambda) I) (x) (G + sqrt(lambda)/pi I) in the eigenbasis.

    KFAC's factored damping (Martens & Grosse 2015, section 6.3; docs/algorithms.md,
    section 4).

    Example:
      >>> from tekfax.damping import factored
      >>> factored(jnp.array([1.0, 3.0]), jnp.array([0.0]), 1.0)
      Array([[2.],
             [4.]], dtype=float32)
    """
    return _factored_pair(eig_in, eig_out, damping, pi).outer()


def tkfac_normal(
    eig_in: jax.Array, eig_out: jax.Array, delta: jax.Array, damping: jax.Array
) -> jax.Array:
    """(sqrt(delta) Phi + sqrt(lambda) I) (x) (sqrt(delta) Psi + sqrt(lambda) I) (TKFAC Eq. 13-14).

    ``eig_in``/``eig_out`` are eigenvalues of the moments M_Phi, M_Psi; sqrt(delta) Phi has
    eigenvalues eig(M_Phi) / sqrt(delta). docs/algorithms.md, section 4.

    Example:
      >>> from tekfax.damping import tkfac_normal
      >>> tkfac_normal(jnp.array([4.0]), jnp.array([4.0]), jnp.array(4.0), 1.0)
      Array([[9.]], dtype=float32)
    """
    return _tkfac_normal_pair(eig_in, eig_out, delta, damping).outer()


def trace_adaptive_factored(phi: jax.Array, psi: jax.Array, delta_tilde: jax.Array) -> jax.Array:
    """(sqrt(d~) Phi + d~/d_in I) (x) (sqrt(d~) Psi + d~/d_out I) (TKFAC_new, Eq. 15-16).

    ``phi`` and ``psi`` are the eigenvalues of the unit-trace factors Phi and Psi.
    docs/algorithms.md, section 4.

    Example:
      >>> from tekfax.damping import trace_adaptive_factored
      >>> trace_adaptive_factored(jnp.array([1.0]), jnp.array([1.0]), jnp.array(4.0))
      Array([[36.]], dtype=float32)
    """
    return _trace_adaptive_pair(phi, psi, delta_tilde).outer()


def rescale_fixed(s: jax.Array, damping: jax.Array) -> jax.Array:
    """S~ = S + lambda (EKFAC, TEKFAC on FNNs; docs/algorithms.md, section 4).

    Example:
      >>> from tekfax.damping import rescale_fixed
      >>> rescale_fixed(jnp.array([[1.0, 2.0]]), 0.5)
      Array([[1.5, 2.5]], dtype=float32)
    """
    return s + damping


def block_mean(basis: Eigenbasis, s: jax.Array | None) -> jax.Array:
    """The undamped block's mean eigenvalue tr(F_hat) / dim; 0 if not finite.

    S (EKFAC/TEKFAC): mean(S). KFAC: mean(eig A) mean(eig G). TKFAC: (mean(eig M_Phi) /
    delta) mean(eig M_Psi), divided first because every eigenvalue is at most delta.
    docs/algorithms.md, section 9.

    Example:
      >>> from tekfax.damping import block_mean
      >>> from tekfax.eigenbasis import Eigenbasis
      >>> basis = Eigenbasis(jnp.eye(2), jnp.array([1.0, 3.0]), jnp.eye(1), jnp.array([4.0]),
      ...                    None)
      >>> float(block_mean(basis, None)), float(block_mean(basis, jnp.ones((2, 1))))
      (8.0, 1.0)
    """

    def mean(x):  # divided before summing: no overflow unless the mean overflows
        return jnp.sum(x / x.size)

    if s is not None:
        value = mean(s)
    elif basis.delta is None:
        value = mean(basis.eig_in) * mean(basis.eig_out)
    else:
        value = safe_div(mean(basis.eig_in), basis.delta) * mean(basis.eig_out)
    return jnp.where(jnp.isfinite(value), value, 0.0)


def floored(damping: jax.Array, peak: jax.Array, floor: jax.Array | float) -> jax.Array:
    """max(lambda, r * peak): the relative damping floor (docs/algorithms.md, section 9).

    ``peak`` is the largest :func:`block_mean` the layer has had, so the floor follows the
    curvature's scale up but not down: as the loss and with it the gradients shrink late in
    training, the eigenvalue-corrected and trace-restricted curvature shrink too, and a floor
    relative to the current scale would shrink with them. ``floor`` = 0 returns lambda.

    Example:
      >>> from tekfax.damping import floored
      >>> float(floored(1e-8, jnp.array(2.0), 0.25)), float(floored(1.0, jnp.array(2.0), 0.25))
      (0.5, 1.0)
    """
    return jnp.maximum(damping, floor * peak)


def rescale_trace(s: jax.Array, delta_tilde: jax.Array) -> jax.Array:
    """S~ = (d~/delta) S + d~/dim, delta = tr S, dim = d_in d_out (reading TEKFAC Eq. 3.5).

    A dead layer (delta = 0) gets S~ = d~/dim. docs/algorithms.md, section 4.

    Example:
      >>> from tekfax.damping import rescale_trace
      >>> rescale_trace(jnp.array([[1.0, 3.0]]), jnp.array(8.0))
      Array([[ 6., 10.]], dtype=float32)
    """
    return safe_div(delta_tilde, jnp.sum(s)) * s + delta_tilde / s.size


def adaptive_deltas(
    deltas: Mapping[str, jax.Array], is_conv: Mapping[str, bool], nu: jax.Array
) -> dict[str, jax.Array]:
    """delta~ per layer for the trace-adaptive rules (TKFAC Eq. 15-16, TEKFAC Eq. 3.4-3.5).

    Conv layers: delta~ = max(nu, delta). beta = max over conv layers of delta~/delta (1 when
    there is none; a dead conv layer, delta = 0, counts as ratio 1 rather than infinity).
    Dense layers: delta~ = beta * max(nu, delta). docs/algorithms.md, section 4. ``nu`` may
    be a per-layer dict (the relative floor raises it per layer, section 9).

    Example:
      >>> from tekfax.damping import adaptive_deltas
      >>> tilde = adaptive_deltas({"conv": jnp.array(0.5), "dense": jnp.array(2.0)},
      ...                         {"conv": True, "dense": False}, 1.0)
      >>> float(tilde["conv"]), float(tilde["dense"])
      (1.0, 4.0)
    """
    ratios = [
        jnp.where(deltas[k] > 0, safe_div(jnp.maximum(_at(nu, k), deltas[k]), deltas[k]), 1.0)
        for k in deltas
        if is_conv[k]
    ]
    beta = jnp.max(jnp.stack(ratios)) if ratios else 1.0
    return {
        k: jnp.maximum(_at(nu, k), d) * (1.0 if is_conv[k] else beta) for k, d in deltas.items()
    }


DampingRule = Callable[..., dict[str, jax.Array]]
"""``rule(bases, s, is_conv, damping, nu) -> {layer: D}``: per-layer :class:`Eigenbasis`,
S (None unless eigenvalue-corrected), whether each layer is a convolution, and the two
damping hyperparameters (either may be unused by the rule; ``damping`` may be a per-layer
dict, as the relative floor makes it)."""


def unit_trace(basis: Eigenbasis, tkfac: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eigenvalues of the unit-trace factors Phi, Psi and the trace scale delta of a block.

    TKFAC: Phi = M_Phi / delta, Psi = M_Psi / delta (TKFAC Eq. 8). KFAC (tekfax's extension
    of the trace-adaptive rule, docs/algorithms.md, section 4): A (x) G = (tr A tr G)
    (A / tr A) (x) (G / tr G).

    Example:
      >>> from tekfax.damping import unit_trace
      >>> from tekfax.eigenbasis import Eigenbasis
      >>> basis = Eigenbasis(jnp.eye(2), jnp.array([1.0, 3.0]), jnp.eye(1), jnp.array([2.0]),
      ...                    None)
      >>> phi, psi, delta = unit_trace(basis, tkfac=False)
      >>> phi, float(delta)
      (Array([0.25, 0.75], dtype=float32), 8.0)
    """
    if tkfac:
        delta = basis.delta
        return safe_div(basis.eig_in, delta), safe_div(basis.eig_out, delta), delta
    tr_in, tr_out = jnp.sum(basis.eig_in), jnp.sum(basis.eig_out)
    return safe_div(basis.eig_in, tr_in), safe_div(basis.eig_out, tr_out), tr_in * tr_out


def _at(damping, layer: str):
    """One layer's lambda: ``damping`` is a float, a scalar array or a per-layer dict."""
    return damping[layer] if isinstance(damping, Mapping) else damping


def _kfac_fixed(bases, s, is_conv, damping, nu, *, pi_adjusted: bool):
    del s, is_conv, nu
    out = {}
    for k, b in bases.items():
        pi = pi_factor(b.eig_in, b.eig_out) if pi_adjusted else 1.0
        out[k] = _factored_pair(b.eig_in, b.eig_out, _at(damping, k), pi)
    return out


def _tkfac_fixed(bases, s, is_conv, damping, nu):
    del s, is_conv, nu
    return {
        k: _tkfac_normal_pair(b.eig_in, b.eig_out, b.delta, _at(damping, k))
        for k, b in bases.items()
    }


def _factored_adaptive(bases, s, is_conv, damping, nu, *, tkfac: bool):
    del s, damping
    unit = {k: unit_trace(b, tkfac) for k, b in bases.items()}
    tilde = adaptive_deltas({k: u[2] for k, u in unit.items()}, is_conv, nu)
    return {k: _trace_adaptive_pair(phi, psi, tilde[k]) for k, (phi, psi, _) in unit.items()}


def _rescale_fixed(bases, s, is_conv, damping, nu):
    del is_conv, nu
    return {k: rescale_fixed(s[k], _at(damping, k)) for k in bases}


def _rescale_adaptive(bases, s, is_conv, damping, nu):
    del damping
    tilde = adaptive_deltas({k: jnp.sum(s[k]) for k in bases}, is_conv, nu)
    return {k: rescale_trace(s[k], tilde[k]) for k in bases}


FactoredRule = Callable[..., dict[str, FactoredDamping]]
"""``rule(bases, s, is_conv, damping, nu) -> {layer: FactoredDamping}``: the arguments of a
:data:`DampingRule`, the two vectors of each layer's factored D."""


def _pair_rule(estimator: str, adaptive: bool, pi_adjusted: bool) -> FactoredRule:
    """KFAC's or TKFAC's factored rule, unclamped (section 4)."""
    if adaptive:
        return functools.partial(_factored_adaptive, tkfac=estimator == "tkfac")
    if estimator == "tkfac":
        return _tkfac_fixed
    return functools.partial(_kfac_fixed, pi_adjusted=pi_adjusted)


def clamped(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x`` in ``dtype``, at most its float maximum: how every rule returns D (section 4).

    A damped eigenvalue beyond the float maximum divides to 0 either way; clamping it keeps
    inf out of the state (the guard would otherwise skip every later step).

    Example:
      >>> from tekfax.damping import clamped
      >>> clamped(jnp.array([1.0, jnp.inf]), jnp.float32)
      Array([1.0000000e+00, 3.4028235e+38], dtype=float32)
    """
    return jnp.minimum(x, jnp.finfo(dtype).max).astype(dtype)


def choose_rule(
    estimator: str, eigen_corrected: bool, adaptive: bool, pi_adjusted: bool = False
) -> DampingRule:
    """The damping rule of one optimizer, picked once at construction (docs/algorithms.md, s. 4).

    - EKFAC/TEKFAC: S + lambda, or with ``adaptive`` (``nu`` given) the trace rule on S
      (TEKFAC Eq. 3.4-3.5);
    - KFAC/TKFAC with ``adaptive``: the trace-adaptive factored rule (TKFAC Eq. 15-16);
    - TKFAC: the normal factored damping (TKFAC Eq. 13-14);
    - KFAC: factored damping, split by pi when ``pi_adjusted`` (Martens & Grosse 2015).

    The rule returns D in the dtype of each layer's eigenvalues, at most the float maximum.

    Example:
      >>> from tekfax.damping import choose_rule
      >>> from tekfax.eigenbasis import Eigenbasis
      >>> rule = choose_rule("kfac", eigen_corrected=False, adaptive=False)
      >>> basis = Eigenbasis(jnp.eye(1), jnp.array([3.0]), jnp.eye(1), jnp.array([0.0]), None)
      >>> rule({"Dense_0": basis}, {"Dense_0": None}, {"Dense_0": False}, 1.0, None)
      {'Dense_0': Array([[4.]], dtype=float32)}
    """
    if eigen_corrected:
        rule = _rescale_adaptive if adaptive else _rescale_fixed
    else:
        pairs = _pair_rule(estimator, adaptive, pi_adjusted)

        def rule(*args):
            return {k: p.outer() for k, p in pairs(*args).items()}

    def damped(bases, s, is_conv, damping, nu):
        out = rule(bases, s, is_conv, damping, nu)
        return {k: clamped(out[k], b.eig_in.dtype) for k, b in bases.items()}

    return damped


def choose_factored_rule(
    estimator: str, eigen_corrected: bool, adaptive: bool, pi_adjusted: bool = False
) -> FactoredRule | None:
    """The two vectors of :func:`choose_rule`'s D for KFAC/TKFAC; None when eigen-corrected.

    Same arguments and same formulas as :func:`choose_rule`: each layer's D is outer(inp,
    out) (before the clamp), and each vector is clamped to the float maximum as D is. The
    preconditioner inverts the damped factors Q diag(vec) Q^T once per refresh or damping
    change (docs/algorithms.md, section 5).

    Example:
      >>> from tekfax.damping import choose_factored_rule
      >>> from tekfax.eigenbasis import Eigenbasis
      >>> rule = choose_factored_rule("kfac", eigen_corrected=False, adaptive=False)
      >>> basis = Eigenbasis(jnp.eye(2), jnp.array([3.0, 0.0]), jnp.eye(1), jnp.array([0.0]),
      ...                    None)
      >>> rule({"Dense_0": basis}, {"Dense_0": None}, {"Dense_0": False}, 4.0, None)["Dense_0"]
      FactoredDamping(inp=Array([5., 2.], dtype=float32), out=Array([2.], dtype=float32))
    """
    if eigen_corrected:
        return None
    pairs = _pair_rule(estimator, adaptive, pi_adjusted)

    def rule(bases, s, is_conv, damping, nu):
        out = pairs(bases, s, is_conv, damping, nu)
        return {
            k: FactoredDamping(*(clamped(v, b.eig_in.dtype) for v in out[k]))
            for k, b in bases.items()
        }

    return rule
