"""Step-time benchmark: tekfax optimizers against SGD with momentum, in one process.

For each model and optimizer it compiles one jitted training step (timed separately), runs a
warm-up, then times ``--window`` steps, a whole multiple of the longest interval so periodic
work (statistics, eigendecompositions, rescale) is amortised as ALGORITHMS.md section 8 asks.
It prints a Markdown table per model: mean, median and max step time, the mean's ratio to
SGD measured in the same process, and compile time. Synthetic data; device recorded.

    python scripts/bench.py [--models cnn mlp] [--window 100] [--batch-size 256]

Interval settings: "default" (the library defaults) and "stats1-eig5" (statistics every step,
eigenbasis every 5 steps). The Kronecker steps pass ``compute_stats=tekfax.stats_needed(...)``
so statistics are computed only on the steps that consume them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tekfax
from tekfax.experiments import models

SHAPES = {"mlp": (8, 8, 1), "cnn": (8, 8, 1), "resnet20": (32, 32, 3), "vgg16": (32, 32, 3)}
INTERVALS = {"default": {}, "stats1-eig5": {"curvature_every": 1, "eigen_every": 5}}
KRONECKER = {
    "kfac": tekfax.kfac,
    "ekfac": tekfax.ekfac,
    "tkfac": tekfax.tkfac,
    "tekfac": tekfax.tekfac,
}


def optimizers() -> dict[str, tuple[optax.GradientTransformation, bool]]:
    """name -> (optimizer, uses curvature statistics)."""
    out = {
        "sgdm": (optax.sgd(0.01, momentum=0.9), False),
        "adam": (optax.adam(1e-3), False),
        "eadam": (tekfax.eadam(1e-3), False),
    }
    for interval, kwargs in INTERVALS.items():
        for name, make in KRONECKER.items():
            out[f"{name} ({interval})"] = (make(0.01, damping=0.1, **kwargs), True)
    return out


def make_step(model, opt, kronecker: bool, has_bn: bool):
    def apply(params, batch_stats, x):
        variables = {"params": params, **({"batch_stats": batch_stats} if has_bn else {})}
        if has_bn:
            return model.apply(variables, x, train=True, mutable=["batch_stats"])
        return model.apply(variables, x, train=True), {}

    @jax.jit
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

    return step


def bench_model(name: str, batch_size: int, window: int, warmup: int) -> list[dict]:
    shape = SHAPES[name]
    model = models.create_model(name, 10, shape)
    variables = models.init_variables(model, shape, jax.random.key(0))
    has_bn = "batch_stats" in variables
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch_size, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
    rows = []
    for opt_name, (opt, kronecker) in optimizers().items():
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        opt_state = opt.init(params)
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
                "mean": statistics.fmean(times),
                "median": statistics.median(times),
                "max": max(times),
                "compile": compile_s,
                "finite": bool(np.isfinite(float(loss))),
            }
        )
    sgd = next(r["mean"] for r in rows if r["optimizer"] == "sgdm")
    for row in rows:
        row["ratio"] = row["mean"] / sgd
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--window",
        type=int,
        default=100,
        help="timed steps; a multiple of the longest interval (100 by default)",
    )
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = jax.devices()[0]
    for name in args.models:
        rows = bench_model(name, args.batch_size, args.window, args.warmup)
        print(
            f"\n### {name}, batch {args.batch_size}, {args.window} timed steps, "
            f"{device.platform} ({device.device_kind}), jax {jax.__version__}\n"
        )
        print(
            "| optimizer | mean step (ms) | ratio to SGD | median (ms) | max (ms) | compile (s) |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['optimizer']} | {1e3 * r['mean']:.2f} | {r['ratio']:.2f}x | "
                f"{1e3 * r['median']:.2f} | {1e3 * r['max']:.2f} | {r['compile']:.1f} |"
            )


if __name__ == "__main__":
    main()
