"""Rescale: the eigenvalue-corrected diagonal S of EKFAC/TEKFAC (docs/algorithms.md, s. 2-3).

S is held in kernel layout, (d_in, d_out): S[i, o] = E_n[(Q_in^T gradW_n^T Q_out)[i, o]^2],
the transpose of the paper's (d_out, d_in) matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tekfax.curvature import all_finite, eigen_diagonal, ema, power_of_two, split_count
from tekfax.eigenbasis import Eigenbasis

CONV_RESCALE = ("per_example", "per_location")


def balance(a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a k, u / k) with k a power of two per location, so a and u have similar magnitudes.

    ``a`` is (N, T, d_in), ``u`` (S, N, T, d_out); k ~ sqrt(max|u| / max|a|) at each (n, t).
    Every product a_i u_o (and so every gradient and S) is unchanged, bit for bit, but
    squaring a or u alone can no longer overflow while their product fits: in float32 a ~
    1e20 with u = 0 (a saturated unit) gives S = 0, not inf * 0 = NaN.

    Example:
      >>> from tekfax.rescale import balance
      >>> a, u = balance(jnp.full((1, 1, 2), 1e20), jnp.full((1, 1, 1, 3), 1e-20))
      >>> float(a[0, 0, 0] * u[0, 0, 0, 0]), bool(jnp.isfinite(jnp.square(a)).all())
      (1.0, True)
    """
    return _balance(a, u)


# The private helpers are jitted so that eager calls (tests, notebooks) dispatch one program
# each; inside the optimizer's jit they are inlined and change nothing.
@jax.jit
def _balance(a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    top_a = power_of_two(jnp.max(jnp.abs(a), axis=-1))
    top_u = power_of_two(jnp.max(jnp.abs(u), axis=(0, 3)))
    k = power_of_two(jnp.sqrt(top_u) / jnp.sqrt(top_a))[..., None]
    return a * k, u / k


def per_location(ap: jax.Array, up: jax.Array) -> jax.Array:
    """S = E_n[sum_t ((Q_in^T a_t)^2) ((Q_out^T u_t)^2)^T] = diag(Q^T F1 Q).

    ``ap`` = a Q_in and ``up`` = u Q_out are the projected layer matrices. For T = 1 this
    is also the exact per-example S: gradW_n = u a^T has rank one (docs/algorithms.md,
    section 8). ``ap`` and ``up`` are balanced first (:func:`balance`) and the mean is taken
    as in :func:`tekfax.curvature.split_count`, so S overflows only when twice its value
    does.

    Example:
      >>> from tekfax.rescale import per_location
      >>> per_location(jnp.ones((2, 1, 3)), jnp.ones((1, 2, 1, 2))).shape
      (3, 2)
    """
    return _per_location(ap, up)


@jax.jit
def _per_location(ap: jax.Array, up: jax.Array) -> jax.Array:
    samples, n = up.shape[:2]
    ap, up = _balance(ap, up)
    lo, hi, rest = split_count(samples * n)
    return jnp.einsum("nti,snto->io", jnp.square(ap) * lo, jnp.square(up) * hi) / rest


def _per_example_sum(
    a: jax.Array,
    u: jax.Array,
    q_in: jax.Array,
    q_out: jax.Array,
    project_first: bool,
    scale: float = 1.0,
) -> jax.Array:
    """sum over a chunk of examples and samples of (scale Q_in^T a_n^T u_n Q_out)^2.

    A power-of-two ``scale`` applied before squaring keeps the sum from overflowing.
    """
    if project_first:  # (Q_in^T A_n^T)(U_n Q_out): cheap when T is small.
        proj = jnp.einsum("nti,snto->snio", a @ q_in, u @ q_out)
    else:  # Q_in^T (A_n^T U_n) Q_out: cheap when T is large.
        grads = jnp.einsum("nti,snto->snio", a, u)
        proj = jnp.einsum("ji,snjp,po->snio", q_in, grads, q_out)
    return jnp.sum(jnp.square(proj * scale), axis=(0, 1))


def project_first(t: int, d_in: int, d_out: int) -> bool:
    """Whether projecting a and u before the product costs fewer flops (docs/algorithms.md, s. 8).

    Example:
      >>> from tekfax.rescale import project_first
      >>> project_first(1, 64, 10), project_first(1024, 64, 10)
      (True, False)
    """
    return t * (d_in * d_in + d_out * d_out + d_in * d_out) <= (
        t * d_in * d_out + d_in * d_in * d_out + d_in * d_out * d_out
    )


def per_example(a: jax.Array, u: jax.Array, q_in: jax.Array, q_out: jax.Array) -> jax.Array:
    """S = E_n[(Q_in^T gradW_n^T Q_out)^2] with gradW_n = sum_t u_t a_t^T (exact EKFAC S).

    Projects first or multiplies first, whichever costs fewer flops. Memory is bounded by the
    caller streaming chunks of examples (:func:`tekfax.patches.sum_over_examples`). a and u
    are balanced first (:func:`balance`), so S overflows only when about four times its
    value does.
    EKFAC (George et al. 2018); docs/algorithms.md, section 2.

    Example:
      >>> from tekfax.rescale import per_example
      >>> a, u = jnp.ones((2, 3, 4)), jnp.ones((1, 2, 3, 2))  # T = 3 positions
      >>> float(per_example(a, u, jnp.eye(4), jnp.eye(2))[0, 0])
      9.0
    """
    return _per_example(a, u, q_in, q_out)


@jax.jit
def _per_example(a: jax.Array, u: jax.Array, q_in: jax.Array, q_out: jax.Array) -> jax.Array:
    samples, n, t, d_out = u.shape
    first = project_first(t, a.shape[-1], d_out)
    _, hi, _ = split_count(samples * n)  # the mean, as the sum scaled by hi^2 / (N S hi^2)
    return _per_example_sum(*_balance(a, u), q_in, q_out, first, hi) / (samples * n * hi * hi)


def elements_per_example(samples: int, t: int, d_in: int, d_out: int, mode: str) -> int:
    """Elements :func:`batch_rescale` holds per example (for chunking the batch).

    Example:
      >>> from tekfax.rescale import elements_per_example
      >>> elements_per_example(1, 1, 5, 3, "per_example")
      16
    """
    matrices = t * (d_in + samples * d_out)
    if t == 1 or mode == "per_location":
        return 2 * matrices
    return matrices + 2 * samples * d_in * d_out


def batch_rescale(
    a: jax.Array, u: jax.Array, q_in: jax.Array, q_out: jax.Array, mode: str
) -> jax.Array:
    """S_batch for one layer; ``mode`` matters only when T > 1 (convolutions, sequences).

    Example:
      >>> from tekfax.rescale import batch_rescale
      >>> s = batch_rescale(jnp.ones((2, 1, 3)), jnp.ones((1, 2, 1, 2)), jnp.eye(3), jnp.eye(2),
      ...                   "per_example")
      >>> s.shape
      (3, 2)
    """
    if a.shape[1] == 1 or mode == "per_location":
        return per_location(a @ q_in, u @ q_out)
    return per_example(a, u, q_in, q_out)


def update(
    old: jax.Array, batch: jax.Array, basis: Eigenbasis, refreshed: jax.Array, decay: jax.Array
) -> jax.Array:
    """S after one batch: S <- eps_S base + (1 - eps_S) S_batch (docs/algorithms.md, s. 3).

    ``base`` is the old S, or on a refresh step (``refreshed``) the un-corrected diagonal
    S_init in the new basis (S_KFAC, or S_TKFAC when ``basis.delta`` is set), since a stale S
    belongs to the old basis (George et al. 2018).

    Only finite values enter S (``old`` is finite by induction):

    - a non-finite ``batch`` is rejected: S = base;
    - a non-finite S_init on a refresh (eigenvalues whose product overflows) is rejected
      for S: S restarts from the batch alone, S = S_batch, which already lives in the new
      basis; when the batch is not finite either, S keeps its old value, stale but of the
      right scale (zero would leave the preconditioner with damping alone, P(g) = g / lambda,
      the largest step it can take);
    - should the average itself round to a non-finite value, S = base.

    Example:
      >>> from tekfax.eigenbasis import Eigenbasis
      >>> from tekfax.rescale import update
      >>> basis = Eigenbasis(jnp.eye(2), jnp.array([1.0, 2.0]), jnp.eye(1), jnp.array([4.0]),
      ...                    None)
      >>> update(jnp.zeros((2, 1)), jnp.full((2, 1), jnp.nan), basis, jnp.array(True), 0.9)
      Array([[4.],
             [8.]], dtype=float32)
      >>> huge = basis._replace(eig_in=jnp.array([1e30, 1e30]), eig_out=jnp.array([1e30]))
      >>> update(jnp.zeros((2, 1)), jnp.ones((2, 1)), huge, jnp.array(True), 0.9)
      Array([[1.],
             [1.]], dtype=float32)
    """
    s_init = eigen_diagonal(basis.eig_in, basis.eig_out, basis.delta)
    init_ok = all_finite(s_init)
    batch_ok = all_finite(batch)
    base = jnp.where(refreshed & init_ok, s_init, old)
    averaged = ema(base, batch, decay)
    new = jnp.where(batch_ok & all_finite(averaged), averaged, base)
    restart = jnp.where(batch_ok, batch, old)  # a refresh whose S_init is not finite
    return jnp.where(refreshed & ~init_ok, restart, new)
