"""Shared fixtures, the optimizer case table, and the Hypothesis profiles.

Test helpers are imported through the ``tests`` package (``from tests import reference``,
``from tests.models import MLP``), never as top-level modules, so that each helper module
(and its caches) exists once per process. The subprocess workers of ``test_sharding.py`` run
with the repository root on ``PYTHONPATH`` and import the same way.

The optimizer cases (:data:`CASES`) and their statistics intervals (:data:`INTERVALS`) are
declared here once; a test module that needs other intervals or hyperparameters passes them
as explicit overrides to :func:`make_optimizer` / :func:`make_scale_by` and says why.

Hypothesis profiles: ``ci`` (the default: few examples, derandomized, no deadline) and
``thorough`` (at least 1,000 examples per property test, random), chosen with the
environment variable ``TEKFAX_HYPOTHESIS_PROFILE=thorough``. Property tests take their
example count from the loaded profile through :func:`examples`.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from importlib.metadata import version

# XLA's newer CPU fusion emitters compile the suite's many tiny programs several times slower
# than the classic ones, for the same arithmetic. Set before jax creates its CPU backend;
# subprocesses started by the tests inherit it. XLA rejects flags it does not know, so the
# flag is only set for the jaxlib releases it was measured on (0.9 and 0.10). XLA's backend
# optimisation (LLVM passes) is off as well, as in `jit` below: the suite compiles thousands
# of tiny programs, also inside the tools it runs. No fast-math either way, but vectorisation
# and FMA contraction differ between levels, so two equivalent programs can round differently:
# the one test that compares two different programs bit for bit (tests/test_schedule.py)
# compiles them at the levels users run: XLA's default, 3, and tekfax-compare's, 1.
if version("jaxlib").split(".")[:2] in (["0", "9"], ["0", "10"]):
    os.environ["XLA_FLAGS"] = " ".join(
        [
            os.environ.get("XLA_FLAGS", ""),
            "--xla_cpu_use_fusion_emitters=false",
            "--xla_backend_optimization_level=0",
        ]
    ).strip()

# tekfax-compare keeps compiled steps in ~/.cache/tekfax/jax; the suite writes nothing there
# (tests/test_compare.py checks the setting itself with its own directory).
os.environ["TEKFAX_COMPILATION_CACHE"] = "off"

# One JAX compilation cache for the whole run, in a fresh temporary directory shared by the
# xdist workers and the subprocesses the tests start (they inherit the environment): many
# tests and tools compile the same programs, and a program compiled once is loaded after.
# Every program is cached, however fast it compiled. Measured on the 2-core CPU: the suite
# took 767 s with it against 839 s without. The process that made the directory removes it
# at the end of the run (pytest_unconfigure).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tekfax-tests-jax-")
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _OWN_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import hypothesis  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import tekfax  # noqa: E402

# --- Hypothesis profiles -----------------------------------------------------------------

hypothesis.settings.register_profile(
    "ci", max_examples=4, derandomize=True, deadline=None, print_blob=True
)
hypothesis.settings.register_profile(
    "thorough", max_examples=1000, derandomize=False, deadline=None, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("TEKFAX_HYPOTHESIS_PROFILE", "ci"))


def examples(scale: float = 1.0) -> hypothesis.settings:
    """Settings with ``scale`` times the loaded profile's ``max_examples`` (at least one).

    ``ci`` runs 4 examples per unit of scale, ``thorough`` 1,000.
    """
    base = hypothesis.settings.default.max_examples
    return hypothesis.settings(max_examples=max(1, round(base * scale)))


# --- The optimizer cases -----------------------------------------------------------------

# Statistics on every step, eigenbasis refreshes on even steps (0, 2, ...), S on every step.
INTERVALS = {"curvature_every": 1, "eigen_every": 2, "rescale_every": 1}
LEARNING_RATE = 0.1
DAMPING = 1e-2
# Above the trace delta of the tests' small layers (about 3), so the nu rule binds.
NU = 10.0
PRESETS = ("kfac", "ekfac", "tkfac", "tekfac")
# case id -> (preset, the hyperparameters that set its damping).
CASES = {
    "kfac": ("kfac", {"damping": DAMPING}),
    "ekfac": ("ekfac", {"damping": DAMPING}),
    "tkfac": ("tkfac", {"damping": DAMPING}),
    "tekfac": ("tekfac", {"damping": DAMPING}),
    "tkfac-nu": ("tkfac", {"nu": NU}),
    "tekfac-nu": ("tekfac", {"nu": NU}),
}


EXACT = {"norm_constraint": None, "damping_floor": 0.0, "skip_non_finite": False}
"""Turns off the full optimizers' trust region, damping floor and guard: the bare chain of
exactly the formulas the references implement (tests/test_defaults.py and tests/test_guard.py
test the defaults)."""


def make_optimizer(
    case: str, learning_rate=LEARNING_RATE, **overrides
) -> optax.GradientTransformationExtraArgs:
    """The full alias ``tekfax.<preset>`` of a case, with the shared intervals.

    Example: ``make_optimizer("tkfac-nu", 0.05, nu=1.0, eigen_every=3)``.
    """
    preset, hyper = CASES[case]
    return getattr(tekfax, preset)(learning_rate, **{**hyper, **INTERVALS, **EXACT, **overrides})


def make_scale_by(case: str, **overrides) -> optax.GradientTransformationExtraArgs:
    """The preconditioner ``tekfax.scale_by_<preset>`` of a case, with the shared intervals."""
    preset, hyper = CASES[case]
    return getattr(tekfax, f"scale_by_{preset}")(**{**hyper, **INTERVALS, **overrides})


@pytest.fixture(params=list(CASES))
def optimizer_case(request) -> str:
    """Each optimizer case id of :data:`CASES` in turn."""
    return request.param


# --- Compilation ---------------------------------------------------------------------------

# Tests compile many tiny programs once each: XLA's backend optimisation (LLVM passes) costs
# more than it saves there. It does not change the arithmetic (no fast-math is involved).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --- Other fixtures ----------------------------------------------------------------------


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


def pytest_unconfigure(config):
    """Removes the run's compilation cache, in the process that made it."""
    del config
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
