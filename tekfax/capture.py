"""Curvature capture: one forward pass, two backward passes (ALGORITHMS.md section 1)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tekfax import losses
from tekfax.tagging import LayerMeta, stat_dtype, tag_layers

FISHER_MODES = ("sampled", "empirical")


@flax.struct.dataclass
class LayerStats:
    """Per-layer curvature statistics of one batch.

    Attributes:
      inputs: the layer's raw inputs, (N, ..., features), in float32 or wider.
      out_grads: per-example output gradients d l_n / d s (not divided by N), with a leading
        sample axis: (num_samples, N, ..., d_out). For ``fisher="empirical"`` num_samples is 1.
      meta: static :class:`~tekfax.tagging.LayerMeta` (kind, kernel size, strides, explicit
        padding, dilation, bias); it is pytree metadata, not a leaf.
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


def _split_output(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "tekfax: with has_aux=True, logits_fn must return a pair (logits, aux); got "
            f"{type(out).__name__}."
        )
    return out


def discover_layers(logits_fn: Callable, params: Any, has_aux: bool = False) -> dict:
    """Traces ``logits_fn`` abstractly and returns the tagged layers it calls, by name."""
    with tag_layers() as found:
        jax.eval_shape(lambda p: _split_output(logits_fn(p), has_aux)[0], params)
    if not found:
        raise ValueError(
            "tekfax: logits_fn called no flax.linen.Dense or flax.linen.Conv layer, so there is "
            "no curvature to capture. Build the model from nn.Dense / nn.Conv modules."
        )
    return dict(found)


def nest_by_name(flat: Mapping[str, Any]) -> Any:
    """{"Block_0/Conv_0": x} -> {"Block_0": {"Conv_0": x}}; the root layer ("") maps to x."""
    if "" in flat:
        return flat[""]
    nested: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return nested


def flatten_by_name(tree: Any) -> dict[str, Any]:
    """Inverse of :func:`nest_by_name`: {"Block_0": {"Conv_0": x}} -> {"Block_0/Conv_0": x}."""
    if not isinstance(tree, Mapping):
        return {"": tree}
    flat = {}
    for key, value in tree.items():
        for name, leaf in flatten_by_name(value).items():
            flat[f"{key}/{name}" if name else str(key)] = leaf
    return flat


def iter_layer_stats(stats: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, LayerStats]]:
    """Yields ``(name, LayerStats)`` for every layer in a nested stats tree."""
    if isinstance(stats, LayerStats):
        yield "/".join(prefix), stats
    elif isinstance(stats, Mapping):
        for key, value in stats.items():
            yield from iter_layer_stats(value, prefix + (str(key),))
    else:
        raise TypeError(
            "tekfax: stats must be the nested dict of LayerStats returned by "
            f"tekfax.loss_and_curvature(...).stats; found {type(stats).__name__} at "
            f"'{'/'.join(prefix)}'."
        )


def check_capture_args(
    loss: str, fisher: str, rng: Any, num_samples: int, logits_fn: Any = None
) -> None:
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
    (``fisher="sampled"``, the true Fisher) give the output gradients u of ALGORITHMS.md
    section 1. ``fisher="empirical"`` reuses the first pass's output gradients instead.

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
        made at run time, without recompiling) ``out_grads`` are zeros and, on GPU/TPU, the
        sampled-label backward pass is skipped by ``lax.cond``. On CPU it runs and is masked:
        XLA:CPU executes conditional branches much slower (see the code).

    Returns:
      ``CurvatureOutput(loss, grads, stats, aux)``; ``stats`` mirrors the params tree down
      to each tagged layer's dict, which holds a :class:`LayerStats`.

    Example:
      >>> out = tekfax.loss_and_curvature(lambda p: model.apply({"params": p}, x),
      ...                                 params, y, rng=jax.random.key(0))  # doctest: +SKIP
      >>> updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
    """
    check_capture_args(loss, fisher, rng, num_samples, logits_fn)
    if not isinstance(has_aux, bool):
        raise TypeError(f"tekfax: has_aux must be True or False, got {type(has_aux).__name__}.")
    if not isinstance(compute_stats, bool | np.bool_ | jax.Array | np.ndarray) or (
        jnp.ndim(compute_stats) != 0
    ):
        raise TypeError(
            "tekfax: compute_stats must be a bool or a scalar bool array (pass "
            f"tekfax.stats_needed(opt_state)), got {type(compute_stats).__name__}."
        )
    found = discover_layers(logits_fn, params, has_aux)
    probes = {
        name: (
            jnp.zeros(d.outputs.shape, d.outputs.dtype),
            jnp.zeros(d.inputs.shape, d.inputs.dtype),
        )
        for name, d in found.items()
    }

    def tapped(p, probes):
        with tag_layers(probes):
            return _split_output(logits_fn(p), has_aux)

    logits, vjp_fn, aux = jax.vjp(tapped, params, probes, has_aux=True)
    batch = logits.shape[0]
    check_targets(loss, logits, targets)
    loss_fn = functools.partial(losses.mean_loss, loss)
    loss_value, dlogits = jax.value_and_grad(loss_fn)(logits, targets)
    grads, probe_grads = vjp_fn(dlogits.astype(logits.dtype))

    if fisher == "empirical":
        out_grads = {name: g[None] for name, (g, _) in probe_grads.items()}
    else:

        def sampled_out_grads(key):
            sampled = losses.sample_targets(loss, key, logits)
            cotangent = jax.grad(loss_fn)(logits, sampled).astype(logits.dtype)
            return {name: g for name, (g, _) in vjp_fn(cotangent)[1].items()}

        def sampled_pass():
            return jax.vmap(sampled_out_grads)(jax.random.split(rng, num_samples))

        def skipped_pass():
            return jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(sampled_pass)
            )

        def masked_pass(flag):
            return jax.tree_util.tree_map(
                lambda g: jnp.where(flag, g, jnp.zeros((), g.dtype)), sampled_pass()
            )

        if isinstance(compute_stats, bool):
            out_grads = sampled_pass() if compute_stats else skipped_pass()
        else:
            # XLA:CPU runs a conditional's branches as nested computations, measured far
            # slower for convolutions: on the digits CNN at batch 256 the sampled pass costs
            # 0.2-0.6 ms unconditionally but 3.5 ms inside lax.cond, and a skipped cond still
            # 0.45 ms (scripts/bench.py, BENCHMARKS.md). So on CPU the pass always runs and
            # is masked; elsewhere lax.cond skips it.
            out_grads = jax.lax.platform_dependent(
                compute_stats,
                cpu=masked_pass,
                default=lambda flag: jax.lax.cond(flag, sampled_pass, skipped_pass),
            )

    stats = {}
    for name, d in found.items():
        dtype = stat_dtype(d.outputs.dtype)
        stats[name] = LayerStats(
            inputs=probe_grads[name][1],
            out_grads=out_grads[name].astype(dtype) * batch,  # d l_n / d s = N * d L / d s
            meta=d.meta,
        )
    return CurvatureOutput(loss_value, grads, nest_by_name(stats), aux)
