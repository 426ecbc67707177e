"""Curvature capture: one forward pass, two backward passes (docs/algorithms.md, section 1).

:func:`loss_and_curvature` runs four stages, each a function of this module:

1. :func:`discover_layers` traces ``logits_fn`` abstractly and finds its tagged layers;
2. :func:`forward_pass` runs ``logits_fn`` once with zero probes on every layer, keeps the
   VJP and backpropagates the data-label loss: the loss, ``grads`` and every layer's input a;
3. :func:`output_gradients` gives every layer's output gradients u: a second backward pass at
   labels drawn from the model (the true Fisher), or the first pass's (empirical Fisher);
4. :func:`layer_stats` pairs a and u into one :class:`LayerStats` per layer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from tekfax import losses
from tekfax.conditional import cond_shaped_like, zeros_shaped
from tekfax.layers import leaf_paths
from tekfax.tagging import LayerMeta, stat_dtype, tag_layers

FISHER_MODES = ("sampled", "empirical")
_LOG = logging.getLogger("tekfax")


@flax.struct.dataclass
class LayerStats:
    """Per-layer curvature statistics of one batch.

    Attributes:
      inputs: the layer's raw inputs, (N, ..., features), in float32 or wider.
      out_grads: per-example output gradients d l_n / d s (not divided by N), with a leading
        sample axis: (num_samples, N, ..., d_out). For ``fisher="empirical"`` num_samples is 1.
      meta: static :class:`~tekfax.tagging.LayerMeta` (kind, kernel size, strides, explicit
        padding, dilation, bias); it is pytree metadata, not a leaf.

    Example:
      >>> stats = out.stats["Dense_1"]    # from tekfax.loss_and_curvature
      >>> stats.inputs.shape, stats.out_grads.shape
      ((8, 16), (1, 8, 3))
      >>> stats.kind, stats.has_bias, stats.meta.d_in, stats.meta.d_out
      ('dense', True, 17, 3)
    """

    inputs: jax.Array
    out_grads: jax.Array
    meta: LayerMeta = flax.struct.field(pytree_node=False)

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.meta.kernel_size

    @property
    def strides(self) -> tuple[int, ...]:
        return self.meta.strides

    @property
    def padding(self) -> tuple[tuple[int, int], ...]:
        return self.meta.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.meta.dilation

    @property
    def has_bias(self) -> bool:
        return self.meta.has_bias


class CurvatureOutput(NamedTuple):
    """What :func:`loss_and_curvature` returns."""

    loss: jax.Array
    grads: Any
    stats: Any
    aux: Any


class ForwardPass(NamedTuple):
    """The result of :func:`forward_pass`, by layer name where per layer.

    Attributes:
      logits: the model's outputs f.
      aux: the auxiliary output of ``logits_fn`` (None without ``has_aux``).
      loss: the batch-mean loss at the data labels.
      grads: its gradient with respect to the params (exactly ``jax.grad``).
      inputs: every layer's input a, in float32 or wider.
      data_out_grads: every layer's output gradient d L / d s at the data labels.
      vjp_fn: the pullback of ``(params, probes)``, for further backward passes.
    """

    logits: jax.Array
    aux: Any
    loss: jax.Array
    grads: Any
    inputs: dict[str, jax.Array]
    data_out_grads: dict[str, jax.Array]
    vjp_fn: Callable[[jax.Array], Any]


def _split_output(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "tekfax: with has_aux=True, logits_fn must return a pair (logits, aux); got "
            f"{type(out).__name__}."
        )
    return out


def _segment(name: str) -> str | int:
    return int(name) if name.isdecimal() else name


def nest_by_name(flat: Mapping[str, Any]) -> Any:
    """{"Block_0/Conv_0": x} -> {"Block_0": {"Conv_0": x}}; the root layer ("") maps to x.

    Segments that are decimal numbers become integers, as the indices of an ``nnx.List``
    are in an ``nnx.State``, so the result mirrors the params tree; a model that is a
    single layer has the name ``""`` and its entry is not nested.

    Example:
      >>> tekfax.capture.nest_by_name({"Block_0/Conv_0": 1, "Dense_0": 2, "layers/0": 3})
      {'Block_0': {'Conv_0': 1}, 'Dense_0': 2, 'layers': {0: 3}}
      >>> tekfax.capture.nest_by_name({"": 1})
      1
    """
    if "" in flat:
        return flat[""]
    return traverse_util.unflatten_dict(
        {tuple(_segment(k) for k in name.split("/")): v for name, v in flat.items()}
    )


def flatten_by_name(tree: Any) -> dict[str, Any]:
    """Inverse of :func:`nest_by_name`: {"Block_0": {"Conv_0": x}} -> {"Block_0/Conv_0": x}.

    Descends every mapping (dicts, ``nnx.State``); anything else is an entry, an NNX
    Variable by its value. A tree that is not a mapping is the root layer's entry,
    ``{"": tree}``.

    Example:
      >>> tekfax.capture.flatten_by_name({"Block_0": {"Conv_0": 1}, "layers": {0: 2}})
      {'Block_0/Conv_0': 1, 'layers/0': 2}
    """
    if not isinstance(tree, Mapping):
        return {"": tree}
    paths, leaves, _ = leaf_paths(tree, is_leaf=lambda x: not isinstance(x, Mapping))
    return {
        "/".join(path): leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        for path, leaf in zip(paths, leaves, strict=True)
    }


def iter_layer_stats(stats: Any) -> Iterator[tuple[str, LayerStats]]:
    """Yields ``(name, LayerStats)`` for every layer in a nested stats tree.

    Example:
      >>> [name for name, _ in tekfax.capture.iter_layer_stats(out.stats)]
      ['Dense_0', 'Dense_1']
    """
    for name, leaf in flatten_by_name(stats).items():
        if not isinstance(leaf, LayerStats):
            raise TypeError(
                "tekfax: stats must be the nested dict of LayerStats returned by "
                f"tekfax.loss_and_curvature(...).stats; found {type(leaf).__name__} at "
                f"'{name}'."
            )
        yield name, leaf


def check_capture_args(
    loss: str, fisher: str, rng: Any, num_samples: int, logits_fn: Any = None
) -> None:
    """Raises on arguments of :func:`loss_and_curvature` that cannot work, naming the fix."""
    if logits_fn is not None and not callable(logits_fn):
        raise TypeError(
            "tekfax: logits_fn must be a callable params -> logits (e.g. lambda p: "
            f"model.apply({{'params': p}}, x)), got {type(logits_fn).__name__}."
        )
    losses.check_loss(loss)
    if fisher not in FISHER_MODES:
        raise ValueError(f"tekfax: unknown fisher={fisher!r}; choose 'sampled' or 'empirical'.")
    if fisher == "sampled" and rng is None:
        raise ValueError(
            "tekfax: fisher='sampled' draws labels from the model, so it needs rng=a "
            "jax.random key (or pass fisher='empirical' to use the data labels)."
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"tekfax: num_samples must be a positive int, got {num_samples!r}.")
    if rng is not None and not (
        isinstance(rng, jax.Array)
        and (jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) or rng.dtype == jnp.uint32)
    ):
        raise TypeError(
            "tekfax: rng must be a jax.random key (jax.random.key(0)), got "
            f"{type(rng).__name__} {getattr(rng, 'dtype', '')}."
        )


def _check_flags(has_aux: Any, compute_stats: Any) -> None:
    if not isinstance(has_aux, bool):
        raise TypeError(f"tekfax: has_aux must be True or False, got {type(has_aux).__name__}.")
    if not isinstance(compute_stats, bool | np.bool_ | jax.Array | np.ndarray) or (
        jnp.ndim(compute_stats) != 0
    ):
        raise TypeError(
            "tekfax: compute_stats must be a bool or a scalar bool array (pass "
            f"tekfax.stats_needed(opt_state)), got {type(compute_stats).__name__}."
        )


def check_targets(loss: str, logits: jax.Array, targets: Any) -> None:
    """Targets shaped for ``loss`` on these logits (broadcasting would silently be wrong)."""
    shape = getattr(targets, "shape", None)
    if shape is None:
        raise TypeError(f"tekfax: targets must be an array, got {type(targets).__name__}.")
    want = logits.shape[:-1] if loss == "softmax_cross_entropy" else logits.shape
    kind = "integer labels" if loss == "softmax_cross_entropy" else "targets"
    if tuple(shape) != tuple(want):
        raise ValueError(
            f"tekfax: targets has shape {tuple(shape)} but loss={loss!r} on logits of shape "
            f"{tuple(logits.shape)} needs {kind} of shape {tuple(want)}."
        )
    if loss == "softmax_cross_entropy" and not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(
            f"tekfax: targets for loss='softmax_cross_entropy' must be integer labels, got "
            f"dtype {targets.dtype}."
        )


def discover_layers(logits_fn: Callable, params: Any, has_aux: bool = False) -> dict:
    """Stage 1: traces ``logits_fn`` abstractly and returns the tagged layers it calls, by name.

    Each entry holds the layer's :class:`~tekfax.tagging.LayerMeta` and the shapes and dtypes
    of its input and output; nothing is computed.

    Example:
      >>> found = tekfax.capture.discover_layers(logits_fn, params)
      >>> found["Dense_0"].meta.kind, found["Dense_0"].outputs.shape
      ('dense', (8, 16))
    """
    found = {}

    def trace(p):
        with tag_layers(params=p) as layers:
            logits = _split_output(logits_fn(p), has_aux)[0]
        found.update(layers)
        return logits

    batch = jax.eval_shape(trace, params).shape[0]
    found = _per_example_layers(found, batch)
    if not found:
        raise ValueError(
            "tekfax: logits_fn called no supported layer (Linen nn.Dense, nn.Conv, "
            "nn.DenseGeneral, nn.Einsum, nn.Embed; NNX nnx.Linear, nnx.Conv, "
            "nnx.LinearGeneral, nnx.Einsum, nnx.Embed), so there is no curvature to capture."
        )
    return found


def _per_example_layers(found: Mapping, batch: int) -> dict:
    """The layers applied per example: the batch axis leads their input as it leads the logits.

    An embedding looked up without a batch axis (positions: ``Embed(L, d)(jnp.arange(L))``)
    is shared by all examples and passes through untagged; any other layer raises.
    """
    kept = {}
    for name, d in found.items():
        if d.inputs.shape[:1] == (batch,):
            kept[name] = d
        elif d.meta.kind != "embed":
            raise ValueError(
                f"tekfax: layer '{name}' got an input of shape {d.inputs.shape}, whose leading "
                f"axis is not the batch of {batch} examples the logits have; tekfax needs "
                "every tagged layer applied per example, with the batch axis first."
            )
    return kept


def layer_dims(logits_fn: Callable, params: Any, *, has_aux: bool = False) -> dict:
    """(d_in, d_out) of every tagged layer, by name, from a trace of ``logits_fn``.

    For the optimizers' ``layer_dims=``: the kernel and bias shapes alone cannot tell a
    bias-free kernel's input axes from its output axes (docs/algorithms.md, section 10).

    Example:
      >>> tekfax.layer_dims(logits_fn, params)
      {'Dense_0': (5, 16), 'Dense_1': (17, 3)}
    """
    found = discover_layers(logits_fn, params, has_aux)
    return {name: (d.meta.d_in, d.meta.d_out) for name, d in found.items()}


def untagged_params(found: Mapping, params: Any) -> list[str]:
    """Paths of the params that are not the kernel or bias of a layer in ``found``.

    They pass through every tekfax optimizer unpreconditioned (plain momentum SGD).

    Example:
      >>> found = tekfax.capture.discover_layers(logits_fn, params)
      >>> tekfax.capture.untagged_params(found, {**params, "LayerNorm_0": {"scale": x}})
      ['LayerNorm_0/scale']
    """
    paths = leaf_paths(params)[0]
    return [
        "/".join(path)
        for path in paths
        if not (
            path and path[-1] in ("kernel", "bias", "embedding") and "/".join(path[:-1]) in found
        )
    ]


_REPORTED: set[tuple[str, ...]] = set()


def report_untagged(found: Mapping, params: Any) -> None:
    """Logs (once per list, at trace time) the params that pass through unpreconditioned."""
    untagged = tuple(untagged_params(found, params))
    if not untagged or untagged in _REPORTED:
        return
    _REPORTED.add(untagged)
    _LOG.warning(
        "tekfax: %d parameter array(s) are in no supported layer and pass through "
        "unpreconditioned: %s. tekfax.diagnostics.unpreconditioned lists them.",
        len(untagged),
        ", ".join(untagged),
    )


def forward_pass(
    logits_fn: Callable,
    params: Any,
    targets: jax.Array,
    found: Mapping,
    *,
    loss: str,
    has_aux: bool = False,
) -> ForwardPass:
    """Stage 2: one forward pass with the VJP kept, and the data-label backward pass.

    Every layer of ``found`` gets two zero probes, shaped like its output and input, that
    :func:`tekfax.tag_layers` taps; their gradients are the layer's output gradient and its
    input a (docs/algorithms.md, section 1). The backward pass of the batch-mean loss at the
    data labels gives the loss, the exact ``grads`` and those per-layer gradients.

    Example:
      >>> found = tekfax.capture.discover_layers(logits_fn, params)
      >>> fwd = tekfax.capture.forward_pass(logits_fn, params, y, found,
      ...                                   loss="softmax_cross_entropy")
      >>> fwd.inputs["Dense_1"].shape, fwd.data_out_grads["Dense_1"].shape
      ((8, 16), (8, 3))
    """
    probes = {
        name: (
            jnp.zeros(d.outputs.shape, d.outputs.dtype),
            jnp.zeros(d.inputs.shape, d.inputs.dtype),
        )
        for name, d in found.items()
    }

    def tapped(p, probes):
        with tag_layers(probes, params=p):
            return _split_output(logits_fn(p), has_aux)

    logits, vjp_fn, aux = jax.vjp(tapped, params, probes, has_aux=True)
    check_targets(loss, logits, targets)
    loss_value, dlogits = jax.value_and_grad(functools.partial(losses.mean_loss, loss))(
        logits, targets
    )
    grads, probe_grads = vjp_fn(dlogits.astype(logits.dtype))
    return ForwardPass(
        logits=logits,
        aux=aux,
        loss=loss_value,
        grads=grads,
        inputs={name: a for name, (_, a) in probe_grads.items()},
        data_out_grads={name: u for name, (u, _) in probe_grads.items()},
        vjp_fn=vjp_fn,
    )


def sampled_output_gradients(
    fwd: ForwardPass, loss: str, rng: jax.Array, num_samples: int
) -> dict[str, jax.Array]:
    """d L / d s per layer at labels drawn from the model: (num_samples, N, ..., d_out).

    Each draw of :func:`tekfax.losses.sample_targets` is backpropagated through the kept
    VJP of ``fwd``; ``vmap`` runs the ``num_samples`` draws at once.
    """
    loss_fn = functools.partial(losses.mean_loss, loss)

    def one_draw(key):
        sampled = losses.sample_targets(loss, key, fwd.logits)
        cotangent = jax.grad(loss_fn)(fwd.logits, sampled).astype(fwd.logits.dtype)
        return {name: g for name, (g, _) in fwd.vjp_fn(cotangent)[1].items()}

    return jax.vmap(one_draw)(jax.random.split(rng, num_samples))


def run_if_needed(compute_stats: bool | jax.Array, pass_fn: Callable[[], Any]) -> Any:
    """``pass_fn()`` when ``compute_stats`` is true, zeros shaped like its result otherwise.

    A Python bool decides at trace time; a traced flag at run time, with ``lax.cond``, on
    every backend. On CPU that is cheap for convolutional models too: tagged convolutions
    compute their input gradients in XLA:CPU's fast layout inside the branch
    (:func:`tekfax.modules.transposable_conv`, docs/algorithms.md, section 8).

    Example:
      >>> tekfax.capture.run_if_needed(jnp.array(False), lambda: {"u": jnp.ones(2)})
      {'u': Array([0., 0.], dtype=float32)}
    """
    if isinstance(compute_stats, bool):
        return pass_fn() if compute_stats else zeros_shaped(jax.eval_shape(pass_fn))
    return cond_shaped_like(compute_stats, pass_fn, zeros_shaped)


def output_gradients(
    fwd: ForwardPass,
    *,
    loss: str,
    fisher: str,
    rng: jax.Array | None = None,
    num_samples: int = 1,
    compute_stats: bool | jax.Array = True,
) -> dict[str, jax.Array]:
    """Stage 3: per-example u = N d L / d s per layer, (num_samples, N, ..., d_out).

    ``fisher="sampled"``: :func:`sampled_output_gradients`; ``fisher="empirical"``: the
    data-label pass of ``fwd``, with a sample axis of 1. u is rescaled from the batch mean's
    gradient to the per-example d l_n / d s and kept in float32 or wider, all inside
    :func:`run_if_needed`: a step without statistics spends no pass
    over u (on the MNIST auto-encoder the rescaling alone took 3 ms of a 106 ms KFAC step).

    Example:
      >>> found = tekfax.capture.discover_layers(logits_fn, params)
      >>> fwd = tekfax.capture.forward_pass(logits_fn, params, y, found,
      ...                                   loss="softmax_cross_entropy")
      >>> u = tekfax.capture.output_gradients(fwd, loss="softmax_cross_entropy",
      ...                                     fisher="sampled", rng=rng, num_samples=2)
      >>> u["Dense_1"].shape
      (2, 8, 3)
    """
    batch = fwd.logits.shape[0]

    def per_example(grads: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return {name: g.astype(stat_dtype(g.dtype)) * batch for name, g in grads.items()}

    def pass_fn():
        if fisher == "empirical":
            return per_example({name: g[None] for name, g in fwd.data_out_grads.items()})
        return per_example(sampled_output_gradients(fwd, loss, rng, num_samples))

    return run_if_needed(compute_stats, pass_fn)


def layer_stats(
    found: Mapping, inputs: Mapping[str, jax.Array], out_grads: Mapping[str, jax.Array]
) -> dict[str, LayerStats]:
    """Stage 4: one :class:`LayerStats` per layer name, from :func:`output_gradients`' u.

    Example:
      >>> found = tekfax.capture.discover_layers(logits_fn, params)
      >>> fwd = tekfax.capture.forward_pass(logits_fn, params, y, found,
      ...                                   loss="softmax_cross_entropy")
      >>> u = tekfax.capture.output_gradients(fwd, loss="softmax_cross_entropy",
      ...                                     fisher="empirical")
      >>> stats = tekfax.capture.layer_stats(found, fwd.inputs, u)
      >>> stats["Dense_0"].out_grads.shape
      (1, 8, 16)
    """
    return {
        name: LayerStats(inputs=inputs[name], out_grads=out_grads[name], meta=d.meta)
        for name, d in found.items()
    }


def loss_and_curvature(
    logits_fn: Callable[[Any], Any],
    params: Any,
    targets: jax.Array,
    *,
    loss: str = "softmax_cross_entropy",
    fisher: str = "sampled",
    rng: jax.Array | None = None,
    has_aux: bool = False,
    num_samples: int = 1,
    compute_stats: bool | jax.Array = True,
) -> CurvatureOutput:
    """Loss, exact gradients and per-layer curvature statistics from one forward pass.

    ``logits_fn(params)`` runs once under :func:`tekfax.tag_layers`; ``jax.vjp`` keeps its
    residuals and backpropagates twice: the data-label loss gives ``grads`` (exactly
    ``jax.grad`` of the batch-mean loss), and loss gradients at labels drawn from the model
    (``fisher="sampled"``, the true Fisher) give the output gradients u of
    docs/algorithms.md, section 1. ``fisher="empirical"`` reuses the first pass's output
    gradients instead. Each stage is a function of :mod:`tekfax.capture`.

    Args:
      logits_fn: params -> logits, or (logits, aux) with ``has_aux=True``.
      params: the parameters to differentiate.
      targets: data labels (integers for softmax cross-entropy).
      loss: ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or
        ``"squared_error"``; see :mod:`tekfax.losses`.
      fisher: ``"sampled"`` (default) or ``"empirical"``.
      rng: a ``jax.random`` key, required for ``fisher="sampled"``.
      has_aux: whether ``logits_fn`` returns ``(logits, aux)``.
      num_samples: label draws per example; the statistics average over them.
      compute_stats: whether the optimizer will consume ``stats`` on this step; pass
        ``tekfax.stats_needed(opt_state)``. When false (a traced bool is fine: the choice is
        made at run time, without recompiling) ``out_grads`` are zeros and the sampled-label
        backward pass is skipped (:func:`run_if_needed`).

    Returns:
      ``CurvatureOutput(loss, grads, stats, aux)``; ``stats`` mirrors the params tree down
      to each tagged layer's dict, which holds a :class:`LayerStats`.

    Example:
      >>> out = tekfax.loss_and_curvature(logits_fn, params, y, rng=jax.random.key(0))
      >>> sorted(out.stats), out.grads["Dense_0"]["kernel"].shape
      (['Dense_0', 'Dense_1'], (4, 16))
      >>> opt = tekfax.kfac(learning_rate=1e-2, damping=1e-3)
      >>> updates, opt_state = opt.update(out.grads, opt.init(params), params, stats=out.stats)
    """
    check_capture_args(loss, fisher, rng, num_samples, logits_fn)
    _check_flags(has_aux, compute_stats)
    found = discover_layers(logits_fn, params, has_aux)
    report_untagged(found, params)
    fwd = forward_pass(logits_fn, params, targets, found, loss=loss, has_aux=has_aux)
    out_grads = output_gradients(
        fwd,
        loss=loss,
        fisher=fisher,
        rng=rng,
        num_samples=num_samples,
        compute_stats=compute_stats,
    )
    stats = layer_stats(found, fwd.inputs, out_grads)
    return CurvatureOutput(fwd.loss, fwd.grads, nest_by_name(stats), fwd.aux)
