"""Input validation shared by the public functions: every message names the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_array(value: Any) -> bool:
    return isinstance(value, jax.Array | np.ndarray | np.generic)


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    allow_none: bool = True,
) -> None:
    """A Python number in [low, high) (or (low, high) without ``low_inclusive``), finite.

    Scalar arrays (``optax.inject_hyperparams`` passes them, possibly traced) are accepted
    without a value check; anything else raises a ``TypeError`` naming ``name``.

    Example:
      >>> from tekfax.validation import check_number
      >>> check_number("ema", 0.95, 0.0, 1.0)
      >>> check_number("ema", 1.0, 0.0, 1.0)
      Traceback (most recent call last):
      ...
      ValueError: tekfax: ema must be finite and in [0.0, 1.0), got 1.0.
    """
    if value is None:
        if allow_none:
            return
        raise TypeError(f"tekfax: {name} is required, got None.")
    if _is_array(value):
        if np.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.number):
            raise TypeError(
                f"tekfax: {name} must be a number or a scalar array, got an array of shape "
                f"{np.shape(value)} and dtype {value.dtype}."
            )
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"tekfax: {name} must be a number, got {type(value).__name__} {value!r}.")
    too_low = value < low if low_inclusive else value <= low
    if not math.isfinite(value) or too_low or (high is not None and value >= high):
        if high is not None:
            bound = f"in {'[' if low_inclusive else '('}{low}, {high})"
        else:
            bound = f"{'>=' if low_inclusive else '>'} {low}"
        raise ValueError(f"tekfax: {name} must be finite and {bound}, got {value!r}.")


def check_interval(name: str, value: Any) -> None:
    """A positive int, or a scalar integer array (``optax.inject_hyperparams`` makes one).

    Example:
      >>> from tekfax.validation import check_interval
      >>> check_interval("eigen_every", 0)
      Traceback (most recent call last):
      ...
      ValueError: tekfax: eigen_every must be a positive integer, got 0.
    """
    if _is_array(value) and np.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.integer):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"tekfax: {name} must be a positive int (a step interval), got "
            f"{type(value).__name__} {value!r}."
        )
    if value < 1:
        raise ValueError(f"tekfax: {name} must be a positive integer, got {value!r}.")


def check_learning_rate(name: str, value: Any, allow_none: bool = False) -> None:
    """A positive number, a scalar array or a schedule (a callable of the step count).

    Example:
      >>> from tekfax.validation import check_learning_rate
      >>> check_learning_rate("learning_rate", optax.constant_schedule(1e-3))
    """
    if callable(value) and not _is_array(value):
        return
    check_number(name, value, 0.0, low_inclusive=False, allow_none=allow_none)


def check_bool(name: str, value: Any) -> None:
    """True or False (a static switch, never an array).

    Example:
      >>> from tekfax.validation import check_bool
      >>> check_bool("pi_adjusted", "yes")
      Traceback (most recent call last):
      ...
      TypeError: tekfax: pi_adjusted must be True or False, got str.
    """
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"tekfax: {name} must be True or False, got {type(value).__name__}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """One of ``choices``.

    Example:
      >>> from tekfax.validation import check_choice
      >>> check_choice("estimator", "kfac", ("kfac", "tkfac"))
    """
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"tekfax: unknown {name} {value!r}; choose one of {options}.")
