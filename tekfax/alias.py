"""Presets (``scale_by_kfac`` ...) and full optimizers (``kfac`` ...), as optax chains.

Each full optimizer is ``optax.chain(scale_by_X(...), optax.trace(decay=momentum),
optax.scale_by_learning_rate(learning_rate))``: m <- tau m + P(grad), update = -alpha m
(docs/algorithms.md, section 5), wrapped in :func:`tekfax.skip_non_finite` unless
``skip_non_finite=False``. The full optimizers turn on the trust region and the relative
damping floor by default; the ``scale_by_*`` building blocks keep them off and stay
unguarded, so that they compute exactly the documented formulas. Their keyword arguments,
defaults and documentation come from :mod:`tekfax.hyperparams`, the one definition shared
with :func:`tekfax.scale_by_kronecker`; the full optimizers override three defaults
(:data:`FULL_DEFAULTS`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import optax

from tekfax.adaptive_damping import adaptive_damping as levenberg_marquardt
from tekfax.guard import skip_non_finite as guard_non_finite
from tekfax.hyperparams import DOCS, Hyperparams, args_doc, shared_parameters, takes_hyperparams
from tekfax.kronecker import scale_by_kronecker
from tekfax.validation import check_bool, check_learning_rate, check_number


class _Preset(NamedTuple):
    name: str
    estimator: str
    eigen_corrected: bool
    summary: str
    link: str


_PRESETS = (
    _Preset(
        "kfac",
        "kfac",
        False,
        "KFAC (Martens & Grosse 2015; KFC for convolutions): A (x) G.",
        "https://arxiv.org/abs/1503.05671",
    ),
    _Preset(
        "ekfac",
        "kfac",
        True,
        "EKFAC (George et al. 2018): S re-scaled in the eigenbasis of A, G.",
        "https://arxiv.org/abs/1806.03884",
    ),
    _Preset(
        "tkfac",
        "tkfac",
        False,
        "TKFAC (Gao et al. 2021): delta Phi (x) Psi with tr F_TKFAC = tr F.",
        "https://arxiv.org/abs/2011.10741",
    ),
    _Preset(
        "tekfac",
        "tkfac",
        True,
        "TEKFAC (Gao et al.): S re-scaled in the eigenbasis of Phi, Psi.",
        "https://arxiv.org/abs/2011.13609",
    ),
)

_SHARED_DOC = args_doc(shared_parameters(), DOCS)
"""The "Args:" entries of the shared keyword arguments, generated from tekfax.hyperparams."""

FULL_DEFAULTS = {"damping": 1e-3, "norm_constraint": 1e-3, "damping_floor": 1.0}
"""The defaults in which the full optimizers differ from the building blocks: chosen on the
robustness panel (README, "Robustness panel"; docs/algorithms.md, section 9)."""


def _keyword(name: str, default, annotation: str) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


_FULL_LEADING = [
    inspect.Parameter(
        "learning_rate",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation="optax.ScalarOrSchedule",
    ),
    _keyword("momentum", 0.9, "float"),
    _keyword("damping", FULL_DEFAULTS["damping"], "float | jax.Array | None"),
    _keyword("norm_constraint", FULL_DEFAULTS["norm_constraint"], "float | None"),
    _keyword("damping_floor", FULL_DEFAULTS["damping_floor"], "float"),
    _keyword("skip_non_finite", True, "bool"),
    _keyword("adaptive_damping", False, "bool"),
]
_FULL_DOCS = {
    "learning_rate": "alpha, a float or an optax schedule; also the alpha of ``norm_constraint``.",
    "momentum": "tau of ``optax.trace`` (docs/algorithms.md, section 5).",
    "damping": DOCS["damping"].replace(" Required unless ``nu`` is given.", "")
    + " The largest step any direction can take is the gradient over the damping; the "
    "trust region bounds the whole step.",
    "norm_constraint": "kappa of the trust region, the KL clip (docs/algorithms.md, "
    "section 5): the step is scaled so that alpha^2 <P(g), g> <= kappa, whatever the "
    "learning rate and damping; None turns it off.",
    "damping_floor": DOCS["damping_floor"],
    "adaptive_damping": "True adapts ``damping`` (its initial value) by the "
    "Levenberg-Marquardt rule every 5 steps (:func:`tekfax.adaptive_damping`, "
    "docs/algorithms.md, section 9); ``update`` then needs ``obj_fn=``, params -> the "
    "batch's loss. Off (False), ``obj_fn`` is ignored. Not with ``nu``.",
    "skip_non_finite": "skip every step whose gradients, ``stats`` or results are not "
    "finite: parameters and state stay unchanged and ``tekfax.skipped_steps(opt_state)`` "
    "counts the skips (:func:`tekfax.skip_non_finite`). False returns the bare chain.",
}


def _named(fn: Callable, name: str, doc: str) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


def _make_scale_by(preset: _Preset) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``scale_by_<name>``: :func:`scale_by_kronecker` with the preset's estimator fixed."""

    @takes_hyperparams([])
    def scale_by(hp: Hyperparams) -> optax.GradientTransformationExtraArgs:
        return scale_by_kronecker(
            estimator=preset.estimator, eigen_corrected=preset.eigen_corrected, **hp._asdict()
        )

    return _named(
        scale_by,
        f"scale_by_{preset.name}",
        f"""{preset.summary}

    Returns the preconditioned gradient P(grad) before momentum and learning rate; the
    update needs the extra argument ``stats=tekfax.loss_and_curvature(...).stats``.

    Args:
{_SHARED_DOC}

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``stats=``.

    Example:
      >>> opt = tekfax.scale_by_{preset.name}(damping=1e-3)
      >>> opt_state = opt.init(params)
      >>> p_grad, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
      >>> bool(tekfax.stats_needed(opt_state))
      False

    References:
      {preset.link}
    """,
    )


def _make_full(
    preset: _Preset, scale_by: Callable[..., optax.GradientTransformationExtraArgs]
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``<name>``: ``scale_by_<name>``, then momentum, then the learning rate."""

    @takes_hyperparams(_FULL_LEADING, _FULL_DOCS)
    def full(
        hp: Hyperparams,
        *,
        learning_rate: optax.ScalarOrSchedule,
        momentum: float,
        skip_non_finite: bool,
        adaptive_damping: bool,
        **shared,
    ) -> optax.GradientTransformationExtraArgs:
        del shared  # damping, norm_constraint, damping_floor: already in hp
        check_learning_rate("learning_rate", learning_rate)
        check_number("momentum", momentum, 0.0, 1.0, allow_none=False)
        check_bool("skip_non_finite", skip_non_finite)
        check_bool("adaptive_damping", adaptive_damping)
        opt = optax.chain(
            scale_by(**hp._asdict()),
            optax.trace(decay=momentum),
            optax.scale_by_learning_rate(learning_rate),
        )
        if adaptive_damping:
            if hp.nu is not None:
                raise ValueError(
                    "tekfax: adaptive_damping adapts damping; the trace-adaptive rule (nu) "
                    "does not use it. Pass nu=None or adaptive_damping=False."
                )
            opt = levenberg_marquardt(opt, initial_damping=hp.damping)
        return guard_non_finite(opt) if skip_non_finite else opt

    args = args_doc(inspect.signature(full).parameters.values(), {**DOCS, **_FULL_DOCS})
    return _named(
        full,
        preset.name,
        f"""{preset.summary}

    ``tekfax.skip_non_finite(optax.chain(scale_by_{preset.name}(...),
    optax.trace(momentum), scale_by_learning_rate(lr)))``; ``tekfax.{preset.name}(lr)`` is
    a complete call, with defaults chosen on the robustness panel (README).

    What to know:

    - ``update`` needs ``stats=out.stats``, where ``out = tekfax.loss_and_curvature(...)``
      computed the gradients; pass ``compute_stats=tekfax.stats_needed(opt_state)`` there
      to skip the statistics work on the steps that do not use it.
    - The step is -lr times the preconditioned gradient P(g) (with momentum). The damping
      bounds P(g) direction by direction (no direction moves more than g / damping), the
      relative ``damping_floor`` keeps a too-small damping from mattering, and the trust
      region (``norm_constraint``) then shrinks the whole step so that
      lr^2 <P(g), g> <= kappa. With the trust region on, a learning rate that is too large
      costs progress, not divergence; with it off (None), lr and damping must be tuned
      together.
    - Non-finite steps are skipped and counted (``tekfax.skipped_steps``) unless
      ``skip_non_finite=False``.
    - ``adaptive_damping=True`` moves the damping by the Levenberg-Marquardt rule; then
      ``update`` also needs ``obj_fn=``, the loss on the same batch as a function of params.

    Args:
{args}

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``stats=``.

    Example:
      >>> opt = tekfax.{preset.name}(1e-3)
      >>> opt_state = opt.init(params)
      >>> updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
      >>> params = optax.apply_updates(params, updates)
      >>> bool(tekfax.stats_needed(opt_state)), int(tekfax.skipped_steps(opt_state))
      (False, 0)

    References:
      {preset.link}
    """,
    )


def _make_preset(preset: _Preset) -> tuple[Callable, Callable]:
    scale_by = _make_scale_by(preset)
    return scale_by, _make_full(preset, scale_by)


scale_by_kfac, kfac = _make_preset(_PRESETS[0])
scale_by_ekfac, ekfac = _make_preset(_PRESETS[1])
scale_by_tkfac, tkfac = _make_preset(_PRESETS[2])
scale_by_tekfac, tekfac = _make_preset(_PRESETS[3])
