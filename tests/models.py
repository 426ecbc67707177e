"""Tiny Flax models and a helper that builds (logits_fn, params, x, y) for the tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """Dense layers with tanh; the last one gives the logits."""

    features: Sequence[int] = (6, 5, 4)
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, f in enumerate(self.features):
            x = nn.Dense(f, use_bias=self.use_bias)(x)
            if i < len(self.features) - 1:
                x = jnp.tanh(x)
        return x


class ConvNet(nn.Module):
    """One or two convolutions of any rank, then a Dense head."""

    kernel_size: Sequence[int] = (3, 3)
    strides: Any = 1
    padding: Any = "SAME"
    dilation: Any = 1
    channels: Sequence[int] = (3,)
    use_bias: bool = True
    num_classes: int = 4

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = nn.Conv(
                c,
                tuple(self.kernel_size),
                strides=self.strides,
                padding=self.padding,
                kernel_dilation=self.dilation,
                use_bias=self.use_bias,
            )(x)
            x = jnp.tanh(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)


class SequenceDense(nn.Module):
    """A Dense layer over (N, T, d) inputs (T positions), mean-pooled, then a Dense head."""

    hidden: int = 5
    num_classes: int = 3

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(h.mean(axis=1))


def setup(
    model: nn.Module, x_shape: Sequence[int], num_classes: int, dtype=jnp.float32, seed: int = 0
):
    """Returns (logits_fn, params, x, y) with params and inputs cast to ``dtype``."""
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, tuple(x_shape), dtype)
    y = jax.random.randint(ky, (x_shape[0],), 0, num_classes)
    params = model.init(kp, x)["params"]
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)

    def logits_fn(p):
        return model.apply({"params": p}, x)

    return logits_fn, params, x, y
