"""tekfax: Kronecker-factored natural-gradient optimizers for JAX as optax transformations.

The pipeline, one module per stage (sections of docs/algorithms.md in brackets):

* :mod:`tekfax.modules`: the supported Linen and NNX modules, each as one layer matrix
  (sections 1 and 10);
* :mod:`tekfax.tagging`: finds the supported layers a model calls and taps them;
* :mod:`tekfax.capture`: :func:`loss_and_curvature`, the loss, gradients and per-layer
  statistics of one batch from one forward pass (section 1);
* :mod:`tekfax.patches`: the layer matrices a and u, im2col, kernel layout (section 1);
* :mod:`tekfax.curvature`: per-batch Kronecker factors and their moving averages (2-3);
* :mod:`tekfax.eigenbasis`: the eigenbasis refresh (section 3);
* :mod:`tekfax.rescale`: the eigenvalue-corrected diagonal S of EKFAC/TEKFAC (2-3);
* :mod:`tekfax.damping`: the damped eigenvalues D (section 4);
* :mod:`tekfax.precondition`: preconditioning in the eigenbasis (section 5).

Wiring and the rest:

* :mod:`tekfax.kronecker`: :func:`scale_by_kronecker`, the stages as one optax transformation;
* :mod:`tekfax.layers`: the kernel/bias pairs of a params tree (Linen dicts, NNX states);
* :mod:`tekfax.hyperparams`: the keyword arguments it shares with every preset, defined once;
* :mod:`tekfax.alias`: the presets KFAC, EKFAC, TKFAC and TEKFAC;
* :mod:`tekfax.eadam`: the EAdam optimizer (section 6);
* :mod:`tekfax.guard`: the guard that skips non-finite steps;
* :mod:`tekfax.adaptive_damping`: Levenberg-Marquardt adaptive damping (section 9);
* :mod:`tekfax.losses`: the losses and their model-distribution samplers;
* :mod:`tekfax.diagnostics`: dense Fisher blocks, approximate and exact;
* :mod:`tekfax.serialization`: saving and restoring optimizer state;
* :mod:`tekfax.states`: finding one transformation's state inside a nested state;
* :mod:`tekfax.sharding`: data-parallel helpers (mesh, batch sharding);
* :mod:`tekfax.validation`: the argument checks;
* :mod:`tekfax.experiments`: the training scripts and experiments (section 7).
"""

from tekfax import diagnostics, sharding
from tekfax.adaptive_damping import AdaptiveDampingState, adaptive_damping, current_damping
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
from tekfax.capture import CurvatureOutput, LayerStats, layer_dims, loss_and_curvature
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
    "AdaptiveDampingState",
    "CurvatureOutput",
    "LayerCurvature",
    "LayerMeta",
    "LayerStats",
    "ScaleByEAdamState",
    "ScaleByKroneckerState",
    "SkipNonFiniteState",
    "adaptive_damping",
    "current_damping",
    "diagnostics",
    "eadam",
    "ekfac",
    "kfac",
    "layer_dims",
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
