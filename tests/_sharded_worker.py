"""Subprocess of ``test_sharding.py``: the same training steps on one device and on a mesh.

Run as ``python tests/_sharded_worker.py OUT.npz`` with the repository root on ``PYTHONPATH``
and ``XLA_FLAGS`` forcing 8 CPU devices (set before jax is imported). For every optimizer it
trains three steps of a small CNN: unsharded on one device (the reference) and data-parallel
over all devices; kfac and tekfac also with distributed eigendecompositions (``eigen_mesh``).
It saves the losses, the final params, factors and (damped) approximate Fisher blocks of each,
and facts about the sharded program. The global batch (64) exceeds every layer's d_in (19, 49),
so the factors have no degenerate null space whose eigenvectors rounding could rotate.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tekfax
from tekfax import eigenbasis, patches
from tekfax.experiments import compare
from tests.conftest import INTERVALS, PRESETS
from tests.models import ConvNet

OPTIMIZERS = PRESETS
# The refresh is one code path for all four; these two cover the bases of A, G and of S.
EIGEN_MESH_OPTIMIZERS = ("kfac", "tekfac")
STEPS = 3  # with the shared INTERVALS: statistics every step, refreshes on steps 0 and 2
PER_DEVICE = 8
MODEL = ConvNet(channels=(3,), num_classes=5)


def make_step(opt):
    def step(params, opt_state, x, y, key):
        out = tekfax.loss_and_curvature(
            lambda p: MODEL.apply({"params": p}, x),
            params,
            y,
            rng=key,
            compute_stats=tekfax.stats_needed(opt_state),
        )
        updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        return optax.apply_updates(params, updates), opt_state, out.loss

    # Ten programs compile here: XLA's backend optimisation is off, as in tests/conftest.py.
    return jax.jit(step, compiler_options={"xla_backend_optimization_level": 0})


def train(name, batches, params, mesh=None, eigen_mesh=None):
    opt = getattr(tekfax, name)(
        0.1, damping=0.1, eigen_mesh=eigen_mesh, skip_non_finite=False, **INTERVALS
    )
    opt_state = opt.init(params)
    key = jax.random.key(1)
    if mesh is not None:
        params, opt_state, key = tekfax.sharding.replicate(mesh, (params, opt_state, key))
    step, losses, facts = make_step(opt), [], {}
    for i, (x, y) in enumerate(batches):
        if mesh is None:
            x, y = jax.device_put((x, y))
        else:
            x, y = tekfax.sharding.shard_batch(mesh, (x, y))
        args = (params, opt_state, x, y, jax.random.fold_in(key, i))
        if i == 0:
            step = step.lower(*args).compile()
            hlo = step.as_text()
            facts["all_reduces"] = hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")
            facts["all_gathers"] = hlo.count(" all-gather(") + hlo.count(" all-gather-start(")
            facts["batch_shards"] = len({s.index[0].start for s in x.addressable_shards})
        params, opt_state, loss = step(*args)
        losses.append(loss)
    facts["replicated"] = all(
        leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(opt_state)
    )
    opt_state = jax.device_get(opt_state)  # the diagnostics then run on one device
    state = tekfax.kronecker.find_kronecker_state(opt_state)
    results = {
        "losses": losses,
        "params": params,
        "factors": {k: {"in": v.factor_in, "out": v.factor_out} for k, v in state.layers.items()},
        "approx": tekfax.diagnostics.approx_fisher_blocks(opt_state),
        "damped": tekfax.diagnostics.damped_fisher_blocks(opt_state),
    }
    flat = tekfax.capture.flatten_by_name(jax.device_get(results))
    return {k: np.asarray(v) for k, v in flat.items()}, facts


def grouped_eigh(mesh) -> dict[str, np.ndarray]:
    """eigh_psd_grouped undistributed and spread over ``mesh``: 11 same-shaped factors (more
    than the devices), 3 of another shape and one non-finite factor, which makes every
    device take the jittered retry."""
    rng = np.random.default_rng(1)
    mats = {}
    for i, d in enumerate([6] * 11 + [4] * 3):
        root = rng.standard_normal((d, 2 * d)).astype(np.float32)
        mats[f"m{i}"] = root @ root.T
    mats["bad"] = np.full((4, 4), np.nan, np.float32)
    out = {}
    for mode, kwargs in (("single", {}), ("eigen_mesh", {"mesh": mesh})):
        result = jax.jit(lambda m, kw=kwargs: eigenbasis.eigh_psd_grouped(m, **kw))(mats)
        for key, (values, vectors) in jax.device_get(result).items():
            out[f"eigh/{mode}/{key}/values"] = values
            out[f"eigh/{mode}/{key}/vectors"] = vectors
    return out


def compare_cli(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """``tekfax-compare --devices 8`` and ``--devices 1``: per-epoch records of each, and the
    usage error for a batch that does not split over the devices."""
    out = {}
    flags = ["--model", "mlp", "--optimizers", "tekfac", "--epochs", "1", "--batch-size", "256"]
    flags += ["--no-progress", "--no-plots"]
    for devices in (1, jax.device_count()):
        target = folder / f"devices{devices}"
        with contextlib.redirect_stdout(io.StringIO()):
            assert compare.main([*flags, "--devices", str(devices), "--output", str(target)]) == 0
        results = json.loads((target / "results.json").read_text())
        record = results["runs"][0]["records"][0]
        out[f"cli/{devices}/devices"] = np.asarray(results["config"]["devices"])
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            out[f"cli/{devices}/{key}"] = np.asarray(record[key])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            compare.main([*flags, "--batch-size", "60", "--output", str(folder / "bad")])
        except SystemExit as exit_:
            out["cli/bad_batch_status"] = np.asarray(exit_.code)
    out["cli/bad_batch_error"] = np.asarray(stderr.getvalue())
    return out


def main(path: str) -> None:
    # Small chunks, so the convolution's statistics scan over several chunks of the sharded
    # batch axis.
    patches.CHUNK_ELEMENTS = 512
    devices = jax.device_count()
    mesh = tekfax.sharding.data_mesh()
    rng = np.random.default_rng(0)
    batch = PER_DEVICE * devices
    batches = [
        (
            rng.standard_normal((batch, 4, 4, 2)).astype(np.float32),
            rng.integers(0, 5, batch).astype(np.int32),
        )
        for _ in range(STEPS)
    ]
    x0 = jnp.asarray(batches[0][0])
    params = MODEL.init(jax.random.key(0), x0)["params"]
    out: dict[str, np.ndarray] = {"devices": np.asarray(devices), **grouped_eigh(mesh)}
    for name in OPTIMIZERS:
        modes = [("single", {}), ("sharded", {"mesh": mesh})]
        if name in EIGEN_MESH_OPTIMIZERS:
            modes.append(("eigen_mesh", {"mesh": mesh, "eigen_mesh": mesh}))
        for mode, kwargs in modes:
            results, facts = train(name, batches, params, **kwargs)
            for key, value in results.items():
                out[f"{name}/{mode}/{key}"] = value
            for fact, value in facts.items():
                out[f"{name}/{mode}/facts/{fact}"] = np.asarray(value)
    out.update(compare_cli(pathlib.Path(path).parent))
    try:
        tekfax.sharding.shard_batch(mesh, np.zeros((63, 2)))
    except ValueError as err:
        out["indivisible_batch_error"] = np.asarray(str(err))
    np.savez(path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
