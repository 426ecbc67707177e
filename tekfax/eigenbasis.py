"""Eigenbasis refresh: symmetrised ``eigh`` with eigenvalues clipped at 0 (section 3)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

# Relative jitter added to the diagonal when eigh fails to converge (returns NaN).
_JITTER = 1e-6


def _finite(values: jax.Array, vectors: jax.Array) -> jax.Array:
    """Per-matrix flag: all eigenvalues and eigenvectors are finite."""
    return jnp.all(jnp.isfinite(values), axis=-1) & jnp.all(jnp.isfinite(vectors), axis=(-2, -1))


def _symmetrise(matrices: jax.Array) -> jax.Array:
    return 0.5 * (matrices + jnp.swapaxes(matrices, -1, -2))


def _eigh(sym: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh`` of matrices (..., d, d), batched except on CPU.

    On XLA:CPU a batched eigh (B > 1) inside a ``lax.cond`` branch, as the periodic refresh
    is, was seen to deadlock the thread pool once a program holds a dozen of them; one call
    per matrix does not, and costs the same there since CPU eigh loops over the batch anyway.
    GPUs and TPUs keep the batched kernel.
    """

    def per_matrix(stack):
        flat = stack.reshape((-1,) + stack.shape[-2:])
        parts = [jnp.linalg.eigh(m) for m in flat]
        values = jnp.stack([v for v, _ in parts]).reshape(stack.shape[:-1])
        return values, jnp.stack([q for _, q in parts]).reshape(stack.shape)

    def batched(stack):
        values, vectors = jnp.linalg.eigh(stack)
        return values, vectors

    return lax.platform_dependent(sym, cpu=per_matrix, default=batched)


def _jittered_eigh(sym: jax.Array) -> tuple[jax.Array, jax.Array]:
    """eigh of sym + jitter * max|diag| * I; factors that still fail get (0, I)."""
    eye = jnp.eye(sym.shape[-1], dtype=sym.dtype)
    diag = jnp.abs(jnp.diagonal(sym, axis1=-2, axis2=-1))
    scale = jnp.maximum(jnp.max(diag, axis=-1), jnp.finfo(sym.dtype).tiny)
    values, vectors = _eigh(sym + _JITTER * scale[..., None, None] * eye)
    ok = _finite(values, vectors)
    return jnp.where(ok[..., None], values, 0.0), jnp.where(ok[..., None, None], vectors, eye)


def _eigh_all(stacks: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    """Symmetrised, clipped eigh of every stack, with one retry ``lax.cond`` for them all.

    A single cond matters: on XLA:CPU, many conditionals each holding a LAPACK eigh in one
    program were seen to deadlock the thread pool.
    """
    syms = [_symmetrise(m) for m in stacks]
    first = [_eigh(s) for s in syms]
    all_finite = jnp.all(jnp.stack([jnp.all(_finite(v, q)) for v, q in first]))
    decomposed = lax.cond(
        all_finite, lambda _: first, lambda _: [_jittered_eigh(s) for s in syms], operand=None
    )
    return [(jnp.maximum(v, 0.0), q) for v, q in decomposed]


def eigh_psd(matrices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposes PSD factors, (..., d, d): returns (eigenvalues >= 0, eigenvectors).

    Eigenvectors are columns. Factors are symmetrised first, because moving averages of
    float32 Gram matrices drift off symmetry by rounding; negative eigenvalues are rounding
    noise and are clipped to 0. If ``eigh`` does not converge (NaN output, seen in float32 on
    badly scaled factors), it is retried once with a relative diagonal jitter, under a
    ``lax.cond`` that costs nothing when all is well; a factor that still fails, or is not
    finite, gets the identity basis with zero eigenvalues, so its layer falls back to damping
    alone instead of poisoning the optimizer state.
    """
    return _eigh_all([matrices])[0]


def eigh_psd_grouped(
    matrices: Mapping[Hashable, jax.Array],
) -> dict[Hashable, tuple[jax.Array, jax.Array]]:
    """:func:`eigh_psd` of many factors, batching those of equal shape and dtype.

    ResNets hold many same-shaped factors; one batched ``eigh`` call per shape is cheaper
    than one call per factor, on every backend.
    """
    groups: dict[tuple, list[Hashable]] = {}
    for key, m in matrices.items():
        groups.setdefault((m.shape, m.dtype), []).append(key)
    stacks = [jnp.stack([matrices[k] for k in keys]) for keys in groups.values()]
    out = {}
    for keys, (values, vectors) in zip(groups.values(), _eigh_all(stacks), strict=True):
        for i, key in enumerate(keys):
            out[key] = (values[i], vectors[i])
    return out
