"""Data parallelism with jax.sharding: 8 forced CPU devices and two processes equal one device.

The 8-device runs happen in one subprocess (``_sharded_worker.py``), because the forced
device count must be set before jax is imported and this process keeps its one device.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

import tekfax
from tekfax.experiments import compare
from tests import _two_process_worker
from tests.conftest import PRESETS

TESTS = pathlib.Path(__file__).resolve().parent
DEVICES = 8
OPTIMIZERS = PRESETS
# float32: the sharded sums over the batch are reduced in another order than on one device.
RTOL, ATOL = 2e-5, 1e-6


# The workers compile a dozen programs each: the fast-compiling settings of tests/conftest.py.
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"


def _env(xla_flags: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # The repository root, so that the workers import the helpers as ``tests.<module>``.
    env.update(
        JAX_PLATFORMS="cpu", PYTHONPATH=str(TESTS.parent), XLA_FLAGS=f"{FAST_COMPILE} {xla_flags}"
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The two-process job, started first so that it runs while the 8-device worker does."""
    folder, port = tmp_path_factory.mktemp("two_processes"), _free_port()
    command = [sys.executable, str(TESTS / "_two_process_worker.py"), f"localhost:{port}"]
    procs = [
        subprocess.Popen(
            [*command, str(i), str(folder / f"process{i}.json")],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    yield folder, procs
    for p in procs:
        p.kill()
        p.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, two_processes):
    path = tmp_path_factory.mktemp("sharding") / "runs.npz"
    env = _env(f"--xla_force_host_platform_device_count={DEVICES}")
    subprocess.run(
        [sys.executable, str(TESTS / "_sharded_worker.py"), str(path)],
        env=env,
        check=True,
        timeout=240,
    )
    with np.load(path) as data:
        return dict(data)


def _results(runs: dict, name: str, mode: str) -> dict[str, np.ndarray]:
    prefix = f"{name}/{mode}/"
    return {k[len(prefix) :]: v for k, v in runs.items() if k.startswith(prefix)}


def _split(results: dict) -> tuple[dict, dict]:
    values = {k: v for k, v in results.items() if not k.startswith("facts/")}
    facts = {k[6:]: v.item() for k, v in results.items() if k.startswith("facts/")}
    return values, facts


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_eight_devices_equal_one_device_on_the_global_batch(runs, name):
    assert runs["devices"] == DEVICES
    single, single_facts = _split(_results(runs, name, "single"))
    sharded, facts = _split(_results(runs, name, "sharded"))
    assert set(single) == set(sharded)
    assert {k.split("/")[0] for k in single} == {"losses", "params", "factors", "approx", "damped"}
    # Three steps: losses, params, factor moving averages and the damped blocks the
    # preconditioner inverted (basis-independent) all match the one-device run.
    chex.assert_trees_all_close(sharded, single, rtol=RTOL, atol=ATOL)
    # ... and the run was really data parallel: the batch split 8 ways, the factors (and
    # gradients) all-reduced across devices, the state replicated.
    assert single_facts["all_reduces"] == 0 and single_facts["batch_shards"] == 1
    assert facts["batch_shards"] == DEVICES and facts["all_reduces"] >= 2
    assert facts["replicated"]
    # No gather of the per-example activations (or of anything else).
    assert facts["all_gathers"] == 0


@pytest.mark.parametrize("name", ["kfac", "tekfac"])
def test_distributed_eigendecomposition_equals_default(runs, name):
    default, default_facts = _split(_results(runs, name, "sharded"))
    spread, facts = _split(_results(runs, name, "eigen_mesh"))
    chex.assert_trees_all_close(spread, default, rtol=RTOL, atol=ATOL)
    # The eigendecompositions were spread: their results come back through collectives
    # (a psum here, as every group of same-shaped factors is smaller than the devices).
    assert facts["all_reduces"] > default_facts["all_reduces"]


def test_grouped_eigh_spread_over_devices_is_exact(runs):
    single = _results(runs, "eigh", "single")
    spread = _results(runs, "eigh", "eigen_mesh")
    assert set(single) == set(spread) and len(single) == 2 * 15
    # The same LAPACK eigh on the same matrices, on CPU: equal to the bit, whether returned
    # by all-gather (the 11 6x6 factors: 2 per device) or psum (the 4 4x4: padded to 8). A
    # device whose share is finite must still take the jittered retry the non-finite
    # factor triggers.
    for key in single:
        np.testing.assert_array_equal(spread[key], single[key], err_msg=key)
    np.testing.assert_array_equal(single["bad/values"], np.zeros(4, np.float32))


def test_one_device_mesh_is_a_no_op():
    x = np.random.default_rng(0).standard_normal((4, 5, 5)).astype(np.float32)
    mats = {i: m @ m.T for i, m in enumerate(x)}
    mesh = tekfax.sharding.data_mesh(1)
    spread = tekfax.eigenbasis.eigh_psd_grouped(mats, mesh)
    chex.assert_trees_all_equal(spread, tekfax.eigenbasis.eigh_psd_grouped(mats))
    hlo = jax.jit(lambda m: tekfax.eigenbasis.eigh_psd_grouped(m, mesh)).lower(mats).as_text()
    assert "shard_map" not in hlo and "all_gather" not in hlo


def test_sharding_errors(runs):
    with pytest.raises(ValueError, match="devices_per_process must be an integer"):
        tekfax.sharding.data_mesh(jax.local_device_count() + 1)
    with pytest.raises(ValueError, match="eigen_axis 'model' is not an axis"):
        tekfax.tekfac(0.1, damping=0.1, eigen_mesh=tekfax.sharding.data_mesh(), eigen_axis="model")
    message = str(runs["indivisible_batch_error"])
    assert "global batch (63 rows)" in message and f"the {DEVICES} devices" in message


def test_compare_cli_on_eight_devices_matches_one(runs):
    one = _results(runs, "cli", "1")
    eight = _results(runs, "cli", str(DEVICES))
    assert one.pop("devices") == 1 and eight.pop("devices") == DEVICES
    # One epoch of tekfac on digits (5 steps of batch 256) and the test-set evaluation
    # (chunks padded to a multiple of 8 and sharded): the same run on 8 devices.
    chex.assert_trees_all_close(eight, one, rtol=1e-3)
    assert runs["cli/bad_batch_status"] == 2
    assert "--batch-size 60 must be a multiple of the 8 devices" in str(runs["cli/bad_batch_error"])


def test_compare_cli_rejects_bad_device_flags(capsys):
    for flags, message in (
        (["--devices", "2"], "--devices must be in [1, 1]"),
        (["--num-processes", "2"], "--num-processes and --process-id need --coordinator"),
        (["--coordinator", "localhost:1", "--num-processes", "2"], "needs --num-processes and"),
    ):
        with pytest.raises(SystemExit) as exit_:
            compare.main(flags)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_two_processes_agree_with_one_device(two_processes):
    folder, procs = two_processes
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    results = [json.loads((folder / f"process{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["process_count"] == 2 and r["global_devices"] == 2 for r in results)
    # Both processes hold the same replicated params after the step ...
    assert results[0]["params"] == results[1]["params"]
    # ... equal to one device's step on the same global batch.
    expected = _two_process_worker.reference()
    chex.assert_trees_all_close(
        {k: np.asarray(v) for k, v in results[0]["params"].items()},
        expected,
        rtol=RTOL,
        atol=ATOL,
    )
