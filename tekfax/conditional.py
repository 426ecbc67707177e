"""Conditional stages: run a computation only when its result is needed, tracing it once.

Every periodic stage runs under :func:`cond`: ``lax.cond`` when traced, the chosen branch
alone when called eagerly (and the eigendecomposition's retry under :func:`while_loop`).
The statistics pass (skip it when no statistics are due) and, off the CPU, the guard's
inner update (skip it on non-finite gradients) need ``cond(pred, run, stand_in)`` where the
stand-in returns values shaped like ``run``'s outputs (:func:`cond_shaped_like`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _shape_of(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def zeros_shaped(shapes: Any) -> Any:
    """Zeros of each ``jax.ShapeDtypeStruct`` (or array) in ``shapes``.

    Example:
      >>> from tekfax.conditional import zeros_shaped
      >>> zeros_shaped({"a": jax.ShapeDtypeStruct((2,), jnp.int32)})
      {'a': Array([0, 0], dtype=int32)}
    """
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cond(pred: jax.Array | bool, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    """``lax.cond(pred, true_fn, false_fn)``; when ``pred`` is a concrete value, the branch it
    picks, called directly.

    Under ``jax.jit`` (or ``vmap``, ``grad``) the predicate is traced and this is ``lax.cond``.
    Called eagerly, ``lax.cond`` would compile both branches again on every call, since each
    call builds new branch functions: on the two-layer MLP of the docstring examples (2-core
    CPU) an eager ``kfac`` or ``tekfac`` update took 2.0-3.1 s a call that way. Here only the
    taken branch runs, op by op, and its operations' compilations are cached across calls.
    The taken branch's output is returned as it is: equal in shape and dtype to
    ``lax.cond``'s, since ``lax.cond`` requires both branches to agree.

    Example:
      >>> from tekfax.conditional import cond
      >>> cond(jnp.array(True), lambda: jnp.ones(2), lambda: jnp.zeros(2))
      Array([1., 1.], dtype=float32)
    """
    if isinstance(pred, jax.core.Tracer):
        return lax.cond(pred, true_fn, false_fn)
    return true_fn() if bool(pred) else false_fn()


def while_loop(cond_fun: Callable[[Any], Any], body_fun: Callable[[Any], Any], init: Any) -> Any:
    """``lax.while_loop(cond_fun, body_fun, init)``; when no leaf of ``init`` is traced, the
    same loop in Python.

    As for :func:`cond`: called eagerly, ``lax.while_loop`` compiles its body again on every
    call (the eigendecomposition's retry loop, :mod:`tekfax.eigenbasis`).

    Example:
      >>> from tekfax.conditional import while_loop
      >>> int(while_loop(lambda i: i < 3, lambda i: i + 1, jnp.array(0)))
      3
    """
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(init)):
        return lax.while_loop(cond_fun, body_fun, init)
    carry = init
    while bool(cond_fun(carry)):
        carry = body_fun(carry)
    return carry


def cond_shaped_like(pred: jax.Array, run: Callable[[], Any], stand_in: Callable[[Any], Any]):
    """``run()`` if ``pred`` else ``stand_in(shapes)``, with ``shapes`` those of ``run()``.

    ``shapes`` is a pytree of ``jax.ShapeDtypeStruct``. ``lax.cond`` traces its true branch
    before its false one, so ``stand_in`` reads the shapes recorded while ``run`` was traced
    instead of tracing ``run`` again with ``jax.eval_shape`` (on the digits CNN, lowering a
    guarded KFAC step took 0.57-0.61 s this way against 0.67 s). Should a JAX release
    trace the branches in the other order, ``stand_in`` falls back to ``jax.eval_shape``, so
    the result does not depend on the order.

    Example:
      >>> from tekfax.conditional import cond_shaped_like, zeros_shaped
      >>> cond_shaped_like(jnp.array(False), lambda: {"a": jnp.ones(2)}, zeros_shaped)
      {'a': Array([0., 0.], dtype=float32)}
    """
    recorded = []

    def run_and_record():
        out = run()
        recorded.append(jax.tree_util.tree_map(_shape_of, out))
        return out

    def instead():
        return stand_in(recorded[-1] if recorded else jax.eval_shape(run))

    return cond(pred, run_and_record, instead)
