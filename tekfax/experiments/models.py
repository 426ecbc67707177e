"""Flax Linen models of the KFAC/TKFAC/TEKFAC experiments (docs/algorithms.md, sections 7 and 8).

Every model is called as ``model.apply(variables, x, train=...)`` on NHWC images (the MLP and
the auto-encoder flatten them) and returns logits. Weight layers are only ``nn.Dense`` and
``nn.Conv``, each called once, so :func:`tekfax.tag_layers` tags all of them. BatchNorm
models keep running statistics in the ``batch_stats`` collection and use them when
``train=False``; their BatchNorm momentum is 0.9, PyTorch's 0.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_MNIST_DIM = 784
_MNIST_AUTOENCODER = (1000, 500, 250, 30)
_MIN_AUTOENCODER_WIDTH = 8
_BN_MOMENTUM = 0.9
_VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M")
_VGG16_CONFIG += (512, 512, 512, "M")
# Convolutions before BatchNorm: no bias; He initialisation N(0, 2 / (k * k * c_out)) as in
# KFAC-Pytorch's CIFAR models.
_CONV = dict(use_bias=False, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _batch_norm(train: bool) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=1e-5)


class MLP(nn.Module):
    """Fully connected ReLU network on the flattened input; the last Dense gives logits."""

    hidden: Sequence[int] = (128, 64)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        del train
        x = _flatten(x)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def autoencoder_sizes(input_dim: int) -> tuple[int, ...]:
    """Encoder widths: Martens & Grosse's MNIST 1000-500-250-30 scaled to ``input_dim``.

    Each width is ``max(8, round(w * input_dim / 784))``: the paper's widths for 784 inputs,
    ``(82, 41, 20, 8)`` for the 64 inputs of scikit-learn's digits.
    """
    scale = input_dim / _MNIST_DIM
    return tuple(max(_MIN_AUTOENCODER_WIDTH, round(w * scale)) for w in _MNIST_AUTOENCODER)


class Autoencoder(nn.Module):
    """Deep auto-encoder of KFAC (Martens & Grosse 2015) and TKFAC part I.

    Encoder ``input_dim -> sizes[0] -> ... -> sizes[-1]`` with tanh between layers and a
    linear code, and the mirror-image decoder back to ``input_dim`` logits, for a sigmoid
    binary cross-entropy loss against the flattened input in [0, 1].
    """

    input_dim: int
    sizes: Sequence[int] = _MNIST_AUTOENCODER

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        del train
        x = _flatten(x)
        widths = (*self.sizes, *reversed(self.sizes[:-1]), self.input_dim)
        code = len(self.sizes) - 1
        for i, width in enumerate(widths):
            x = nn.Dense(width)(x)
            if i != code and i != len(widths) - 1:
                x = jnp.tanh(x)
        return x


class SmallCNN(nn.Module):
    """The digits CNN: conv16, conv32/s2, dense 64, dense (docs/algorithms.md, section 8)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        del train
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Dense(64)(_flatten(x)))
        return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
    """ResNet basic block, with a projection shortcut (option B, He et al. 2016).

    When the block subsamples or widens, the shortcut is a strided 1x1 convolution and
    BatchNorm, as in KFAC-Pytorch's CIFAR ResNet; otherwise it is the identity.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        strides = (self.strides, self.strides)
        y = nn.Conv(self.features, (3, 3), strides=strides, **_CONV)(x)
        y = nn.relu(_batch_norm(train)(y))
        y = nn.Conv(self.features, (3, 3), **_CONV)(y)
        y = _batch_norm(train)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=strides, **_CONV)(x)
            x = _batch_norm(train)(x)
        return nn.relu(y + x)


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20: 0.27M parameters (272,474 for 10 classes).

    conv3x3 16 + BN + ReLU, three stages of three basic blocks with 16, 32 and 64 channels
    (stride 2 at the start of stages 2 and 3, with projection shortcuts), global average
    pooling, Dense.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(16, (3, 3), **_CONV)(x)
        x = nn.relu(_batch_norm(train)(x))
        for stage, features in enumerate((16, 32, 64)):
            for block in range(3):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(features, strides)(x, train)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class VGG16(nn.Module):
    """VGG-16 with BatchNorm, CIFAR variant: 13 conv3x3-BN-ReLU layers and one Dense.

    Configuration 64, 64, M, 128, 128, M, 256 x 3, M, 512 x 3, M, 512 x 3, M (M: 2x2 max
    pool). The classifier is a single Dense on the 512 features, as in the CIFAR VGG of
    KFAC-Pytorch. Pools use SAME padding and the features are average-pooled over space, so
    32x32 inputs give exactly the usual 1x1x512 flatten and smaller inputs also work.
    ``config`` (conv widths and "M") defaults to VGG-16's; the tests run a narrow copy.
    """

    num_classes: int = 10
    config: Sequence[int | str] = _VGG16_CONFIG

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        for item in self.config:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            else:
                x = nn.Conv(item, (3, 3), **_CONV)(x)
                x = nn.relu(_batch_norm(train)(x))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "autoencoder": Autoencoder,
    "cnn": SmallCNN,
    "resnet20": ResNet20,
    "vgg16": VGG16,
}


def create_model(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Builds model ``name`` for per-example inputs of ``input_shape`` (no batch axis).

    The auto-encoder ignores ``num_classes``: its output size is ``prod(input_shape)`` and its
    widths follow :func:`autoencoder_sizes`.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    if name == "autoencoder":
        input_dim = math.prod(input_shape)
        return Autoencoder(input_dim=input_dim, sizes=autoencoder_sizes(input_dim))
    return MODELS[name](num_classes=num_classes)


def model_loss(name: str) -> str:
    """The tekfax loss name of model ``name``.

    ``"sigmoid_binary_cross_entropy"`` for the auto-encoder, whose targets are its flattened
    inputs in [0, 1] (see ``Dataset.unnormalize``); ``"softmax_cross_entropy"`` otherwise.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    return "sigmoid_binary_cross_entropy" if name == "autoencoder" else "softmax_cross_entropy"


def init_variables(model: nn.Module, input_shape: tuple[int, ...], rng: jax.Array) -> dict:
    """Initial variables: ``{"params": ...}`` plus ``"batch_stats"`` for BatchNorm models."""
    init = jax.jit(model.init, static_argnames="train")
    return dict(init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False))
