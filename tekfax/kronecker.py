"""``scale_by_kronecker``: the shared pipeline behind KFAC, EKFAC, TKFAC and TEKFAC.

One update is five stages, each a pure function over named per-layer state:

1. curvature estimate (:func:`tekfax.curvature.moving_average`): factor moving averages,
   every ``curvature_every`` steps, rejecting a non-finite batch (docs/algorithms.md, s. 3);
2. eigenbasis refresh (:func:`tekfax.eigenbasis.refresh`): every ``eigen_every`` steps and
   on step 0 (section 3);
3. rescale (:func:`tekfax.rescale.update`, EKFAC/TEKFAC): S, every ``rescale_every`` steps
   and on every refresh, re-initialised to the un-corrected diagonal at each refresh
   (sections 2-3);
4. damping (:func:`tekfax.damping.choose_rule`): the damped eigenvalues D, every step, so
   damping and nu can be changed by ``optax.inject_hyperparams``, a schedule or adaptive
   damping at any time (section 4), after the relative floor raises them (section 9);
   KFAC/TKFAC (factored D): the damped inverse factors
   (:func:`tekfax.precondition.damped_inverses`), recomputed only on a refresh or when D
   differs from theirs beyond rounding, else the cached ones and their D (section 5);
5. preconditioning of every tagged layer, with the optional norm constraint (section 5):
   KFAC/TKFAC with the inverse factors (:func:`tekfax.precondition.precondition_factored`,
   2 matrix products), EKFAC/TEKFAC in the eigenbasis
   (:func:`tekfax.precondition.precondition_layers`, 4); parameters that are not tagged
   layers pass through unchanged.

Periodic stages run under ``lax.cond`` on the step count, so one compiled update serves every
step. Non-finite gradients make no stage due and keep the count, so such a step leaves the
state as it was (docs/algorithms.md, section 9).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tekfax import curvature, eigenbasis, precondition, rescale
from tekfax import damping as damping_rules
from tekfax.capture import LayerStats, iter_layer_stats
from tekfax.conditional import cond
from tekfax.curvature import Factors, all_finite
from tekfax.damping import FactoredDamping
from tekfax.eigenbasis import Eigenbasis
from tekfax.hyperparams import Hyperparams, takes_hyperparams
from tekfax.layers import find_layers, fits, layer_dims, replace_layers
from tekfax.patches import grad_matrix, locations, matrix_to_grads, sum_over_examples
from tekfax.precondition import DampedInverses
from tekfax.states import find_outermost
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
        block is (Q_in (x) Q_out) diag(vec D) (Q_in (x) Q_out)^T. KFAC/TKFAC: the D of the
        cached inverse factors (within rounding of this step's rule, docs/algorithms.md,
        section 5).
      peak_mean: the largest mean eigenvalue tr(F_hat)/dim the layer's undamped block has
        had (:func:`tekfax.damping.block_mean`), the scale of the relative damping floor.
      inv_in, inv_out: KFAC/TKFAC only, the cached damped inverse factors Q_in diag(1/d_in)
        Q_in^T, (d_in, d_in), and Q_out diag(1/d_out) Q_out^T, (d_out, d_out), of the
        factored D = outer(d_in, d_out) (docs/algorithms.md, section 5); else None.

    The fields stay flat (checkpoints depend on the layout); :attr:`factors`, :attr:`basis`
    and :attr:`inverses` give the stages' named views.
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
    peak_mean: jax.Array
    inv_in: jax.Array | None
    inv_out: jax.Array | None

    @property
    def factors(self) -> Factors:
        """The running factor sums as a :class:`tekfax.curvature.Factors`."""
        return Factors(self.factor_in, self.factor_out)

    @property
    def basis(self) -> Eigenbasis:
        """The eigenbasis of the last refresh as a :class:`tekfax.eigenbasis.Eigenbasis`."""
        return Eigenbasis(self.q_in, self.eig_in, self.q_out, self.eig_out, self.delta)

    @property
    def inverses(self) -> DampedInverses | None:
        """The cached inverse factors as a :class:`tekfax.precondition.DampedInverses`."""
        return None if self.inv_in is None else DampedInverses(self.inv_in, self.inv_out)


def _layer_state(
    factors: Factors,
    basis: Eigenbasis,
    s: jax.Array | None,
    damped: jax.Array,
    peak: jax.Array,
    inverses: DampedInverses | None,
) -> LayerCurvature:
    return LayerCurvature(
        factor_in=factors.inp,
        factor_out=factors.out,
        q_in=basis.q_in,
        eig_in=basis.eig_in,
        q_out=basis.q_out,
        eig_out=basis.eig_out,
        delta=basis.delta,
        rescale=s,
        damped=damped,
        peak_mean=peak,
        inv_in=None if inverses is None else inverses.inp,
        inv_out=None if inverses is None else inverses.out,
    )


class ScaleByKroneckerState(NamedTuple):
    """State of :func:`scale_by_kronecker`.

    Attributes:
      count: number of updates so far (int32).
      ema_weight: bias-correction weight w of the factor moving averages
        (docs/algorithms.md, section 3).
      layers: ``LayerCurvature`` per tagged layer, keyed by its ``/``-joined params path.
      needs_stats: whether the next update consumes the statistics (a factor, or for
        EKFAC/TEKFAC an S, update is due); see :func:`stats_needed`.
    """

    count: jax.Array
    ema_weight: jax.Array
    layers: dict[str, LayerCurvature]
    needs_stats: jax.Array


def find_kronecker_state(opt_state: Any) -> ScaleByKroneckerState:
    """The outermost ``ScaleByKroneckerState`` inside an optimizer state.

    The state may be the transformation's own or contain it (a chain, a guard,
    ``optax.inject_hyperparams``).

    Example:
      >>> from tekfax.kronecker import find_kronecker_state
      >>> opt_state = tekfax.tekfac(learning_rate=1e-3, damping=1e-3).init(params)
      >>> int(find_kronecker_state(opt_state).count)
      0
    """
    return find_outermost(
        opt_state,
        ScaleByKroneckerState,
        missing="tekfax: opt_state holds no tekfax Kronecker state; pass the state of a tekfax "
        "optimizer (tekfax.kfac, ekfac, tkfac, tekfac or scale_by_*).",
    )


def stats_needed(opt_state: Any) -> jax.Array:
    """Whether the next ``update`` of this optimizer state reads ``stats`` (a bool array).

    Pass it as ``compute_stats=`` to :func:`tekfax.loss_and_curvature` to skip the
    sampled-label backward pass on steps where the statistics would be ignored. Step 0
    always needs them; with ``curvature_every=rescale_every=10`` step 1 does not.

    Example:
      >>> opt = tekfax.tekfac(learning_rate=1e-3, damping=1e-3)
      >>> opt_state = opt.init(params)
      >>> bool(tekfax.stats_needed(opt_state))
      True
      >>> updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
      >>> bool(tekfax.stats_needed(opt_state))
      False
      >>> out = tekfax.loss_and_curvature(logits_fn, params, y, rng=rng,
      ...                                 compute_stats=tekfax.stats_needed(opt_state))
    """
    return find_kronecker_state(opt_state).needs_stats


def _layer_sum(fn, st: LayerStats, dtype: jnp.dtype, per_example: int):
    """``fn(a, u)`` over the layer's batch, streamed in chunks (bounded memory)."""
    return sum_over_examples(fn, st.inputs, st.out_grads, st.meta, dtype, per_example)


def _factor_elements(st: LayerStats) -> int:
    """Elements the factor products hold per example: the layer matrices a and u.

    The same under ``positions="reduce"``: each chunk builds a and u (im2col included)
    before reducing them over positions, and the reduced pair is T times smaller.
    """
    return locations(st.out_grads) * (st.meta.d_in + st.out_grads.shape[0] * st.meta.d_out)


def _check_layer(name: str, st: LayerStats, layer: Any, grad_layers: Mapping) -> None:
    """Raises when a layer's stats do not match its state or its gradient."""
    if layer is None:
        raise ValueError(
            f"tekfax: stats has layer '{name}' but the optimizer state does not; call "
            "opt.init on the same params tree the model is applied with."
        )
    shape = (layer.factor_in.shape[0], layer.factor_out.shape[0])
    if (st.meta.d_in, st.meta.d_out) != shape:
        raise ValueError(
            f"tekfax: layer '{name}' multiplies its kernel as (d_in, d_out) = "
            f"{(st.meta.d_in, st.meta.d_out)} but the optimizer state has {shape}, read from "
            "the kernel's shape. A bias-free kernel with several output axes is ambiguous: "
            "pass layer_dims=tekfax.layer_dims(logits_fn, params) to the optimizer."
        )
    if name not in grad_layers or ("bias" in grad_layers[name]) != st.meta.has_bias:
        raise ValueError(
            f"tekfax: the gradient tree has no kernel/bias dict matching layer '{name}'."
        )
    if not fits(grad_layers[name], shape):
        raise ValueError(
            f"tekfax: layer '{name}' has a gradient (updates) with kernel shape "
            f"{tuple(grad_layers[name]['kernel'].shape)}, not the (d_in, d_out) = {shape} "
            "matrix of the optimizer state; pass the gradients of the params that opt.init "
            "was called with."
        )


def _active_layers(
    state: ScaleByKroneckerState, stats: Any, grad_layers: Mapping[str, Mapping]
) -> dict[str, LayerStats]:
    """The layers to precondition: those in ``stats``, validated against state and grads."""
    active = {}
    for name, st in iter_layer_stats(stats):
        _check_layer(name, st, state.layers.get(name), grad_layers)
        active[name] = st
    if not active:
        raise ValueError(
            "tekfax: stats holds no layer statistics; pass stats=out.stats from "
            "tekfax.loss_and_curvature on a model with supported layers (tekfax.modules)."
        )
    return active


def _check_hyperparams(estimator: str, eigen_corrected: bool, hp: Hyperparams) -> None:
    """Raises a clear error, naming the argument, for every invalid hyperparameter."""
    check_choice("estimator", estimator, curvature.ESTIMATORS)
    check_choice("conv_rescale", hp.conv_rescale, rescale.CONV_RESCALE)
    check_choice("positions", hp.positions, curvature.POSITIONS)
    check_bool("eigen_corrected", eigen_corrected)
    check_bool("pi_adjusted", hp.pi_adjusted)
    if hp.damping is None and hp.nu is None:
        raise ValueError("tekfax: damping is required (or pass nu for trace-adaptive damping).")
    if hp.pi_adjusted and (estimator != "kfac" or eigen_corrected):
        raise ValueError("tekfax: pi_adjusted applies to KFAC's factored damping only.")
    check_number("damping", hp.damping, 0.0, low_inclusive=False)
    check_number("nu", hp.nu, 0.0, low_inclusive=False)
    check_number("norm_constraint", hp.norm_constraint, 0.0, low_inclusive=False)
    check_number("damping_floor", hp.damping_floor, 0.0, allow_none=False)
    check_number("ema", hp.ema, 0.0, 1.0, allow_none=False)
    check_number("rescale_ema", hp.rescale_ema, 0.0, 1.0, allow_none=False)
    for name in ("curvature_every", "eigen_every", "rescale_every"):
        check_interval(name, getattr(hp, name))
    check_learning_rate("learning_rate", hp.learning_rate, allow_none=True)
    mesh = hp.eigen_mesh
    if mesh is not None and hp.eigen_axis not in mesh.axis_names:
        raise ValueError(
            f"tekfax: eigen_axis {hp.eigen_axis!r} is not an axis of eigen_mesh "
            f"{tuple(mesh.axis_names)}."
        )


class _Pipeline(NamedTuple):
    """What one ``scale_by_kronecker`` fixes at construction."""

    estimator: str
    eigen_corrected: bool
    hp: Hyperparams
    damping_rule: damping_rules.DampingRule
    factored_rule: damping_rules.FactoredRule | None

    @property
    def tkfac(self) -> bool:
        return self.estimator == "tkfac"


def _init_layer(name: str, layer: Mapping, pipe: _Pipeline) -> LayerCurvature:
    """Zero factors, identity bases, zero S, D = 1 and identity inverses for one kernel."""
    dtype = stat_dtype(layer["kernel"].dtype)
    d_in, d_out = _dims(name, layer, pipe.hp.layer_dims)
    return LayerCurvature(
        factor_in=jnp.zeros((d_in, d_in), dtype),
        factor_out=jnp.zeros((d_out, d_out), dtype),
        q_in=jnp.eye(d_in, dtype=dtype),
        eig_in=jnp.zeros((d_in,), dtype),
        q_out=jnp.eye(d_out, dtype=dtype),
        eig_out=jnp.zeros((d_out,), dtype),
        delta=jnp.zeros((), dtype) if pipe.tkfac else None,
        rescale=jnp.zeros((d_in, d_out), dtype) if pipe.eigen_corrected else None,
        damped=jnp.ones((d_in, d_out), dtype),
        peak_mean=jnp.zeros((), dtype),
        inv_in=None if pipe.factored_rule is None else jnp.eye(d_in, dtype=dtype),
        inv_out=None if pipe.factored_rule is None else jnp.eye(d_out, dtype=dtype),
    )


def _dims(name: str, layer: Mapping, given: Mapping | None) -> tuple[int, int]:
    """(d_in, d_out) of a layer: from ``layer_dims`` when it names the layer, else the shapes."""
    if not given or name not in given:
        return layer_dims(layer)
    d_in, d_out = (int(d) for d in given[name])
    if not fits(layer, (d_in, d_out)):
        raise ValueError(
            f"tekfax: layer_dims gives layer '{name}' (d_in, d_out) = {(d_in, d_out)}, which "
            f"does not fit its kernel {tuple(layer['kernel'].shape)}"
            + (f" and bias {tuple(layer['bias'].shape)}." if "bias" in layer else ".")
        )
    return d_in, d_out


def _init(params: Any, pipe: _Pipeline) -> ScaleByKroneckerState:
    found = find_layers(params)
    unknown = set(pipe.hp.layer_dims or ()) - set(found)
    if unknown:
        raise ValueError(
            f"tekfax: layer_dims names {sorted(unknown)}, which are not layers of the params "
            f"(layers: {sorted(found)})."
        )
    layers = {name: _init_layer(name, layer, pipe) for name, layer in found.items()}
    if not layers:
        raise ValueError(
            "tekfax: params contain no layer (a node holding a 'kernel' of rank >= 2 and "
            "optionally a 'bias'); there is nothing to precondition."
        )
    return ScaleByKroneckerState(
        count=jnp.zeros([], jnp.int32),
        # In the statistics' precision, so estimate = factor / weight is exact (section 3).
        ema_weight=jnp.zeros([], jnp.result_type(*(v.factor_in for v in layers.values()))),
        layers=layers,
        needs_stats=jnp.ones([], jnp.bool_),
    )


class Due(NamedTuple):
    """Which periodic stages run at one step (docs/algorithms.md, section 3)."""

    curvature: jax.Array
    eigen: jax.Array
    rescale: jax.Array


def schedule(count: jax.Array, hp: Hyperparams) -> Due:
    """The stages due at step ``count``: every ``*_every`` steps, all of them on step 0.

    A refresh also updates S, which is re-initialised in the new basis.

    Example:
      >>> from tekfax.hyperparams import Hyperparams
      >>> from tekfax.kronecker import schedule
      >>> due = schedule(jnp.array(20), Hyperparams(curvature_every=10, eigen_every=100))
      >>> bool(due.curvature), bool(due.eigen), bool(due.rescale)
      (True, False, True)
    """
    do_eigen = count % hp.eigen_every == 0
    return Due(
        count % hp.curvature_every == 0, do_eigen, do_eigen | (count % hp.rescale_every == 0)
    )


def _consumes_stats(count: jax.Array, pipe: _Pipeline) -> jax.Array:
    due = schedule(count, pipe.hp)
    return due.curvature | (due.rescale if pipe.eigen_corrected else False)


def _batch_factors(
    active: Mapping[str, LayerStats],
    dtypes: Mapping[str, jnp.dtype],
    estimator: str,
    positions: str,
) -> dict[str, Factors]:
    """Each layer's factors of this batch (sections 2 and 11), streamed over its examples.

    With ``positions="reduce"`` each chunk's layer matrices are reduced over positions
    (:func:`tekfax.curvature.reduce_positions`) before their outer products.
    """
    fn = functools.partial(curvature.batch_factors, estimator, positions=positions)
    return {k: _layer_sum(fn, st, dtypes[k], _factor_elements(st)) for k, st in active.items()}


def _estimate_curvature(
    old: Mapping[str, LayerCurvature],
    active: Mapping[str, LayerStats],
    weight: jax.Array,
    due: Due,
    pipe: _Pipeline,
) -> tuple[dict[str, Factors], jax.Array]:
    """Stage 1 under ``lax.cond``: the factor sums and the weight w after this step.

    The layer matrices are built inside the branch that uses them, never otherwise.
    """
    dtypes = {k: v.factor_in.dtype for k, v in old.items()}
    previous = {k: v.factors for k, v in old.items()}
    factors, accepted = cond(
        due.curvature,
        lambda: curvature.moving_average(
            previous,
            _batch_factors(active, dtypes, pipe.estimator, pipe.hp.positions),
            pipe.hp.ema,
        ),
        lambda: (previous, jnp.array(False)),
    )
    return factors, curvature.ema_weight(weight, accepted, pipe.hp.ema)


def _refresh_eigenbasis(
    old: Mapping[str, LayerCurvature],
    factors: Mapping[str, Factors],
    weight: jax.Array,
    due: Due,
    pipe: _Pipeline,
) -> dict[str, Eigenbasis]:
    """Stage 2 under ``lax.cond``: new eigenbases on refresh steps, else the old ones."""

    def refresh():
        estimates = {k: curvature.estimate(f, weight) for k, f in factors.items()}
        return eigenbasis.refresh(estimates, pipe.tkfac, pipe.hp.eigen_mesh, pipe.hp.eigen_axis)

    return cond(due.eigen, refresh, lambda: {k: v.basis for k, v in old.items()})


def _batch_rescale(st: LayerStats, basis: Eigenbasis, dtype: jnp.dtype, mode: str) -> jax.Array:
    """S_batch of one layer (section 2), streamed over its examples."""
    per_example = rescale.elements_per_example(
        st.out_grads.shape[0], locations(st.out_grads), st.meta.d_in, st.meta.d_out, mode
    )

    def fn(a, u):
        return rescale.batch_rescale(a, u, basis.q_in, basis.q_out, mode)

    return _layer_sum(fn, st, dtype, per_example)


def _update_rescale(
    old: Mapping[str, LayerCurvature],
    active: Mapping[str, LayerStats],
    bases: Mapping[str, Eigenbasis],
    due: Due,
    pipe: _Pipeline,
) -> dict[str, jax.Array | None]:
    """Stage 3 under ``lax.cond`` (EKFAC/TEKFAC): S after this step; None otherwise."""
    if not pipe.eigen_corrected:
        return {k: None for k in old}
    hp = pipe.hp

    def new_rescale():
        return {
            k: rescale.update(
                old[k].rescale,
                _batch_rescale(st, bases[k], old[k].factor_in.dtype, hp.conv_rescale),
                bases[k],
                due.eigen,
                hp.rescale_ema,
            )
            for k, st in active.items()
        }

    return cond(due.rescale, new_rescale, lambda: {k: v.rescale for k, v in old.items()})


def _learning_rate_at(learning_rate: optax.ScalarOrSchedule | None, count: jax.Array):
    """alpha at step ``count`` for the norm constraint: a schedule is evaluated, None is 1."""
    if callable(learning_rate):
        return learning_rate(count)
    return 1.0 if learning_rate is None else learning_rate


def _check_update_args(state: Any, stats: Any) -> None:
    if stats is None:
        raise ValueError(MISSING_STATS)
    if not isinstance(state, ScaleByKroneckerState):
        raise TypeError(
            "tekfax: state must be the ScaleByKroneckerState from this transformation's "
            f"init, got {type(state).__name__}."
        )


def _damping(
    hp: Hyperparams, damping: Any, peak: Mapping[str, jax.Array], dims: Mapping[str, int]
) -> tuple[Any, Any]:
    """(lambda, nu) per layer, raised to the relative floor (docs/algorithms.md, section 9).

    Fixed damping: lambda = max(damping, r peak). Trace-adaptive rules: their lower bound on
    delta becomes max(nu, r peak dim), dim the block's size (peak dim is the peak trace).
    """
    damping = hp.damping if damping is None else damping
    if hp.nu is not None:
        nu = {
            k: damping_rules.floored(hp.nu, p * dims[k], hp.damping_floor) for k, p in peak.items()
        }
        return damping, nu
    return {k: damping_rules.floored(damping, p, hp.damping_floor) for k, p in peak.items()}, None


DAMPING_ULPS = 16
"""A D within this many units in the last place of the cached inverses' D keeps them."""


def _unchanged(new: jax.Array, old: jax.Array) -> jax.Array:
    """|new - old| <= DAMPING_ULPS eps |old| everywhere; False if ``new`` is not finite.

    Not an exact comparison: XLA may compute the same D with different rounding in different
    fusions (a fused multiply-add in one, not in the other), off by an ulp or two.
    """
    tol = DAMPING_ULPS * jnp.finfo(old.dtype).eps
    return jnp.all(jnp.abs(new - old) <= tol * jnp.abs(old))


def _edges(damped: jax.Array) -> tuple[jax.Array, jax.Array]:
    """D's first column and first row: a factored D = outer(d_in, d_out) is fixed by them."""
    return damped[:, 0], damped[0, :]


def _pair_edges(pair: FactoredDamping, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """The edges of outer(pair) (:func:`_edges`) in O(d_in + d_out), clamped as D is."""
    return (
        damping_rules.clamped(pair.inp * pair.out[0], dtype),
        damping_rules.clamped(pair.inp[0] * pair.out, dtype),
    )


def _cached_inverses(
    old: Mapping[str, LayerCurvature],
    bases: Mapping[str, Eigenbasis],
    due: Due,
    rule_args: tuple,
    pipe: _Pipeline,
) -> tuple[dict[str, jax.Array], dict[str, DampedInverses | None]]:
    """Stage 4 (docs/algorithms.md, sections 4-5): (D applied, damped inverse factors).

    Eigen-corrected: this step's D and None for every layer. KFAC/TKFAC, under one
    ``lax.cond``: D and the inverses are recomputed for every layer on a refresh or when any
    layer's D differs from the cached inverses' D, the state's ``damped`` (a damping changed
    by ``inject_hyperparams``, a schedule, adaptive damping or the relative floor), beyond
    rounding (:data:`DAMPING_ULPS`); else the cached ones are kept, so a damping that drifts
    slowly is still caught once it has moved. The check compares D's first column and row
    (:func:`_edges`), which fix a factored D, so a step that keeps the cache builds and
    compares no (d_in, d_out) array: on the MNIST auto-encoder that took about 2 ms of a
    94 ms KFAC step (2-core CPU).
    """
    if pipe.factored_rule is None:
        return pipe.damping_rule(bases, *rule_args), {k: None for k in old}
    pairs = pipe.factored_rule(bases, *rule_args)
    unchanged = [
        _unchanged(new, was)
        for k in old
        for new, was in zip(
            _pair_edges(pairs[k], old[k].damped.dtype), _edges(old[k].damped), strict=True
        )
    ]
    changed = functools.reduce(jnp.logical_or, [~u for u in unchanged], due.eigen)

    def recompute():
        return pipe.damping_rule(bases, *rule_args), {
            k: precondition.damped_inverses(b, pairs[k]) for k, b in bases.items()
        }

    def reuse():
        return {k: v.damped for k, v in old.items()}, {k: v.inverses for k, v in old.items()}

    return cond(changed, recompute, reuse)


def _precondition(grads, bases, damped, inverses, pipe: _Pipeline, lr) -> dict[str, jax.Array]:
    """Stage 5: with the inverse factors (KFAC/TKFAC) or in the eigenbasis (section 5)."""
    if pipe.factored_rule is None:
        return precondition.precondition_layers(grads, bases, damped, pipe.hp.norm_constraint, lr)
    return precondition.precondition_factored(
        grads, bases, damped, inverses, pipe.hp.norm_constraint, lr
    )


def _update(
    updates: Any,
    state: ScaleByKroneckerState,
    stats: Any,
    pipe: _Pipeline,
    damping: jax.Array | float | None = None,
) -> tuple[Any, ScaleByKroneckerState]:
    """One update: the five stages in order (module docstring), then the new state.

    ``damping``, when given, replaces the hyperparameter (adaptive damping passes it).
    """
    _check_update_args(state, stats)
    grad_layers = find_layers(updates)
    active = _active_layers(state, stats, grad_layers)
    old = {name: state.layers[name] for name in active}
    # Non-finite gradients (section 9): no stage is due and the count stays, so the state
    # comes out as it went in and the update is not finite (tekfax.skip_non_finite drops it).
    accept = all_finite(updates)
    due = Due(*(flag & accept for flag in schedule(state.count, pipe.hp)))

    factors, weight = _estimate_curvature(old, active, state.ema_weight, due, pipe)
    bases = _refresh_eigenbasis(old, factors, weight, due, pipe)
    s = _update_rescale(old, active, bases, due, pipe)
    is_conv = {k: st.meta.is_conv for k, st in active.items()}
    peak = {
        k: jnp.maximum(old[k].peak_mean, damping_rules.block_mean(bases[k], s[k])) for k in active
    }
    dims = {k: old[k].damped.size for k in active}
    rule_args = (s, is_conv, *_damping(pipe.hp, damping, peak, dims))
    damped, inverses = _cached_inverses(old, bases, due, rule_args, pipe)
    grads = {
        k: grad_matrix(grad_layers[k], old[k].factor_in.dtype, old[k].factor_out.shape[0])
        for k in active
    }
    lr = _learning_rate_at(pipe.hp.learning_rate, state.count)
    pre = _precondition(grads, bases, damped, inverses, pipe, lr)

    layers = dict(state.layers)
    layers.update(
        {
            k: _layer_state(factors[k], bases[k], s[k], damped[k], peak[k], inverses[k])
            for k in active
        }
    )
    new_updates = replace_layers(
        updates, {k: matrix_to_grads(pre[k], grad_layers[k]) for k in active}
    )
    count = jnp.where(accept, optax.safe_int32_increment(state.count), state.count)
    return new_updates, ScaleByKroneckerState(count, weight, layers, _consumes_stats(count, pipe))


_KEYWORD = inspect.Parameter.KEYWORD_ONLY
_LEADING = [
    inspect.Parameter("estimator", _KEYWORD, default="kfac", annotation="str"),
    inspect.Parameter("eigen_corrected", _KEYWORD, default=False, annotation="bool"),
]
_LEADING_DOCS = {
    "estimator": '``"kfac"`` (factors A, G) or ``"tkfac"`` (trace-restricted moments).',
    "eigen_corrected": "re-scale in the factors' eigenbasis with S (EKFAC/TEKFAC).",
}


@takes_hyperparams(_LEADING, _LEADING_DOCS)
def scale_by_kronecker(
    hp: Hyperparams, *, estimator: str, eigen_corrected: bool
) -> optax.GradientTransformationExtraArgs:
    """Kronecker-factored natural-gradient preconditioner P(grad) (docs/algorithms.md, s. 2-5).

    The four presets fix ``estimator`` and ``eigen_corrected``: KFAC ("kfac", False), EKFAC
    ("kfac", True), TKFAC ("tkfac", False), TEKFAC ("tkfac", True). The update runs the
    stages listed in :mod:`tekfax.kronecker`.

    Args:
    {args}

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``stats=``.

    Example:
      >>> opt = tekfax.scale_by_kronecker(estimator="tkfac", eigen_corrected=True,
      ...                                 damping=1e-3)
      >>> opt_state = opt.init(params)
      >>> p_grad, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
      >>> p_grad["Dense_0"]["kernel"].shape, int(opt_state.count)
      ((4, 16), 1)

    References:
      Martens & Grosse 2015 (https://arxiv.org/abs/1503.05671); George et al. 2018
      (https://arxiv.org/abs/1806.03884); Gao et al. 2021 (https://arxiv.org/abs/2011.10741);
      Gao et al. (https://arxiv.org/abs/2011.13609).
    """
    _check_hyperparams(estimator, eigen_corrected, hp)
    args = (estimator, eigen_corrected, hp.nu is not None, hp.pi_adjusted)
    pipe = _Pipeline(
        estimator,
        eigen_corrected,
        hp,
        damping_rules.choose_rule(*args),
        damping_rules.choose_factored_rule(*args),
    )

    def update_fn(updates, state, params=None, *, stats=None, damping=None, **extra_args):
        del params, extra_args
        return _update(updates, state, stats, pipe, damping)

    return optax.GradientTransformationExtraArgs(functools.partial(_init, pipe=pipe), update_fn)
