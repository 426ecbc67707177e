"""Shared fixtures. Exactness tests opt into float64 with ``pytestmark = usefixtures("x64")``."""

import jax
import pytest


@pytest.fixture
def x64():
    """Runs the test with 64-bit JAX types enabled (default dtypes stay float32 elsewhere)."""
    with jax.enable_x64(True):
        yield
