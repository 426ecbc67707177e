"""Eigenbasis refresh: symmetrised ``eigh`` with eigenvalues clipped at 0 (section 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Relative jitter added to the diagonal when eigh fails to converge (returns NaN).
_JITTER = 1e-6


def _finite(values: jax.Array, vectors: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(values)) & jnp.all(jnp.isfinite(vectors))


def eigh_psd(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposes a PSD factor: returns (eigenvalues >= 0, eigenvectors as columns).

    The factor is symmetrised first, because moving averages of float32 Gram matrices drift
    off symmetry by rounding; negative eigenvalues are rounding noise and are clipped to 0.
    If ``eigh`` does not converge (NaN output, which happens in float32 on badly scaled
    factors), it is retried once with a relative diagonal jitter; if that fails too, or the
    factor itself is not finite, the identity basis with zero eigenvalues is returned, so the
    layer falls back to damping alone instead of poisoning the optimizer state.
    """
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = jnp.linalg.eigh(sym)

    def retry(_):
        scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(sym))), jnp.finfo(sym.dtype).tiny)
        eye = jnp.eye(sym.shape[0], dtype=sym.dtype)
        v2, q2 = jnp.linalg.eigh(sym + _JITTER * scale * eye)
        ok = _finite(v2, q2)
        return jnp.where(ok, v2, 0.0), jnp.where(ok, q2, eye)

    values, vectors = lax.cond(
        _finite(values, vectors), lambda _: (values, vectors), retry, operand=None
    )
    return jnp.maximum(values, 0.0), vectors
