"""tekfax: Kronecker-factored natural-gradient optimizers for JAX as optax transformations.

Pipeline, one module per stage: ``tagging`` (Flax interceptor) -> ``capture``
(``loss_and_curvature``) -> ``patches`` (layer matrices) -> ``curvature`` (factor estimates)
-> ``eigenbasis`` -> ``rescale`` (EKFAC/TEKFAC S) -> ``damping`` -> ``precondition``;
``kronecker`` wires the stages into ``scale_by_kronecker``, ``alias`` holds the presets,
``eadam`` the EAdam optimizer, ``guard`` the non-finite step guard, ``diagnostics`` the
dense Fisher blocks and ``sharding`` the data-parallel helpers (mesh, batch sharding).
"""

from tekfax import diagnostics, sharding
from tekfax.alias import (
    ekfac,
    kfac,
    scale_by_ekfac,
    scale_by_kfac,
    scale_by_tekfac,
    scale_by_tkfac,
    tekfac,
    tkfac,
)
from tekfax.capture import CurvatureOutput, LayerStats, loss_and_curvature
from tekfax.eadam import ScaleByEAdamState, eadam, scale_by_eadam
from tekfax.guard import SkipNonFiniteState, skip_non_finite, skipped_steps
from tekfax.kronecker import (
    LayerCurvature,
    ScaleByKroneckerState,
    scale_by_kronecker,
    stats_needed,
)
from tekfax.serialization import state_from_bytes, state_to_bytes
from tekfax.tagging import LayerMeta, tag_layers

__version__ = "0.1.0"

__all__ = [
    "CurvatureOutput",
    "LayerCurvature",
    "LayerMeta",
    "LayerStats",
    "ScaleByEAdamState",
    "ScaleByKroneckerState",
    "SkipNonFiniteState",
    "diagnostics",
    "eadam",
    "ekfac",
    "kfac",
    "loss_and_curvature",
    "scale_by_eadam",
    "scale_by_ekfac",
    "scale_by_kfac",
    "scale_by_kronecker",
    "scale_by_tekfac",
    "scale_by_tkfac",
    "skip_non_finite",
    "skipped_steps",
    "state_from_bytes",
    "state_to_bytes",
    "sharding",
    "stats_needed",
    "tag_layers",
    "tekfac",
    "tkfac",
]
