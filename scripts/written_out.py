"""tekfax against its algorithm written out in plain JAX: compile time and step time.

Two targets are ratios to SGD that the algorithm itself may not allow: TEKFAC's step on the
digits CNN compiling in at most 3x SGD's time (XLA:CPU compiles every fused kernel on its
own, so compile time follows the kernel count), and the MNIST auto-encoder's steps within
1.2x of their FLOP floor. This script measures the floor a direct implementation reaches.
For one model and method it compiles and times, in one process:

- ``sgdm``: the Flax model's step with ``optax.sgd`` (momentum 0.9), the reference;
- ``written out``: :func:`written_out_step`, KFAC or TEKFAC in plain JAX with the
  algorithm and the defaults' protections only: the forward pass (``lax.conv`` and products
  on the Flax model's parameters) and backward pass, the sampled-label backward through the
  same VJP, the factors (KFAC's A and G or TKFAC's moments; convolutions as patches), their
  bias-corrected averages, ``eigh`` of each factor, KFAC's damped inverse factors or
  TEKFAC's S per example, the relative damping floor, the norm constraint (KL clip),
  momentum, one check that skips a non-finite step, and the library's default intervals as
  ``lax.cond``. It leaves out what protects the numbers beyond that: the power-of-two
  scaling against overflow, each stage's rejection of non-finite statistics, the ``eigh``
  retry, the accuracy check of the inverse factors, streaming in chunks;
- ``written out, bare``: the same without the damping floor, the norm constraint and the
  check: the formulas alone;
- ``tekfax``: the library's preset with the same settings (lr 0.01, damping 0.1).

Each row gives the kernels XLA compiles one by one, the compile seconds (lower and compile,
best of ``--repeats``) and the mean step over ``--steps`` steps (a whole number of
statistics intervals, so the periodic work is in it). The written-out steps compute what
tekfax computes: ``tests/test_scripts.py`` runs them side by side in float64 and compares
the weights.

    python scripts/written_out.py                                  # digits CNN, TEKFAC
    python scripts/written_out.py --model autoencoder --method kfac --batch 500
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any, NamedTuple

import bench
import jax
import jax.numpy as jnp
from bench_eigh import header

import tekfax
from tekfax.experiments import models
from tekfax.experiments.compare import single_threaded_lapack

assert bench.DEFAULTS["curvature_every"] == bench.DEFAULTS["rescale_every"], "one cond for both"


class Spec(NamedTuple):
    """A sequential model as the written-out step runs it."""

    layers: tuple[tuple[str, tuple[int, int] | None, bool], ...]  # name, conv strides, act
    activation: Any
    loss: str


def spec(model) -> Spec:
    """The :class:`Spec` of the experiments' digits CNN or auto-encoder ``model``."""
    if isinstance(model, models.SmallCNN):
        convs = (("Conv_0", (1, 1), True), ("Conv_1", (2, 2), True))
        dense = (("Dense_0", None, True), ("Dense_1", None, False))
        return Spec(convs + dense, jax.nn.relu, "softmax_cross_entropy")
    count, code = 2 * len(model.sizes), len(model.sizes) - 1
    layers = tuple((f"Dense_{i}", None, i not in (code, count - 1)) for i in range(count))
    return Spec(layers, jnp.tanh, "sigmoid_binary_cross_entropy")


class Layer(NamedTuple):
    """One layer's state: factor sums, eigenbasis, then S (TEKFAC) or the inverses (KFAC)."""

    f_in: jax.Array
    f_out: jax.Array
    q_in: jax.Array
    eig_in: jax.Array
    q_out: jax.Array
    eig_out: jax.Array
    delta: jax.Array  # TKFAC's tr M_Phi
    s: jax.Array  # TEKFAC's S, (d_in, d_out)
    inv_in: jax.Array  # KFAC's damped inverse factors
    inv_out: jax.Array
    peak: jax.Array  # the largest mean eigenvalue so far, for the damping floor


class State(NamedTuple):
    count: jax.Array
    weight: jax.Array  # the bias correction of the factor averages
    layers: dict[str, Layer]
    momentum: Any


def _forward(spec: Spec, params, x, perturb):
    """The logits and each layer's (input, output), ``perturb`` added to the outputs."""
    inputs, outputs, h = {}, {}, x
    for name, strides, act in spec.layers:
        p = params[name]
        if strides is None and h.ndim > 2:
            h = h.reshape(h.shape[0], -1)
        inputs[name] = h
        if strides is not None:
            dims = ("NHWC", "HWIO", "NHWC")
            z = jax.lax.conv_general_dilated(h, p["kernel"], strides, "SAME", None, None, dims)
        else:
            z = h @ p["kernel"]
        h = outputs[name] = z + p["bias"] + perturb[name]
        if act:
            h = spec.activation(h)
    return h, (inputs, outputs)


def _matrix(strides: tuple[int, int] | None, h: jax.Array) -> jax.Array:
    """The layer's input rows a (N, T, d_in + 1): patches in the kernel's (kh, kw, c) order."""
    if strides is not None:
        p = jax.lax.conv_general_dilated_patches(
            h, (3, 3), strides, "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC")
        )  # features in (c, kh, kw) order
        n, y, x, _ = p.shape
        p = p.reshape(n, y, x, h.shape[-1], 9).swapaxes(-1, -2).reshape(n, y * x, -1)
    else:
        p = h[:, None, :]
    return jnp.concatenate([p, jnp.ones(p.shape[:-1] + (1,), p.dtype)], axis=-1)


def _kernel(p) -> jax.Array:
    """A layer's weights as one (d_in + 1, d_out) matrix, the bias as the last row."""
    k = p["kernel"].reshape(-1, p["kernel"].shape[-1])
    return jnp.concatenate([k, p["bias"][None]], axis=0)


def _unkernel(m: jax.Array, p) -> dict:
    return {"kernel": m[:-1].reshape(p["kernel"].shape), "bias": m[-1]}


def _eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    values, vectors = jnp.linalg.eigh(0.5 * (m + m.T))
    return jnp.maximum(values, 0.0), vectors


def init(params) -> State:
    """The state before the first step, in the parameters' dtype."""

    def layer(p):
        d_in, d_out = _kernel(p).shape
        zeros = functools.partial(jnp.zeros, dtype=p["kernel"].dtype)
        eye = functools.partial(jnp.eye, dtype=p["kernel"].dtype)
        return Layer(
            zeros((d_in, d_in)), zeros((d_out, d_out)), eye(d_in), zeros(d_in), eye(d_out),
            zeros(d_out), zeros([]), zeros((d_in, d_out)), eye(d_in), eye(d_out), zeros([]),
        )  # fmt: skip

    layers = jax.tree.map(layer, params, is_leaf=lambda n: "kernel" in n)
    weight = jnp.zeros([], jax.tree.leaves(params)[0].dtype)
    return State(jnp.zeros([], jnp.int32), weight, layers, jax.tree.map(jnp.zeros_like, params))


class Settings(NamedTuple):
    """The step's hyperparameters: the presets' defaults but lr 0.01 and damping 0.1."""

    method: str = "tekfac"
    lr: float = 0.01
    damping: float = 0.1
    momentum: float = 0.9
    kappa: float = 1e-3  # the norm constraint
    floor: float = 1.0  # the relative damping floor
    ema: float = 0.95
    s_ema: float = 0.95
    protect: bool = True  # False: no norm constraint, damping floor or finiteness check
    # (statistics and S, eigh): the presets' curvature_every = rescale_every, eigen_every
    every: tuple[int, int] = (bench.DEFAULTS["curvature_every"], bench.DEFAULTS["eigen_every"])


def _factors(method: str, a: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """KFAC's A and G, or TKFAC's moments M_Phi and M_Psi, of one batch."""
    n, t = a.shape[:2]
    if method == "kfac":
        return jnp.einsum("ntd,nte->de", a, a) / (n * t), jnp.einsum("ntd,nte->de", u, u) / n
    u_sq, a_sq = jnp.sum(u**2, axis=-1), jnp.sum(a**2, axis=-1)  # (N, T)
    m_phi = jnp.einsum("ntd,nt,nte->de", a, u_sq, a) / n
    m_psi = jnp.einsum("ntd,nt,nte->de", u, a_sq, u) / n
    return m_phi, m_psi


def _damped(layer: Layer, cfg: Settings) -> jax.Array:
    """lambda, raised to the relative floor of the layer's peak mean eigenvalue."""
    return jnp.maximum(cfg.damping, cfg.floor * layer.peak) if cfg.protect else cfg.damping


def _refresh(layer: Layer, f_in, f_out, weight, cfg: Settings) -> Layer:
    """New eigenbases; KFAC's damped inverses with them, and its peak mean eigenvalue."""
    (e_in, q_in), (e_out, q_out) = _eigh(f_in / weight), _eigh(f_out / weight)
    layer = layer._replace(q_in=q_in, eig_in=e_in, q_out=q_out, eig_out=e_out)
    if cfg.method == "tekfac":
        return layer._replace(delta=jnp.trace(f_in) / weight)
    if cfg.protect:
        layer = layer._replace(peak=jnp.maximum(layer.peak, jnp.mean(e_in) * jnp.mean(e_out)))
    root = jnp.sqrt(_damped(layer, cfg))
    return layer._replace(
        inv_in=(q_in / (e_in + root)) @ q_in.T, inv_out=(q_out / (e_out + root)) @ q_out.T
    )


def _statistics(layer: Layer, a, u, weight, due_eigen, cfg: Settings) -> Layer:
    """One layer on a statistics step: factors, eigenbasis, then S (TEKFAC)."""
    f_in, f_out = _factors(cfg.method, a, u)
    f_in, f_out = (cfg.ema * old + (1 - cfg.ema) * new
                   for old, new in ((layer.f_in, f_in), (layer.f_out, f_out)))  # fmt: skip
    layer = layer._replace(f_in=f_in, f_out=f_out)
    layer = jax.lax.cond(
        due_eigen, lambda: _refresh(layer, f_in, f_out, weight, cfg), lambda: layer
    )
    if cfg.method == "kfac":
        return layer
    s_init = jnp.outer(layer.eig_in, layer.eig_out) / jnp.where(layer.delta > 0, layer.delta, 1)
    old = jnp.where(due_eigen, s_init, layer.s)
    return layer._replace(s=cfg.s_ema * old + (1 - cfg.s_ema) * _rescale(layer, a, u))


def _rescale(layer: Layer, a: jax.Array, u: jax.Array) -> jax.Array:
    """S of one batch, E_n[(Q_in^T grad_n Q_out)^2]; for one position per example the
    projected gradient is an outer product, so its square is the outer product of squares."""
    if a.shape[1] == 1:
        a_sq, u_sq = (a[:, 0] @ layer.q_in) ** 2, (u[:, 0] @ layer.q_out) ** 2
        return a_sq.T @ u_sq / a.shape[0]
    per_example = jnp.einsum("ntd,nte->nde", a, u)  # each example's gradient
    projected = jnp.einsum("di,nde,eo->nio", layer.q_in, per_example, layer.q_out)
    return jnp.mean(projected**2, axis=0)


def _precondition(layer: Layer, g: jax.Array, cfg: Settings) -> tuple[Layer, jax.Array]:
    """(layer with its peak updated, P(g)): the inverses (KFAC) or the eigenbasis (TEKFAC)."""
    if cfg.method == "kfac":
        return layer, layer.inv_in @ g @ layer.inv_out
    if cfg.protect:
        layer = layer._replace(peak=jnp.maximum(layer.peak, jnp.mean(layer.s)))
    y = layer.q_in.T @ g @ layer.q_out / (layer.s + _damped(layer, cfg))
    return layer, layer.q_in @ y @ layer.q_out.T


def written_out_step(spec: Spec, cfg: Settings, params, batch_stats, state: State, x, y, key):
    """One KFAC or TEKFAC step, written out; returns (params, batch_stats, state, loss).

    The formulas of docs/algorithms.md: the factors (section 2), their averages and the
    schedule (3), factored or fixed damping (4), preconditioning, the KL clip and momentum
    (5), the relative damping floor and the skipped non-finite step (9).

    The signature is that of ``scripts/bench.py``'s steps; ``batch_stats`` (the models here
    have none) passes through.
    """
    stats_every, eigen_every = cfg.every
    assert eigen_every % stats_every == 0, "refreshes on statistics steps"
    n = x.shape[0]

    def forward(p, e):
        return _forward(spec, p, x, e)

    _, (_, shapes) = jax.eval_shape(forward, params, {k: jnp.zeros((), x.dtype) for k in params})
    perturb = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    logits, vjp, (inputs, _) = jax.vjp(forward, params, perturb, has_aux=True)
    loss = tekfax.losses.mean_loss(spec.loss, logits, y)

    def per_example_grad(targets):  # d l_n / d logits
        return jax.grad(lambda z: tekfax.losses.per_example_loss(spec.loss, z, targets).sum())(
            logits
        )

    grads = vjp(per_example_grad(y) / n)[0]
    ok = jnp.isfinite(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))) if cfg.protect else True
    stats_due = (state.count % stats_every == 0) & ok
    due_eigen = (state.count % eigen_every == 0) & ok

    def statistics():
        sampled = tekfax.losses.sample_targets(spec.loss, key, logits)
        u = vjp(per_example_grad(sampled).astype(logits.dtype))[1]
        weight = cfg.ema * state.weight + (1 - cfg.ema)
        strides = {name: s for name, s, _ in spec.layers}
        return weight, {
            k: _statistics(
                layer, _matrix(strides[k], inputs[k]), u[k].reshape(n, -1, u[k].shape[-1]),
                weight, due_eigen, cfg,
            )
            for k, layer in state.layers.items()
        }  # fmt: skip

    weight, layers = jax.lax.cond(stats_due, statistics, lambda: (state.weight, state.layers))
    quad, pre = 0.0, {}
    for k in layers:
        g = _kernel(grads[k])
        layers[k], pre[k] = _precondition(layers[k], g, cfg)
        quad = quad + jnp.sum(pre[k] * g)
    if cfg.protect:
        clip = jnp.minimum(1.0, jnp.sqrt(cfg.kappa / (cfg.lr**2 * jnp.abs(quad))))
    else:
        clip = 1.0
    direction = {k: _unkernel(clip * pre[k], grads[k]) for k in params}
    # A non-finite step ran no statistics (stats_due & ok), so factors, S and the peak stay
    # as they were; only momentum, weights and count need the select, fused into updates.
    keep = (lambda new, old: jnp.where(ok, new, old)) if cfg.protect else (lambda new, old: new)
    mom = jax.tree.map(lambda m, d: keep(cfg.momentum * m + d, m), state.momentum, direction)
    new_params = jax.tree.map(lambda p, m: keep(p - cfg.lr * m, p), params, mom)
    new_state = State(keep(state.count + 1, state.count), weight, layers, mom)
    return new_params, batch_stats, new_state, loss


def programs(b: bench.Bench, method: str, preset: bench.Entry) -> dict[str, tuple]:
    """Row name -> (step function, its arguments) for the four rows, on ``b``'s model and
    batch; SGD and the preset as ``scripts/bench.py`` runs them (lr 0.01, damping 0.1)."""
    params, key = b.variables["params"], jax.random.key(1)
    written = functools.partial(written_out_step, spec(b.model))
    sgd = bench.optimizers(["sgdm"])["sgdm"]
    rows = {
        name: (bench.make_step(b, entry), (params, {}, entry.opt.init(params), b.x, b.y, key))
        for name, entry in (("sgdm", sgd), (f"tekfax {method}", preset))
    }
    for name, protect in ((f"{method} written out", True), (f"{method} written out, bare", False)):
        step = functools.partial(written, Settings(method, protect=protect))
        rows[name] = (step, (params, {}, init(params), b.x, b.y, key))
    order = ("sgdm", f"{method} written out", f"{method} written out, bare", f"tekfax {method}")
    return {name: rows[name] for name in order}


def floor_flops(b: bench.Bench, preset: bench.Entry, compiled_sgd) -> tuple[float, float]:
    """(SGD's, the preset's) FLOP floor per step, as ``scripts/bench.py`` computes them."""
    dims = bench.layer_dims(bench.stats_shapes(b))
    fwd_bwd, _ = bench.model_flops(compiled_sgd, dims)
    return fwd_bwd, sum(bench.floor_flops(preset, dims, fwd_bwd).values())


def measure(fn, args, repeats: int, steps: int) -> tuple[Any, float, float]:
    """(compiled step, best compile seconds, mean step seconds over ``steps`` after one
    warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        compiled = jax.jit(fn, donate_argnums=(0, 1, 2)).lower(*args).compile()
        best = min(best, time.perf_counter() - start)
    donated, (x, y, key) = jax.tree.map(jnp.copy, args[:3]), args[3:]
    donated = compiled(*donated, x, y, key)[:3]  # warm-up: a statistics step
    jax.block_until_ready(donated)
    start = time.perf_counter()
    for _ in range(steps):
        donated = compiled(*donated, x, y, key)[:3]
    jax.block_until_ready(donated)
    return compiled, best, (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["autoencoder", "cnn"], default="cnn")
    parser.add_argument("--method", choices=["kfac", "tekfac"], default="tekfac")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="compilations; the best counts")
    parser.add_argument("--steps", type=int, default=100, help="timed steps, after one warm-up")
    args = parser.parse_args(argv)
    single_threaded_lapack()
    rate = bench.matmul_rate()
    print(
        header(
            f"{args.model}, batch {args.batch}, {args.method}; mean of {args.steps} steps; "
            f"float32 matmul rate {rate / 1e9:.0f} GFLOP/s\n"
        )
    )
    b = bench.setup(args.model, args.batch)
    preset = bench.optimizers([args.method], ["default"])[f"{args.method} (default)"]
    rows = {
        name: measure(fn, fn_args, args.repeats, args.steps)
        for name, (fn, fn_args) in programs(b, args.method, preset).items()
    }
    sgd_compiled, sgd_compile, sgd_step_s = rows["sgdm"]
    floors = floor_flops(b, preset, sgd_compiled)
    print(
        "| step | kernels | compile (s) | compile / SGD | mean step (ms) | step / SGD "
        "| floor (GFLOP) | step / floor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (compiled, seconds, step) in rows.items():
        kernels = sum(bench.kernel_sources(compiled.as_text()).values())
        flops = floors[0] if name == "sgdm" else floors[1]
        print(
            f"| {name} | {kernels} | {seconds:.2f} | {seconds / sgd_compile:.1f}x "
            f"| {1e3 * step:.2f} | {step / sgd_step_s:.2f}x | {flops / 1e9:.3f} "
            f"| {step * rate / flops:.2f}x |"
        )


if __name__ == "__main__":
    main()
