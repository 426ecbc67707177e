"""Presets (``scale_by_kfac`` ...) and full optimizers (``kfac`` ...), as optax chains.

Each full optimizer is ``optax.chain(scale_by_X(...), optax.trace(decay=momentum),
optax.scale_by_learning_rate(learning_rate))``: m <- tau m + P(grad), update = -alpha m
(docs/algorithms.md, section 5). Their keyword arguments, defaults and documentation come
from :mod:`tekfax.hyperparams`, the one definition shared with
:func:`tekfax.scale_by_kronecker`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import optax

from tekfax.hyperparams import DOCS, Hyperparams, args_doc, shared_parameters, takes_hyperparams
from tekfax.kronecker import scale_by_kronecker
from tekfax.validation import check_learning_rate, check_number


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

_FULL_LEADING = [
    inspect.Parameter(
        "learning_rate",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation="optax.ScalarOrSchedule",
    ),
    inspect.Parameter("momentum", inspect.Parameter.KEYWORD_ONLY, default=0.9, annotation="float"),
]
_FULL_DOCS = {
    "learning_rate": "alpha, a float or an optax schedule; also the alpha of ``norm_constraint``.",
    "momentum": "tau of ``optax.trace`` (docs/algorithms.md, section 5).",
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
        hp: Hyperparams, *, learning_rate: optax.ScalarOrSchedule, momentum: float
    ) -> optax.GradientTransformationExtraArgs:
        check_learning_rate("learning_rate", learning_rate)
        check_number("momentum", momentum, 0.0, 1.0, allow_none=False)
        return optax.chain(
            scale_by(**hp._asdict()),
            optax.trace(decay=momentum),
            optax.scale_by_learning_rate(learning_rate),
        )

    args = args_doc(inspect.signature(full).parameters.values(), {**DOCS, **_FULL_DOCS})
    return _named(
        full,
        preset.name,
        f"""{preset.summary}

    ``optax.chain(scale_by_{preset.name}(...), optax.trace(momentum),
    scale_by_learning_rate(lr))``.

    Args:
{args}

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``stats=``.

    Example:
      >>> opt = tekfax.{preset.name}(learning_rate=1e-3, damping=1e-3)
      >>> opt_state = opt.init(params)
      >>> updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
      >>> params = optax.apply_updates(params, updates)
      >>> bool(tekfax.stats_needed(opt_state))
      False

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
