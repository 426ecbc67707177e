"""Per-run checkpoints, written by orbax: one folder per run, the latest epoch kept.

A checkpoint holds two items. ``state`` (arrays, saved by orbax's standard handler): the
params and batch_stats (as Flax state dicts), the optimizer state (its pytree leaves, keyed by
position and restored into the structure of a freshly initialised state) and the JAX key.
``meta`` (JSON): the NumPy seed and next epoch (shuffling uses ``default_rng((seed, epoch))``),
the step and epoch counters, the per-epoch records and a description of the run, so a resumed
run can check that it continues the same one.

orbax's :class:`~orbax.checkpoint.CheckpointManager` writes each epoch's checkpoint into a
temporary folder and renames it when complete, then deletes the previous epoch's, so an
interrupted save leaves the last complete checkpoint in place. Saving is synchronous. Every
process of a multi-process run calls :func:`save`; orbax writes the host arrays once.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

VERSION = 2


def _host(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _manager(path: str | os.PathLike) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(pathlib.Path(path).absolute(), options=options)


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete checkpoint."""
    if not pathlib.Path(path).is_dir():
        return False
    with _manager(path) as manager:
        return manager.latest_step() is not None


def save(
    path: str | os.PathLike,
    *,
    params: Any,
    batch_stats: Any,
    opt_state: Any,
    key: jax.Array,
    seed: int,
    epoch: int,
    step: int,
    records: list[dict],
    run: dict,
    extra: dict | None = None,
) -> None:
    """Writes the checkpoint of ``epoch`` into the folder ``path``, replacing the previous one."""
    leaves = _host(jax.tree_util.tree_leaves(opt_state))
    state = {
        "params": _host(flax.serialization.to_state_dict(params)),
        "batch_stats": _host(flax.serialization.to_state_dict(batch_stats)),
        "opt_state": {str(i): leaf for i, leaf in enumerate(leaves)},
        "jax_key": np.asarray(jax.random.key_data(key)),
    }
    meta = {
        "version": VERSION,
        "run": run,
        "epoch": int(epoch),
        "step": int(step),
        "numpy_rng": {"seed": int(seed), "next_epoch": int(epoch)},
        "records": records,
        "extra": extra or {},
    }
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    with _manager(path) as manager:
        manager.save(int(epoch), args=args, force=True)
        manager.wait_until_finished()


def read(path: str | os.PathLike) -> dict:
    """The latest checkpoint in ``path``: arrays as NumPy, the optimizer state as a list."""
    with _manager(path) as manager:
        latest = manager.latest_step()
        if latest is None:
            raise FileNotFoundError(f"{path}: no checkpoint.")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        restored = manager.restore(latest, args=args)
    payload = dict(restored["meta"])
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {payload.get('version')}.")
    payload.update(_host(restored["state"]))
    leaves = payload["opt_state"]
    payload["opt_state"] = [leaves[str(i)] for i in range(len(leaves))]
    return payload


def restore(payload: dict, params: Any, batch_stats: Any, opt_state: Any) -> tuple:
    """``(params, batch_stats, opt_state, key)`` with the structures of the given templates."""
    params = flax.serialization.from_state_dict(params, payload["params"])
    batch_stats = flax.serialization.from_state_dict(batch_stats, payload["batch_stats"])
    paths, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    template = [leaf for _, leaf in paths]
    leaves = payload["opt_state"]
    if len(leaves) != len(template):
        raise ValueError(
            f"checkpoint optimizer state has {len(leaves)} arrays, this optimizer {len(template)}: "
            "it was saved by another optimizer or model."
        )
    for (path, want), got in zip(paths, leaves, strict=True):
        if np.shape(got) != np.shape(want) or np.asarray(got).dtype != np.asarray(want).dtype:
            raise ValueError(
                f"checkpoint optimizer state does not match this optimizer at "
                f"opt_state{jax.tree_util.keystr(path)}: saved {np.shape(got)} "
                f"{np.asarray(got).dtype}, expected {np.shape(want)} {np.asarray(want).dtype}."
            )
    opt_state = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])
    as_jax = jax.numpy.asarray
    params = jax.tree_util.tree_map(as_jax, params)
    batch_stats = jax.tree_util.tree_map(as_jax, batch_stats)
    key = jax.random.wrap_key_data(as_jax(payload["jax_key"]))
    return params, batch_stats, opt_state, key
