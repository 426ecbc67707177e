"""Independent brute-force references: per-example gradients by ``jax.vmap(jax.grad)``.

Nothing here uses tekfax; the model is applied to one example at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree


def example_loss(loss: str, logits, target):
    """l_n summed over all non-batch axes, for one example (leading axis of size 1)."""
    if loss == "softmax_cross_entropy":
        values = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    elif loss == "sigmoid_binary_cross_entropy":
        values = optax.sigmoid_binary_cross_entropy(logits, target)
    else:
        values = 0.5 * jnp.square(logits - target)
    return jnp.sum(values)


def per_example_grads(model, params, x, targets, loss="softmax_cross_entropy"):
    """{layer path tuple: (N, P) ravelled per-example gradients (bias first, then kernel)}."""

    def one(p, xi, yi):
        return example_loss(loss, model.apply({"params": p}, xi[None]), yi[None])

    grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, targets)
    out = {}

    def walk(node, path):
        if isinstance(node, dict) and "kernel" in node and not isinstance(node["kernel"], dict):
            out["/".join(path)] = jax.vmap(lambda g: ravel_pytree(g)[0])(node)
            return
        for k, v in node.items():
            walk(v, path + (k,))

    walk(grads, ())
    return out


def fisher_block(per_example: jnp.ndarray) -> np.ndarray:
    """F = E_n[g_n g_n^T] from (N, P) per-example gradients."""
    g = np.asarray(per_example, np.float64)
    return g.T @ g / g.shape[0]
