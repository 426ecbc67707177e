"""Finding one transformation's state inside a nested optimizer state.

A tekfax state may sit inside ``optax.chain``, ``optax.inject_hyperparams``, the guard or
adaptive damping; the helpers that read it (``stats_needed``, ``skipped_steps``,
``current_damping``, the diagnostics) find it by its NamedTuple type.
"""

from __future__ import annotations

from typing import Any, TypeVar

import optax

State = TypeVar("State")


def find_outermost(opt_state: Any, cls: type[State], missing: str | None = None) -> State | None:
    """The outermost ``cls`` NamedTuple inside ``opt_state`` (itself included).

    None when there is none, or a ``ValueError`` with the message ``missing`` when given.

    Example:
      >>> from tekfax.states import find_outermost
      >>> from tekfax.guard import SkipNonFiniteState
      >>> state = optax.chain(tekfax.skip_non_finite(optax.sgd(0.1))).init(params)
      >>> int(find_outermost(state, SkipNonFiniteState).skipped)
      0
    """
    found = optax.tree_utils.tree_get_all_with_path(opt_state, cls.__name__)
    found = [state for _, state in found if isinstance(state, cls)]
    if not found and missing is not None:
        raise ValueError(missing)
    return found[0] if found else None
