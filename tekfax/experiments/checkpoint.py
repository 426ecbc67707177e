"""Per-run checkpoints: one msgpack file (flax.serialization), replaced atomically.

A checkpoint holds the params and batch_stats (as Flax state dicts), the optimizer state (as
the list of its pytree leaves, restored into the structure of a freshly initialised state),
the JAX key, the NumPy seed and next epoch (shuffling uses ``default_rng((seed, epoch))``),
the step and epoch counters, the per-epoch records and a description of the run, so a resumed
run can check that it continues the same one.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import flax.serialization
import jax
import numpy as np

VERSION = 1


def _host(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


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
    """Writes the checkpoint to ``path`` via a temporary file and ``os.replace``."""
    payload = {
        "version": VERSION,
        "run": json.dumps(run, sort_keys=True),
        "epoch": int(epoch),
        "step": int(step),
        "numpy_rng": {"seed": int(seed), "next_epoch": int(epoch)},
        "jax_key": np.asarray(jax.random.key_data(key)),
        "params": _host(flax.serialization.to_state_dict(params)),
        "batch_stats": _host(flax.serialization.to_state_dict(batch_stats)),
        "opt_state": {
            str(i): leaf for i, leaf in enumerate(_host(jax.tree_util.tree_leaves(opt_state)))
        },
        "records": json.dumps(records),
        "extra": json.dumps(extra or {}),
    }
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(payload))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: str | os.PathLike) -> dict:
    """The raw checkpoint: arrays as NumPy, ``run``/``records``/``extra`` decoded from JSON."""
    with open(path, "rb") as f:
        payload = flax.serialization.msgpack_restore(f.read())
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {payload.get('version')}.")
    payload["run"] = json.loads(payload["run"])
    payload["records"] = json.loads(payload["records"])
    payload["extra"] = json.loads(payload["extra"])
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
