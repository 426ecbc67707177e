"""The keyword arguments shared by ``scale_by_kronecker`` and every preset, defined once.

:class:`Hyperparams` holds their names, types and defaults, and :data:`DOCS` their
documentation. The signatures of :func:`tekfax.scale_by_kronecker`, the ``scale_by_*``
presets and the full optimizers are generated from them by :func:`takes_hyperparams`, as is
the "Args:" text of their docstrings (:func:`args_doc`), so a default or a description is
changed in one place. ``optax.inject_hyperparams`` reads the generated signatures.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import optax

_KEYWORD = inspect.Parameter.KEYWORD_ONLY


class Hyperparams(NamedTuple):
    """The shared hyperparameters and their defaults (documented in :data:`DOCS`).

    Example:
      >>> from tekfax.hyperparams import Hyperparams
      >>> Hyperparams(damping=1e-3).eigen_every
      100
    """

    damping: float | jax.Array | None = None
    nu: float | jax.Array | None = None
    ema: float = 0.95
    rescale_ema: float = 0.95
    curvature_every: int = 10
    eigen_every: int = 100
    rescale_every: int = 10
    conv_rescale: str = "per_example"
    positions: str = "expand"
    norm_constraint: float | None = None
    damping_floor: float = 0.0
    learning_rate: optax.ScalarOrSchedule | None = None
    pi_adjusted: bool = False
    eigen_mesh: jax.sharding.Mesh | None = None
    eigen_axis: str = "data"
    layer_dims: Mapping[str, tuple[int, int]] | None = None


DOCS = {
    "damping": "lambda (docs/algorithms.md, section 4): factored damping for KFAC/TKFAC, "
    "S + lambda for EKFAC/TEKFAC. Required unless ``nu`` is given.",
    "nu": "None for fixed/factored damping; a float selects the trace-adaptive CNN rule "
    "(docs/algorithms.md, section 4; TKFAC Eq. 15-16, TEKFAC Eq. 3.4-3.5; for KFAC the "
    "same rule on A (x) G = (tr A tr G)(A / tr A) (x) (G / tr G)), in which ``damping`` "
    "is not used.",
    "ema": "factor decay eps of the bias-corrected moving averages (docs/algorithms.md, "
    "section 3).",
    "rescale_ema": "decay of S, EKFAC/TEKFAC only (not bias-corrected; re-initialised at "
    "each refresh).",
    "curvature_every": "update the factors every this many steps (T_FIM).",
    "eigen_every": "eigendecompose every this many steps (T_INV), always on step 0.",
    "rescale_every": "update S every this many steps, and on every refresh. The interval "
    'defaults were chosen from scripts/bench.py (README, "Performance").',
    "conv_rescale": '``"per_example"`` (exact) or ``"per_location"`` (diag(Q^T F1 Q)), for '
    "EKFAC/TEKFAC layers applied over positions (docs/algorithms.md, section 8).",
    "positions": '``"expand"`` (positions as extra examples) or ``"reduce"`` (KFAC-reduce: '
    "inputs averaged and output gradients summed over each example's positions before the "
    "outer products), the Kronecker factors of every tagged layer applied at more than one "
    "position: a Dense layer over extra axes, a convolution (its output locations). S of "
    "EKFAC/TEKFAC is the same either way (docs/algorithms.md, section 11).",
    "norm_constraint": "kappa of the KL clip (docs/algorithms.md, section 5), or None.",
    "damping_floor": "r, the relative damping floor (docs/algorithms.md, section 9): lambda "
    "is raised to at least r times the largest mean eigenvalue tr(F_hat)/dim the layer's "
    "block has had (with ``nu``, the rule's lower bound on delta to r times the largest "
    "trace), so a damping too small for the curvature's scale cannot blow up the step, "
    "early or late in training. 0 disables it.",
    "learning_rate": "alpha, used only by ``norm_constraint`` (a schedule is evaluated at "
    "the step count); None means 1.",
    "pi_adjusted": "KFAC only: split sqrt(lambda) between A and G by pi (docs/algorithms.md, "
    "section 4); True raises a ValueError for the other estimators.",
    "eigen_mesh": "None decomposes every factor on every device. A ``jax.sharding.Mesh`` "
    "spreads each refresh's eigendecompositions over the devices of its axis "
    "``eigen_axis`` (each decomposes a share; results all-gathered; KAISA). Same results.",
    "eigen_axis": "the axis of ``eigen_mesh`` the work is spread over.",
    "layer_dims": "None reads every layer's (d_in, d_out) from its kernel and bias shapes. "
    "A mapping from layer name to (d_in, d_out), bias row included, overrides that for a "
    "bias-free kernel whose outputs span several axes (the shapes alone are ambiguous); "
    "``tekfax.layer_dims(logits_fn, params)`` traces the model for it.",
}


def _parameter(name: str, default: Any, annotation: Any, kind=_KEYWORD) -> inspect.Parameter:
    return inspect.Parameter(name, kind, default=default, annotation=annotation)


def shared_parameters(exclude: Iterable[str] = ()) -> list[inspect.Parameter]:
    """The keyword-only ``inspect.Parameter`` of every shared hyperparameter, in order.

    Example:
      >>> from tekfax.hyperparams import shared_parameters
      >>> [p.name for p in shared_parameters()][:3]
      ['damping', 'nu', 'ema']
    """
    annotations, exclude = Hyperparams.__annotations__, set(exclude)
    return [
        _parameter(name, default, getattr(annotations[name], "__forward_arg__", annotations[name]))
        for name, default in Hyperparams._field_defaults.items()
        if name not in exclude
    ]


def args_doc(parameters: Iterable[inspect.Parameter], docs: dict[str, str]) -> str:
    """Google-style "Args:" lines for ``parameters``, each with its default, from ``docs``.

    Example:
      >>> from tekfax.hyperparams import DOCS, args_doc, shared_parameters
      >>> print(args_doc(shared_parameters()[2:3], DOCS))
            ema: factor decay eps of the bias-corrected moving averages (docs/algorithms.md,
              section 3). Default 0.95.
    """
    lines = []
    for p in parameters:
        default = "" if p.default is inspect.Parameter.empty else f" Default {p.default!r}."
        text = f"{p.name}: {docs[p.name]}{default}"
        lines += textwrap.wrap(text, 88, initial_indent=" " * 6, subsequent_indent=" " * 8)
    return "\n".join(lines)


def takes_hyperparams(
    leading: Iterable[inspect.Parameter],
    leading_docs: dict[str, str] | None = None,
    returns: Any = "optax.GradientTransformationExtraArgs",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Gives ``build(hp, **leading)`` the signature ``(*leading, **Hyperparams fields)``.

    The decorated function is called with the ``leading`` arguments by name and the shared
    ones collected in a :class:`Hyperparams` (``hp``; a leading argument that is also a
    shared one, like the full optimizers' ``learning_rate``, goes to both);
    ``inspect.signature`` (hence ``optax.inject_hyperparams`` and the API docs) sees every
    argument with its default. A line ``{args}`` in the docstring becomes the "Args:"
    entries of the whole signature, from ``leading_docs`` and :data:`DOCS`.

    Example:
      >>> from tekfax.hyperparams import takes_hyperparams
      >>> @takes_hyperparams([])
      ... def every(hp):
      ...     return hp.eigen_every
      >>> every(eigen_every=7)
      7
    """
    leading = list(leading)
    docs = {**DOCS, **(leading_docs or {})}
    signature = inspect.Signature(
        leading + shared_parameters(p.name for p in leading), return_annotation=returns
    )

    def decorate(build: Callable[..., Any]) -> Callable[..., Any]:
        def factory(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = bound.arguments
            shared = {k: v for k, v in values.items() if k in Hyperparams._fields}
            return build(Hyperparams(**shared), **{p.name: values[p.name] for p in leading})

        factory.__signature__ = signature
        factory.__name__ = factory.__qualname__ = build.__name__
        factory.__module__ = build.__module__
        factory.__doc__ = (build.__doc__ or "").replace(
            "    {args}", args_doc(signature.parameters.values(), docs)
        )
        return factory

    return decorate
