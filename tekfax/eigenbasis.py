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


def eigh_psd(matrices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposes PSD factors, (..., d, d): returns (eigenvalues >= 0, eigenvectors).

    Eigenvectors are columns. Factors are symmetrised first, because moving averages of
    float32 Gram matrices drift off symmetry by rounding; negative eigenvalues are rounding
    noise and are clipped to 0. If ``eigh`` does not converge (NaN output, seen in float32 on
    badly scaled factors), the batch is retried once with a relative diagonal jitter, under a
    ``lax.cond`` that costs nothing when all is well; a factor that still fails, or is not
    finite, gets the identity basis with zero eigenvalues, so its layer falls back to damping
    alone instead of poisoning the optimizer state.
    """
    sym = 0.5 * (matrices + jnp.swapaxes(matrices, -1, -2))
    values, vectors = jnp.linalg.eigh(sym)
    eye = jnp.eye(sym.shape[-1], dtype=sym.dtype)

    def retry(_):
        diag = jnp.abs(jnp.diagonal(sym, axis1=-2, axis2=-1))
        scale = jnp.maximum(jnp.max(diag, axis=-1), jnp.finfo(sym.dtype).tiny)
        v2, q2 = jnp.linalg.eigh(sym + _JITTER * scale[..., None, None] * eye)
        ok = _finite(v2, q2)
        return (jnp.where(ok[..., None], v2, 0.0), jnp.where(ok[..., None, None], q2, eye))

    values, vectors = lax.cond(
        jnp.all(_finite(values, vectors)), lambda _: (values, vectors), retry, operand=None
    )
    return jnp.maximum(values, 0.0), vectors


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
    out = {}
    for keys in groups.values():
        values, vectors = eigh_psd(jnp.stack([matrices[k] for k in keys]))
        for i, key in enumerate(keys):
            out[key] = (values[i], vectors[i])
    return out
