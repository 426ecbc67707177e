"""``scale_by_kronecker``: the shared pipeline behind KFAC, EKFAC, TKFAC and TEKFAC.

Stages per update, each in its own module:

1. curvature estimate (:mod:`tekfax.curvature`): factor moving averages, every
   ``curvature_every`` steps;
2. eigenbasis refresh (:mod:`tekfax.eigenbasis`): every ``eigen_every`` steps and on step 0;
3. rescale (:mod:`tekfax.rescale`, EKFAC/TEKFAC): S, every ``rescale_every`` steps and on
   every refresh, re-initialised to the un-corrected diagonal at each refresh (section 3);
4. damping (:mod:`tekfax.damping`): the damped eigenvalues D, every step, so damping and nu
   can be changed by ``optax.inject_hyperparams`` or a schedule at any time;
5. preconditioning (:mod:`tekfax.precondition`) of every tagged layer; parameters that are
   not tagged layers pass through unchanged.

Periodic stages run under ``lax.cond`` on the step count, so one compiled update serves every
step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from tekfax import curvature, eigenbasis, precondition, rescale
from tekfax import damping as damping_rules
from tekfax.capture import LayerStats, iter_layer_stats
from tekfax.patches import grad_matrix, locations, matrix_to_grads, sum_over_examples
from tekfax.tagging import stat_dtype
from tekfax.validation import (
    check_bool,
    check_choice,
    check_interval,
    check_learning_rate,
    check_number,
)

MISSING_STATS = (
    "tekfax: this transformation needs the curvature statistics as the keyword argument "
    "stats=. Get them with out = tekfax.loss_and_curvature(logits_fn, params, targets, "
    "rng=rng) and call opt.update(out.grads, opt_state, params, stats=out.stats)."
)


class LayerCurvature(NamedTuple):
    """Curvature state of one tagged layer (kernel layout: d_in rows with the bias first).

    Attributes:
      factor_in: running sum of A (KFAC) or M_Phi (TKFAC), (d_in, d_in); the estimate is
        ``factor_in / ScaleByKroneckerState.ema_weight``.
      factor_out: running sum of G or M_Psi, (d_out, d_out).
      q_in, eig_in: eigenvectors (columns) and clipped eigenvalues of the input-factor
        estimate at the last refresh.
      q_out, eig_out: the same for the output factor.
      delta: TKFAC/TEKFAC only, tr M_Phi of the estimate at the last refresh; None for KFAC.
      rescale: EKFAC/TEKFAC only, the diagonal S in kernel layout (d_in, d_out); else None.
      damped: the damped eigenvalues D used by the last update, (d_in, d_out): the damped
        block is (Q_in (x) Q_out) diag(vec D) (Q_in (x) Q_out)^T.
    """

    factor_in: jax.Array
    factor_out: jax.Array
    q_in: jax.Array
    eig_in: jax.Array
    q_out: jax.Array
    eig_out: jax.Array
    delta: jax.Array | None
    rescale: jax.Array | None
    damped: jax.Array


class ScaleByKroneckerState(NamedTuple):
    """State of :func:`scale_by_kronecker`.

    Attributes:
      count: number of updates so far (int32).
      ema_weight: bias-correction weight w of the factor moving averages (section 3).
      layers: ``LayerCurvature`` per tagged layer, keyed by its ``/``-joined params path.
      needs_stats: whether the next update consumes the statistics (a factor, or for
        EKFAC/TEKFAC an S, update is due); see :func:`stats_needed`.
    """

    count: jax.Array
    ema_weight: jax.Array
    layers: dict[str, LayerCurvature]
    needs_stats: jax.Array


def find_kronecker_state(opt_state: Any) -> ScaleByKroneckerState:
    """The ``ScaleByKroneckerState`` inside an optimizer state (chains, inject_hyperparams)."""
    if isinstance(opt_state, ScaleByKroneckerState):
        return opt_state
    if isinstance(opt_state, Mapping):
        children = opt_state.values()
    else:
        children = opt_state if isinstance(opt_state, tuple | list) else ()
    for child in children:
        try:
            return find_kronecker_state(child)
        except ValueError:
            continue
    raise ValueError(
        "tekfax: opt_state holds no tekfax Kronecker state; pass the state of a tekfax "
        "optimizer (tekfax.kfac, ekfac, tkfac, tekfac or scale_by_*)."
    )


def stats_needed(opt_state: Any) -> jax.Array:
    """Whether the next ``update`` of this optimizer state reads ``stats`` (a bool array).

    Pass it as ``compute_stats=`` to :func:`tekfax.loss_and_curvature` to skip the
    sampled-label backward pass on steps where the statistics would be ignored:

    >>> needed = tekfax.stats_needed(opt_state)  # doctest: +SKIP
    >>> out = tekfax.loss_and_curvature(logits_fn, params, y, rng=rng,
    ...                                 compute_stats=needed)  # doctest: +SKIP
    """
    return find_kronecker_state(opt_state).needs_stats


def _is_layer(node: Any) -> bool:
    if not isinstance(node, Mapping) or "kernel" not in node or not set(node) <= {"kernel", "bias"}:
        return False
    kernel = node["kernel"]
    if getattr(kernel, "ndim", 0) < 2:
        return False
    return "bias" not in node or tuple(node["bias"].shape) == (kernel.shape[-1],)


def find_layers(params: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, Mapping]]:
    """Yields (name, {"kernel", "bias"}) for every dict in ``params`` shaped like a Dense/Conv."""
    if _is_layer(params):
        yield "/".join(prefix), params
    elif isinstance(params, Mapping):
        for key, value in params.items():
            yield from find_layers(value, prefix + (str(key),))


def _replace_layers(tree: Any, new: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Any:
    name = "/".join(prefix)
    if name in new:
        return type(tree)(new[name]) if isinstance(tree, Mapping) else new[name]
    if isinstance(tree, Mapping):
        return type(tree)({k: _replace_layers(v, new, prefix + (str(k),)) for k, v in tree.items()})
    return tree


def _layer_sum(fn, st: LayerStats, dtype: jnp.dtype, per_example: int):
    """``fn(a, u)`` over the layer's batch, streamed in chunks (bounded memory)."""
    return sum_over_examples(fn, st.inputs, st.out_grads, st.meta, dtype, per_example)


def _factor_elements(st: LayerStats) -> int:
    """Elements the factor products hold per example: the layer matrices a and u."""
    return locations(st.out_grads) * (st.meta.d_in + st.out_grads.shape[0] * st.meta.d_out)


def _active_layers(
    state: ScaleByKroneckerState, stats: Any, grad_layers: Mapping[str, Mapping]
) -> dict[str, LayerStats]:
    """The layers to precondition: those in ``stats``, validated against state and grads."""
    active = {}
    for name, st in iter_layer_stats(stats):
        layer = state.layers.get(name)
        if layer is None:
            raise ValueError(
                f"tekfax: stats has layer '{name}' but the optimizer state does not; call "
                "opt.init on the same params tree the model is applied with."
            )
        shape = (layer.factor_in.shape[0], layer.factor_out.shape[0])
        if (st.meta.d_in, st.meta.d_out) != shape:
            raise ValueError(
                f"tekfax: layer '{name}' has (d_in, d_out) = {(st.meta.d_in, st.meta.d_out)} in "
                f"its stats but {shape} in the optimizer state."
            )
        if name not in grad_layers or ("bias" in grad_layers[name]) != st.meta.has_bias:
            raise ValueError(
                f"tekfax: the gradient tree has no kernel/bias dict matching layer '{name}'."
            )
        kernel = grad_layers[name]["kernel"]
        grad_shape = (math.prod(kernel.shape[:-1]) + int(st.meta.has_bias), kernel.shape[-1])
        if grad_shape != shape:
            raise ValueError(
                f"tekfax: layer '{name}' has a gradient (updates) of (d_in, d_out) = {grad_shape} "
                f"but {shape} in the optimizer state; pass the gradients of the params that "
                "opt.init was called with."
            )
        active[name] = st
    if not active:
        raise ValueError(
            "tekfax: stats holds no layer statistics; pass stats=out.stats from "
            "tekfax.loss_and_curvature on a model with nn.Dense / nn.Conv layers."
        )
    return active


def scale_by_kronecker(
    *,
    estimator: str = "kfac",
    eigen_corrected: bool = False,
    damping: float | jax.Array | None = None,
    nu: float | jax.Array | None = None,
    pi_adjusted: bool = False,
    ema: float = 0.95,
    rescale_ema: float = 0.95,
    curvature_every: int = 10,
    eigen_every: int = 100,
    rescale_every: int = 10,
    conv_rescale: str = "per_example",
    norm_constraint: float | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    eigen_mesh: jax.sharding.Mesh | None = None,
    eigen_axis: str = "data",
) -> optax.GradientTransformationExtraArgs:
    """Kronecker-factored natural-gradient preconditioner P(grad) (ALGORITHMS.md s. 2-5).

    The four presets fix ``estimator`` and ``eigen_corrected``: KFAC ("kfac", False), EKFAC
    ("kfac", True), TKFAC ("tkfac", False), TEKFAC ("tkfac", True).

    Args:
      estimator: ``"kfac"`` (factors A, G) or ``"tkfac"`` (trace-restricted moments).
      eigen_corrected: re-scale in the factors' eigenbasis with S (EKFAC/TEKFAC).
      damping: lambda. Factored damping for KFAC/TKFAC, S + lambda for EKFAC/TEKFAC.
        Required unless ``nu`` is given.
      nu: None for fixed/factored damping; a float selects the trace-adaptive CNN rule
        (TKFAC_new Eq. 15-16; TEKFAC Eq. 3.5 on S for EKFAC/TEKFAC; for KFAC the TKFAC_new
        rule on A (x) G = (tr A tr G)(A / tr A) (x) (G / tr G)), in which ``damping`` is
        not used.
      pi_adjusted: KFAC only: split sqrt(lambda) between A and G by pi (s. 4).
      ema: factor decay eps of the bias-corrected moving averages.
      rescale_ema: decay of S (not bias-corrected; re-initialised at each refresh).
      curvature_every: update the factors every this many steps (T_FIM).
      eigen_every: eigendecompose every this many steps (T_INV), always on step 0.
      rescale_every: update S every this many steps, and on every refresh.
      conv_rescale: ``"per_example"`` (exact) or ``"per_location"`` (diag(Q^T F1 Q)).
      norm_constraint: kappa of the KL clip, or None.
      learning_rate: alpha, used only by ``norm_constraint`` (a schedule is evaluated at
        the step count); None means 1.
      eigen_mesh: None (default) decomposes every factor on every device. A
        ``jax.sharding.Mesh`` spreads each refresh's eigendecompositions over the devices of
        its axis ``eigen_axis``: each device decomposes a share of the same-shaped factors
        and the results are all-gathered, so the per-device refresh cost falls as devices
        are added (KAISA). Same results as None; a one-device axis is a no-op.
      eigen_axis: the mesh axis ``eigen_mesh`` spreads the work over (the data axis).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``stats=``.

    Example:
      >>> opt = tekfax.scale_by_kronecker(estimator="tkfac", eigen_corrected=True,
      ...                                 damping=1e-3)
      >>> state = opt.init(params)  # doctest: +SKIP
      >>> p_grad, state = opt.update(grads, state, stats=out.stats)  # doctest: +SKIP

    References:
      Martens & Grosse 2015 (https://arxiv.org/abs/1503.05671); George et al. 2018
      (https://arxiv.org/abs/1806.03884); Gao et al. 2021 (https://arxiv.org/abs/2011.10741);
      Gao et al. (https://arxiv.org/abs/2011.13609).
    """
    check_choice("estimator", estimator, curvature.ESTIMATORS)
    check_choice("conv_rescale", conv_rescale, rescale.CONV_RESCALE)
    check_bool("eigen_corrected", eigen_corrected)
    check_bool("pi_adjusted", pi_adjusted)
    if damping is None and nu is None:
        raise ValueError("tekfax: damping is required (or pass nu for trace-adaptive damping).")
    if pi_adjusted and (estimator != "kfac" or eigen_corrected):
        raise ValueError("tekfax: pi_adjusted applies to KFAC's factored damping only.")
    check_number("damping", damping, 0.0, low_inclusive=False)
    check_number("nu", nu, 0.0, low_inclusive=False)
    check_number("norm_constraint", norm_constraint, 0.0, low_inclusive=False)
    check_number("ema", ema, 0.0, 1.0, allow_none=False)
    check_number("rescale_ema", rescale_ema, 0.0, 1.0, allow_none=False)
    for name, value in (
        ("curvature_every", curvature_every),
        ("eigen_every", eigen_every),
        ("rescale_every", rescale_every),
    ):
        check_interval(name, value)
    check_learning_rate("learning_rate", learning_rate, allow_none=True)
    if eigen_mesh is not None and eigen_axis not in eigen_mesh.axis_names:
        raise ValueError(
            f"tekfax: eigen_axis {eigen_axis!r} is not an axis of eigen_mesh "
            f"{tuple(eigen_mesh.axis_names)}."
        )
    tkfac = estimator == "tkfac"

    def init_fn(params: Any) -> ScaleByKroneckerState:
        layers = {}
        for name, layer in find_layers(params):
            kernel = layer["kernel"]
            dtype = stat_dtype(kernel.dtype)
            d_out = kernel.shape[-1]
            d_in = math.prod(kernel.shape[:-1]) + int("bias" in layer)
            layers[name] = LayerCurvature(
                factor_in=jnp.zeros((d_in, d_in), dtype),
                factor_out=jnp.zeros((d_out, d_out), dtype),
                q_in=jnp.eye(d_in, dtype=dtype),
                eig_in=jnp.zeros((d_in,), dtype),
                q_out=jnp.eye(d_out, dtype=dtype),
                eig_out=jnp.zeros((d_out,), dtype),
                delta=jnp.zeros((), dtype) if tkfac else None,
                rescale=jnp.zeros((d_in, d_out), dtype) if eigen_corrected else None,
                damped=jnp.ones((d_in, d_out), dtype),
            )
        if not layers:
            raise ValueError(
                "tekfax: params contain no Dense/Conv layer (a dict holding a 'kernel' of rank "
                ">= 2 and optionally a 'bias'); there is nothing to precondition."
            )
        return ScaleByKroneckerState(
            count=jnp.zeros([], jnp.int32),
            # In the statistics' precision, so estimate = factor / weight is exact (section 3).
            ema_weight=jnp.zeros([], jnp.result_type(*(v.factor_in for v in layers.values()))),
            layers=layers,
            needs_stats=jnp.ones([], jnp.bool_),
        )

    def update_fn(updates, state, params=None, *, stats=None, **extra_args):
        del params, extra_args
        if stats is None:
            raise ValueError(MISSING_STATS)
        if not isinstance(state, ScaleByKroneckerState):
            raise TypeError(
                "tekfax: state must be the ScaleByKroneckerState from this transformation's "
                f"init, got {type(state).__name__}."
            )
        grad_layers = dict(find_layers(updates))
        active = _active_layers(state, stats, grad_layers)
        old = {name: state.layers[name] for name in active}
        dtypes = {k: v.factor_in.dtype for k, v in old.items()}

        count = state.count
        do_curvature, do_eigen, do_rescale = _schedule(count)

        # 1. Curvature estimate (section 2-3). A batch whose factors are not finite (NaN
        # inputs, overflow) is left out of the moving averages, weight included. Layer
        # matrices are built inside the branches that use them, never otherwise.
        def old_factors():
            return {k: (v.factor_in, v.factor_out) for k, v in old.items()}, jnp.array(False)

        def new_factors():
            batch, finite = {}, []
            for k, st in active.items():
                batch[k] = _layer_sum(
                    functools.partial(curvature.batch_factors, estimator),
                    st,
                    dtypes[k],
                    _factor_elements(st),
                )
                finite.extend(jnp.all(jnp.isfinite(f)) for f in batch[k])
            ok = jnp.all(jnp.stack(finite))
            previous, _ = old_factors()
            out = {
                k: tuple(
                    jnp.where(ok, curvature.ema(f_old, f_new, ema), f_old)
                    for f_old, f_new in zip(previous[k], batch[k], strict=True)
                )
                for k in active
            }
            return out, ok

        factors, accepted = lax.cond(do_curvature, new_factors, old_factors)
        weight = jnp.where(accepted, curvature.ema(state.ema_weight, 1.0, ema), state.ema_weight)

        # 2. Eigenbasis refresh (section 3).
        def refresh():
            estimates = {}
            for k, (f_in, f_out) in factors.items():
                # w is 0 only while no batch was accepted, and then the factors are 0 too.
                w = jnp.where(weight > 0, weight, 1.0).astype(f_in.dtype)
                estimates[k, "in"], estimates[k, "out"] = f_in / w, f_out / w
            decomposed = eigenbasis.eigh_psd_grouped(estimates, eigen_mesh, eigen_axis)
            out = {}
            for k in factors:
                (eig_in, q_in), (eig_out, q_out) = decomposed[k, "in"], decomposed[k, "out"]
                delta = jnp.trace(estimates[k, "in"]) if tkfac else None
                out[k] = (q_in, eig_in, q_out, eig_out, delta)
            return out

        basis = lax.cond(
            do_eigen,
            refresh,
            lambda: {k: (v.q_in, v.eig_in, v.q_out, v.eig_out, v.delta) for k, v in old.items()},
        )

        # 3. Rescale (section 2-3): S re-initialised to the un-corrected diagonal on refresh.
        def new_rescale():
            out = {}
            for k, st in active.items():
                q_in, eig_in, q_out, eig_out, delta = basis[k]
                per_example = rescale.elements_per_example(
                    st.out_grads.shape[0],
                    locations(st.out_grads),
                    st.meta.d_in,
                    st.meta.d_out,
                    conv_rescale,
                )
                s_batch = _layer_sum(
                    lambda a, u, q_in=q_in, q_out=q_out: rescale.batch_rescale(
                        a, u, q_in, q_out, conv_rescale
                    ),
                    st,
                    dtypes[k],
                    per_example,
                )
                s_init = curvature.eigen_diagonal(eig_in, eig_out, delta)
                base = jnp.where(do_eigen, s_init, old[k].rescale)
                # A non-finite S_batch is left out, like a non-finite factor batch.
                finite = jnp.all(jnp.isfinite(s_batch))
                out[k] = jnp.where(finite, curvature.ema(base, s_batch, rescale_ema), base)
            return out

        if eigen_corrected:
            s = lax.cond(do_rescale, new_rescale, lambda: {k: v.rescale for k, v in old.items()})
        else:
            s = {k: None for k in old}

        # 4. Damping (section 4).
        damped = _damped_eigenvalues(basis, s, active)

        # 5. Preconditioning (section 5).
        grads = {k: grad_matrix(grad_layers[k], dtypes[k]) for k in active}
        pre = {
            k: precondition.precondition(grads[k], basis[k][0], basis[k][2], damped[k])
            for k in active
        }
        if norm_constraint is not None:
            lr = (
                learning_rate(count)
                if callable(learning_rate)
                else (1.0 if learning_rate is None else learning_rate)
            )
            scale = precondition.norm_constraint_scale(pre, grads, norm_constraint, lr)
            pre = {k: v * scale.astype(v.dtype) for k, v in pre.items()}

        new_layers = dict(state.layers)
        for k in active:
            q_in, eig_in, q_out, eig_out, delta = basis[k]
            new_layers[k] = LayerCurvature(
                factor_in=factors[k][0],
                factor_out=factors[k][1],
                q_in=q_in,
                eig_in=eig_in,
                q_out=q_out,
                eig_out=eig_out,
                delta=delta,
                rescale=s[k],
                damped=damped[k],
            )
        new_updates = _replace_layers(
            updates, {k: matrix_to_grads(pre[k], grad_layers[k]) for k in active}
        )
        next_count = optax.safe_int32_increment(count)
        new_state = ScaleByKroneckerState(
            count=next_count,
            ema_weight=weight,
            layers=new_layers,
            needs_stats=_consumes_stats(next_count),
        )
        return new_updates, new_state

    def _schedule(count: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(factor update, eigenbasis refresh, S update) due at step ``count`` (section 3)."""
        do_eigen = count % eigen_every == 0
        return count % curvature_every == 0, do_eigen, do_eigen | (count % rescale_every == 0)

    def _consumes_stats(count: jax.Array) -> jax.Array:
        do_curvature, _, do_rescale = _schedule(count)
        return do_curvature | (do_rescale if eigen_corrected else False)

    def _unit_trace(q_in, eig_in, q_out, eig_out, delta):
        """Eigenvalues of the unit-trace factors and the trace scale delta of the block.

        TKFAC: Phi = M_Phi / delta, Psi = M_Psi / delta. KFAC (tekfax's extension of the
        trace-adaptive rule): A (x) G = (tr A tr G) (A / tr A) (x) (G / tr G).
        """
        del q_in, q_out
        if tkfac:
            return (
                damping_rules.safe_div(eig_in, delta),
                damping_rules.safe_div(eig_out, delta),
                delta,
            )
        tr_in, tr_out = jnp.sum(eig_in), jnp.sum(eig_out)
        return (
            damping_rules.safe_div(eig_in, tr_in),
            damping_rules.safe_div(eig_out, tr_out),
            tr_in * tr_out,
        )

    def _damped_eigenvalues(basis, s, active) -> dict[str, jax.Array]:
        if nu is not None:  # Trace-adaptive rules need delta of every layer first.
            if eigen_corrected:
                deltas = {k: jnp.sum(s[k]) for k in active}
            else:
                deltas = {k: _unit_trace(*basis[k])[2] for k in active}
            tilde = damping_rules.adaptive_deltas(
                deltas, {k: st.meta.is_conv for k, st in active.items()}, nu
            )
        out = {}
        for k in active:
            q_in, eig_in, q_out, eig_out, delta = basis[k]
            if eigen_corrected and nu is None:
                out[k] = damping_rules.rescale_fixed(s[k], damping)
            elif eigen_corrected:
                out[k] = damping_rules.rescale_trace(s[k], tilde[k])
            elif nu is not None:
                phi, psi, _ = _unit_trace(*basis[k])
                out[k] = damping_rules.trace_adaptive_factored(phi, psi, tilde[k])
            elif tkfac:
                out[k] = damping_rules.tkfac_normal(eig_in, eig_out, delta, damping)
            else:
                pi = jnp.where(pi_adjusted, damping_rules.pi_factor(eig_in, eig_out), 1.0)
                out[k] = damping_rules.factored(eig_in, eig_out, damping, pi)
            out[k] = out[k].astype(eig_in.dtype)
        return out

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
