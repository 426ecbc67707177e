"""Layer tagging: a Flax Linen method interceptor that finds Dense and Conv layers.

The interceptor runs in two modes.

* ``discover``: used under ``jax.eval_shape``; it records every tagged layer's static
  metadata (:class:`LayerMeta`) and the shapes of its input and output, and raises on
  configurations the Kronecker-factored curvature cannot represent.
* ``tap``: wraps each tagged layer's output in :func:`_tap`, an identity with a custom VJP
  whose backward pass returns the layer's output cotangent and its input as the cotangents
  of two zero-valued *probes*. Differentiating with respect to the probes therefore yields
  ``u`` (the output gradient) and ``a`` (the input) of every layer from ordinary reverse
  mode, with no side channel. That is what makes tagging work inside ``nn.remat``,
  ``jax.checkpoint`` and any other transformation that forbids leaking tracers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

TAGGED_MODULES = (nn.Dense, nn.Conv)


@dataclasses.dataclass(frozen=True)
class LayerMeta:
    """Static description of one tagged layer.

    Attributes:
      name: the layer's path in the params tree, joined with ``/``.
      kind: ``"dense"`` or ``"conv"``.
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


@dataclasses.dataclass(frozen=True)
class _Discovered:
    meta: LayerMeta
    inputs: jax.ShapeDtypeStruct
    outputs: jax.ShapeDtypeStruct


def _as_tuple(value: Any, rank: int) -> tuple[int, ...]:
    if value is None:
        value = 1
    if isinstance(value, int):
        return (value,) * rank
    return tuple(int(v) for v in value)


def _conv_meta(module: nn.Conv, name: str, inputs: jax.Array) -> LayerMeta:
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
    if inputs.ndim < rank + 2:
        raise ValueError(
            f"{where} got an input of shape {inputs.shape} without a batch axis; tekfax "
            "needs (batch, *spatial, features) inputs."
        )
    strides = _as_tuple(module.strides, rank)
    dilation = _as_tuple(module.kernel_dilation, rank)
    padding = nn.linear.canonicalize_padding(module.padding, rank)
    spatial = inputs.shape[-rank - 1 : -1]
    if isinstance(padding, str):
        if padding in ("CIRCULAR", "REFLECT"):
            raise ValueError(
                f"{where} uses {padding} padding, which is not supported; use 'SAME', "
                "'VALID', 'CAUSAL' or explicit padding."
            )
        if padding == "CAUSAL":
            padding = [(dilation[0] * (kernel_size[0] - 1), 0)]
        else:
            dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True)]
            padding = lax.padtype_to_pads(spatial, dilated, strides, padding)
    return LayerMeta(
        name=name,
        kind="conv",
        in_features=int(inputs.shape[-1]),
        out_features=int(module.features),
        kernel_size=kernel_size,
        strides=strides,
        padding=tuple((int(lo), int(hi)) for lo, hi in padding),
        dilation=dilation,
        has_bias=bool(module.use_bias),
    )


def _dense_meta(module: nn.Dense, name: str, inputs: jax.Array) -> LayerMeta:
    if inputs.ndim < 2:
        raise ValueError(
            f"tekfax: Dense layer '{name}' got an input of shape {inputs.shape} without a "
            "batch axis; tekfax needs (batch, ..., features) inputs."
        )
    return LayerMeta(
        name=name,
        kind="dense",
        in_features=int(inputs.shape[-1]),
        out_features=int(module.features),
        has_bias=bool(module.use_bias),
    )


def layer_meta(module: nn.Module, inputs: jax.Array) -> LayerMeta:
    """Validates a tagged module and returns its static metadata.

    Example:
      >>> layer = nn.Conv(8, (3, 3), strides=2).bind(
      ...     {"params": {"kernel": jnp.zeros((3, 3, 1, 8)), "bias": jnp.zeros(8)}})
      >>> meta = tekfax.tagging.layer_meta(layer, jnp.zeros((2, 6, 6, 1)))
      >>> meta.kind, meta.kernel_size, meta.strides, meta.padding, meta.d_in
      ('conv', (3, 3), (2, 2), ((0, 1), (0, 1)), 10)
    """
    name = "/".join(module.scope.path)
    if isinstance(module, nn.Conv):
        return _conv_meta(module, name, inputs)
    return _dense_meta(module, name, inputs)


@jax.custom_vjp
def _tap(outputs, inputs, out_probe, in_probe):
    """Identity on ``outputs``; see the module docstring for the backward pass."""
    del inputs, out_probe, in_probe
    return outputs


def _tap_fwd(outputs, inputs, out_probe, in_probe):
    del out_probe, in_probe
    return outputs, inputs


def _tap_bwd(inputs, out_cotangent):
    return out_cotangent, jnp.zeros_like(inputs), out_cotangent, inputs


_tap.defvjp(_tap_fwd, _tap_bwd)


class _Interceptor:
    """Callable passed to ``flax.linen.intercept_methods``."""

    def __init__(self, probes: Mapping[str, tuple[jax.Array, jax.Array]] | None):
        self.probes = probes
        self.discovered: dict[str, _Discovered] = {}
        self._active: set[str] = set()

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, TAGGED_MODULES):
            return next_fun(*args, **kwargs)
        name = "/".join(module.scope.path)
        outermost = name not in self._active
        if outermost and name in self.discovered:
            raise ValueError(
                f"tekfax: layer '{name}' ({type(module).__name__}) was called more than once in "
                "one apply. Shared weights have no single Kronecker-factored block; give each "
                "call its own module."
            )
        self._active.add(name)
        try:
            outputs = next_fun(*args, **kwargs)
        finally:
            if outermost:
                self._active.discard(name)
        if name in self.discovered:
            # A subclass called super().__call__: the innermost level, the real Dense/Conv
            # whose output is the pre-activation s = W a, is already tagged.
            return outputs
        inputs = args[0] if args else kwargs["inputs"]
        self.discovered[name] = _Discovered(
            layer_meta(module, inputs),
            jax.ShapeDtypeStruct(inputs.shape, stat_dtype(inputs.dtype)),
            jax.ShapeDtypeStruct(outputs.shape, outputs.dtype),
        )
        if self.probes is None:
            return outputs
        if name not in self.probes:
            raise ValueError(
                f"tekfax: layer '{name}' appeared on the second trace of logits_fn but not "
                "the first; logits_fn must call the same layers every time."
            )
        out_probe, in_probe = self.probes[name]
        tapped_inputs = lax.stop_gradient(inputs.astype(in_probe.dtype))
        return _tap(outputs, tapped_inputs, out_probe, in_probe)


def stat_dtype(dtype: Any) -> jnp.dtype:
    """Statistics are kept in float32 or wider, whatever the parameter dtype.

    Example:
      >>> tekfax.tagging.stat_dtype(jnp.bfloat16), tekfax.tagging.stat_dtype(jnp.float64)
      (dtype('float32'), dtype('float64'))
    """
    return jnp.promote_types(dtype, jnp.float32)


@contextlib.contextmanager
def tag_layers(
    probes: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
) -> Iterator[dict[str, _Discovered]]:
    """Context manager that tags every ``nn.Dense`` and ``nn.Conv`` call inside it.

    Without ``probes`` it only discovers: the yielded dict fills with each layer's
    metadata and input/output shapes (run it under ``jax.eval_shape``). With ``probes``,
    a mapping from layer name to ``(out_probe, in_probe)`` zero arrays shaped like the
    layer's output and input, the layer's output gradient and input become the
    gradients of the probes. Enter it inside the traced function, never around ``init``.

    Example:
      >>> with tekfax.tag_layers() as layers:
      ...     _ = jax.eval_shape(logits_fn, params)
      >>> sorted(layers)
      ['Dense_0', 'Dense_1']
      >>> layers["Dense_1"].meta.in_features, layers["Dense_1"].outputs.shape
      (16, (8, 3))
    """
    if probes is not None and not isinstance(probes, Mapping):
        raise TypeError(
            "tekfax: probes must be None or a mapping from layer name to (out_probe, "
            f"in_probe), got {type(probes).__name__}."
        )
    interceptor = _Interceptor(probes)
    with nn.intercept_methods(interceptor):
        yield interceptor.discovered
