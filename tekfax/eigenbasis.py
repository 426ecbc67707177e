"""Eigenbasis refresh: symmetrised ``eigh`` with eigenvalues clipped at 0.

docs/algorithms.md, section 3: every ``eigen_every`` steps (and on step 0) each layer's
factor estimates are eigendecomposed; the result is the layer's :class:`Eigenbasis`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from tekfax.conditional import while_loop
from tekfax.curvature import Factors


class Eigenbasis(NamedTuple):
    """One layer's eigenbasis at the last refresh (kernel layout).

    Attributes:
      q_in, eig_in: eigenvectors (columns) and clipped eigenvalues of the input factor.
      q_out, eig_out: the same for the output factor.
      delta: TKFAC/TEKFAC only, tr M_Phi of the estimate; None for KFAC.
    """

    q_in: jax.Array
    eig_in: jax.Array
    q_out: jax.Array
    eig_out: jax.Array
    delta: jax.Array | None


# Relative jitter added to the diagonal when eigh fails to converge (returns NaN).
_JITTER = 1e-6


def _finite(values: jax.Array) -> jax.Array:
    """Per-matrix flag: the decomposition succeeded, read off its eigenvalues alone.

    jax's eigh (its LAPACK and cuSOLVER lowerings) marks a failed decomposition with NaN in
    both outputs, and the input is finite (the stored factors are), so the d eigenvalues
    decide; ``isfinite(max |values|)`` is one reduction, where checking the d^2 eigenvectors
    too cost a second one per matrix (compile time, docs/algorithms.md, section 8).
    """
    return jnp.isfinite(jnp.max(jnp.abs(values), axis=-1))


def _symmetrise(matrices: jax.Array) -> jax.Array:
    """(M + M^T) / 2, halving first: the sum of two entries near the float maximum overflows."""
    return 0.5 * matrices + 0.5 * jnp.swapaxes(matrices, -1, -2)


BATCHED_EIGH_MAX = 256
"""Largest d whose same-shaped factors one batched ``eigh`` call decomposes on an NVIDIA GPU
(docs/algorithms.md, section 3).

Measured on an H100 (jax 0.11.2, float32), a batch of two against two single calls:
d = 31, 0.27 against 1.24 ms; d = 251, 2.92 against 4.62 ms; d = 501, 29.9 against 10.0 ms;
d = 1001, 76.3 against 22.4 ms. cuSOLVER's batched kernel (Jacobi) wins on small matrices
and loses badly on large ones, where one divide-and-conquer call per matrix is faster."""


def _eigh(sym: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh`` of matrices (..., d, d): batched on GPUs up to
    :data:`BATCHED_EIGH_MAX` and on TPUs, one call per matrix otherwise.

    On XLA:CPU a batched eigh (B > 1) inside a ``lax.cond`` branch, as the periodic refresh
    is, was seen to deadlock the thread pool once a program holds a dozen of them; one call
    per matrix does not, and costs the same there since CPU eigh loops over the batch anyway.
    ``sym`` is exactly symmetric (:func:`_symmetrise`), so jax's own symmetrisation, a
    further pass per matrix, is off.
    """

    def per_matrix(stack):
        flat = stack.reshape((-1,) + stack.shape[-2:])
        if flat.shape[0] == 1:  # no slice and stack: each would be a copy XLA compiles
            values, vectors = jnp.linalg.eigh(flat[0], symmetrize_input=False)
            return values.reshape(stack.shape[:-1]), vectors.reshape(stack.shape)
        parts = [jnp.linalg.eigh(m, symmetrize_input=False) for m in flat]
        values = jnp.stack([v for v, _ in parts]).reshape(stack.shape[:-1])
        return values, jnp.stack([q for _, q in parts]).reshape(stack.shape)

    def batched(stack):
        values, vectors = jnp.linalg.eigh(stack, symmetrize_input=False)
        return values, vectors

    gpu = batched if sym.shape[-1] <= BATCHED_EIGH_MAX else per_matrix
    return lax.platform_dependent(sym, cpu=per_matrix, cuda=gpu, default=batched)


def _eigh_all(
    stacks: list[jax.Array], axis_name: str | None = None
) -> list[tuple[jax.Array, jax.Array]]:
    """Symmetrised, clipped eigh of every stack, retried once with jitter if any fails.

    The two attempts are one ``lax.while_loop`` (:func:`tekfax.conditional.while_loop`)
    whose body holds each eigh once: the second attempt runs only when the first returned a
    non-finite value anywhere, and decomposes every matrix again with ``_JITTER`` times its
    largest diagonal entry added to the diagonal (the first attempt adds exactly 0). A loop
    rather than a retry branch halves the eigh calls XLA compiles (on the digits CNN the
    refresh compiled in 1.1 s with a retry branch). Matrices that still fail get (0, I).
    Inside ``shard_map`` (``axis_name`` given) the retry is decided over all devices, so it
    matches the undistributed one.
    """
    syms = [_symmetrise(m) for m in stacks]
    eyes = [jnp.eye(s.shape[-1], dtype=s.dtype) for s in syms]
    diagonals = [jnp.max(jnp.abs(jnp.diagonal(s, axis1=-2, axis2=-1)), axis=-1) for s in syms]

    def attempt(carry):
        tries, _, _ = carry
        jitter = jnp.where(tries == 0, 0.0, _JITTER)
        decomposed = [
            _eigh(s + (jitter * d).astype(s.dtype)[..., None, None] * e)
            for s, d, e in zip(syms, diagonals, eyes, strict=True)
        ]
        return tries + 1, decomposed, [_finite(v) for v, _ in decomposed]

    def again(carry):
        tries, _, oks = carry
        ok = jnp.all(jnp.stack([jnp.all(k) for k in oks]))
        if axis_name is not None:
            ok = lax.pmin(ok.astype(jnp.int32), axis_name) > 0
        return (tries == 0) | ((tries == 1) & ~ok)

    start = (
        0,
        [(jnp.zeros(s.shape[:-1], s.dtype), jnp.zeros_like(s)) for s in syms],
        [jnp.zeros(s.shape[:-2], jnp.bool_) for s in syms],
    )
    _, decomposed, oks = while_loop(again, attempt, start)
    return [
        (jnp.where(ok[..., None], jnp.maximum(v, 0.0), 0.0), jnp.where(ok[..., None, None], q, e))
        for (v, q), ok, e in zip(decomposed, oks, eyes, strict=True)
    ]


def _eigh_all_sharded(
    stacks: list[jax.Array], mesh: Mesh, axis_name: str
) -> list[tuple[jax.Array, jax.Array]]:
    """:func:`_eigh_all` with each stack's matrices split over the devices of ``axis_name``.

    Each stack of B matrices is padded with identities to a multiple of the axis size;
    every device decomposes its slice (per matrix on CPU, as :func:`_eigh`), and the
    results come back replicated. Per-device cost: sum over stacks of ceil(B / devices)
    eighs. Return traffic: an all-gather of the padded stack when padding is less than half
    of it, else a psum of the B real results, each device adding its own into zeros (exact),
    so a stack smaller than the device count costs B d^2, not devices * d^2.
    """
    ways = mesh.shape[axis_name]
    padded = []
    for stack in stacks:
        pad = -stack.shape[0] % ways
        eye = jnp.eye(stack.shape[-1], dtype=stack.dtype)
        padded.append(jnp.concatenate([stack, jnp.broadcast_to(eye, (pad,) + stack.shape[1:])]))

    def collect(share: jax.Array, count: int) -> jax.Array:
        if share.shape[0] * ways < 2 * count:
            return lax.all_gather(share, axis_name, tiled=True)[:count]
        mine = jnp.zeros((share.shape[0] * ways,) + share.shape[1:], share.dtype)
        start = lax.axis_index(axis_name) * share.shape[0]
        mine = lax.dynamic_update_slice_in_dim(mine, share, start, axis=0)
        return lax.psum(mine[:count], axis_name)

    def local(*shares):
        decomposed = _eigh_all(list(shares), axis_name)
        return [
            (collect(v, s.shape[0]), collect(q, s.shape[0]))
            for (v, q), s in zip(decomposed, stacks, strict=True)
        ]

    # check_vma=False: the gathered or summed results are replicated, which vma cannot infer.
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=PartitionSpec(axis_name),
        out_specs=PartitionSpec(),
        check_vma=False,
    )(*padded)


def eigh_psd(matrices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposes PSD factors, (..., d, d): returns (eigenvalues >= 0, eigenvectors).

    Eigenvectors are columns. Factors are symmetrised first, because moving averages of
    float32 Gram matrices drift off symmetry by rounding; negative eigenvalues are rounding
    noise and are clipped to 0. If ``eigh`` does not converge (NaN output, seen in float32 on
    badly scaled factors), it is retried once with a relative diagonal jitter, under a
    ``lax.cond`` that costs nothing when all is well; a factor that still fails, or is not
    finite, gets the identity basis with zero eigenvalues, so its layer falls back to damping
    alone instead of poisoning the optimizer state.

    Example:
      >>> from tekfax.eigenbasis import eigh_psd
      >>> values, vectors = eigh_psd(jnp.array([[2.0, 0.0], [0.0, -1e-9]]))
      >>> values
      Array([0., 2.], dtype=float32)
    """
    return _eigh_all([matrices])[0]


def eigh_psd_grouped(
    matrices: Mapping[Hashable, jax.Array],
    mesh: Mesh | None = None,
    axis_name: str = "data",
) -> dict[Hashable, tuple[jax.Array, jax.Array]]:
    """:func:`eigh_psd` of many factors, batching those of equal shape and dtype.

    ResNets hold many same-shaped factors; one batched ``eigh`` call per shape is cheaper
    than one call per factor on TPUs, and on NVIDIA GPUs for factors up to
    :data:`BATCHED_EIGH_MAX` (larger ones, and all on CPU, get one call each). With a
    ``mesh`` whose axis ``axis_name`` has more than one device, each device decomposes a
    share of every same-shaped stack and the results are all-gathered (KAISA's distributed
    inversion); the results equal the undistributed ones, and a one-device axis takes the
    undistributed path.

    Example:
      >>> from tekfax.eigenbasis import eigh_psd_grouped
      >>> out = eigh_psd_grouped({"a": jnp.eye(2), "b": 3 * jnp.eye(2)})
      >>> out["b"][0]
      Array([3., 3.], dtype=float32)
    """
    groups: dict[tuple, list[Hashable]] = {}
    for key, m in matrices.items():
        groups.setdefault((m.shape, m.dtype), []).append(key)
    stacks = [jnp.stack([matrices[k] for k in keys]) for keys in groups.values()]
    if mesh is not None and mesh.shape[axis_name] > 1:
        decomposed = _eigh_all_sharded(stacks, mesh, axis_name)
    else:
        decomposed = _eigh_all(stacks)
    out = {}
    for keys, (values, vectors) in zip(groups.values(), decomposed, strict=True):
        for i, key in enumerate(keys):
            out[key] = (values[i], vectors[i])
    return out


def refresh(
    estimates: Mapping[str, Factors],
    with_trace: bool,
    mesh: Mesh | None = None,
    axis_name: str = "data",
) -> dict[str, Eigenbasis]:
    """Every layer's :class:`Eigenbasis` from its factor estimates (docs/algorithms.md, s. 3).

    Q_in diag(eig_in) Q_in^T reproduces the (symmetrised, PSD-clipped) input estimate, and
    likewise for the output one; factors of one shape are grouped
    (:func:`eigh_psd_grouped`, spread over ``mesh`` when given). ``with_trace``
    (TKFAC/TEKFAC) also keeps delta = tr M_Phi, so Phi = M_Phi / delta (TKFAC Eq. 8).

    Example:
      >>> from tekfax.curvature import Factors
      >>> from tekfax.eigenbasis import refresh
      >>> bases = refresh({"Dense_0": Factors(jnp.diag(jnp.array([1.0, 2.0])), jnp.eye(3))},
      ...                 with_trace=True)
      >>> bases["Dense_0"].eig_in, bases["Dense_0"].delta
      (Array([1., 2.], dtype=float32), Array(3., dtype=float32))
    """
    matrices = {}
    for k, factors in estimates.items():
        matrices[k, "in"], matrices[k, "out"] = factors.inp, factors.out
    decomposed = eigh_psd_grouped(matrices, mesh, axis_name)
    out = {}
    for k, factors in estimates.items():
        (eig_in, q_in), (eig_out, q_out) = decomposed[k, "in"], decomposed[k, "out"]
        delta = jnp.trace(factors.inp) if with_trace else None
        out[k] = Eigenbasis(q_in, eig_in, q_out, eig_out, delta)
    return out
