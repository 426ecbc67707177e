"""Layer tagging: finds the supported layers a model calls, and taps their inputs and outputs.

Supported modules (:mod:`tekfax.modules`): Linen ``nn.Dense``, ``nn.Conv``,
``nn.DenseGeneral`` and ``nn.Einsum``, found with a Linen method interceptor and named by
their scope path; NNX ``nnx.Linear``, ``nnx.Conv``, ``nnx.LinearGeneral`` and ``nnx.Einsum``,
found by wrapping those classes' ``__call__`` while :func:`tag_layers` is active and named
by the path of their kernel in the ``params`` tree (build the NNX model inside the traced
function with ``nnx.merge(graphdef, params, rest)``).

The tagging runs in two modes.

* ``discover``: used under ``jax.eval_shape``; it records every tagged layer's static
  metadata (:class:`LayerMeta`) and the shapes of its input and output rows, and raises on
  configurations the Kronecker-factored curvature cannot represent.
* ``tap``: wraps each tagged layer's output rows in :func:`_tap`, an identity with a custom
  VJP whose backward pass returns the layer's output cotangent and its input as the
  cotangents of two zero-valued *probes*. Differentiating with respect to the probes
  therefore yields ``u`` (the output gradient) and ``a`` (the input) of every layer from
  ordinary reverse mode, with no side channel. That is what makes tagging work inside
  ``nn.remat``, ``jax.checkpoint`` and any other transformation that forbids leaking tracers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from tekfax.layers import leaf_names
from tekfax.modules import (
    EMBEDS,
    LINEN_MODULES,
    NNX_MODULES,
    LayerMeta,
    describe,
    transposable,
)

__all__ = ["LayerMeta", "stat_dtype", "tag_layers"]


@dataclasses.dataclass(frozen=True)
class _Discovered:
    meta: LayerMeta
    inputs: jax.ShapeDtypeStruct
    outputs: jax.ShapeDtypeStruct


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


class _Tagger:
    """Tags module calls: the Linen interceptor and the NNX ``__call__`` wrapper both call it."""

    def __init__(self, probes: Mapping[str, tuple[jax.Array, jax.Array]] | None, params: Any):
        self.probes = probes
        self.leaf_names = None if params is None else leaf_names(params)
        self.discovered: dict[str, _Discovered] = {}
        self.tied: set[str] = set()  # embeddings also used as an output layer (``attend``)
        self._active: set[str] = set()

    def linen(self, next_fun, args, kwargs, context):
        """The ``flax.linen.intercept_methods`` interceptor."""
        module = context.module
        if context.method_name == "attend" and isinstance(module, EMBEDS):
            self.tied.add("/".join(module.scope.path))
        if context.method_name != "__call__" or not isinstance(module, LINEN_MODULES):
            return next_fun(*args, **kwargs)
        return self.call(module, "/".join(module.scope.path), next_fun, args, kwargs)

    def nnx_name(self, module: Any) -> str:
        """An NNX module's name: the path of its kernel in ``params``, without ``/kernel``."""
        kernel = (module.embedding if isinstance(module, EMBEDS) else module.kernel).get_value()
        name = None if self.leaf_names is None else self.leaf_names.get(id(kernel))
        if name is None:
            raise ValueError(
                f"tekfax: an nnx.{type(module).__name__} was called whose kernel is not a leaf "
                "of the params being differentiated. Build the NNX model from them inside "
                "logits_fn: lambda p: nnx.merge(graphdef, p, rest)(x) (and pass params= to "
                "tekfax.tag_layers when driving it yourself). NNX transforms such as "
                "nnx.remat, nnx.scan and nnx.vmap rebuild a module's Variables, so its layer "
                "cannot be named: use jax.checkpoint on a function of the module instead of "
                "nnx.remat."
            )
        return name.rpartition("/")[0]

    def call(self, module: Any, name: str, next_fun: Callable, args: tuple, kwargs: dict):
        """Runs one module call, recording (and with probes, tapping) the outermost one."""
        outermost = name not in self._active
        if outermost and name in self.discovered:
            raise ValueError(
                f"tekfax: layer '{name}' ({type(module).__name__}) was called more than once in "
                "one apply. Shared weights have no single Kronecker-factored block; give each "
                "call its own module."
            )
        self._active.add(name)
        try:
            with transposable(module):
                outputs = next_fun(*args, **kwargs)
        finally:
            if outermost:
                self._active.discard(name)
        if name in self.discovered:
            # A subclass called super().__call__: the innermost level, the real layer whose
            # output is the pre-activation s = W a, is already tagged.
            return outputs
        untapped = self.probes is not None and name not in self.probes
        described = describe(module, name, args, kwargs, outputs)
        if described is None or (untapped and isinstance(module, EMBEDS)):
            return outputs  # an embedding too large to tag, or tied to an output layer
        meta, rows = described
        inputs, out_rows = rows.inputs(args[0] if args else kwargs["inputs"]), rows.outputs(outputs)
        self.discovered[name] = _Discovered(
            meta,
            jax.ShapeDtypeStruct(inputs.shape, stat_dtype(inputs.dtype)),
            jax.ShapeDtypeStruct(out_rows.shape, out_rows.dtype),
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
        return rows.restore(_tap(out_rows, tapped_inputs, out_probe, in_probe), outputs)


@contextlib.contextmanager
def _wrap_nnx_calls(tagger: _Tagger) -> Iterator[None]:
    """Routes every call of the NNX module classes through ``tagger`` while active."""
    originals = {cls: cls.__dict__["__call__"] for cls in NNX_MODULES}

    def wrap(original):
        def __call__(self, *args, **kwargs):
            name = tagger.nnx_name(self)
            return tagger.call(self, name, lambda *a, **k: original(self, *a, **k), args, kwargs)

        return __call__

    def attend(self, *args, **kwargs):
        tagger.tied.add(tagger.nnx_name(self))
        return original_attend(self, *args, **kwargs)

    original_attend = nnx.Embed.__dict__["attend"]
    for cls, original in originals.items():
        cls.__call__ = wrap(original)
    nnx.Embed.attend = attend
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original
        nnx.Embed.attend = original_attend


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
    params: Any = None,
) -> Iterator[dict[str, _Discovered]]:
    """Context manager that tags every supported layer called inside it (:mod:`tekfax.modules`).

    Without ``probes`` it only discovers: the yielded dict fills with each layer's
    metadata and input/output row shapes (run it under ``jax.eval_shape``). With ``probes``,
    a mapping from layer name to ``(out_probe, in_probe)`` zero arrays shaped like the
    layer's output and input rows, the layer's output gradient and input become the
    gradients of the probes. Enter it inside the traced function, never around ``init``.
    ``params``, the traced params tree, names NNX layers (Linen layers are named by scope).
    An embedding also used as an output layer (``attend``, tied weights) is left out.
    NNX classes are patched while it is active, so do not trace two models at once in
    different threads. A tagged convolution runs :func:`tekfax.modules.transposable_conv`,
    the same convolution with a kernel layout XLA:CPU differentiates fast under ``lax.cond``.

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
    tagger = _Tagger(probes, params)
    with nn.intercept_methods(tagger.linen), _wrap_nnx_calls(tagger):
        yield tagger.discovered
    for name in tagger.tied:  # a tied embedding is also an output layer: no block of its own
        tagger.discovered.pop(name, None)
