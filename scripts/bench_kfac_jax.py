"""Side-by-side step time: tekfax KFAC against kfac-jax's ``OptaxPreconditioner``.

kfac-jax is optional and never vendored. Its PyPI wheel (0.0.8) needs jax 0.9.1, so run this
in an environment like::

    python3 -m venv /tmp/kfacenv && . /tmp/kfacenv/bin/activate
    pip install "jax==0.9.1" "jaxlib==0.9.1" "kfac-jax==0.0.8"
    pip install -c <(printf 'jax==0.9.1\\njaxlib==0.9.1\\n') -e .
    python scripts/bench_kfac_jax.py --models cnn mlp

Both optimizers train the same Flax model on the same synthetic batches in one process, with
the same hyperparameters: curvature statistics every step (kfac-jax's OptaxPreconditioner
allows no other period), factor inverses (kfac-jax) or eigendecompositions (tekfax) every
``--inverse-every`` steps, factor decay 0.95, damping 0.1, momentum 0.9, lr 0.01. Each step
is one jitted function; the median and mean over ``--window`` timed steps are printed after
``--warmup`` untimed ones, with SGD as the common yardstick.
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
from tekfax.experiments.compare import single_threaded_lapack

SHAPES = {"mlp": (8, 8, 1), "cnn": (8, 8, 1), "resnet20": (32, 32, 3)}
LR, DAMPING, MOMENTUM, EMA = 0.01, 0.1, 0.9, 0.95


def _cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def sgd_step(model):
    opt = optax.sgd(LR, momentum=MOMENTUM)

    @jax.jit
    def step(params, opt_state, x, y, key):
        del key
        loss, grads = jax.value_and_grad(
            lambda p: _cross_entropy(model.apply({"params": p}, x), y)
        )(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt.init, step


def tekfax_step(model, inverse_every: int):
    opt = tekfax.kfac(
        LR,
        damping=DAMPING,
        momentum=MOMENTUM,
        ema=EMA,
        curvature_every=1,
        eigen_every=inverse_every,
    )

    @jax.jit
    def step(params, opt_state, x, y, key):
        out = tekfax.loss_and_curvature(
            lambda p: model.apply({"params": p}, x),
            params,
            y,
            rng=key,
            compute_stats=tekfax.stats_needed(opt_state),
        )
        updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        return optax.apply_updates(params, updates), opt_state, out.loss

    return opt.init, step


def kfac_jax_step(model, inverse_every: int):
    import kfac_jax  # noqa: PLC0415 - optional, only in the kfac-jax environment

    def loss_fn(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x)
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return _cross_entropy(logits, y)

    precond = kfac_jax.OptaxPreconditioner(
        loss_fn,
        damping=DAMPING,
        curvature_ema=EMA,
        curvature_update_period=1,
        inverse_update_period=inverse_every,
    )
    opt = optax.chain(precond.as_gradient_transform(), optax.sgd(LR, momentum=MOMENTUM))

    def init(params, x, y):
        return opt.init(params), precond.init((params, (x, y)), jax.random.key(0))

    def replicated_step(params, state, x, y, key):
        opt_state, precond_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, (x, y))
        precond_state = precond.maybe_update(precond_state, (params, (x, y)), key)
        updates, opt_state = opt.update(grads, opt_state, params, precond_state=precond_state)
        precond_state = precond.increment_count(precond_state)
        return optax.apply_updates(params, updates), (opt_state, precond_state), loss

    # kfac-jax runs under pmap (its statistics sync needs the axis); here over one device,
    # with every input carrying a leading device axis of 1 for the whole run.
    return init, jax.pmap(replicated_step, axis_name="kfac_axis")


def _lead(tree):
    return jax.tree_util.tree_map(lambda v: v[None], tree)


def time_steps(step, params, state, x, y, window: int, warmup: int, pmapped=False) -> dict:
    key = (lambda i: jax.random.key(i)[None]) if pmapped else jax.random.key
    if pmapped:
        params, state, x, y = _lead((params, state, x, y))
    start = time.perf_counter()
    compiled = step.lower(params, state, x, y, key(0)).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(warmup + window):
        start = time.perf_counter()
        params, state, loss = compiled(params, state, x, y, key(i))
        loss.block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "compile": compile_s,
        "loss": float(np.ravel(loss)[0]),
    }


def bench(name: str, batch: int, window: int, warmup: int, inverse_every: int) -> dict:
    shape = SHAPES[name]
    model = models.create_model(name, 10, shape)
    params = models.init_variables(model, shape, jax.random.key(0))["params"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    rows = {}
    init, step = sgd_step(model)
    rows["sgdm"] = time_steps(step, params, init(params), x, y, window, warmup)
    init, step = tekfax_step(model, inverse_every)
    rows["tekfax kfac"] = time_steps(step, params, init(params), x, y, window, warmup)
    init, step = kfac_jax_step(model, inverse_every)
    rows["kfac-jax"] = time_steps(
        step, params, init(params, x, y), x, y, window, warmup, pmapped=True
    )
    return rows


def main() -> None:
    single_threaded_lapack()  # OpenBLAS threads spinning after eigh slow the next steps
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=list(SHAPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--inverse-every", type=int, default=5)
    args = parser.parse_args()
    try:
        import kfac_jax  # noqa: PLC0415
    except ImportError:
        parser.error("kfac-jax is not installed; this module's docstring says how to set it up")

    device = jax.devices()[0]
    print(
        f"device: {device.platform} ({device.device_kind}); jax {jax.__version__}, "
        f"kfac-jax {kfac_jax.__version__}; statistics every step, inverses/eigenbasis every "
        f"{args.inverse_every} steps; {args.window} timed steps\n"
    )
    print(
        "| model | batch | SGD median (ms) | tekfax kfac median (ms) | kfac-jax median (ms) | "
        "tekfax / kfac-jax (median) | tekfax / kfac-jax (mean) | compile tekfax / kfac-jax (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for batch in args.batch_sizes:
            r = bench(name, batch, args.window, args.warmup, args.inverse_every)
            t, k = r["tekfax kfac"], r["kfac-jax"]
            print(
                f"| {name} | {batch} | {1e3 * r['sgdm']['median']:.2f} | {1e3 * t['median']:.2f} "
                f"| {1e3 * k['median']:.2f} | {t['median'] / k['median']:.2f}x | "
                f"{t['mean'] / k['mean']:.2f}x | {t['compile']:.1f} / {k['compile']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
