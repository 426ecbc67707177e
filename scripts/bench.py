"""Step-time, memory and per-stage benchmark of the tekfax optimizers against SGD.

For each model and batch size, in one process:

1. **Steps.** One jitted, donating training step per optimizer (sgdm, adam, eadam, and
   kfac, ekfac, tkfac, tekfac with the library's defaults, with "statistics every step,
   eigenbasis every 5 steps", and with the defaults unguarded, ``skip_non_finite=False``,
   which measures the guard's cost). Compile time is reported apart; then ``--warmup`` steps
   are run untimed and ``--window`` steps timed (a whole multiple of the longest interval,
   so the periodic work is in the mean). Printed: median and mean step, both as ratios to
   SGD, and the compiled program's peak memory (XLA's buffer assignment: arguments + outputs
   + temporaries - aliased, so the statistics branches are counted even on steps that skip
   them) with its ratio to SGD's.
2. **Stages** (``--stages``). Each stage of a Kronecker step as its own jitted function of
   the library's internals on the same batch: forward + backward, the extra sampled-label
   backward pass, statistics (im2col and factor products), eigendecompositions, rescale
   (EKFAC/TEKFAC S), preconditioning. Beside each time: how often the default intervals run
   it, its amortised cost per step, an analytic FLOP count and the achieved rate as a share
   of this device's measured float32 matmul rate, so the gap to the hardware is visible.

Synthetic data; the device is recorded. ``--json`` also writes every number.

    python scripts/bench.py                       # digits MLP and CNN, batch 128 and 256
    python scripts/bench.py --models resnet20 --batch-sizes 128 --window 20 --stages
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tekfax
from tekfax import curvature, eigenbasis, precondition, rescale
from tekfax.capture import iter_layer_stats
from tekfax.experiments import models
from tekfax.experiments.compare import single_threaded_lapack
from tekfax.patches import input_matrix, output_matrix

SHAPES = {"mlp": (8, 8, 1), "cnn": (8, 8, 1), "resnet20": (32, 32, 3), "vgg16": (32, 32, 3)}
INTERVALS = {  # variants of each Kronecker preset: its keyword arguments
    "default": {},
    "stats1-eig5": {"curvature_every": 1, "eigen_every": 5, "rescale_every": 1},
    "unguarded": {"skip_non_finite": False},  # the default without the guard: its cost
}
KRONECKER = {
    "kfac": tekfax.kfac,
    "ekfac": tekfax.ekfac,
    "tkfac": tekfax.tkfac,
    "tekfac": tekfax.tekfac,
}
_PRESET = inspect.signature(tekfax.kfac).parameters
DEFAULTS = {  # The library's default intervals, read from the preset's signature.
    k: _PRESET[k].default for k in ("curvature_every", "eigen_every", "rescale_every")
}
MIB = 2.0**20


def optimizers(
    only: list[str] | None, intervals: list[str] | None = None
) -> dict[str, tuple[optax.GradientTransformation, bool]]:
    """name -> (optimizer, uses curvature statistics); lr 0.01, damping 0.1."""
    out = {
        "sgdm": (optax.sgd(0.01, momentum=0.9), False),
        "adam": (optax.adam(1e-3), False),
        "eadam": (tekfax.eadam(1e-3), False),
    }
    for interval, kwargs in INTERVALS.items():
        if intervals and interval not in intervals:
            continue
        for name, make in KRONECKER.items():
            out[f"{name} ({interval})"] = (make(0.01, damping=0.1, **kwargs), True)
    if only:
        out = {k: v for k, v in out.items() if k == "sgdm" or k.split(" ")[0] in only}
    return out


def _apply_fn(model, has_bn: bool):
    def apply(params, batch_stats, x):
        if has_bn:
            variables = {"params": params, "batch_stats": batch_stats}
            return model.apply(variables, x, train=True, mutable=["batch_stats"])
        return model.apply({"params": params}, x, train=True), {}

    return apply


def make_step(model, opt, kronecker: bool, has_bn: bool):
    apply = _apply_fn(model, has_bn)

    def step(params, batch_stats, opt_state, x, y, key):
        if kronecker:
            out = tekfax.loss_and_curvature(
                lambda p: apply(p, batch_stats, x),
                params,
                y,
                rng=key,
                has_aux=True,
                compute_stats=tekfax.stats_needed(opt_state),
            )
            loss, grads, aux = out.loss, out.grads, out.aux
            updates, opt_state = opt.update(grads, opt_state, params, stats=out.stats)
        else:

            def loss_fn(p):
                logits, aux = apply(p, batch_stats, x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), aux

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, aux.get("batch_stats", batch_stats), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def peak_bytes(compiled) -> float:
    """Peak memory of a compiled program from XLA's buffer assignment."""
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def _setup(name: str, batch: int):
    shape = SHAPES[name]
    model = models.create_model(name, 10, shape)
    variables = models.init_variables(model, shape, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    return model, variables, x, y


def bench_steps(
    name: str, batch: int, window: int, warmup: int, only, intervals=None
) -> list[dict]:
    model, variables, x, y = _setup(name, batch)
    has_bn = "batch_stats" in variables
    rows = []
    for opt_name, (opt, kronecker) in optimizers(only, intervals).items():
        params = _copy(variables["params"])
        batch_stats = _copy(variables.get("batch_stats", {}))
        opt_state = _copy(opt.init(params))  # distinct buffers: every argument is donated
        step = make_step(model, opt, kronecker, has_bn)
        start = time.perf_counter()
        compiled = step.lower(params, batch_stats, opt_state, x, y, jax.random.key(0)).compile()
        compile_s = time.perf_counter() - start
        times = []
        for i in range(warmup + window):
            start = time.perf_counter()
            params, batch_stats, opt_state, loss = compiled(
                params, batch_stats, opt_state, x, y, jax.random.key(i)
            )
            loss.block_until_ready()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        rows.append(
            {
                "optimizer": opt_name,
                "median_s": statistics.median(times),
                "mean_s": statistics.fmean(times),
                "max_s": max(times),
                "compile_s": compile_s,
                "peak_bytes": peak_bytes(compiled),
                "finite": bool(np.isfinite(float(loss))),
            }
        )
    sgd = rows[0]
    for row in rows:
        row["median_ratio"] = row["median_s"] / sgd["median_s"]
        row["mean_ratio"] = row["mean_s"] / sgd["mean_s"]
        row["memory_ratio"] = row["peak_bytes"] / sgd["peak_bytes"]
    return rows


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


def stage_flops(layers: dict, estimator: str) -> dict[str, float]:
    """Analytic FLOPs per call of each statistics stage, summed over layers.

    ``layers`` maps names to (a, u) layer matrices: a (N, T, d_in), u (S, N, T, d_out).
    Matrix products count 2 m n k; only the tagged layers' products are counted (the forward
    and backward rows leave out BatchNorm and activations, a few percent). Eigendecomposition:
    ~9 d^3 per factor (symmetric QR with eigenvectors, Golub & Van Loan section 8.3); LAPACK's
    divide and conquer needs fewer.
    """
    stats = eig = resc = pre = forward = 0.0
    for a, u in layers.values():
        samples, n, t, d_out = u.shape
        d_in = a.shape[-1]
        forward += 2.0 * n * t * d_in * d_out
        stats += 2.0 * n * t * d_in**2 + 2.0 * samples * n * t * d_out**2
        if estimator == "tkfac":  # the weights |u|^2, |a|^2 and their broadcast products
            stats += 2.0 * n * t * (d_in + samples * d_out) + n * t * (d_in + samples * d_out)
        eig += 9.0 * (d_in**3 + d_out**3)
        pre += 4.0 * d_in * d_out * (d_in + d_out)
        if t == 1:
            resc += 2.0 * n * t * (d_in**2 + samples * d_out**2) + 3.0 * samples * n * d_in * d_out
        else:
            per_grad = (  # the path rescale.per_example takes (docs/algorithms.md, section 8)
                2.0 * t * (d_in**2 + d_out**2 + d_in * d_out)
                if rescale.project_first(t, d_in, d_out)
                else 2.0 * (t * d_in * d_out + d_in**2 * d_out + d_in * d_out**2)
            )
            resc += samples * n * (per_grad + 2.0 * d_in * d_out)
    return {
        "forward + backward": 3.0 * forward,  # forward, input gradients, weight gradients
        "sampled backward": samples * forward,  # output gradients only, per label sample
        "statistics": stats,
        "eigh": eig,
        "rescale": resc,
        "precondition": pre,
    }


def bench_stages(name: str, batch: int, repeats: int, peak: float) -> list[dict]:
    """Per-stage times of one Kronecker step on ``name`` (see the module docstring)."""
    model, variables, x, y = _setup(name, batch)
    has_bn = "batch_stats" in variables
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    apply = _apply_fn(model, has_bn)

    def logits(p):
        return apply(p, batch_stats, x)[0]

    def sgd_grads(p):
        return jax.grad(
            lambda q: optax.softmax_cross_entropy_with_integer_labels(logits(q), y).mean()
        )(p)

    def capture(p, compute):
        return tekfax.loss_and_curvature(logits, p, y, rng=jax.random.key(0), compute_stats=compute)

    stats = jax.jit(lambda p: capture(p, True).stats)(params)
    metas = {k: st.meta for k, st in iter_layer_stats(stats)}

    def matrices(st):
        return {
            k: (input_matrix(s.inputs, s.meta), output_matrix(s.out_grads))
            for k, s in iter_layer_stats(st)
        }

    def factors(st, estimator):
        return {k: curvature.batch_factors(estimator, a, u) for k, (a, u) in matrices(st).items()}

    kfac_factors = jax.jit(lambda st: factors(st, "kfac"))(stats)
    estimates = {
        (k, side): f + 1e-3 * jnp.eye(f.shape[0], dtype=f.dtype)
        for k, pair in kfac_factors.items()
        for side, f in zip(("in", "out"), pair, strict=True)
    }
    bases = jax.jit(eigenbasis.eigh_psd_grouped)(estimates)
    q = {k: (bases[k, "in"][1], bases[k, "out"][1]) for k in kfac_factors}

    def rescales(st):
        return {
            k: rescale.batch_rescale(a, u, *q[k], "per_example")
            for k, (a, u) in matrices(st).items()
        }

    grads = {k: jnp.ones((m.d_in, m.d_out), jnp.float32) for k, m in metas.items()}

    def preconditioned(g):
        return {k: precondition.precondition(g[k], *q[k], g[k]) for k in g}

    shapes = jax.eval_shape(matrices, stats)
    analytic = stage_flops(
        {k: (jnp.zeros(a.shape), jnp.zeros(u.shape)) for k, (a, u) in shapes.items()}, "kfac"
    )
    every = DEFAULTS
    plan = [
        ("forward + backward (SGD)", sgd_grads, (params,), 1, "forward + backward"),
        (
            "capture, statistics skipped",
            lambda p: capture(p, False).grads,
            (params,),
            1,
            "forward + backward",
        ),
        (
            "capture with sampled backward",
            lambda p: capture(p, True),
            (params,),
            None,
            "sampled backward",
        ),
        (
            "statistics: KFAC factors",
            lambda st: factors(st, "kfac"),
            (stats,),
            "curvature_every",
            "statistics",
        ),
        (
            "statistics: TKFAC moments",
            lambda st: factors(st, "tkfac"),
            (stats,),
            "curvature_every",
            "statistics",
        ),
        ("eigendecompositions", eigenbasis.eigh_psd_grouped, (estimates,), "eigen_every", "eigh"),
        ("rescale S (per example)", rescales, (stats,), "rescale_every", "rescale"),
        ("preconditioning", preconditioned, (grads,), 1, "precondition"),
    ]
    rows = []
    for label, fn, args, interval, flops_key in plan:
        seconds = _timeit(fn, *args, repeats=repeats)
        flops = analytic[flops_key]
        period = every[interval] if isinstance(interval, str) else interval
        rows.append(
            {
                "stage": label,
                "ms": 1e3 * seconds,
                "every": period,
                "gflop": flops / 1e9,
                "gflops_per_s": flops / seconds / 1e9,
                "share_of_peak": flops / seconds / peak,
            }
        )
    # The sampled-label pass costs the difference between the two captures, timed in
    # alternation (median of the paired differences) so drift between them cancels.
    skipped, sampled = jax.jit(plan[1][1]), jax.jit(plan[2][1])
    jax.block_until_ready((skipped(params), sampled(params)))
    differences = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(sampled(params))
        middle = time.perf_counter()
        jax.block_until_ready(skipped(params))
        differences.append((middle - start) - (time.perf_counter() - middle))
    rows[2] = {
        "stage": "extra sampled-label backward",
        "ms": 1e3 * statistics.median(differences),
        # On CPU loss_and_curvature runs this pass on every step (masked); see capture.py.
        "every": 1 if jax.default_backend() == "cpu" else every["curvature_every"],
        "gflop": analytic["sampled backward"] / 1e9,
    }
    rows[2]["gflops_per_s"] = rows[2]["gflop"] / max(rows[2]["ms"], 1e-9) * 1e3
    rows[2]["share_of_peak"] = rows[2]["gflops_per_s"] * 1e9 / peak
    for row in rows:
        row["amortised_ms"] = row["ms"] / row["every"] if row["every"] else float("nan")
    return rows


# --- output -------------------------------------------------------------------------------


def print_steps(name: str, batch: int, rows: list[dict], window: int) -> None:
    print(f"\n#### {name}, batch {batch}: steps ({window} timed)\n")
    print(
        "| optimizer | median (ms) | median / SGD | mean (ms) | mean / SGD | peak memory (MiB) "
        "| memory / SGD | compile (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['optimizer']} | {1e3 * r['median_s']:.2f} | {r['median_ratio']:.2f}x | "
            f"{1e3 * r['mean_s']:.2f} | {r['mean_ratio']:.2f}x | {r['peak_bytes'] / MIB:.1f} | "
            f"{r['memory_ratio']:.2f}x | {r['compile_s']:.1f} |"
        )


def print_stages(name: str, batch: int, rows: list[dict], peak: float) -> None:
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


def main() -> None:
    single_threaded_lapack()  # OpenBLAS threads spinning after eigh slow the next steps
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=list(SHAPES))
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
    args = parser.parse_args()
    device = jax.devices()[0]
    print(
        f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s); "
        f"jax {jax.__version__}; default intervals {DEFAULTS}"
    )
    peak = matmul_rate() if args.stages else float("nan")
    results = {"device": str(device.device_kind), "platform": device.platform, "runs": []}
    for name in args.models:
        for batch in args.batch_sizes:
            run = {"model": name, "batch": batch}
            if not args.skip_steps:
                run["steps"] = bench_steps(
                    name, batch, args.window, args.warmup, args.optimizers, args.intervals
                )
                print_steps(name, batch, run["steps"], args.window)
            if args.stages:
                run["stages"] = bench_stages(name, batch, args.repeats, peak)
                print_stages(name, batch, run["stages"], peak)
            results["runs"].append(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
