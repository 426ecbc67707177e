"""Curvature estimate: per-batch Kronecker factors and their moving averages.

docs/algorithms.md, section 2 (one batch) and section 3 (bias-corrected moving averages).
Inputs are the layer matrices of :mod:`tekfax.patches`: a with shape (N, T, d_in) and u with shape
(num_samples, N, T, d_out); expectations over label samples are averaged. Layers with T > 1
positions take their factors from the positions as extra examples (KFAC-expand) or from the
per-example position mean of a and sum of u (KFAC-reduce; docs/algorithms.md, section 11).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tekfax.damping import safe_div

ESTIMATORS = ("kfac", "tkfac")
POSITIONS = ("expand", "reduce")


class Factors(NamedTuple):
    """One layer's Kronecker factor pair, kernel layout (bias row first).

    Attributes:
      inp: the input factor, A (KFAC) or M_Phi (TKFAC), (d_in, d_in).
      out: the output factor, G (KFAC) or M_Psi (TKFAC), (d_out, d_out).
    """

    inp: jax.Array
    out: jax.Array


def power_of_two(x: jax.Array) -> jax.Array:
    """2^floor(log2 |x|) for finite normal x != 0, else 1: an exact power-of-two scale.

    Computed by clearing the mantissa bits, so it is exact. Multiplying or dividing by it is
    exact too (barring under- or overflow), which lets the statistics rescale their rows
    against overflow without changing a single bit of the results in the normal range.

    Example:
      >>> from tekfax.curvature import power_of_two
      >>> power_of_two(jnp.array([3.0, -0.3, 0.0, jnp.inf]))
      Array([2.  , 0.25, 1.  , 1.  ], dtype=float32)
      >>> float(jnp.log2(power_of_two(jnp.array(1e30))))  # 2^99 <= 1e30 < 2^100
      99.0
    """
    x = jnp.asarray(x)
    info = jnp.finfo(x.dtype)
    int_type = {16: jnp.int16, 32: jnp.int32, 64: jnp.int64}[info.bits]
    mask = ((1 << info.nexp) - 1) << info.nmant  # the exponent bits
    bits = lax.bitcast_convert_type(x, int_type) & jnp.asarray(mask, int_type)
    p = lax.bitcast_convert_type(bits, x.dtype)
    return jnp.where((p > 0) & jnp.isfinite(p), p, jnp.ones_like(p))


def split_count(count: int) -> tuple[float, float, float]:
    """(lo, hi, rest) with lo * hi = 2^-k, 2^k <= count < 2^(k+1), rest = count 2^-k.

    A sum divided by ``count`` is computed as (sum over rows scaled by the powers of two lo
    and hi) / rest: the same bits in the normal range, and the sum cannot overflow unless
    twice the mean does.

    Example:
      >>> from tekfax.curvature import split_count
      >>> split_count(12)
      (0.25, 0.5, 1.5)
    """
    k = count.bit_length() - 1
    return 2.0 ** -(k - k // 2), 2.0 ** -(k // 2), count / 2**k


# The private helpers are jitted so that eager calls (tests, notebooks) dispatch one program
# each; inside the optimizer's jit they are inlined and change nothing.
@functools.partial(jax.jit, static_argnums=1)
def _weighted_gram(
    x: jax.Array,
    count: int,
    weight: jax.Array | None = None,
    scale: jax.Array | None = None,
) -> jax.Array:
    """sum_rows w_r x_r x_r^T / count for x of shape (..., d), w_r = weight_r scale_r^2.

    ``scale`` (powers of two) multiplies both sides of each row's outer product and
    ``weight`` one side, so no row product overflows unless its result does; ``count`` is
    split as in :func:`split_count`.
    """
    rows = x.reshape(-1, x.shape[-1])
    lo, hi, rest = split_count(count)
    left, right = rows * lo, rows * hi
    if weight is not None:
        left = left * weight.reshape(-1, 1)
    if scale is not None:
        left, right = left * scale.reshape(-1, 1), right * scale.reshape(-1, 1)
    return (left.T @ right) / rest


def _row_scale(top: jax.Array) -> jax.Array:
    """power_of_two(top), at most 2^(maxexp - 2) (2^126 in float32): a scale for x / p.

    XLA rewrites x / p as x * (1/p) and flushes subnormal numbers to zero on CPU, so 1/p
    must stay normal: 1/2^127 would turn every x / p into 0. With the cap, |x| / p < 4.
    """
    cap = 2.0 ** (jnp.finfo(top.dtype).maxexp - 2)
    return jnp.minimum(power_of_two(top), jnp.asarray(cap, top.dtype))


@functools.partial(jax.jit, static_argnums=1)
def _squared_norm(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(m, p) with sum over ``axes`` of x^2 = m p^2, p a power of two: no overflow in m."""
    p = _row_scale(jnp.max(jnp.abs(x), axis=axes))
    p_in = jnp.expand_dims(p, axes)
    return jnp.sum(jnp.square(x / p_in), axis=axes), p


def kfac_factors(a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A = E_n[(1/T) sum_t a a^T], G = E_n[sum_t u u^T] (docs/algorithms.md, section 2).

    KFAC (Martens & Grosse 2015, Eq. 1) and KFC for convolutions (Grosse & Martens 2016).
    The sums are scaled by powers of two (:func:`split_count`), so in float32 a factor
    overflows only when twice its value does.

    Example:
      >>> from tekfax.curvature import kfac_factors
      >>> a, u = jnp.ones((4, 1, 3)), jnp.ones((1, 4, 1, 2))  # (N, T, d_in), (S, N, T, d_out)
      >>> [f.shape for f in kfac_factors(a, u)]
      [(3, 3), (2, 2)]
    """
    samples, n, t, _ = u.shape
    return _weighted_gram(a, n * t), _weighted_gram(u, samples * n)


def tkfac_moments(a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """M_Phi = E_n[sum_t |u_t|^2 a a^T], M_Psi = E_n[sum_t |a_t|^2 u u^T] (TKFAC Eq. 8).

    docs/algorithms.md, section 2. tr M_Phi = tr M_Psi = delta = tr F1; the normalised
    factors are M / delta. The squared norms are held as m p^2 with p a power of two that
    scales both sides of the outer products, so |a|^2 = inf (a ~ 1e20 in float32) times
    u = 0 cannot give NaN: a moment overflows only when twice its value does.

    Example:
      >>> from tekfax.curvature import tkfac_moments
      >>> m_phi, m_psi = tkfac_moments(jnp.ones((4, 1, 3)), jnp.ones((1, 4, 1, 2)))
      >>> float(jnp.trace(m_phi)), float(jnp.trace(m_psi))
      (6.0, 6.0)
    """
    samples, n, _, _ = u.shape
    u_sq, u_scale = _squared_norm(u, (0, 3))  # (N, T): sum_o u^2 summed over samples
    a_sq, a_scale = _squared_norm(a, (2,))  # (N, T)
    m_phi = _weighted_gram(a, n, u_sq / samples, u_scale)
    shape = u.shape[:-1]
    m_psi = _weighted_gram(
        u, samples * n, jnp.broadcast_to(a_sq, shape), jnp.broadcast_to(a_scale, shape)
    )
    return m_phi, m_psi


@functools.partial(jax.jit, static_argnums=(1, 2))
def _position_sum(x: jax.Array, axis: int, count: int) -> jax.Array:
    """sum over ``axis`` of x / count (kept as an axis of 1), scaled by powers of two.

    Each slice is divided by p (:func:`_row_scale` of its largest |x|) before the sum and
    multiplied back after the division by ``count``: the sum of terms below 4 cannot
    overflow, and p, 1/p are exact, so the bits are those of the plain sum in the normal
    range. A slice of ones (the bias column) gives exactly 1 for count = its length.
    """
    p = _row_scale(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    return jnp.sum(x / p, axis=axis, keepdims=True) / count * p


def reduce_positions(a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """KFAC-reduce's matrices: abar_n = (1/T) sum_t a_{n,t}, ubar_n = sum_t u_{n,t}.

    docs/algorithms.md, section 11 (Eschenhagen et al. 2023). Returned as a layer with one
    position, shapes (N, 1, d_in) and (S, N, 1, d_out), so the factors of
    :func:`kfac_factors` and :func:`tkfac_moments` apply to them unchanged. The sums are
    scaled by powers of two: in float32 neither overflows unless its result does, and the
    bias column's mean is exactly 1.

    Example:
      >>> from tekfax.curvature import reduce_positions
      >>> a = jnp.concatenate([jnp.ones((1, 3, 1)), jnp.arange(3.0).reshape(1, 3, 1)], -1)
      >>> a_bar, u_bar = reduce_positions(a, jnp.ones((1, 1, 3, 2)))
      >>> a_bar.tolist(), u_bar.tolist()
      ([[[1.0, 1.0]]], [[[[3.0, 3.0]]]])
    """
    return _position_sum(a, 1, a.shape[1]), _position_sum(u, 2, 1)


def batch_factors(estimator: str, a: jax.Array, u: jax.Array, positions: str = "expand") -> Factors:
    """The (input, output) factor pair of one batch for ``estimator`` ("kfac" or "tkfac").

    ``positions="reduce"`` takes them from :func:`reduce_positions` (KFAC-reduce), for
    layers with T > 1 positions; "expand" (and any layer with T = 1, where the two agree)
    uses a and u as they are (docs/algorithms.md, sections 2 and 11).

    Example:
      >>> from tekfax.curvature import batch_factors
      >>> factors = batch_factors("tkfac", jnp.ones((4, 1, 3)), jnp.ones((1, 4, 1, 2)))
      >>> float(factors.inp[0, 0])
      2.0
      >>> a, u = jnp.ones((4, 5, 3)), jnp.ones((1, 4, 5, 2))   # T = 5 positions
      >>> float(batch_factors("kfac", a, u).out[0, 0]), float(batch_factors(
      ...     "kfac", a, u, "reduce").out[0, 0])   # sum_t u^2 = 5, (sum_t u)^2 = 25
      (5.0, 25.0)
    """
    if positions == "reduce" and a.shape[1] > 1:
        a, u = reduce_positions(a, u)
    if estimator == "kfac":
        return Factors(*kfac_factors(a, u))
    return Factors(*tkfac_moments(a, u))


def ema(old: jax.Array, new: jax.Array, decay: jax.Array) -> jax.Array:
    """M <- eps M + (1 - eps) M_batch (docs/algorithms.md, section 3).

    Divide by the running weight (:func:`ema_weight`) to use the average.

    Example:
      >>> from tekfax.curvature import ema
      >>> float(ema(jnp.array(0.0), jnp.array(2.0), 0.75))
      0.5
    """
    return decay * old + (1.0 - decay) * new


def all_finite(tree: Any) -> jax.Array:
    """True when every inexact array leaf of ``tree`` is finite (integer leaves always are).

    The one finiteness check of the library's stages and guard (docs/algorithms.md, section
    9). Each leaf is checked as ``isfinite(max |x|)`` (XLA's max propagates NaN), one float
    reduction; ``all(isfinite(x))`` wrote a boolean array and reduced it in two more passes
    (6.4 of the 106 ms of a KFAC step on the MNIST auto-encoder, 2-core CPU).

    Example:
      >>> from tekfax.curvature import all_finite
      >>> bool(all_finite({"a": jnp.ones(3), "n": jnp.arange(2)})), bool(all_finite(jnp.nan))
      (True, False)
    """
    flags = [
        jnp.isfinite(jnp.max(jnp.abs(leaf))) if jnp.size(leaf) else jnp.array(True)
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def moving_average(
    old: Mapping[str, Factors], batch: Mapping[str, Factors], decay: jax.Array
) -> tuple[dict[str, Factors], jax.Array]:
    """The factor running sums after one batch, and whether the batch was accepted.

    M <- eps M + (1 - eps) M_batch for every layer (docs/algorithms.md, section 3;
    Martens & Grosse 2015, section 5). A batch with any non-finite factor, in any layer
    (NaN inputs, overflow), is rejected: every sum stays as it was.

    Example:
      >>> from tekfax.curvature import Factors, moving_average
      >>> old = {"Dense_0": Factors(jnp.eye(2), jnp.eye(1))}
      >>> bad = {"Dense_0": Factors(jnp.full((2, 2), jnp.nan), jnp.eye(1))}
      >>> new, accepted = moving_average(old, bad, 0.95)
      >>> bool(accepted), bool(jnp.all(new["Dense_0"].inp == jnp.eye(2)))
      (False, True)
    """
    ok = all_finite(batch)
    new = {
        k: Factors(
            *(
                jnp.where(ok, ema(f_old, f_new, decay), f_old)
                for f_old, f_new in zip(old[k], batch[k], strict=True)
            )
        )
        for k in batch
    }
    return new, ok


def ema_weight(weight: jax.Array, accepted: jax.Array, decay: jax.Array) -> jax.Array:
    """The bias-correction weight w <- eps w + (1 - eps) after an accepted batch.

    docs/algorithms.md, section 3: the estimate is the running sum divided by w, so the
    average is unbiased from the first batch on. A rejected batch leaves w unchanged.

    Example:
      >>> from tekfax.curvature import ema_weight
      >>> float(ema_weight(jnp.array(0.0), jnp.array(True), 0.75))
      0.25
    """
    return jnp.where(accepted, ema(weight, 1.0, decay), weight)


def estimate(factors: Factors, weight: jax.Array) -> Factors:
    """The bias-corrected factor estimate, running sum / w (docs/algorithms.md, section 3).

    w is 0 only while no batch was accepted, and then the sums are 0 too (estimate 0).

    Example:
      >>> from tekfax.curvature import Factors, estimate
      >>> estimate(Factors(jnp.full((1, 1), 0.5), jnp.zeros((1, 1))), jnp.array(0.25)).inp
      Array([[2.]], dtype=float32)
    """
    w = jnp.where(weight > 0, weight, 1.0).astype(factors.inp.dtype)
    return Factors(factors.inp / w, factors.out / w)


def eigen_diagonal(eig_in: jax.Array, eig_out: jax.Array, delta: jax.Array | None) -> jax.Array:
    """The un-corrected block's eigenvalues in kernel layout (docs/algorithms.md, section 2).

    KFAC: S_KFAC = outer(eig A, eig G). TKFAC (``delta`` given, eigenvalues of the moments):
    S_TKFAC = delta outer(eig Phi, eig Psi) = outer(eig M_Phi, eig M_Psi) / delta, computed
    as (the larger eigenvalue / delta) * the smaller one. M_Phi and M_Psi are PSD with trace
    delta, so every eigenvalue is at most delta: the quotient is at most 1 and the product
    overflows only when its result does (eigenvalues 1e20 and delta 2e20 give 5e19 in
    float32, where the product first would overflow); it underflows only below 4 times the
    smallest normal number. delta = 0 (a dead layer) gives 0.

    Example:
      >>> from tekfax.curvature import eigen_diagonal
      >>> eigen_diagonal(jnp.array([1.0, 2.0]), jnp.array([3.0]), jnp.array(2.0))
      Array([[1.5],
             [3. ]], dtype=float32)
      >>> eigen_diagonal(jnp.array([1e20]), jnp.array([1e20]), jnp.array(2e20))
      Array([[5.e+19]], dtype=float32)
    """
    if delta is None:
        return jnp.outer(eig_in, eig_out)
    big_in = eig_in[:, None] >= eig_out[None, :]
    first_in = safe_div(eig_in, delta)[:, None] * eig_out[None, :]
    first_out = eig_in[:, None] * safe_div(eig_out, delta)[None, :]
    return jnp.where(big_in, first_in, first_out)
