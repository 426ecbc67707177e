"""The optimizers of ``tekfax-compare``: names, default hyperparameters, flags and grids.

Eight optimizers: first-order ``sgdm``, ``adam`` and ``eadam``, and the Kronecker-factored
``kfac``, ``ekfac``, ``tkfac`` (TKFAC_nor, fixed damping), ``tkfac-new`` (TKFAC_new, the
trace-adaptive damping ``nu``) and ``tekfac``. Hyperparameters are split in two:

* numeric ones (``learning_rate``, ``damping``, ``nu``, ``momentum``, ``norm_constraint``,
  ``weight_decay``) are passed to the jitted train step as arrays, so one compilation serves
  every grid candidate and seed;
* static ones (``eigen_every``, ``curvature_every``, ``rescale_every``, ``fisher``,
  ``positions``) shape the compiled program.

Defaults: the library's wherever it has one (momentum, damping, the intervals, ``fisher``:
read from the presets' signatures, so they cannot drift). The library has none for the
learning rate and ``nu``; the tool's were measured on the default problem (digits, the small
CNN, batch 128). :data:`DIFFERENCES` says why for each value that differs from the library's,
and the README table "Tool defaults that differ from the library's" repeats it (a test checks
that they agree).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import optax

import tekfax

FIRST_ORDER = ("sgdm", "adam", "eadam")
KRONECKER = {"kfac": "kfac", "ekfac": "ekfac", "tkfac": "tkfac", "tkfac-new": "tkfac"}
KRONECKER["tekfac"] = "tekfac"
OPTIMIZERS = (*FIRST_ORDER, *KRONECKER)
DISPLAY_NAMES = {
    "sgdm": "SGDM",
    "adam": "Adam",
    "eadam": "EAdam",
    "kfac": "KFAC",
    "ekfac": "EKFAC",
    "tkfac": "TKFAC",
    "tkfac-new": "TKFAC-new",
    "tekfac": "TEKFAC",
}
NUMERIC = ("learning_rate", "damping", "nu", "momentum", "norm_constraint", "weight_decay")
STATIC = ("eigen_every", "curvature_every", "rescale_every", "fisher", "positions")
FISHER = ("sampled", "empirical")

# The papers' grids (docs/algorithms.md, section 7); ``--grid`` picks neighbours from them.
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
DAMPING_GRID = (1e-8, 1e-6, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
NU_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def library_default(key: str) -> Any:
    """The library's default of hyperparameter ``key``; ``inspect.Parameter.empty`` if required.

    From the signatures of the presets (``tekfax.kfac``) and, for ``fisher``, of
    ``tekfax.loss_and_curvature``. ``weight_decay`` is 0: the presets apply none (a user
    chains ``optax.add_decayed_weights`` in front, as :func:`make_optimizer` does).

    Example:
      >>> from tekfax.experiments.optimizers import library_default
      >>> library_default("momentum"), library_default("fisher")
      (0.9, 'sampled')
    """
    if key == "fisher":
        return inspect.signature(tekfax.loss_and_curvature).parameters["fisher"].default
    if key == "weight_decay":
        return 0.0
    return inspect.signature(tekfax.kfac).parameters[key].default


_KRONECKER_STATIC = {key: library_default(key) for key in STATIC}
_KRONECKER = {
    "learning_rate": 0.03,
    "momentum": library_default("momentum"),
    "norm_constraint": library_default("norm_constraint"),
    **_KRONECKER_STATIC,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "sgdm": {"learning_rate": 0.1, "momentum": 0.9},
    "adam": {"learning_rate": 3e-3},
    "eadam": {"learning_rate": 3e-3},
    "kfac": {**_KRONECKER, "damping": library_default("damping")},
    "ekfac": {**_KRONECKER, "damping": library_default("damping")},
    "tkfac": {**_KRONECKER, "damping": library_default("damping")},
    "tkfac-new": {**_KRONECKER, "nu": 10.0},
    "tekfac": {**_KRONECKER, "damping": library_default("damping")},
}
for _hparams in DEFAULTS.values():  # every optimizer takes weight decay, none by default
    _hparams["weight_decay"] = library_default("weight_decay")
# Why each tool default that differs from the library's does (README, "Comparing optimizers").
DIFFERENCES = {
    "learning_rate": "the library has no default; measured on digits + the small CNN",
    "nu": "tkfac-new is TKFAC_new, which needs nu; 10 measured (the papers' 1e-2 is for ResNet20)",
}

# flag (without "--") -> (hyperparameter, parser of one value)
FLAGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "lr": ("learning_rate", float),
    "damping": ("damping", float),
    "nu": ("nu", float),
    "momentum": ("momentum", float),
    "norm-constraint": ("norm_constraint", float),
    "weight-decay": ("weight_decay", float),
    "eigen-every": ("eigen_every", int),
    "curvature-every": ("curvature_every", int),
    "rescale-every": ("rescale_every", int),
    "fisher": ("fisher", str),
    "positions": ("positions", str),
}


class HyperparameterError(ValueError):
    """A bad ``--lr``/``--damping``/... value or ``name=value`` pair."""


def applies(name: str, key: str) -> bool:
    """Whether hyperparameter ``key`` is used by optimizer ``name``.

    ``nu`` is accepted by every Kronecker optimizer (it switches to trace-adaptive damping),
    except ``tkfac``, which is TKFAC with fixed damping; ``damping`` is unused by
    ``tkfac-new``.
    """
    if name in FIRST_ORDER:
        return key in DEFAULTS[name]
    if key == "nu":
        return name != "tkfac"
    if key == "damping":
        return name != "tkfac-new"
    return key in NUMERIC or key in STATIC


def parse_assignments(
    tokens: Sequence[str] | None,
    cast: Callable[[str], Any],
    optimizers: Iterable[str],
    flag: str,
) -> tuple[Any, dict[str, Any]]:
    """Parses ``["0.1"]`` or ``["kfac=0.1", "adam=1e-3"]`` (or a mix) of one flag.

    Returns ``(value for all or None, {optimizer: value})``; pairs override the bare value.
    """
    everyone, named = None, {}
    known = set(optimizers)
    for token in tokens or ():
        name, sep, text = token.partition("=")
        try:
            if not sep:
                if everyone is not None:
                    raise HyperparameterError(f"--{flag}: more than one value for all optimizers.")
                everyone = cast(token)
                continue
            if name not in known:
                raise HyperparameterError(
                    f"--{flag} {token}: unknown optimizer {name!r}; one of {', '.join(known)}."
                )
            named[name] = cast(text)
        except (TypeError, ValueError) as err:
            if isinstance(err, HyperparameterError):
                raise
            raise HyperparameterError(f"--{flag} {token}: {err}") from err
    return everyone, named


def resolve(
    names: Sequence[str], overrides: Mapping[str, Sequence[str] | None]
) -> dict[str, dict[str, Any]]:
    """Each optimizer's hyperparameters: defaults, then the flags' values.

    ``overrides`` maps a flag of :data:`FLAGS` (``"lr"``, ``"eigen-every"``, ...) to its
    tokens. A bare value applies to every optimizer that uses that hyperparameter (for ``nu``,
    only to those whose default has one, i.e. ``tkfac-new``). A ``name=value`` pair must name
    an optimizer that uses that hyperparameter; pairs of unselected optimizers are ignored.
    """
    resolved = {name: dict(DEFAULTS[name]) for name in names}
    for flag, tokens in overrides.items():
        key, cast = FLAGS[flag]
        everyone, named = parse_assignments(tokens, cast, OPTIMIZERS, flag)
        for name in named:
            if not applies(name, key):
                raise HyperparameterError(f"--{flag}: optimizer {name} has no {key}.")
        for name in names:
            if name in named:
                resolved[name][key] = named[name]
            elif everyone is not None and key in DEFAULTS[name]:
                resolved[name][key] = everyone
    for name, hparams in resolved.items():
        check(name, hparams)
    return resolved


def check(name: str, hparams: Mapping[str, Any]) -> None:
    """Raises :class:`HyperparameterError` for values no optimizer accepts."""
    for key in ("learning_rate", "damping", "nu", "norm_constraint"):
        value = hparams.get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise HyperparameterError(f"{name}: {key} must be positive, got {value}.")
    decay = hparams.get("weight_decay", 0.0)
    if not (math.isfinite(decay) and decay >= 0):
        raise HyperparameterError(f"{name}: weight_decay must be >= 0, got {decay}.")
    if not 0 <= hparams.get("momentum", 0.0) < 1:
        raise HyperparameterError(f"{name}: momentum must be in [0, 1).")
    for key in ("eigen_every", "curvature_every", "rescale_every"):
        if key in hparams and hparams[key] < 1:
            raise HyperparameterError(f"{name}: {key} must be >= 1, got {hparams[key]}.")
    if "fisher" in hparams and hparams["fisher"] not in FISHER:
        raise HyperparameterError(f"{name}: fisher must be one of {', '.join(FISHER)}.")
    if "positions" in hparams and hparams["positions"] not in tekfax.curvature.POSITIONS:
        raise HyperparameterError(
            f"{name}: positions must be one of {', '.join(tekfax.curvature.POSITIONS)}."
        )


def split(hparams: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """``(numeric, static)`` parts of resolved hyperparameters (see the module docstring).

    A zero ``weight_decay`` is left out of ``numeric``, so :func:`make_optimizer` builds the
    optimizer without it: the same program, bit for bit, as before the option existed.
    """
    numeric = {
        k: float(v)
        for k, v in hparams.items()
        if k in NUMERIC and v is not None and not (k == "weight_decay" and v == 0)
    }
    static = {k: v for k, v in hparams.items() if k in STATIC}
    return numeric, static


def make_optimizer(
    name: str,
    numeric: Mapping[str, Any],
    static: Mapping[str, Any],
    lr_boundaries: Mapping[int, float],
) -> optax.GradientTransformationExtraArgs:
    """Builds optimizer ``name``; numeric values may be traced arrays (inside ``jax.jit``).

    The learning rate follows :func:`learning_rate_schedule`. With a ``weight_decay`` wd,
    ``optax.add_decayed_weights(wd)`` comes first, turning the gradient into that of
    loss + (wd / 2) |params|^2, so a Kronecker optimizer preconditions the decay with it
    (L2 regularisation, the ``weight_decay`` of KFAC-PyTorch), and Adam is Adam with L2.

    Example:
      >>> from tekfax.experiments.optimizers import make_optimizer
      >>> opt = make_optimizer("sgdm", {"learning_rate": 1.0, "momentum": 0.0,
      ...                               "weight_decay": 0.5}, {}, {})
      >>> p = {"w": jnp.array([2.0])}
      >>> opt.update({"w": jnp.array([1.0])}, opt.init(p), p)[0]["w"]  # -(1 + 0.5 * 2)
      Array([-2.], dtype=float32)
    """
    opt = _make_base(name, numeric, static, lr_boundaries)
    if "weight_decay" in numeric:
        return optax.chain(optax.add_decayed_weights(numeric["weight_decay"]), opt)
    return opt


def _make_base(name, numeric, static, lr_boundaries) -> optax.GradientTransformationExtraArgs:
    lr = learning_rate_schedule(numeric["learning_rate"], lr_boundaries)
    if name == "sgdm":
        return optax.sgd(lr, momentum=numeric["momentum"])
    if name == "adam":
        return optax.adam(lr)
    if name == "eadam":
        return tekfax.eadam(lr)
    factory = getattr(tekfax, KRONECKER[name])
    kwargs = {k: static[k] for k in ("eigen_every", "curvature_every", "rescale_every")}
    kwargs["positions"] = static.get("positions", library_default("positions"))
    return factory(
        lr,
        damping=numeric.get("damping"),
        nu=numeric.get("nu"),
        momentum=numeric["momentum"],
        norm_constraint=numeric.get("norm_constraint"),
        **kwargs,
    )


def learning_rate_schedule(lr: Any, lr_boundaries: Mapping[int, float]) -> optax.Schedule:
    """The learning rate: ``lr`` times the scale of every boundary the step has reached.

    It is ``optax.piecewise_constant_schedule(lr, lr_boundaries)``, on optimizer steps.
    """
    return optax.piecewise_constant_schedule(lr, dict(lr_boundaries))


def learning_rate_at(lr: float, step: int, lr_boundaries: Mapping[int, float]) -> float:
    """The optimizer's learning rate at ``step``: its optax schedule, evaluated for the logs.

    The schedule computes in float32; the value is returned in its shortest decimal form
    (0.03, not 0.029999999329447746).
    """
    value = learning_rate_schedule(lr, lr_boundaries)(step)
    return float(str(np.float32(value)))


def step_boundaries(lr_decay_every: int | None, steps_per_epoch: int, epochs: int) -> dict:
    """``{step: 0.1}`` every ``lr_decay_every`` epochs (none when it is None or 0)."""
    if not lr_decay_every:
        return {}
    count = (epochs - 1) // lr_decay_every
    return {i * lr_decay_every * steps_per_epoch: 0.1 for i in range(1, count + 1)}


def _neighbours(value: float, grid: Sequence[float], below: int, above: int) -> list[float]:
    i = min(range(len(grid)), key=lambda j: abs(math.log(grid[j]) - math.log(value)))
    lo, hi = max(0, i - below), min(len(grid), i + above + 1)
    return list(grid[lo:hi])


def grid_candidates(
    name: str,
    hparams: Mapping[str, Any],
    lrs: Sequence[float] | None = None,
    dampings: Sequence[float] | None = None,
    nus: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """The small ``--grid`` of one optimizer: learning rates x (dampings or nus).

    By default: the papers' learning rates nearest to the default and its two neighbours, and
    for the Kronecker optimizers two dampings (the nearest and the next smaller of the papers'
    grid), or two values of ``nu`` when it uses ``nu``.
    """
    lrs = list(lrs or _neighbours(hparams["learning_rate"], LR_GRID, 1, 1))
    axis, values = None, [None]
    if hparams.get("nu") is not None:
        axis, values = "nu", list(nus or _neighbours(hparams["nu"], NU_GRID, 1, 0))
    elif hparams.get("damping") is not None:
        axis, values = (
            "damping",
            list(dampings or _neighbours(hparams["damping"], DAMPING_GRID, 1, 0)),
        )
    candidates = []
    for lr in lrs:
        for value in values:
            candidate = {**hparams, "learning_rate": float(lr)}
            if axis is not None:
                candidate[axis] = float(value)
            check(name, candidate)
            candidates.append(candidate)
    return candidates


def parse_grid_values(tokens: Sequence[str] | None, flag: str) -> tuple[Any, dict[str, Any]]:
    """``--grid-lr 0.01,0.1 adam=1e-4,1e-3``: comma-separated lists, bare or per optimizer."""

    def floats(text: str) -> list[float]:
        return [float(v) for v in text.split(",") if v]

    return parse_assignments(tokens, floats, OPTIMIZERS, flag)


def describe(value: Any) -> str:
    """A default as the help and the README show it: ``required``, ``None``, ``0.03``."""
    if value is inspect.Parameter.empty:
        return "required"
    return value if isinstance(value, str) else "None" if value is None else f"{value:g}"


def describe_defaults(key: str) -> str:
    """The tool's defaults of ``key``, grouped: ``kfac/ekfac/tkfac/tekfac 0.3``.

    Example:
      >>> from tekfax.experiments.optimizers import describe_defaults
      >>> describe_defaults("nu")
      'tkfac-new 10'
    """
    groups: dict[Any, list[str]] = {}
    for name, values in DEFAULTS.items():
        if key in values:
            groups.setdefault(values[key], []).append(name)
    return "; ".join(f"{'/'.join(names)} {describe(value)}" for value, names in groups.items())


def is_kronecker(name: str) -> bool:
    """Whether ``name`` is one of tekfax's Kronecker-factored optimizers."""
    return name in KRONECKER
