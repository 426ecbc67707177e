"""Shared fixtures. Exactness tests opt into float64 with ``pytestmark = usefixtures("x64")``."""

import jax
import pytest


@pytest.fixture
def x64():
    """Runs the test with 64-bit JAX types enabled (default dtypes stay float32 elsewhere)."""
    with jax.enable_x64(True):
        yield


def pytest_configure(config):
    """Single-threaded BLAS/LAPACK in every test process, as ``tekfax-compare`` runs: with
    ``-n 2`` on 2 cores, OpenBLAS threads spinning after each eigh would fight the workers."""
    del config
    from tekfax.experiments.compare import single_threaded_lapack

    single_threaded_lapack()
