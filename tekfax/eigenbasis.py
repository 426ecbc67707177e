"""Eigenbasis refresh: symmetrised ``eigh`` with eigenvalues clipped at 0 (section 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def eigh_psd(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposes a PSD factor: returns (eigenvalues >= 0, eigenvectors as columns).

    The factor is symmetrised first, because moving averages of float32 Gram matrices drift
    off symmetry by rounding; negative eigenvalues are rounding noise and are clipped to 0.
    """
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = jnp.linalg.eigh(sym)
    return jnp.maximum(values, 0.0), vectors
