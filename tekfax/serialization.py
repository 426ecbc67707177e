"""Saving and restoring optimizer state with ``flax.serialization``, checked against a target.

Optimizer states are NamedTuples of arrays, so ``flax.serialization.to_bytes`` writes them
as-is. Restoring needs a *target*, the freshly initialised state of the optimizer that will
continue; :func:`state_from_bytes` compares the saved state with it field by field before
anything is restored, so a checkpoint of another optimizer (EKFAC state into KFAC) or of
another model (a layer of another width) fails with the path of the first difference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np


def state_to_bytes(opt_state: Any) -> bytes:
    """The optimizer state (any pytree of NamedTuples, dicts and arrays) as msgpack bytes.

    Example:
      >>> opt = tekfax.kfac(learning_rate=1e-2, damping=1e-3)
      >>> _, opt_state = opt.update(grads, opt.init(params), params, stats=out.stats)
      >>> data = tekfax.state_to_bytes(opt_state)
      >>> isinstance(data, bytes)
      True
    """
    return flax.serialization.to_bytes(jax.device_get(opt_state))


def _describe(node: Any) -> str:
    if node is None:
        return "None"
    if isinstance(node, Mapping):
        return f"a dict with keys {sorted(node)}"
    return f"an array of shape {tuple(np.shape(node))} and dtype {np.asarray(node).dtype}"


def check_state_dict(target: Any, saved: Any, path: str = "opt_state") -> None:
    """Raises ``ValueError`` at the first place where ``saved`` does not fit ``target``.

    Both are state dicts (``flax.serialization.to_state_dict``); the message names the
    path, e.g. ``opt_state/inner_state/0/layers/Dense_0/rescale``.

    Example:
      >>> target = {"Dense_0": {"kernel": jnp.zeros((4, 16))}}
      >>> saved = {"Dense_0": {"kernel": jnp.zeros((4, 32))}}    # a wider layer
      >>> tekfax.serialization.check_state_dict(target, saved)
      Traceback (most recent call last):
      ...
      ValueError: tekfax: opt_state/Dense_0/kernel: the saved state holds an array of shape
      (4, 32) and dtype float32, this optimizer expects an array of shape (4, 16) ...
    """
    hint = (
        "The saved state belongs to an optimizer with other settings (preset, nu, model "
        "layers or widths); restore it into the same optimizer and model it was saved from."
    )
    if isinstance(target, Mapping) or isinstance(saved, Mapping):
        if not (isinstance(target, Mapping) and isinstance(saved, Mapping)):
            raise ValueError(
                f"tekfax: {path}: the saved state holds {_describe(saved)}, this optimizer "
                f"expects {_describe(target)}. {hint}"
            )
        missing, extra = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
        if missing or extra:
            raise ValueError(
                f"tekfax: {path}: the saved state lacks {missing} and has unexpected {extra}. "
                f"{hint}"
            )
        for key in target:
            check_state_dict(target[key], saved[key], f"{path}/{key}")
        return
    if (target is None) != (saved is None):
        raise ValueError(
            f"tekfax: {path}: the saved state holds {_describe(saved)}, this optimizer expects "
            f"{_describe(target)}. {hint}"
        )
    if target is None:
        return
    if np.shape(target) != np.shape(saved) or np.asarray(target).dtype != np.asarray(saved).dtype:
        raise ValueError(
            f"tekfax: {path}: the saved state holds {_describe(saved)}, this optimizer expects "
            f"{_describe(target)}. {hint}"
        )


def state_from_bytes(target: Any, data: bytes) -> Any:
    """Restores bytes of :func:`state_to_bytes` into the structure of ``target``.

    ``target`` is ``opt.init(params)`` of the optimizer that continues. Every field is
    checked first: a saved state of another preset, of other hyperparameters that change
    the state (``nu`` for EKFAC/TEKFAC does not, ``eigen_corrected`` does) or of another
    model raises a ``ValueError`` naming the first differing path.

    Example:
      >>> opt = tekfax.kfac(learning_rate=1e-2, damping=1e-3)
      >>> _, opt_state = opt.update(grads, opt.init(params), params, stats=out.stats)
      >>> data = tekfax.state_to_bytes(opt_state)
      >>> restored = tekfax.state_from_bytes(opt.init(params), data)
      >>> jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, restored, opt_state))
      True
    """
    if not isinstance(data, bytes | bytearray):
        raise TypeError(
            f"tekfax: data must be the bytes of state_to_bytes, got {type(data).__name__}."
        )
    saved = flax.serialization.msgpack_restore(bytes(data))
    check_state_dict(flax.serialization.to_state_dict(jax.device_get(target)), saved)
    restored = flax.serialization.from_state_dict(target, saved)
    return jax.tree_util.tree_map(jnp.asarray, restored)
