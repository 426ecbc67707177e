"""Flax Linen models of the KFAC/TKFAC/TEKFAC experiments (docs/algorithms.md, sections 7 and 8).

Every image model (:data:`MODELS`) is called as ``model.apply(variables, x, train=...)`` on
NHWC images (the MLP and the auto-encoder flatten them) and returns logits. Weight layers are
only ``nn.Dense`` and ``nn.Conv``, each called once, so :func:`tekfax.tag_layers` tags all of
them. BatchNorm models keep running statistics in the ``batch_stats`` collection and use them
when ``train=False``; their BatchNorm momentum is 0.9, PyTorch's 0.1.

The sequence models (:data:`SEQUENCE_MODELS`) are a small decoder-only :class:`Transformer`
on int32 tokens (N, L), giving next-token logits (N, L, V). Its MLP and head are
``nn.Dense`` layers applied at every position (tekfax treats the positions as extra rows,
docs/algorithms.md, section 1); its attention projections are ``nn.DenseGeneral`` and its
token embedding an ``nn.Embed``, or with ``"transformer-onehot"`` the same map written as an
``nn.Dense`` on one-hot tokens: tekfax tags all of them (section 10) and gives the two
embeddings the same block. The learned positions, looked up without a batch axis, pass
through.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

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


class GapCNN(nn.Module):
    """An all-convolutional classifier: conv16, conv32/s2, conv64/s2, global average pooling, dense.

    Its one Dense layer reads the 64 pooled channels, so every Kronecker factor stays small
    (inputs at most 3 x 3 x 32 + 1 = 289 wide) on any image size, and the convolutions'
    forward and backward passes dominate a step. ``scripts/time_to_target.py`` classifies
    mnist5k with it: with only 23,946 weights it fits slowly, so curvature decides how soon
    its test accuracy rises (docs/algorithms.md, section 7).
    """

    widths: Sequence[int] = (16, 32, 64)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        del train
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Conv(width, (3, 3), strides=(1, 1) if i == 0 else (2, 2))(x))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


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
    pooling, Dense. ``blocks_per_stage`` (n, default 3) gives He et al.'s ResNet-(6n+2) of
    the same design: n = 3 is ResNet-20; the tests run n = 1, ResNet-8.
    """

    num_classes: int = 10
    blocks_per_stage: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(16, (3, 3), **_CONV)(x)
        x = nn.relu(_batch_norm(train)(x))
        for stage, features in enumerate((16, 32, 64)):
            for block in range(self.blocks_per_stage):
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


# nn.Embed's initialiser: N(0, 1 / features) per entry of the (vocabulary, features) table.
_EMBED_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
EMBEDDINGS = ("lookup", "one_hot")


class DecoderBlock(nn.Module):
    """Pre-LayerNorm decoder block: ``h + attention(LN(h))``, then ``h + MLP(LN(h))``.

    The attention is ``nn.MultiHeadDotProductAttention`` (self-attention, biases on, no
    dropout) under ``mask``; the MLP is ``Dense(mlp_ratio * d) -> GELU -> Dense(d)``.
    """

    num_heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        d = h.shape[-1]
        attention = nn.MultiHeadDotProductAttention(self.num_heads, use_bias=True, name="attention")
        h = h + attention(nn.LayerNorm()(h), mask=mask, deterministic=True)
        y = nn.gelu(nn.Dense(self.mlp_ratio * d, name="mlp_in")(nn.LayerNorm()(h)))
        return h + nn.Dense(d, name="mlp_out")(y)


class Transformer(nn.Module):
    """Small decoder-only (GPT-style) transformer: int32 tokens (N, L) -> logits (N, L, V).

    Token embedding plus a learned positional embedding (``nn.Embed`` over positions),
    ``num_layers`` causal :class:`DecoderBlock`, a final LayerNorm and an ``nn.Dense(V)`` head
    (no weight tying: tekfax refuses shared weights). Position t only sees tokens 0..t.
    The defaults (d 64, one layer of 4 heads, 55k parameters for V = 32) keep the default
    ``tekfax-compare --model transformer`` within about two minutes on 2 CPU cores: compiling
    a Kronecker optimizer's step takes about twice as long with two layers.

    ``embedding="lookup"`` embeds with ``nn.Embed``; ``embedding="one_hot"`` is the same
    function written as ``nn.Dense(d, use_bias=False)`` on ``jax.nn.one_hot(tokens, V)``.
    tekfax gives both the same Kronecker block, whose input factor is the diagonal of the
    token frequencies (docs/algorithms.md, section 10). Both name the table ``token_embed``
    and draw it from the same distribution with the same key, so they also initialise
    identically (``embedding`` in one, ``kernel`` in the other).

    Example:
      >>> from tekfax.experiments.models import Transformer
      >>> net = Transformer(vocab_size=16, max_len=8, d_model=32, num_layers=1, num_heads=2)
      >>> tokens = jnp.zeros((3, 8), jnp.int32)
      >>> variables = net.init(jax.random.key(0), tokens)
      >>> net.apply(variables, tokens).shape
      (3, 8, 16)
    """

    vocab_size: int
    max_len: int
    d_model: int = 64
    num_layers: int = 1
    num_heads: int = 4
    mlp_ratio: int = 4
    embedding: str = "lookup"

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = True) -> jax.Array:
        del train
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}.")
        length = tokens.shape[-1]
        if length > self.max_len:
            raise ValueError(f"{length} tokens exceed max_len {self.max_len}.")
        if self.embedding == "lookup":
            embed = nn.Embed(self.vocab_size, self.d_model, name="token_embed")
            h = embed(tokens)
        else:
            one_hot = jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32)
            dense = nn.Dense(
                self.d_model, use_bias=False, kernel_init=_EMBED_INIT, name="token_embed"
            )
            h = dense(one_hot)
        h = h + nn.Embed(self.max_len, self.d_model, name="pos_embed")(jnp.arange(length))
        mask = nn.make_causal_mask(tokens)
        for i in range(self.num_layers):
            h = DecoderBlock(self.num_heads, self.mlp_ratio, name=f"block_{i}")(h, mask)
        h = nn.LayerNorm(name="final_norm")(h)
        return nn.Dense(self.vocab_size, name="head")(h)


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "autoencoder": Autoencoder,
    "cnn": SmallCNN,
    "gapcnn": GapCNN,
    "resnet20": ResNet20,
    "vgg16": VGG16,
}
# Models of token sequences: name -> constructor(vocab_size=..., max_len=...).
SEQUENCE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "transformer": Transformer,
    "transformer-onehot": functools.partial(Transformer, embedding="one_hot"),
}
ALL_MODELS = (*MODELS, *SEQUENCE_MODELS)


def is_sequence_model(name: str) -> bool:
    """Whether model ``name`` reads int32 token sequences (N, L) rather than images.

    Example:
      >>> from tekfax.experiments.models import is_sequence_model
      >>> is_sequence_model("transformer"), is_sequence_model("cnn")
      (True, False)
    """
    return name in SEQUENCE_MODELS


def _check_name(name: str) -> None:
    if name not in MODELS and name not in SEQUENCE_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ALL_MODELS)}.")


def create_model(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Builds model ``name`` for per-example inputs of ``input_shape`` (no batch axis).

    The auto-encoder ignores ``num_classes``: its output size is ``prod(input_shape)`` and its
    widths follow :func:`autoencoder_sizes`. A sequence model takes ``num_classes`` as its
    vocabulary size and ``input_shape == (L,)`` as its maximum length.

    Example:
      >>> from tekfax.experiments.models import create_model
      >>> net = create_model("transformer-onehot", 16, (12,))
      >>> net.vocab_size, net.max_len, net.embedding
      (16, 12, 'one_hot')
    """
    _check_name(name)
    if name in SEQUENCE_MODELS:
        (length,) = input_shape
        return SEQUENCE_MODELS[name](vocab_size=num_classes, max_len=length)
    if name == "autoencoder":
        input_dim = math.prod(input_shape)
        return Autoencoder(input_dim=input_dim, sizes=autoencoder_sizes(input_dim))
    return MODELS[name](num_classes=num_classes)


def model_loss(name: str) -> str:
    """The tekfax loss name of model ``name``.

    ``"sigmoid_binary_cross_entropy"`` for the auto-encoder, whose targets are its flattened
    inputs in [0, 1] (see ``Dataset.unnormalize``); ``"softmax_cross_entropy"`` otherwise
    (for the sequence models on (N, L, V) logits and (N, L) next-token targets).
    """
    _check_name(name)
    return "sigmoid_binary_cross_entropy" if name == "autoencoder" else "softmax_cross_entropy"


def init_variables(model: nn.Module, input_shape: tuple[int, ...], rng: jax.Array) -> dict:
    """Initial variables: ``{"params": ...}`` plus ``"batch_stats"`` for BatchNorm models.

    Images are float32; a :class:`Transformer` gets int32 tokens.
    """
    init = jax.jit(model.init, static_argnames="train")
    dtype = jnp.int32 if isinstance(model, Transformer) else jnp.float32
    return dict(init(rng, jnp.zeros((1, *input_shape), dtype), train=False))
