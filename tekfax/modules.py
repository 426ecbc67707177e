"""Supported modules: how each tagged module's call is one layer matrix (docs/algorithms.md, s. 10).

A tagged module computes s = W^T a (+ b) at every position of every example: a Dense or
``nnx.Linear`` on its last axis, a convolution at each output location, and a
``DenseGeneral``, ``LinearGeneral`` or ``Einsum`` on the flattened contracted input axes and
output feature axes. :func:`describe` validates a module's configuration and returns its
static :class:`~tekfax.tagging.LayerMeta` and a :class:`Rows` view that rearranges the
module's input and output to the layer's rows, (N, positions..., features): the kernel is
read as a (d_in, d_out) matrix with rows in the kernel's own row-major order, so a
DenseGeneral's kernel of shape (contracted..., features...) is exactly the Dense kernel of
the equivalent Dense reshaped.

Supported: Linen ``nn.Dense``, ``nn.Conv``, ``nn.DenseGeneral``, ``nn.Einsum``; NNX
``nnx.Linear``, ``nnx.Conv``, ``nnx.LinearGeneral``, ``nnx.Einsum``. Configurations with no
Kronecker-factored block raise a ``ValueError`` naming the layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import string
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import opt_einsum
from flax import nnx
from jax import lax


@dataclasses.dataclass(frozen=True)
class LayerMeta:
    """Static description of one tagged layer.

    Attributes:
      name: the layer's path in the params tree, joined with ``/``.
      kind: ``"dense"``, ``"conv"`` or ``"embed"`` (a Dense on one-hot token rows).
      in_features: input features (channels for a convolution).
      out_features: output features.
      kernel_size: spatial kernel size, ``()`` for a Dense layer.
      strides: convolution strides, ``()`` for a Dense layer.
      padding: explicit ``(low, high)`` padding per spatial axis, ``()`` for Dense.
      dilation: kernel dilation per spatial axis, ``()`` for Dense.
      has_bias: whether the layer has a bias (folded in as a leading input of 1).

    Example:
      >>> meta = out.stats["Dense_0"].meta
      >>> meta.kind, meta.in_features, meta.out_features, meta.d_in, meta.d_out
      ('dense', 4, 16, 5, 16)
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()
    has_bias: bool = True

    @property
    def d_in(self) -> int:
        """Rows of the layer matrix: patch length plus one for the bias.

        See docs/algorithms.md, section 1.
        """
        patch = self.in_features
        for k in self.kernel_size:
            patch *= k
        return patch + int(self.has_bias)

    @property
    def d_out(self) -> int:
        return self.out_features

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv"


LINEN_MODULES = (nn.Dense, nn.Conv, nn.DenseGeneral, nn.Einsum, nn.Embed)
NNX_MODULES = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum, nnx.Embed)
EMBEDS = (nn.Embed, nnx.Embed)
# Largest vocabulary an embedding is tagged with: its input factor is a dense V x V matrix and
# its inputs are one-hot rows, so memory grows as V^2 and N T V (docs/algorithms.md, s. 10).
MAX_EMBED_VOCAB = 4096


class Rows(NamedTuple):
    """Where a module's features sit: the transposes that put them last, and how many.

    Attributes:
      in_perm: transpose of the input to (example, positions..., contracted...), or None.
      in_axes: how many trailing axes (after ``in_perm``) are contracted features.
      out_perm: transpose of the output to (example, positions..., features...), or None.
      out_axes: how many trailing axes (after ``out_perm``) are output features.
      vocab: an embedding's vocabulary size V: its integer input becomes one-hot rows of
        length V; 0 for the other layers.

    A convolution keeps its spatial input (``in_axes=0``): its rows are im2col patches.

    Example:
      >>> from tekfax.modules import Rows
      >>> rows = Rows(in_perm=None, in_axes=2, out_perm=None, out_axes=1)
      >>> rows.inputs(jnp.zeros((8, 5, 4, 3))).shape
      (8, 5, 12)
    """

    in_perm: tuple[int, ...] | None
    in_axes: int
    out_perm: tuple[int, ...] | None
    out_axes: int
    vocab: int = 0

    def inputs(self, x: jax.Array) -> jax.Array:
        """The input as (N, positions..., d_in without the bias)."""
        if self.vocab:
            return jax.nn.one_hot(x, self.vocab, dtype=jnp.float32)
        return _to_rows(x, self.in_perm, self.in_axes)

    def outputs(self, y: jax.Array) -> jax.Array:
        """The output as (N, positions..., d_out)."""
        return _to_rows(y, self.out_perm, self.out_axes)

    def restore(self, rows: jax.Array, like: jax.Array) -> jax.Array:
        """Inverse of :meth:`outputs`: rows back to the module's output layout ``like``."""
        if self.out_axes == 0:
            return rows
        shape = like.shape if self.out_perm is None else tuple(like.shape[i] for i in self.out_perm)
        y = rows.reshape(shape)
        return y if self.out_perm is None else jnp.transpose(y, _inverse(self.out_perm))


DENSE_ROWS = Rows(None, 1, None, 1)
CONV_ROWS = Rows(None, 0, None, 0)


def _to_rows(x: jax.Array, perm: tuple[int, ...] | None, axes: int) -> jax.Array:
    if axes == 0:
        return x
    if perm is not None:
        x = jnp.transpose(x, perm)
    return x.reshape(x.shape[: x.ndim - axes] + (-1,))


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return tuple(inverse)


def _as_tuple(value: Any, rank: int) -> tuple[int, ...]:
    if value is None:
        value = 1
    if isinstance(value, int):
        return (value,) * rank
    return tuple(int(v) for v in value)


def _check_batch_axis(where: str, inputs: jax.Array, min_ndim: int) -> None:
    if inputs.ndim < min_ndim:
        raise ValueError(
            f"{where} got an input of shape {inputs.shape} without a batch axis; tekfax "
            "needs (batch, ..., features) inputs."
        )


def _conv_padding(module: Any, where: str, spatial, kernel_size, strides, dilation):
    rank = len(kernel_size)
    padding = nn.linear.canonicalize_padding(module.padding, rank)
    if not isinstance(padding, str):
        return padding
    if padding in ("CIRCULAR", "REFLECT"):
        raise ValueError(
            f"{where} uses {padding} padding, which is not supported; use 'SAME', "
            "'VALID', 'CAUSAL' or explicit padding."
        )
    if padding == "CAUSAL":
        return [(dilation[0] * (kernel_size[0] - 1), 0)]
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True)]
    return lax.padtype_to_pads(spatial, dilated, strides, padding)


def conv_meta(module: Any, name: str, inputs: jax.Array) -> LayerMeta:
    """A Linen ``nn.Conv`` or ``nnx.Conv`` call as im2col rows (docs/algorithms.md, s. 1).

    Example:
      >>> layer = nn.Conv(8, (3, 3), strides=2).bind(
      ...     {"params": {"kernel": jnp.zeros((3, 3, 1, 8)), "bias": jnp.zeros(8)}})
      >>> meta = tekfax.modules.conv_meta(layer, "conv", jnp.zeros((2, 6, 6, 1)))
      >>> meta.kind, meta.kernel_size, meta.strides, meta.padding, meta.d_in
      ('conv', (3, 3), (2, 2), ((0, 1), (0, 1)), 10)
    """
    ks = module.kernel_size
    kernel_size = (int(ks),) if isinstance(ks, int) else tuple(int(k) for k in ks)
    rank = len(kernel_size)
    where = f"tekfax: Conv layer '{name}'"
    if module.feature_group_count != 1:
        raise ValueError(
            f"{where} has feature_group_count={module.feature_group_count}; grouped and "
            "depthwise convolutions have no Kronecker-factored block here. Use "
            "feature_group_count=1 or keep this layer out of tekfax (e.g. an untagged module)."
        )
    if any(d != 1 for d in _as_tuple(module.input_dilation, rank)):
        raise ValueError(f"{where} uses input_dilation, which is not supported.")
    if module.mask is not None:
        raise ValueError(f"{where} uses a weight mask, which is not supported.")
    _check_batch_axis(where, inputs, rank + 2)
    strides = _as_tuple(module.strides, rank)
    dilation = _as_tuple(module.kernel_dilation, rank)
    spatial = inputs.shape[-rank - 1 : -1]
    padding = _conv_padding(module, where, spatial, kernel_size, strides, dilation)
    features = module.features if isinstance(module, nn.Conv) else module.out_features
    return LayerMeta(
        name=name,
        kind="conv",
        in_features=int(inputs.shape[-1]),
        out_features=int(features),
        kernel_size=kernel_size,
        strides=strides,
        padding=tuple((int(lo), int(hi)) for lo, hi in padding),
        dilation=dilation,
        has_bias=bool(module.use_bias),
    )


def transposable_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated``, computed from the kernel with its feature axes swapped.

    The same convolution (the same arguments, the same result), but the kernel enters it as
    ``swapaxes(rhs, out, in)`` with dimension numbers to match. JAX's input gradient of a
    convolution swaps the kernel's feature axes; here that swap undoes this one, so the
    input gradient reads its kernel as (spatial..., in, out), the layout XLA:CPU's fast
    convolution expects. Outside a conditional XLA:CPU inserts that transpose itself;
    inside a ``lax.cond`` branch it does not, and the input gradient ran 10-20x slower
    there (``scripts/bench_conditional.py``). The sampled-label pass, which runs under
    ``lax.cond`` only on the steps that use statistics, is a chain of such input gradients
    (docs/algorithms.md, section 8).

    Example:
      >>> x, w = jnp.ones((2, 5, 5, 3)), jnp.arange(54.0).reshape(3, 3, 3, 2)
      >>> args = (x, w, (1, 1), "SAME")
      >>> kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> bool(jnp.allclose(tekfax.modules.transposable_conv(*args, **kw),
      ...                   jax.lax.conv_general_dilated(*args, **kw)))
      True
    """
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    out_axis, in_axis, *spatial = dn.rhs_spec
    swapped = lax.ConvDimensionNumbers(dn.lhs_spec, (in_axis, out_axis, *spatial), dn.out_spec)
    return lax.conv_general_dilated(
        lhs,
        jnp.swapaxes(rhs, out_axis, in_axis),
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers=swapped,
        **kwargs,
    )


@contextlib.contextmanager
def transposable(module: Any) -> Iterator[None]:
    """While active, a Linen or NNX ``Conv`` convolves with :func:`transposable_conv`.

    Only a ``Conv`` that uses JAX's own convolution is switched (a Linen ``nn.Conv`` whose
    ``conv_general_dilated`` and ``conv_general_dilated_cls`` are unset, an ``nnx.Conv``
    whose ``conv_general_dilated`` is ``lax.conv_general_dilated``); every other module,
    and a convolution the user supplied, is left as it is. :func:`tekfax.tag_layers` runs
    every tagged call inside it.

    Example:
      >>> layer = nn.Conv(2, (3, 3)).bind({"params": {"kernel": jnp.ones((3, 3, 1, 2)),
      ...                                             "bias": jnp.zeros(2)}})
      >>> with tekfax.modules.transposable(layer):
      ...     layer.conv_general_dilated is tekfax.modules.transposable_conv
      True
      >>> layer.conv_general_dilated is None
      True
    """
    default = None if isinstance(module, nn.Conv) else lax.conv_general_dilated
    if (
        not isinstance(module, nn.Conv | nnx.Conv)
        or module.conv_general_dilated is not default
        or getattr(module, "conv_general_dilated_cls", None) is not None
    ):
        yield
        return
    # Linen modules are frozen dataclasses: set the field directly, and restore it after.
    object.__setattr__(module, "conv_general_dilated", transposable_conv)
    try:
        yield
    finally:
        object.__setattr__(module, "conv_general_dilated", default)


def einsum_rows(equation: str, lhs_shape, kernel_shape, where: str) -> Rows:
    """The :class:`Rows` of ``einsum(equation, inputs, kernel)`` if it is a matrix product.

    Kernel letters must be the contracted input letters, then the output feature letters in
    the order the output has them (so the kernel reshapes to (d_in, d_out) and a bias to
    d_out); every other input letter is a position kept in the output, the first one the
    examples. Anything else (a kernel axis shared with the input and the output, a summed
    input axis, a kernel with interleaved axes) raises a ``ValueError`` naming the layer.

    Example:
      >>> from tekfax.modules import einsum_rows
      >>> rows = einsum_rows("btd,dhk->bthk", (8, 5, 4), (4, 2, 3), "layer 'q'")
      >>> rows.inputs(jnp.zeros((8, 5, 4))).shape, rows.outputs(jnp.zeros((8, 5, 2, 3))).shape
      ((8, 5, 4), (8, 5, 6))
    """
    shapes = (jax.ShapeDtypeStruct(tuple(s), jnp.float32) for s in (lhs_shape, kernel_shape))
    operands, result, _ = opt_einsum.parser.parse_einsum_input((equation, *shapes))
    lhs, rhs = operands.split(",")
    contracted = [c for c in rhs if c in lhs and c not in result]
    features = [c for c in rhs if c in result and c not in lhs]
    positions = [c for c in lhs if c not in rhs]
    problem = None
    if len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs):
        problem = "repeats an index"
    elif len(contracted) + len(features) != len(rhs):
        problem = "has a kernel axis shared by the input and the output, or summed alone"
    elif any(c not in result for c in positions):
        problem = "sums an input axis that the kernel does not contract"
    elif list(rhs) != contracted + [c for c in result if c in features]:
        problem = "orders the kernel axes other than (contracted..., output features...)"
    elif not positions or lhs[0] != positions[0]:
        problem = "contracts the first (batch) axis of the input"
    if problem is not None:
        raise ValueError(
            f"{where}: the einsum '{lhs},{rhs}->{result}' {problem}, so it is not one matrix "
            "product of the kernel at every position; tekfax cannot give it a Kronecker "
            "block. Write it as inputs x kernel(contracted..., features...) or keep the "
            "layer out of the model's tagged modules."
        )
    in_perm = tuple(lhs.index(c) for c in positions + contracted)
    out_perm = tuple(result.index(c) for c in positions + [c for c in result if c in features])
    identity = tuple(range(len(lhs)))
    return Rows(
        None if in_perm == identity else in_perm,
        len(contracted),
        None if out_perm == tuple(range(len(result))) else out_perm,
        len(features),
    )


def _general_equation(ndim: int, axis: Any, n_features: int, where: str) -> str:
    """The einsum equation of a DenseGeneral / LinearGeneral contracting ``axis``."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(a % ndim for a in axes)
    if ndim + n_features > len(string.ascii_letters):
        raise ValueError(f"{where} has too many axes ({ndim + n_features}).")
    letters = string.ascii_letters[:ndim]
    feats = string.ascii_letters[ndim : ndim + n_features]
    kept = "".join(c for i, c in enumerate(letters) if i not in axes)
    return f"{letters},{''.join(letters[a] for a in axes)}{feats}->{kept}{feats}"


def _features(shape: Sequence[int], perm: tuple[int, ...] | None, axes: int) -> int:
    """The size of the feature row of a ``shape`` rearranged by ``perm``, last ``axes`` axes."""
    if perm is not None:
        shape = [shape[i] for i in perm]
    return math.prod(shape[len(shape) - axes :])


def _matmul(name: str, rows: Rows, inputs, outputs, has_bias: bool) -> tuple[LayerMeta, Rows]:
    _check_batch_axis(f"tekfax: layer '{name}'", inputs, rows.in_axes + 1)
    meta = LayerMeta(
        name=name,
        kind="dense",
        in_features=_features(inputs.shape, rows.in_perm, rows.in_axes),
        out_features=_features(outputs.shape, rows.out_perm, rows.out_axes),
        has_bias=has_bias,
    )
    return meta, rows


def _general_rows(module: Any, name: str, inputs, n_features: int, axis: Any) -> Rows:
    where = f"tekfax: layer '{name}' ({type(module).__name__})"
    equation = _general_equation(inputs.ndim, axis, n_features, where)
    lhs, rest = equation.split(",")
    kernel_letters = rest.split("->")[0]
    sizes = dict(zip(lhs, inputs.shape, strict=True))
    kernel_shape = tuple(sizes.get(c, 1) for c in kernel_letters)
    return einsum_rows(equation, inputs.shape, kernel_shape, where)


def _einsum_equation(module: Any, args: tuple, kwargs: dict) -> str:
    equation = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return (equation or module.einsum_str).replace(" ", "")


def _embed(module: Any, name: str, inputs) -> tuple[LayerMeta, Rows] | None:
    """An embedding as a Dense without bias on one-hot rows, or None above the size limit."""
    vocab = int(module.num_embeddings)
    if vocab > MAX_EMBED_VOCAB:
        return None
    _check_batch_axis(f"tekfax: embedding '{name}'", inputs, 1)
    meta = LayerMeta(
        name=name,
        kind="embed",
        in_features=vocab,
        out_features=int(module.features),
        has_bias=False,
    )
    return meta, Rows(None, 1, None, 1, vocab)


def describe(
    module: Any, name: str, args: tuple, kwargs: dict, outputs
) -> tuple[LayerMeta, Rows] | None:
    """A tagged module's call as one layer matrix: its :class:`LayerMeta` and :class:`Rows`.

    ``args``/``kwargs`` are the call's arguments (the input first), ``outputs`` its result.
    An embedding (``nn.Embed``, ``nnx.Embed``) is a Dense without bias on one-hot rows
    (kind ``"embed"``); above :data:`MAX_EMBED_VOCAB` tokens it is not tagged (None).
    Raises a ``ValueError`` naming the layer for an option with no Kronecker block:
    grouped or input-dilated convolutions, masks, ``batch_dims`` / ``batch_axis``, and
    einsums that are not one matrix product (:func:`einsum_rows`).

    Example:
      >>> layer = nn.DenseGeneral((2, 3), axis=-1).bind(
      ...     {"params": {"kernel": jnp.zeros((4, 2, 3)), "bias": jnp.zeros((2, 3))}})
      >>> x = jnp.zeros((8, 5, 4))
      >>> meta, rows = tekfax.modules.describe(layer, "q", (x,), {}, layer(x))
      >>> meta.kind, meta.d_in, meta.d_out, rows.outputs(layer(x)).shape
      ('dense', 5, 6, (8, 5, 6))
    """
    inputs = args[0] if args else kwargs["inputs"]
    if isinstance(module, EMBEDS):
        return _embed(module, name, inputs)
    if isinstance(module, nn.Conv | nnx.Conv):
        return conv_meta(module, name, inputs), CONV_ROWS
    if isinstance(module, nn.Dense | nnx.Linear):
        return _matmul(name, DENSE_ROWS, inputs, outputs, bool(module.use_bias))
    where = f"tekfax: layer '{name}' ({type(module).__name__})"
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError(
                f"{where} uses batch_dims={module.batch_dims}: a separate kernel per batch "
                "index has no Kronecker-factored block here. Use batch_dims=()."
            )
        n_features = 1 if isinstance(module.features, int) else len(module.features)
        rows = _general_rows(module, name, inputs, n_features, module.axis)
        return _matmul(name, rows, inputs, outputs, bool(module.use_bias))
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ValueError(
                f"{where} uses batch_axis={dict(module.batch_axis)}: a separate kernel per "
                "batch index has no Kronecker-factored block here."
            )
        rows = _general_rows(module, name, inputs, len(module.out_features), module.axis)
        return _matmul(name, rows, inputs, outputs, module.bias is not None)
    equation = _einsum_equation(module, args, kwargs)
    if isinstance(module, nn.Einsum):
        kernel_shape, has_bias = tuple(module.shape), bool(module.use_bias)
    else:
        kernel_shape, has_bias = tuple(module.kernel_shape), module.bias is not None
    rows = einsum_rows(equation, inputs.shape, kernel_shape, where)
    return _matmul(name, rows, inputs, outputs, has_bias)
