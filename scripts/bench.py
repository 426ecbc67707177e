"""Step-time, FLOP floor, compile, memory and per-stage benchmark of the tekfax optimizers.

For each model and batch size, in one process:

1. **Steps.** One jitted, donating training step per optimizer (sgdm, adam, eadam, and kfac,
   ekfac, tkfac, tekfac with the library's defaults, with "statistics every step, eigenbasis
   every 5 steps", with the defaults unguarded, ``skip_non_finite=False``, which measures
   the guard's cost, and with the defaults and the guard in the other backend's form,
   "other-guard": under ``lax.cond`` on CPU, unconditional elsewhere
   (:func:`tekfax.guard.skips_under_cond`), to check that choice in one process). A trivial
   function is compiled first, so SGD's compile time does not carry the process's one-time
   XLA start-up. Then ``--warmup`` steps run untimed and ``--window`` steps are timed (a
   whole multiple of the longest interval, so the periodic work is in the mean). One table:
   median and mean step, the mean as a ratio to SGD's, the step's FLOP floor (below), the
   floor's time at this device's measured float32 matmul rate and the mean as a multiple of
   it, compile time (lower + compile) and its ratio to SGD's, and the compiled program's
   peak memory (XLA's buffer assignment: arguments + outputs + temporaries - aliased, so the
   statistics branches are counted even on steps that skip them) with its ratio to SGD's.
   Footnotes split the floor into its stages, the memory into optimizer state and the
   buffers of a statistics step, and the compiled kernels (whose count sets XLA:CPU's
   compile time) by the tekfax module each comes from (:func:`kernel_sources`).
2. **Stages** (``--stages``). Each stage of a Kronecker step as its own jitted function of
   the library's internals on the same batch: forward + backward, the extra sampled-label
   backward pass, statistics (im2col and factor products), eigendecompositions, rescale
   (EKFAC/TEKFAC S), preconditioning. Beside each time: how often the default intervals run
   it, its amortised cost per step, an analytic FLOP count and the achieved rate as a share
   of this device's measured float32 matmul rate, so the gap to the hardware is visible.

**The FLOP floor** of one step (docs/algorithms.md, section 8) is the work no implementation
of the method can skip, amortised over the intervals the optimizer runs with:

- forward + backward: XLA's cost analysis of the compiled SGD step (``cost_analysis()``),
  which counts every operation the model runs (BatchNorm, activations, loss, the update),
  and of a convolution only the taps that meet the input, not its zero padding. Where a
  backend reports no count (or less than half the analytic one) the analytic count of the
  tagged layers' products is used instead, 3 x 2 N T d_in d_out (forward, input and weight
  gradients); the header says which;
- preconditioning, every step: EKFAC/TEKFAC project into the eigenbasis and back, 4
  products (2 d_in^2 d_out + 2 d_in d_out^2 per pair); KFAC/TKFAC multiply by their cached
  inverse factors, 2 products (:func:`precondition_flops`);
- on the steps that use statistics: the sampled-label backward pass (output gradients only,
  no weight gradients: 2 N T d_in d_out per layer and label sample, the first layer's
  included, a slight over-count) and the factor products
  (2 N T d_in^2 + 2 S N T d_out^2, plus TKFAC's weights); on rescale steps EKFAC/TEKFAC's S;
- on refresh steps: ``eigh`` at ~9 d^3 per factor (symmetric QR with eigenvectors, Golub &
  Van Loan, section 8.3; LAPACK's divide and conquer needs fewer), and for KFAC/TKFAC the
  inverse factors Q diag(1/d) Q^T, 2 d^3 per factor (their recomputations when D changes
  between refreshes are not counted).

Synthetic data; the device is recorded. ``--json`` also writes every number.

    python scripts/bench.py                       # digits MLP and CNN, batch 128 and 256
    python scripts/bench.py --models autoencoder --batch-sizes 256 --optimizers kfac tekfac
    python scripts/bench.py --models resnet20 --batch-sizes 128 --window 20 --stages
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tekfax
from tekfax import curvature, eigenbasis, losses, precondition, rescale
from tekfax.capture import iter_layer_stats
from tekfax.experiments import models
from tekfax.experiments.compare import single_threaded_lapack
from tekfax.patches import CHUNK_ELEMENTS, chunking, input_matrix, locations, output_matrix

SHAPES = {  # per-example input shape of each bench model
    "mlp": (8, 8, 1),
    "cnn": (8, 8, 1),
    "autoencoder": (28, 28, 1),  # MNIST
    "gapcnn": (28, 28, 1),  # MNIST, as in scripts/time_to_target.py
    "resnet20": (32, 32, 3),
    "vgg16": (32, 32, 3),
}
INTERVALS = {  # variants of each Kronecker preset: its keyword arguments
    "default": {},
    "stats1-eig5": {"curvature_every": 1, "eigen_every": 5, "rescale_every": 1},
    "unguarded": {"skip_non_finite": False},  # the default without the guard: its cost
    "other-guard": {},  # the default, its guard in the other backend's form (Entry)
}


class Preset(NamedTuple):
    """A Kronecker preset: its constructor, curvature estimator and whether it has S."""

    make: Callable[..., optax.GradientTransformation]
    estimator: str
    eigen_corrected: bool


KRONECKER = {
    "kfac": Preset(tekfax.kfac, "kfac", False),
    "ekfac": Preset(tekfax.ekfac, "kfac", True),
    "tkfac": Preset(tekfax.tkfac, "tkfac", False),
    "tekfac": Preset(tekfax.tekfac, "tkfac", True),
}
_PRESET = inspect.signature(tekfax.kfac).parameters
DEFAULTS = {  # The library's default intervals, read from the preset's signature.
    k: _PRESET[k].default for k in ("curvature_every", "eigen_every", "rescale_every")
}
EIGH_FLOPS = 9.0  # per d^3 and factor: symmetric QR with eigenvectors (Golub & Van Loan 8.3)
INVERSE_FLOPS = 2.0  # per d^3 and factor: Q diag(1/d) Q^T, one product
MIB = 2.0**20


class Entry(NamedTuple):
    """One benchmarked optimizer: preset (a KRONECKER key) and intervals; None for SGD etc."""

    opt: optax.GradientTransformation
    preset: str | None
    every: dict[str, int]
    guard_under_cond: bool | None = None  # the guard's form; None: this backend's own


def optimizers(only: list[str] | None, intervals: list[str] | None = None) -> dict[str, Entry]:
    """name -> :class:`Entry`; lr 0.01, damping 0.1. SGD with momentum always comes first."""
    out = {
        "sgdm": Entry(optax.sgd(0.01, momentum=0.9), None, {}),
        "adam": Entry(optax.adam(1e-3), None, {}),
        "eadam": Entry(tekfax.eadam(1e-3), None, {}),
    }
    for interval, kwargs in INTERVALS.items():
        if intervals and interval not in intervals:
            continue
        every = {k: kwargs.get(k, v) for k, v in DEFAULTS.items()}
        for name, preset in KRONECKER.items():
            opt = preset.make(0.01, damping=0.1, **kwargs)
            flip = not tekfax.guard.skips_under_cond() if interval == "other-guard" else None
            out[f"{name} ({interval})"] = Entry(opt, name, every, flip)
    if only:
        out = {k: v for k, v in out.items() if k == "sgdm" or k.split(" ")[0] in only}
    return out


# --- model, data and step -----------------------------------------------------------------


class Bench(NamedTuple):
    """One model on one synthetic batch, with its loss (tekfax.losses name)."""

    model: Any
    variables: dict
    x: jax.Array
    y: jax.Array
    loss: str

    @property
    def has_bn(self) -> bool:
        return "batch_stats" in self.variables


def setup(name: str, batch: int) -> Bench:
    """Model ``name`` and a synthetic batch: labels for classifiers, the input in [0, 1] for
    the auto-encoder, whose targets are its flattened inputs (``models.model_loss``)."""
    shape = SHAPES[name]
    model = models.create_model(name, 10, shape)
    variables = models.init_variables(model, shape, jax.random.key(0))
    rng = np.random.default_rng(0)
    loss = models.model_loss(name)
    if loss == "softmax_cross_entropy":
        x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    else:
        x = jnp.asarray(rng.uniform(size=(batch, *shape)), jnp.float32)
        y = x.reshape(batch, -1)
    return Bench(model, variables, x, y, loss)


def _apply_fn(model, has_bn: bool):
    def apply(params, batch_stats, x):
        if has_bn:
            variables = {"params": params, "batch_stats": batch_stats}
            return model.apply(variables, x, train=True, mutable=["batch_stats"])
        return model.apply({"params": params}, x, train=True), {}

    return apply


def _capture(b: Bench, params, batch_stats, key, compute_stats) -> tekfax.CurvatureOutput:
    apply = _apply_fn(b.model, b.has_bn)
    return tekfax.loss_and_curvature(
        lambda p: apply(p, batch_stats, b.x),
        params,
        b.y,
        loss=b.loss,
        rng=key,
        has_aux=True,
        compute_stats=compute_stats,
    )


def _loss_and_grads(b: Bench, params, batch_stats):
    apply = _apply_fn(b.model, b.has_bn)

    def loss_fn(p):
        outputs, aux = apply(p, batch_stats, b.x)
        return losses.mean_loss(b.loss, outputs, b.y), aux

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def guard_form(under_cond: bool | None) -> contextlib.AbstractContextManager:
    """Traces :func:`tekfax.skip_non_finite` under ``lax.cond`` or not; None: as it would."""
    if under_cond is None:
        return contextlib.nullcontext()
    return mock.patch.object(tekfax.guard, "skips_under_cond", lambda: under_cond)


def make_step(b: Bench, entry: Entry):
    """The jitted, donating training step of ``entry``'s optimizer on model ``b``."""
    opt = entry.opt

    def step(params, batch_stats, opt_state, x, y, key):
        b_xy = b._replace(x=x, y=y)
        if entry.preset is not None:
            needed = tekfax.stats_needed(opt_state)
            out = _capture(b_xy, params, batch_stats, key, needed)
            loss, aux = out.loss, out.aux
            with guard_form(entry.guard_under_cond):
                updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        else:
            (loss, aux), grads = _loss_and_grads(b_xy, params, batch_stats)
            updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, aux.get("batch_stats", batch_stats), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def memory(compiled) -> dict[str, float]:
    """XLA's buffer assignment of a compiled program, bytes; ``peak`` as the table counts it."""
    m = compiled.memory_analysis()
    out = {
        k: float(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")
    }
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def xla_flops(compiled) -> float:
    """FLOPs of one call from XLA's cost analysis; 0 where the backend gives none."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


_HLO_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def _hlo_tables(hlo: str) -> dict[str, dict[int, str]]:
    """The source tables of an HLO module's text: table name -> {id: entry text}."""
    tables, current = {name: {} for name in _HLO_TABLES}, None
    for line in hlo.splitlines():
        if line in _HLO_TABLES:
            current = line
        elif current and re.match(r"^\d+ ", line):
            key, text = line.split(" ", 1)
            tables[current][int(key)] = text
        else:
            current = None
    return tables


def _fields(entry: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", entry)}


def _source_module(frame: int | None, tables: dict) -> str:
    """The innermost tekfax module (``eigenbasis``, ...) on a stack frame's chain, else
    "model, loss and optax" (Flax, optax, the benchmark's models), or "unattributed"."""
    seen = set()
    while frame and frame not in seen and frame in tables["StackFrames"]:
        seen.add(frame)
        ids = _fields(tables["StackFrames"][frame])
        location = _fields(tables["FileLocations"][ids["file_location_id"]])
        path = tables["FileNames"][location["file_name_id"]].strip('"')
        if "/tekfax/" in path and "/experiments/" not in path:
            return path.rsplit("/", 1)[-1].removesuffix(".py")
        frame = ids.get("parent_frame_id", 0)
    return "model, loss and optax" if seen else "unattributed"


def kernel_sources(hlo: str) -> collections.Counter:
    """Kernels XLA compiles separately (fusions and library calls), by source module.

    XLA:CPU compiles every fused kernel on its own, so their count drives compile time
    (BENCHMARKS.md, targets). A fusion is attributed to the stack frame most of its fused
    instructions carry, a library call (``eigh``, a product) to its own.
    """
    tables = _hlo_tables(hlo)
    frames, current = collections.defaultdict(list), None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = header.group(1)
        elif current:
            frames[current] += [int(f) for f in re.findall(r"stack_frame_id=(\d+)", line)]
    counts = collections.Counter()
    for line in hlo.splitlines():
        if " fusion(" in line:
            called = re.search(r"calls=%([\w.\-]+)", line).group(1)
            common = collections.Counter(frames[called]).most_common(1)
            counts[_source_module(common[0][0] if common else None, tables)] += 1
        elif " custom-call(" in line:
            frame = re.search(r"stack_frame_id=(\d+)", line)
            counts[_source_module(int(frame.group(1)) if frame else None, tables)] += 1
    return counts


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def warm_up_compiler() -> None:
    """Compiles a trivial function: XLA's one-time start-up is not charged to SGD's compile."""
    jax.jit(lambda v: v * 2.0 + 1.0).lower(jnp.zeros((8,), jnp.float32)).compile()


# --- the FLOP floor -----------------------------------------------------------------------


class Dims(NamedTuple):
    """A tagged layer's sizes: label samples S, examples N, locations T, d_in, d_out."""

    samples: int
    n: int
    t: int
    d_in: int
    d_out: int


def _dims(s: tekfax.LayerStats) -> Dims:
    return Dims(*s.out_grads.shape[:2], locations(s.out_grads), s.meta.d_in, s.meta.d_out)


def layer_dims(stats) -> dict[str, Dims]:
    """Each layer's :class:`Dims` from ``loss_and_curvature`` stats (shapes suffice)."""
    return {k: _dims(s) for k, s in iter_layer_stats(stats)}


def stats_shapes(b: Bench):
    """The shapes of ``b``'s curvature statistics (no computation)."""
    params, batch_stats = b.variables["params"], b.variables.get("batch_stats", {})
    return jax.eval_shape(
        lambda p: _capture(b, p, batch_stats, jax.random.key(0), True).stats, params
    )


def forward_flops(d: Dims) -> float:
    """One layer's forward product, 2 N T d_in d_out (as each backward product)."""
    return 2.0 * d.n * d.t * d.d_in * d.d_out


def precondition_flops(eigen_corrected: bool, d: Dims) -> float:
    """Preconditioning one layer's (d_in, d_out) gradient.

    A pair of products, one with a (d_in, d_in) and one with a (d_out, d_out) matrix, costs
    2 d_in^2 d_out + 2 d_in d_out^2. EKFAC/TEKFAC need two pairs (Q_in^T G Q_out, then back
    with Q_in and Q_out^T); KFAC/TKFAC one, with their cached inverse factors.
    """
    pairs = 2 if eigen_corrected else 1
    return pairs * (2.0 * d.d_in**2 * d.d_out + 2.0 * d.d_in * d.d_out**2)


def factor_flops(estimator: str, d: Dims) -> float:
    """One batch's factor products: 2 N T d_in^2 + 2 S N T d_out^2, plus TKFAC's weights."""
    flops = 2.0 * d.n * d.t * d.d_in**2 + 2.0 * d.samples * d.n * d.t * d.d_out**2
    if estimator == "tkfac":  # the weights |u|^2, |a|^2 and their broadcast products
        flops += 3.0 * d.n * d.t * (d.d_in + d.samples * d.d_out)
    return flops


def rescale_flops(d: Dims) -> float:
    """One batch's S by the path ``rescale.per_example`` takes (docs/algorithms.md, s. 8)."""
    n, t, d_in, d_out, s = d.n, d.t, d.d_in, d.d_out, d.samples
    if t == 1:
        return 2.0 * n * (d_in**2 + s * d_out**2) + 3.0 * s * n * d_in * d_out
    per_grad = (
        2.0 * t * (d_in**2 + d_out**2 + d_in * d_out)
        if rescale.project_first(t, d_in, d_out)
        else 2.0 * (t * d_in * d_out + d_in**2 * d_out + d_in * d_out**2)
    )
    return s * n * (per_grad + 2.0 * d_in * d_out)


def preset_flops(preset: str, dims: dict[str, Dims]) -> dict[str, float]:
    """FLOPs of one run of each Kronecker stage of ``preset``, summed over the layers."""
    p = KRONECKER[preset]
    cubes = sum(d.d_in**3 + d.d_out**3 for d in dims.values())
    out = {
        "precondition": sum(precondition_flops(p.eigen_corrected, d) for d in dims.values()),
        "sampled backward": sum(d.samples * forward_flops(d) for d in dims.values()),
        "factors": sum(factor_flops(p.estimator, d) for d in dims.values()),
        "eigh": EIGH_FLOPS * cubes,
    }
    if p.eigen_corrected:
        out["S"] = sum(rescale_flops(d) for d in dims.values())
    else:
        out["inverses"] = INVERSE_FLOPS * cubes
    return out


def due_shares(every: dict[str, int], eigen_corrected: bool) -> dict[str, float]:
    """Share of steps on which each stage runs (the schedule of docs/algorithms.md, s. 3)."""
    c, e, r = every["curvature_every"], every["eigen_every"], every["rescale_every"]
    steps = np.arange(math.lcm(c, e, r))
    rescaled = (steps % e == 0) | (steps % r == 0)
    used = (steps % c == 0) | (rescaled if eigen_corrected else False)
    share = {
        "precondition": 1.0,
        "sampled backward": used.mean(),
        "factors": np.mean(steps % c == 0),
    }
    share.update(eigh=np.mean(steps % e == 0), inverses=np.mean(steps % e == 0), S=rescaled.mean())
    return {k: float(v) for k, v in share.items()}


def floor_flops(entry: Entry, dims: dict[str, Dims], fwd_bwd: float) -> dict[str, float]:
    """FLOPs per step, amortised, by stage (the module docstring); a plain step: fwd_bwd."""
    out = {"forward + backward": fwd_bwd}
    if entry.preset is not None:
        shares = due_shares(entry.every, KRONECKER[entry.preset].eigen_corrected)
        out.update({k: f * shares[k] for k, f in preset_flops(entry.preset, dims).items()})
    return out


def model_flops(compiled_sgd, dims: dict[str, Dims]) -> tuple[float, str]:
    """Forward + backward FLOPs: XLA's count of the SGD step, or the analytic one (docstring)."""
    analytic = 3.0 * sum(forward_flops(d) for d in dims.values())
    counted = xla_flops(compiled_sgd)
    if counted >= 0.5 * analytic:
        return counted, "XLA cost analysis of the SGD step"
    return analytic, "analytic, tagged layers' products (XLA gave no usable count)"


# --- memory -------------------------------------------------------------------------------


def _mib(leaves) -> float:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves) / MIB


def state_mib(opt_state) -> dict[str, float]:
    """Optimizer state in MiB by field name (``LayerCurvature`` fields, ``_in``/``_out``
    merged; ``trace`` is the momentum), largest first."""
    out = collections.Counter()
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        out[re.sub(r"_(in|out)$", "", names[-1]) if names else "other"] += _mib([leaf])
    return dict(out.most_common())


def statistics_mib(stats) -> dict[str, tuple[float, str, float]]:
    """Buffers of one statistics step: item -> (MiB over layers, largest layer, its MiB).

    The layer matrices a (im2col for convolutions) and the per-example gradients of S
    (EKFAC/TEKFAC, layers with T > 1) are counted for one chunk of the batch, as
    :func:`tekfax.patches.sum_over_examples` streams them.
    """
    items = collections.defaultdict(dict)
    for k, s in iter_layer_stats(stats):
        samples, n, t, d_in, d_out = _dims(s)
        size = np.dtype(s.inputs.dtype).itemsize / MIB
        items["layer inputs"][k] = _mib([s.inputs])
        items["sampled output gradients u"][k] = _mib([s.out_grads])
        blocks, chunk, _ = chunking(n, t * (d_in + samples * d_out))
        items["layer matrices a"][k] = blocks * chunk * t * d_in * size
        if t > 1:
            per = rescale.elements_per_example(samples, t, d_in, d_out, "per_example")
            blocks, chunk, _ = chunking(n, per)
            items["per-example gradients (S)"][k] = blocks * chunk * samples * d_in * d_out * size
    return {
        item: (sum(v.values()), max(v, key=v.get), max(v.values())) for item, v in items.items()
    }


# --- steps --------------------------------------------------------------------------------


def _time_steps(compiled, args, warmup: int, window: int) -> tuple[list[float], jax.Array]:
    params, batch_stats, opt_state, x, y = args
    times = []
    for i in range(warmup + window):
        start = time.perf_counter()
        params, batch_stats, opt_state, loss = compiled(
            params, batch_stats, opt_state, x, y, jax.random.key(i)
        )
        loss.block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, loss


def bench_one(
    b: Bench, entry: Entry, window: int, warmup: int, compiler_options: dict | None = None
) -> tuple[dict, Any]:
    """Compiles (with XLA's ``compiler_options``) and times one optimizer; returns its row and
    its compiled step."""
    params = _copy(b.variables["params"])
    batch_stats = _copy(b.variables.get("batch_stats", {}))
    opt_state = _copy(entry.opt.init(params))  # distinct buffers: every argument is donated
    state_sizes = state_mib(opt_state)
    step = make_step(b, entry)
    start = time.perf_counter()
    lowered = step.lower(params, batch_stats, opt_state, b.x, b.y, jax.random.key(0))
    compiled = lowered.compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - start
    args = (params, batch_stats, opt_state, b.x, b.y)
    times, loss = _time_steps(compiled, args, warmup, window)
    row = {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "max_s": max(times),
        "compile_s": compile_s,
        "memory": memory(compiled),
        "kernels": dict(kernel_sources(compiled.as_text()).most_common()),
        "state_mib": state_sizes,
        "finite": bool(np.isfinite(float(loss))),
    }
    return row, compiled


def bench_steps(
    name: str,
    batch: int,
    window: int,
    warmup: int,
    only,
    intervals=None,
    rate: float = 1.0,
    compiler_options: dict | None = None,
) -> dict:
    """The step table of one model and batch size (module docstring), with its footnotes."""
    b = setup(name, batch)
    stats = stats_shapes(b)
    dims = layer_dims(stats)
    rows, fwd_bwd, source = [], 0.0, ""
    entries = optimizers(only, intervals)
    # The first compilation of a model also pays one-time backend work (GPU autotuning of
    # its convolutions and matmuls: 8.1 s for SGD's auto-encoder step on an H200 against 1.0 s
    # for Adam's right after). It is done once, untimed, so that SGD's compile time is its own.
    bench_one(b, entries["sgdm"], window=1, warmup=0, compiler_options=compiler_options)
    for opt_name, entry in entries.items():
        row, compiled = bench_one(b, entry, window, warmup, compiler_options)
        if not rows:  # SGD: the model's forward and backward FLOPs
            fwd_bwd, source = model_flops(compiled, dims)
        floor = floor_flops(entry, dims, fwd_bwd)
        row.update(optimizer=opt_name, preset=entry.preset, floor_flops=floor)
        row["floor_s"] = sum(floor.values()) / rate
        rows.append(row)
    sgd = rows[0]
    for row in rows:
        row["mean_ratio"] = row["mean_s"] / sgd["mean_s"]
        row["median_ratio"] = row["median_s"] / sgd["median_s"]
        row["floor_ratio"] = row["mean_s"] / row["floor_s"]
        row["compile_ratio"] = row["compile_s"] / sgd["compile_s"]
        row["memory_ratio"] = row["memory"]["peak"] / sgd["memory"]["peak"]
    return {"rows": rows, "flops_source": source, "statistics_mib": statistics_mib(stats)}


# --- per-stage breakdown ------------------------------------------------------------------


def _timeit(fn: Callable, *args, repeats: int) -> float:
    """Median seconds of a jitted ``fn(*args)`` after one warm-up call."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """This device's float32 matmul rate in FLOP/s (the hardware yardstick)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    return 2.0 * size**3 / _timeit(lambda m: m @ m, a, repeats=repeats)


def stage_flops(dims: dict[str, Dims], estimator: str) -> dict[str, float]:
    """Analytic FLOPs per call of each stage the ``--stages`` table times, summed over layers.

    Matrix products count 2 m n k; only the tagged layers' products are counted (the forward
    and backward rows leave out BatchNorm and activations, a few percent). The
    preconditioning stage timed is the eigenbasis one (4 products, :func:`precondition_flops`).
    """
    forward = sum(forward_flops(d) for d in dims.values())
    return {
        "forward + backward": 3.0 * forward,  # forward, input gradients, weight gradients
        "sampled backward": sum(d.samples * forward_flops(d) for d in dims.values()),
        "statistics": sum(factor_flops(estimator, d) for d in dims.values()),
        "eigh": EIGH_FLOPS * sum(d.d_in**3 + d.d_out**3 for d in dims.values()),
        "rescale": sum(rescale_flops(d) for d in dims.values()),
        "precondition": sum(precondition_flops(True, d) for d in dims.values()),
    }


def _stage_inputs(b: Bench, params, stats):
    """Layer matrices, KFAC factors, damped estimates and eigenbases for the stage timings."""

    def matrices(st):
        return {
            k: (input_matrix(s.inputs, s.meta), output_matrix(s.out_grads))
            for k, s in iter_layer_stats(st)
        }

    kfac_factors = jax.jit(
        lambda st: {k: curvature.batch_factors("kfac", a, u) for k, (a, u) in matrices(st).items()}
    )(stats)
    estimates = {
        (k, side): f + 1e-3 * jnp.eye(f.shape[0], dtype=f.dtype)
        for k, pair in kfac_factors.items()
        for side, f in zip(("in", "out"), pair, strict=True)
    }
    bases = jax.jit(eigenbasis.eigh_psd_grouped)(estimates)
    q = {k: (bases[k, "in"][1], bases[k, "out"][1]) for k in kfac_factors}
    return matrices, estimates, q


def _stage_plan(b: Bench, params, batch_stats, stats):
    """(label, fn, args, interval, FLOP key) of every stage the ``--stages`` table times."""
    matrices, estimates, q = _stage_inputs(b, params, stats)
    grads = {k: jnp.ones((d.d_in, d.d_out), jnp.float32) for k, d in layer_dims(stats).items()}

    def sgd(p):
        return _loss_and_grads(b, p, batch_stats)[1]

    def skipped(p):
        return _capture(b, p, batch_stats, jax.random.key(0), False).grads

    def sampled(p):
        return _capture(b, p, batch_stats, jax.random.key(0), True)

    def kfac(st):
        return {k: curvature.kfac_factors(a, u) for k, (a, u) in matrices(st).items()}

    def tkfac(st):
        return {k: curvature.tkfac_moments(a, u) for k, (a, u) in matrices(st).items()}

    def rescales(st):
        mode = "per_example"
        return {k: rescale.batch_rescale(a, u, *q[k], mode) for k, (a, u) in matrices(st).items()}

    def preconditioned(g):
        return {k: precondition.precondition(g[k], *q[k], g[k]) for k in g}

    fwd, curv = "forward + backward", "curvature_every"
    return [
        ("forward + backward (SGD)", sgd, (params,), 1, fwd),
        ("capture, statistics skipped", skipped, (params,), 1, fwd),
        ("capture with sampled backward", sampled, (params,), None, "sampled backward"),
        ("statistics: KFAC factors", kfac, (stats,), curv, "statistics"),
        ("statistics: TKFAC moments", tkfac, (stats,), curv, "statistics"),
        ("eigendecompositions", eigenbasis.eigh_psd_grouped, (estimates,), "eigen_every", "eigh"),
        ("rescale S (per example)", rescales, (stats,), "rescale_every", "rescale"),
        ("preconditioning", preconditioned, (grads,), 1, "precondition"),
    ]


def _stage_row(label: str, seconds: float, every: int, flops: float, peak: float) -> dict:
    return {
        "stage": label,
        "ms": 1e3 * seconds,
        "every": every,
        "gflop": flops / 1e9,
        "gflops_per_s": flops / max(seconds, 1e-12) / 1e9,
        "share_of_peak": flops / max(seconds, 1e-12) / peak,
        "amortised_ms": 1e3 * seconds / every if every else float("nan"),
    }


def _sampled_pass_seconds(plan, params, repeats: int) -> float:
    """The sampled-label pass: the two captures timed in alternation, median of the paired
    differences, so drift between them cancels."""
    skipped, sampled = jax.jit(plan[1][1]), jax.jit(plan[2][1])
    jax.block_until_ready((skipped(params), sampled(params)))
    differences = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(sampled(params))
        middle = time.perf_counter()
        jax.block_until_ready(skipped(params))
        differences.append((middle - start) - (time.perf_counter() - middle))
    return statistics.median(differences)


def bench_stages(name: str, batch: int, repeats: int, peak: float) -> list[dict]:
    """Per-stage times of one Kronecker step on ``name`` (see the module docstring)."""
    b = setup(name, batch)
    params, batch_stats = b.variables["params"], b.variables.get("batch_stats", {})
    stats = jax.jit(lambda p: _capture(b, p, batch_stats, jax.random.key(0), True).stats)(params)
    analytic = stage_flops(layer_dims(stats), "kfac")
    plan = _stage_plan(b, params, batch_stats, stats)
    rows = []
    for label, fn, args, interval, key in plan:
        if interval is None:  # the sampled-label pass alone, as a difference of two captures
            every = DEFAULTS["curvature_every"]
            seconds = _sampled_pass_seconds(plan, params, repeats)
            label = "extra sampled-label backward"
        else:
            every = DEFAULTS[interval] if isinstance(interval, str) else interval
            seconds = _timeit(fn, *args, repeats=repeats)
        rows.append(_stage_row(label, seconds, every, analytic[key], peak))
    return rows


# --- output -------------------------------------------------------------------------------


def print_steps(name: str, batch: int, result: dict, window: int, rate: float) -> None:
    """The step table of :func:`bench_steps` and its footnotes, as Markdown."""
    rows = result["rows"]
    fwd_bwd = rows[0]["floor_flops"]["forward + backward"]
    print(
        f"\n#### {name}, batch {batch}: steps ({window} timed); forward + backward "
        f"{fwd_bwd / 1e9:.3f} GFLOP ({result['flops_source']}); matmul rate "
        f"{rate / 1e9:.0f} GFLOP/s\n"
    )
    print(
        "| optimizer | median (ms) | mean (ms) | mean / SGD | floor (GFLOP) | floor (ms) "
        "| mean / floor | compile (s) | compile / SGD | peak memory (MiB) | memory / SGD |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['optimizer']} | {1e3 * r['median_s']:.2f} | {1e3 * r['mean_s']:.2f} | "
            f"{r['mean_ratio']:.2f}x | {sum(r['floor_flops'].values()) / 1e9:.3f} | "
            f"{1e3 * r['floor_s']:.3f} | {r['floor_ratio']:.1f}x | {r['compile_s']:.1f} | "
            f"{r['compile_ratio']:.1f}x | {r['memory']['peak'] / MIB:.1f} | "
            f"{r['memory_ratio']:.2f}x |"
        )
    if _noted(rows):  # footnotes on the Kronecker rows
        print_floor_notes(rows)
        print_memory_notes(rows, result["statistics_mib"])
        print_kernel_notes(rows)


def _noted(rows: list[dict]) -> list[dict]:
    """The Kronecker rows the footnotes describe: one per preset, its first interval."""
    first = {}
    for r in rows:
        if r["preset"] is not None:
            first.setdefault(r["preset"], r)
    return list(first.values())


def _print_notes(heading: str, rows: list[dict], line: Callable[[dict], str]) -> None:
    """A footnote: ``heading``, then one line per noted Kronecker row."""
    print(heading)
    for r in _noted(rows):
        print(f"- {r['optimizer']}: {line(r)}")


def print_floor_notes(rows: list[dict]) -> None:
    """Each Kronecker preset's floor split into its stages."""
    heading = (
        "\nFloor per step by stage (GFLOP, amortised over the intervals; "
        f"eigh {EIGH_FLOPS:g} d^3 per factor and refresh):"
    )
    _print_notes(heading, rows, lambda r: _items(r["floor_flops"], 1e9, 4))


def _items(sizes: dict[str, float], unit: float = 1.0, digits: int = 2) -> str:
    """ "k v, ..." with v / unit to ``digits`` places; values that round to 0 are left out."""
    shown = {k: v / unit for k, v in sizes.items()}
    return ", ".join(f"{k} {v:.{digits}f}" for k, v in shown.items() if round(v, digits))


def print_memory_notes(rows: list[dict], stats_mib: dict) -> None:
    """Peak memory split into arguments (optimizer state by field) and temporaries."""
    sgd = rows[0]["memory"]
    print(
        "\nMemory (MiB, XLA buffer assignment; outputs alias the donated arguments): "
        f"{rows[0]['optimizer']} arguments {sgd['argument'] / MIB:.2f}, temporaries "
        f"{sgd['temp'] / MIB:.2f} (its activations and their gradients)."
    )
    for r in _noted(rows):
        m = r["memory"]
        print(
            f"- {r['optimizer']}: arguments {m['argument'] / MIB:.2f} (optimizer state "
            f"{sum(r['state_mib'].values()):.2f}: {_items(r['state_mib'])}), "
            f"temporaries {m['temp'] / MIB:.2f}."
        )
    parts = "; ".join(
        f"{item} {total:.2f} (largest {layer}, {size:.2f})"
        for item, (total, layer, size) in stats_mib.items()
    )
    print(
        f"- Buffers of a statistics step, what the Kronecker temporaries hold: {parts}. SGD "
        "keeps the layer inputs too. a and the per-example gradients are per chunk of at most "
        f"{CHUNK_ELEMENTS} elements (tekfax.patches.CHUNK_ELEMENTS); the peak can hold several "
        "layers' at once, some 2-3 times (a beside its scaled copies for the Gram products, "
        "the per-example gradients beside their squares for S)."
    )


def print_kernel_notes(rows: list[dict]) -> None:
    """Each Kronecker preset's compiled kernels, by the tekfax module they come from."""
    heading = (
        "\nKernels XLA compiles one by one (fusions and library calls; compile time follows "
        f"their count): {rows[0]['optimizer']} {sum(rows[0]['kernels'].values())}."
    )
    _print_notes(
        heading, rows, lambda r: f"{sum(r['kernels'].values())}: {_items(r['kernels'], 1, 0)}"
    )


def print_stages(name: str, batch: int, rows: list[dict], peak: float) -> None:
    """The ``--stages`` table as Markdown."""
    print(
        f"\n#### {name}, batch {batch}: stages of a Kronecker step "
        f"(float32 matmul peak measured here: {peak / 1e9:.0f} GFLOP/s)\n"
    )
    print(
        "| stage | ms per call | runs every (default) | amortised ms / step | GFLOP per call "
        "| GFLOP/s | share of matmul peak |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['ms']:.2f} | {r['every']} | {r['amortised_ms']:.3f} | "
            f"{r['gflop']:.3f} | {r['gflops_per_s']:.1f} | {100 * r['share_of_peak']:.1f}% |"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "cnn"], choices=list(SHAPES), help="default: mlp cnn"
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument(
        "--window", type=int, default=100, help="timed steps; a multiple of the longest interval"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--optimizers", nargs="+", choices=["adam", "eadam", *KRONECKER], help="subset (SGD always)"
    )
    parser.add_argument("--intervals", nargs="+", choices=list(INTERVALS), help="subset")
    parser.add_argument("--stages", action="store_true", help="also print the stage breakdown")
    parser.add_argument("--skip-steps", action="store_true", help="only the stage breakdown")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per stage")
    parser.add_argument("--json", help="write all numbers to this file")
    parser.add_argument(
        "--matmul-size", type=int, default=2048, help="n of the n x n matmul timed for the rate"
    )
    parser.add_argument(
        "--opt-level",
        type=int,
        help="XLA backend (LLVM) optimisation level of every step's compilation (XLA's default "
        "3; tekfax-compare compiles its CPU steps at 1)",
    )
    return parser


def _header(args, rate: float) -> None:
    device = jax.devices()[0]
    print(
        f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s); "
        f"jax {jax.__version__}; default intervals {DEFAULTS}; float32 matmul rate "
        f"{rate / 1e9:.0f} GFLOP/s; XLA backend optimisation level "
        f"{'default' if args.opt_level is None else args.opt_level}"
    )
    entries = optimizers(args.optimizers, args.intervals).values()
    longest = max((max(e.every.values()) for e in entries if e.every), default=1)
    if not args.skip_steps and args.window % longest:
        print(
            f"note: window {args.window} is not a multiple of the longest interval ({longest}): "
            "the means do not carry the periodic stages' share."
        )


def main() -> None:
    single_threaded_lapack()  # OpenBLAS threads spinning after eigh slow the next steps
    args = _parser().parse_args()
    warm_up_compiler()
    rate = matmul_rate(args.matmul_size)
    _header(args, rate)
    device = jax.devices()[0]
    results = {"device": str(device.device_kind), "platform": device.platform, "runs": []}
    results["matmul_flops_per_s"] = rate
    options = {} if args.opt_level is None else {"xla_backend_optimization_level": args.opt_level}
    results["compiler_options"] = options
    for name in args.models:
        for batch in args.batch_sizes:
            run = {"model": name, "batch": batch}
            if not args.skip_steps:
                run["steps"] = bench_steps(
                    name,
                    batch,
                    args.window,
                    args.warmup,
                    args.optimizers,
                    args.intervals,
                    rate,
                    options,
                )
                print_steps(name, batch, run["steps"], args.window, rate)
            if args.stages:
                run["stages"] = bench_stages(name, batch, args.repeats, rate)
                print_stages(name, batch, run["stages"], rate)
            results["runs"].append(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
