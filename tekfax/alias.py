"""Presets (``scale_by_kfac`` ...) and full optimizers (``kfac`` ...), as optax chains.

Each full optimizer is ``optax.chain(scale_by_X(...), optax.trace(decay=momentum),
optax.scale_by_learning_rate(learning_rate))``: m <- tau m + P(grad), update = -alpha m
(ALGORITHMS.md section 5).
"""

from __future__ import annotations

import jax
import optax

from tekfax.kronecker import scale_by_kronecker
from tekfax.validation import check_learning_rate, check_number

_SHARED_DOC = """
    Keyword args (ALGORITHMS.md; shared by every preset):
      damping: lambda (section 4). Required unless ``nu`` is given.
      nu: None for fixed/factored damping, or a float for the trace-adaptive CNN rule, in
        which ``damping`` is not used.
      ema: factor decay eps (0.95). rescale_ema: S decay (0.95; EKFAC/TEKFAC only).
      curvature_every: T_FIM (10). eigen_every: T_INV (100). rescale_every: S interval (10).
        The defaults were chosen from scripts/bench.py (README, "Performance").
      conv_rescale: ``"per_example"`` or ``"per_location"`` (EKFAC/TEKFAC convolutions).
      norm_constraint: kappa of the KL clip, or None.
      eigen_mesh: None, or a ``jax.sharding.Mesh`` over which each eigenbasis refresh is
        spread (every device decomposes a share of the factors; results all-gathered).
      eigen_axis: the axis of ``eigen_mesh`` to spread over ("data").
"""

_PI_DOC = "      pi_adjusted: split sqrt(lambda) between A and G by pi (False).\n"

_PRESETS = {
    "kfac": (
        "kfac",
        False,
        "KFAC (Martens & Grosse 2015; KFC for convolutions): A (x) G.",
        "https://arxiv.org/abs/1503.05671",
    ),
    "ekfac": (
        "kfac",
        True,
        "EKFAC (George et al. 2018): S re-scaled in the eigenbasis of A, G.",
        "https://arxiv.org/abs/1806.03884",
    ),
    "tkfac": (
        "tkfac",
        False,
        "TKFAC (Gao et al. 2021): delta Phi (x) Psi with tr F_TKFAC = tr F.",
        "https://arxiv.org/abs/2011.10741",
    ),
    "tekfac": (
        "tkfac",
        True,
        "TEKFAC (Gao et al.): S re-scaled in the eigenbasis of Phi, Psi.",
        "https://arxiv.org/abs/2011.13609",
    ),
}


def _make_preset(name: str):
    estimator, eigen_corrected, summary, link = _PRESETS[name]

    def scale_by(
        *,
        damping: float | jax.Array | None = None,
        nu: float | jax.Array | None = None,
        ema: float = 0.95,
        rescale_ema: float = 0.95,
        curvature_every: int = 10,
        eigen_every: int = 100,
        rescale_every: int = 10,
        conv_rescale: str = "per_example",
        norm_constraint: float | None = None,
        learning_rate: optax.ScalarOrSchedule | None = None,
        pi_adjusted: bool = False,
        eigen_mesh: jax.sharding.Mesh | None = None,
        eigen_axis: str = "data",
    ) -> optax.GradientTransformationExtraArgs:
        return scale_by_kronecker(
            estimator=estimator,
            eigen_corrected=eigen_corrected,
            damping=damping,
            nu=nu,
            ema=ema,
            rescale_ema=rescale_ema,
            curvature_every=curvature_every,
            eigen_every=eigen_every,
            rescale_every=rescale_every,
            conv_rescale=conv_rescale,
            norm_constraint=norm_constraint,
            learning_rate=learning_rate,
            pi_adjusted=pi_adjusted,
            eigen_mesh=eigen_mesh,
            eigen_axis=eigen_axis,
        )

    scale_by.__name__ = scale_by.__qualname__ = f"scale_by_{name}"
    scale_by.__doc__ = f"""{summary}

    Returns the preconditioned gradient P(grad) before momentum and learning rate; the
    update needs the extra argument ``stats=tekfax.loss_and_curvature(...).stats``.
    ``learning_rate`` is used only by ``norm_constraint``.
{_SHARED_DOC}{_PI_DOC if name == "kfac" else ""}
    Example:
      >>> opt = tekfax.scale_by_{name}(damping=1e-3)

    References:
      {link}
    """

    def full(
        learning_rate: optax.ScalarOrSchedule,
        *,
        damping: float | jax.Array | None = None,
        momentum: float = 0.9,
        nu: float | jax.Array | None = None,
        ema: float = 0.95,
        rescale_ema: float = 0.95,
        curvature_every: int = 10,
        eigen_every: int = 100,
        rescale_every: int = 10,
        conv_rescale: str = "per_example",
        norm_constraint: float | None = None,
        pi_adjusted: bool = False,
        eigen_mesh: jax.sharding.Mesh | None = None,
        eigen_axis: str = "data",
    ) -> optax.GradientTransformationExtraArgs:
        check_learning_rate("learning_rate", learning_rate)
        check_number("momentum", momentum, 0.0, 1.0, allow_none=False)
        return optax.chain(
            scale_by(
                damping=damping,
                nu=nu,
                ema=ema,
                rescale_ema=rescale_ema,
                curvature_every=curvature_every,
                eigen_every=eigen_every,
                rescale_every=rescale_every,
                conv_rescale=conv_rescale,
                norm_constraint=norm_constraint,
                learning_rate=learning_rate,
                pi_adjusted=pi_adjusted,
                eigen_mesh=eigen_mesh,
                eigen_axis=eigen_axis,
            ),
            optax.trace(decay=momentum),
            optax.scale_by_learning_rate(learning_rate),
        )

    full.__name__ = full.__qualname__ = name
    full.__doc__ = f"""{summary}

    ``optax.chain(scale_by_{name}(...), optax.trace(momentum), scale_by_learning_rate(lr))``.

    Args:
      learning_rate: alpha, a float or an optax schedule.
      momentum: tau (0.9).
{_SHARED_DOC}
    Example:
      >>> opt = tekfax.{name}(learning_rate=1e-3, damping=1e-3)

    References:
      {link}
    """
    return scale_by, full


scale_by_kfac, kfac = _make_preset("kfac")
scale_by_ekfac, ekfac = _make_preset("ekfac")
scale_by_tkfac, tkfac = _make_preset("tkfac")
scale_by_tekfac, tekfac = _make_preset("tekfac")
