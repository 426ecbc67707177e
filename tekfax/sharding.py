"""Data parallelism with JAX's own sharding: a ``data`` mesh, sharded batches, host reads.

tekfax needs no distribution layer of its own. Under ``jax.jit``, with the global batch
sharded over a ``data`` mesh axis and parameters and optimizer state replicated, every batch
mean in :func:`tekfax.loss_and_curvature` and :func:`tekfax.scale_by_kronecker` (the loss, the
gradients, the factors A, G / M_Phi, M_Psi and S) is a global-batch mean: XLA turns the
contraction over the sharded batch axis into an all-reduce. These helpers only build the
mesh and place arrays on it; they work unchanged with several processes
(``jax.distributed.initialize``), where every process passes the same global batch.

A data-parallel training step (on one device it runs unchanged):

  >>> opt = tekfax.kfac(learning_rate=1e-2, damping=1e-3)
  >>> @jax.jit
  ... def train_step(params, opt_state, x, y, rng):
  ...     out = tekfax.loss_and_curvature(
  ...         lambda p: model.apply({"params": p}, x), params, y, rng=rng
  ...     )
  ...     updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
  ...     return optax.apply_updates(params, updates), opt_state, out.loss
  >>> mesh = tekfax.sharding.data_mesh()                     # every device
  >>> params, opt_state, rng = tekfax.sharding.replicate(mesh, (params, opt.init(params), rng))
  >>> x, y = tekfax.sharding.shard_batch(mesh, (x, y))       # the global batch
  >>> params, opt_state, loss = train_step(params, opt_state, x, y, rng)
  >>> bool(tekfax.sharding.to_host(loss) > 0)
  True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(
    devices_per_process: int | None = None,
    *,
    axis_name: str = DATA_AXIS,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A one-axis mesh for data parallelism.

    Args:
      devices_per_process: how many of each process's local devices to use (default: all).
        With one process this is the device count.
      axis_name: the mesh axis the batch is sharded over.
      devices: explicit devices instead (``devices_per_process`` must then be None).

    Returns:
      ``Mesh`` over the chosen devices of every process, in process order.

    Example:
      >>> mesh = tekfax.sharding.data_mesh()
      >>> mesh.axis_names, mesh.shape["data"] == jax.device_count()
      (('data',), True)
    """
    if devices is None:
        local = jax.local_device_count()
        count = local if devices_per_process is None else devices_per_process
        if not isinstance(count, int) or not 1 <= count <= local:
            raise ValueError(
                f"tekfax: devices_per_process must be an integer in [1, {local}] (this process "
                f"has {local} {jax.default_backend()} device(s)), got {count!r}."
            )
        devices = [d for p in range(jax.process_count()) for d in _process_devices(p)[:count]]
    elif devices_per_process is not None:
        raise ValueError("tekfax: pass devices_per_process or devices, not both.")
    return Mesh(np.asarray(devices), (axis_name,))


def _process_devices(process: int) -> list[jax.Device]:
    return sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of parameters and optimizer state: a full copy on every device.

    Example:
      >>> sharding = tekfax.sharding.replicated(tekfax.sharding.data_mesh())
      >>> sharding.spec == jax.sharding.PartitionSpec()    # no axis split
      True
    """
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    """The sharding of a batch: its leading axis split over ``axis_name``.

    Example:
      >>> sharding = tekfax.sharding.batch_sharding(tekfax.sharding.data_mesh())
      >>> sharding.spec == jax.sharding.PartitionSpec("data")
      True
    """
    return NamedSharding(mesh, PartitionSpec(axis_name))


def _put(leaf: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _put(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(to_host(leaf) if isinstance(leaf, jax.Array) else leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Every array of ``tree`` (params, optimizer state, keys) replicated over ``mesh``.

    With several processes each must pass the same values (e.g. from the same seed).

    Example:
      >>> mesh = tekfax.sharding.data_mesh()
      >>> params = tekfax.sharding.replicate(mesh, params)
      >>> params["Dense_0"]["kernel"].sharding.is_fully_replicated
      True
    """
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda leaf: _put(leaf, sharding), tree)


def shard_batch(mesh: Mesh, batch: Any, axis_name: str = DATA_AXIS) -> Any:
    """The global batch (NumPy arrays) as arrays sharded over ``axis_name`` on their axis 0.

    Every process passes the whole global batch and keeps the rows of its own devices;
    a process that loads only its own rows should call
    ``jax.make_array_from_process_local_data(batch_sharding(mesh), rows)`` instead.

    Example:
      >>> mesh = tekfax.sharding.data_mesh()
      >>> xs, ys = tekfax.sharding.shard_batch(mesh, (x, y))
      >>> xs.shape, xs.sharding == tekfax.sharding.batch_sharding(mesh)
      ((8, 4), True)
    """
    sharding = batch_sharding(mesh, axis_name)
    ways = mesh.shape[axis_name]

    def put(leaf):
        rows = np.shape(leaf)[0] if np.ndim(leaf) else None
        if rows is None or rows % ways:
            raise ValueError(
                f"tekfax: the global batch ({rows} rows) must divide evenly over the {ways} "
                f"devices of mesh axis '{axis_name}'; choose a batch size that is a multiple "
                f"of {ways}."
            )
        return _put(leaf, sharding)

    return jax.tree_util.tree_map(put, batch)


def to_host(x: jax.Array) -> np.ndarray:
    """A NumPy copy of a replicated (or single-process) array; works with several processes.

    Example:
      >>> mesh = tekfax.sharding.data_mesh()
      >>> tekfax.sharding.to_host(tekfax.sharding.replicate(mesh, jnp.arange(3)))
      array([0, 1, 2], dtype=int32)
    """
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if not x.is_fully_replicated:
        raise ValueError("tekfax: to_host needs a replicated array when it spans processes.")
    return np.asarray(x.addressable_data(0))
