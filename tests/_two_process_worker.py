"""Subprocess of ``test_sharding.py``: one tekfac step on a mesh spanning two processes.

``python tests/_two_process_worker.py HOST:PORT PROCESS_ID OUT.json`` (repository root on
``PYTHONPATH``): joins the two-process job with ``jax.distributed.initialize`` (CPU collectives
through gloo), trains one step on the global batch sharded over both processes' devices and
writes the resulting (replicated) params. :func:`reference` is the same step on one device.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import optax

import tekfax
from tests.conftest import INTERVALS
from tests.models import MLP

MODEL = MLP(features=(12, 5))
BATCH = 32


def step(mesh=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 6)).astype(np.float32)
    y = rng.integers(0, 5, BATCH).astype(np.int32)
    params = jax.jit(MODEL.init)(jax.random.key(0), x)["params"]  # jitted: fewer compiles
    opt = tekfax.tekfac(0.1, damping=0.1, **INTERVALS)
    opt_state, key = jax.jit(opt.init)(params), jax.random.key(1)
    if mesh is not None:
        params, opt_state, key = tekfax.sharding.replicate(mesh, (params, opt_state, key))
        x, y = tekfax.sharding.shard_batch(mesh, (x, y))

    @jax.jit
    def train_step(params, opt_state, x, y, key):
        out = tekfax.loss_and_curvature(lambda p: MODEL.apply({"params": p}, x), params, y, rng=key)
        updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        return optax.apply_updates(params, updates)

    new = train_step(params, opt_state, x, y, key)
    flat = tekfax.capture.flatten_by_name(new)
    return {k: tekfax.sharding.to_host(v) for k, v in flat.items()}


def reference() -> dict[str, np.ndarray]:
    """The same step on one device, unsharded."""
    return step()


def main(coordinator: str, process_id: int, path: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=2,
        process_id=process_id,
        initialization_timeout=120,
    )
    params = step(tekfax.sharding.data_mesh())
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "params": {k: v.tolist() for k, v in params.items()},
    }
    with open(path, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
