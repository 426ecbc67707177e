"""Diagnostics: dense Fisher blocks, approximate and exact, for small models.

Every block is ordered like ``jax.flatten_util.ravel_pytree(params_of_that_layer)[0]``: for a
Flax Dense or Conv that is the bias first, then the kernel flattened row-major. That is the
ravel of the kernel-layout matrix of :mod:`tekfax.patches`, so a block in the eigenbasis is
(Q_in (x) Q_out) diag(vec D) (Q_in (x) Q_out)^T with ``jnp.kron`` (docs/algorithms.md,
sections 2 and 5).

The examples below take one KFAC step on the MLP of docs/examples.md, whose layers have
blocks of 80 x 80 (``Dense_0``: 16 biases, 4 x 16 weights) and 51 x 51.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tekfax import losses
from tekfax.capture import (
    check_capture_args,
    check_targets,
    discover_layers,
    flatten_by_name,
    nest_by_name,
    untagged_params,
)
from tekfax.curvature import eigen_diagonal
from tekfax.kronecker import LayerCurvature, find_kronecker_state

EXACT_FISHER_MODES = ("sampled", "empirical", "expected")


def _eigen_block(q_in: jax.Array, q_out: jax.Array, diagonal: jax.Array) -> jax.Array:
    q = jnp.kron(q_in, q_out)
    return (q * diagonal.reshape(1, -1)) @ q.T


def undamped_diagonal(layer: LayerCurvature) -> jax.Array:
    """The un-damped block's eigenvalues in kernel layout (docs/algorithms.md, section 2).

    S for EKFAC/TEKFAC, else S_KFAC = outer(eig A, eig G) or
    S_TKFAC = delta outer(eig Phi, eig Psi).

    Example:
      >>> opt = tekfax.kfac(learning_rate=1e-2, damping=1e-3)
      >>> _, opt_state = opt.update(grads, opt.init(params), params, stats=out.stats)
      >>> layer = tekfax.kronecker.find_kronecker_state(opt_state).layers["Dense_1"]
      >>> tekfax.diagnostics.undamped_diagonal(layer).shape    # (d_in, d_out)
      (17, 3)
    """
    if layer.rescale is not None:
        return layer.rescale
    return eigen_diagonal(layer.eig_in, layer.eig_out, layer.delta)


def approx_fisher_blocks(opt_state: Any) -> Any:
    """Dense un-damped approximate Fisher block per layer, as the optimizer holds it.

    KFAC: A (x) G; TKFAC: delta Phi (x) Psi; EKFAC/TEKFAC: Q diag(S) Q^T; all built from the
    cached eigendecomposition the preconditioner uses (docs/algorithms.md, section 2).
    Returns a nested dict like ``stats``.

    Example:
      >>> opt = tekfax.kfac(learning_rate=1e-2, damping=1e-3)
      >>> _, opt_state = opt.update(grads, opt.init(params), params, stats=out.stats)
      >>> blocks = tekfax.diagnostics.approx_fisher_blocks(opt_state)
      >>> blocks["Dense_0"].shape, blocks["Dense_1"].shape
      ((80, 80), (51, 51))
    """
    state = find_kronecker_state(opt_state)
    return nest_by_name(
        {
            name: _eigen_block(layer.q_in, layer.q_out, undamped_diagonal(layer))
            for name, layer in state.layers.items()
        }
    )


def damped_fisher_blocks(opt_state: Any) -> Any:
    """Dense damped block per layer: exactly the matrix whose inverse the last update applied.

    The preconditioned gradient of ``scale_by_X`` equals, layer by layer,
    ``solve(damped_block, ravelled_grad)`` (docs/algorithms.md, sections 4 and 5).

    Example:
      >>> opt = tekfax.kfac(learning_rate=1e-2, damping=1e-3)
      >>> _, opt_state = opt.update(grads, opt.init(params), params, stats=out.stats)
      >>> damped = tekfax.diagnostics.damped_fisher_blocks(opt_state)
      >>> undamped = tekfax.diagnostics.approx_fisher_blocks(opt_state)
      >>> bool(jnp.linalg.eigvalsh(damped["Dense_1"]).min()
      ...      > jnp.linalg.eigvalsh(undamped["Dense_1"]).min())
      True
    """
    state = find_kronecker_state(opt_state)
    return nest_by_name(
        {
            name: _eigen_block(layer.q_in, layer.q_out, layer.damped)
            for name, layer in state.layers.items()
        }
    )


def _output_fisher(loss: str, logits: jax.Array) -> jax.Array:
    """E_y[r r^T] per example, r = d l_n / d f: the Fisher of the output distribution."""
    n = logits.shape[0]
    if loss == "softmax_cross_entropy":
        p = jax.nn.softmax(logits, axis=-1).reshape(n, -1, logits.shape[-1])
        per_position = jax.vmap(jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q)))(p)
        eye = jnp.eye(p.shape[1], dtype=p.dtype)
        blocks = jnp.einsum("ntkl,ts->ntksl", per_position, eye)
        size = p.shape[1] * p.shape[2]
        return blocks.reshape(n, size, size)
    flat = logits.reshape(n, -1)
    if loss == "sigmoid_binary_cross_entropy":
        p = jax.nn.sigmoid(flat)
        return jax.vmap(jnp.diag)(p * (1 - p))
    return jnp.broadcast_to(jnp.eye(flat.shape[1], dtype=flat.dtype), (n,) + 2 * flat.shape[1:])


def _residuals(
    loss: str, fisher: str, logits: jax.Array, targets: jax.Array, rng: Any, num_samples: int
) -> jax.Array:
    """r_n = d l_n / d f per draw and example, (draws, N, outputs): data or sampled labels."""
    n = logits.shape[0]
    loss_fn = functools.partial(losses.mean_loss, loss)
    if fisher == "empirical":
        residuals = n * jax.grad(loss_fn)(logits, targets)[None]
    else:
        keys = jax.random.split(rng, num_samples)
        residuals = jnp.stack(
            [
                n * jax.grad(loss_fn)(logits, losses.sample_targets(loss, key, logits))
                for key in keys
            ]
        )
    return residuals.reshape(residuals.shape[:2] + (-1,))


def _layer_jacobian(flat_jac: Mapping[str, jax.Array], name: str, logits: jax.Array) -> jax.Array:
    """J_n of one layer, (N, outputs, parameters), its columns ordered like ``ravel_pytree``."""
    prefix = f"{name}/" if name else ""
    parts = [
        flat_jac[prefix + k] for k in ("bias", "kernel", "embedding") if prefix + k in flat_jac
    ]
    n = logits.shape[0]
    return jnp.concatenate([p.reshape(n, logits[0].size, -1) for p in parts], axis=-1)


def _fisher_block(j: jax.Array, residuals: jax.Array | None, h: jax.Array | None) -> jax.Array:
    """E_n[J_n^T r r^T J_n]: over the draws of ``residuals``, or with E_y[r r^T] = ``h``."""
    n = j.shape[0]
    if residuals is None:
        return jnp.einsum("ncp,ncd,ndq->pq", j, h.astype(j.dtype), j) / n
    g = jnp.einsum("ncp,snc->snp", j, residuals.astype(j.dtype))
    return jnp.einsum("snp,snq->pq", g, g) / (g.shape[0] * n)


def exact_fisher_blocks(
    logits_fn: Callable[[Any], jax.Array],
    params: Any,
    targets: jax.Array,
    *,
    loss: str = "softmax_cross_entropy",
    fisher: str = "sampled",
    rng: jax.Array | None = None,
    num_samples: int = 1,
) -> Any:
    """Brute-force Fisher blocks from per-example gradients, for small models.

    Per-example gradients are J_n^T r_n, with J the Jacobian of the logits with respect to
    the parameters (``jax.jacrev``) and r_n = d l_n / d f. The block of a layer is
    F = E_n[vec(gradW_n) vec(gradW_n)^T] over its parameters, ordered like
    ``ravel_pytree`` (docs/algorithms.md, section 2). ``fisher``:

    * ``"empirical"``: r_n at the data labels;
    * ``"sampled"``: r_n at labels drawn exactly as :func:`tekfax.loss_and_curvature` draws
      them from ``rng`` (so the two see the same labels);
    * ``"expected"``: the true Fisher in closed form, E_n[J_n^T E_y[r r^T] J_n].

    Models that couple examples (BatchNorm in training mode) have no per-example gradient;
    use them in inference mode here.

    Example:
      >>> exact = tekfax.diagnostics.exact_fisher_blocks(logits_fn, params, y, fisher="expected")
      >>> exact["Dense_0"].shape, exact["Dense_1"].shape
      ((80, 80), (51, 51))
    """
    if fisher not in EXACT_FISHER_MODES:
        raise ValueError(
            f"tekfax: unknown fisher={fisher!r}; choose 'sampled', 'empirical' or 'expected'."
        )
    check_capture_args(
        loss, "empirical" if fisher == "expected" else fisher, rng, num_samples, logits_fn
    )
    names = sorted(discover_layers(logits_fn, params))
    logits = logits_fn(params)
    check_targets(loss, logits, targets)
    flat_jac = flatten_by_name(jax.jacrev(logits_fn)(params))
    if fisher == "expected":
        residuals, h = None, _output_fisher(loss, logits)
    else:
        residuals, h = _residuals(loss, fisher, logits, targets, rng, num_samples), None
    return nest_by_name(
        {
            name: _fisher_block(_layer_jacobian(flat_jac, name, logits), residuals, h)
            for name in names
        }
    )


def approximation_errors(approx: Any, exact_blocks: Any, *, damped: bool = False) -> Any:
    """Frobenius errors ``|F - F_approx|_F`` per layer, as a nested dict of scalars.

    Args:
      approx: an optimizer state (its :func:`approx_fisher_blocks`, or
        :func:`damped_fisher_blocks` with ``damped=True``) or a blocks tree.
      exact_blocks: the reference, e.g. from :func:`exact_fisher_blocks`.
      damped: compare the damped blocks of an optimizer state instead.

    Returns:
      A nested dict like ``exact_blocks`` of scalar errors.

    Example:
      >>> opt = tekfax.kfac(learning_rate=1e-2, damping=1e-3)
      >>> _, opt_state = opt.update(grads, opt.init(params), params, stats=out.stats)
      >>> exact = tekfax.diagnostics.exact_fisher_blocks(logits_fn, params, y, rng=rng)
      >>> errors = tekfax.diagnostics.approximation_errors(opt_state, exact)
      >>> sorted(errors), errors["Dense_1"].shape
      (['Dense_0', 'Dense_1'], ())
    """
    if not isinstance(approx, Mapping | jax.Array):
        approx = damped_fisher_blocks(approx) if damped else approx_fisher_blocks(approx)
    if not isinstance(exact_blocks, Mapping | jax.Array):
        raise TypeError(
            "tekfax: exact_blocks must be the nested dict of blocks from exact_fisher_blocks, "
            f"got {type(exact_blocks).__name__}."
        )
    approx_flat = flatten_by_name(approx)
    errors = {}
    for name, block in flatten_by_name(exact_blocks).items():
        if name not in approx_flat:
            raise ValueError(f"tekfax: layer '{name}' has an exact block but no approximate one.")
        if approx_flat[name].shape != block.shape:
            raise ValueError(
                f"tekfax: layer '{name}' has an exact block of shape {block.shape} but an "
                f"approximate one of shape {approx_flat[name].shape}."
            )
        errors[name] = jnp.linalg.norm(block - approx_flat[name].astype(block.dtype))
    return nest_by_name(errors)


def unpreconditioned(
    logits_fn: Callable[[Any], Any], params: Any, *, has_aux: bool = False
) -> list[str]:
    """The params ``logits_fn`` uses that no tekfax optimizer preconditions, by path.

    Everything that is not the kernel or bias of a supported layer the model calls
    (:mod:`tekfax.modules`): normalisation scales, embeddings, untagged modules. Those
    pass through the preconditioner unchanged. :func:`tekfax.loss_and_curvature` logs the
    same list once, on the ``tekfax`` logger.

    Example:
      >>> tekfax.diagnostics.unpreconditioned(logits_fn, params)
      []
    """
    return untagged_params(discover_layers(logits_fn, params, has_aux), params)
