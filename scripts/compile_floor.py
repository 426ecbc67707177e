"""How long XLA takes to compile TEKFAC itself: a minimal TEKFAC step against tekfax's.

The compile target (TEKFAC's step on the digits CNN in at most 3x SGD's compile time) is a
ratio of two programs, and XLA:CPU compiles every fused kernel on its own, so its compile
time follows the kernel count (BENCHMARKS.md, "Looked at"). This script asks how much of
TEKFAC's count the algorithm needs. It compiles, for the digits CNN at ``--batch``:

- ``sgdm``: the Flax model's step with ``optax.sgd`` (momentum 0.9), the reference;
- ``minimal tekfac``: :func:`minimal_step`, TEKFAC written out in plain JAX with nothing
  but the algorithm and the defaults' protections: the model's forward pass (``lax.conv``
  and products on the Flax model's parameters) and backward pass, the sampled-label
  backward through the same VJP, the TKFAC moments (convolutions as patches), their
  bias-corrected averages, ``eigh`` of each factor, S per example, the relative damping
  floor, the norm constraint (KL clip), momentum, one check that skips a non-finite step,
  and the library's default intervals as ``lax.cond``. It leaves out what protects the
  numbers beyond that: the power-of-two scaling against overflow, each stage's rejection of
  non-finite statistics, the ``eigh`` retry, streaming in chunks;
- ``bare tekfac``: the same without the damping floor, the norm constraint and the check;
- ``tekfax tekfac``: the library's ``tekfax.tekfac`` with the same settings.

Each row gives the kernels XLA compiles one by one and the compile seconds (lower and
compile, best of ``--repeats``). The minimal step computes what ``tekfax.tekfac`` computes:
``tests/test_scripts.py`` runs both for several steps in float64 and compares the weights.

    python scripts/compile_floor.py            # digits CNN, batch 256
"""

from __future__ import annotations

import argparse
import functools
import re
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_eigh import header

import tekfax
from tekfax.experiments import models
from tekfax.experiments.compare import single_threaded_lapack

SHAPE = (8, 8, 1)  # the digits CNN's input
CONVS = {"Conv_0": (1, 1), "Conv_1": (2, 2)}  # its convolutions and their strides
HP = {"curvature_every": 10, "eigen_every": 100, "rescale_every": 10}  # the defaults


class Layer(NamedTuple):
    """One layer's TEKFAC state: moment sums, eigenbasis, S and peak mean eigenvalue."""

    m_in: jax.Array
    m_out: jax.Array
    q_in: jax.Array
    eig_in: jax.Array
    q_out: jax.Array
    eig_out: jax.Array
    delta: jax.Array
    s: jax.Array
    peak: jax.Array


class State(NamedTuple):
    count: jax.Array
    weight: jax.Array  # the bias correction of the moment averages
    layers: dict[str, Layer]
    momentum: Any


def _forward(params, x, perturb):
    """SmallCNN's logits and each layer's input, with ``perturb`` added to its outputs."""
    inputs, h = {}, x
    for name in ("Conv_0", "Conv_1", "Dense_0", "Dense_1"):
        p = params[name]
        if name.startswith("Dense") and h.ndim > 2:
            h = h.reshape(h.shape[0], -1)
        inputs[name] = h
        if name in CONVS:
            dims = ("NHWC", "HWIO", "NHWC")
            z = jax.lax.conv_general_dilated(h, p["kernel"], CONVS[name], "SAME", None, None, dims)
        else:
            z = h @ p["kernel"]
        h = z + p["bias"] + perturb[name]
        if name != "Dense_1":
            h = jax.nn.relu(h)
    return h, inputs


def _matrix(name: str, h: jax.Array) -> jax.Array:
    """The layer's input rows a (N, T, d_in + 1): patches in the kernel's (kh, kw, c) order."""
    if name in CONVS:
        p = jax.lax.conv_general_dilated_patches(
            h, (3, 3), CONVS[name], "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC")
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
            zeros(d_out), zeros([]), zeros((d_in, d_out)), zeros([]),
        )  # fmt: skip

    layers = jax.tree.map(layer, params, is_leaf=lambda n: "kernel" in n)
    weight = jnp.zeros([], jax.tree.leaves(params)[0].dtype)
    return State(jnp.zeros([], jnp.int32), weight, layers, jax.tree.map(jnp.zeros_like, params))


def _statistics(layer: Layer, a, u, weight, due_eigen, ema, s_ema):
    """Stages 1-3 for one layer on a statistics step: moments, eigenbasis, S."""
    n = a.shape[0]
    u_sq, a_sq = jnp.sum(u**2, axis=-1), jnp.sum(a**2, axis=-1)  # (N, T)
    m_in = jnp.einsum("ntd,nt,nte->de", a, u_sq, a) / n
    m_out = jnp.einsum("ntd,nt,nte->de", u, a_sq, u) / n
    m_in, m_out = ema * layer.m_in + (1 - ema) * m_in, ema * layer.m_out + (1 - ema) * m_out

    def refresh():
        (e_in, q_in), (e_out, q_out) = _eigh(m_in / weight), _eigh(m_out / weight)
        delta = jnp.trace(m_in) / weight
        return q_in, e_in, q_out, e_out, delta

    old = (layer.q_in, layer.eig_in, layer.q_out, layer.eig_out, layer.delta)
    q_in, e_in, q_out, e_out, delta = jax.lax.cond(due_eigen, refresh, lambda: old)
    per_example = jnp.einsum("ntd,nte->nde", a, u)  # each example's gradient
    s_batch = jnp.mean(jnp.einsum("di,nde,eo->nio", q_in, per_example, q_out) ** 2, axis=0)
    s_init = jnp.outer(e_in, e_out) / jnp.where(delta > 0, delta, 1.0)
    s = s_ema * jnp.where(due_eigen, s_init, layer.s) + (1 - s_ema) * s_batch
    return Layer(m_in, m_out, q_in, e_in, q_out, e_out, delta, s, layer.peak)


def minimal_step(params, state: State, x, y, key, lr=0.01, damping=0.1, momentum=0.9,
                 kappa=1e-3, floor=1.0, ema=0.95, s_ema=0.95, hp=HP, protect=True):  # fmt: skip
    """One TEKFAC step of the digits CNN, written out; returns (params, state, loss).

    ``protect=False`` drops the norm constraint, the damping floor and the finiteness check:
    the bare algorithm of docs/algorithms.md, sections 2-5.
    """
    assert hp["curvature_every"] == hp["rescale_every"], "one statistics cond for both"
    assert hp["eigen_every"] % hp["curvature_every"] == 0, "refreshes on statistics steps"
    perturb = _perturbations(params, x)
    n = x.shape[0]
    logits, vjp, inputs = jax.vjp(lambda p, e: _forward(p, x, e), params, perturb, has_aux=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    probs = jax.nn.softmax(logits)
    grads = vjp((probs - jax.nn.one_hot(y, 10)) / n)[0]
    count = state.count
    stats_due = count % hp["curvature_every"] == 0  # = rescale due with these intervals
    due_eigen = count % hp["eigen_every"] == 0
    ok = jnp.isfinite(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))) if protect else True
    stats_due, due_eigen = stats_due & ok, due_eigen & ok

    def statistics():
        label = tekfax.losses.sample_targets("softmax_cross_entropy", key, logits)
        u = vjp((probs - jax.nn.one_hot(label, 10)).astype(logits.dtype))[1]
        weight = ema * state.weight + (1 - ema)
        return weight, {
            k: _statistics(
                layer, _matrix(k, inputs[k]), u[k].reshape(n, -1, u[k].shape[-1]), weight,
                due_eigen, ema, s_ema,
            )
            for k, layer in state.layers.items()
        }  # fmt: skip

    weight, layers = jax.lax.cond(stats_due, statistics, lambda: (state.weight, state.layers))
    quad, pre = 0.0, {}
    for k, layer in layers.items():
        if protect:
            layers[k] = layer = layer._replace(peak=jnp.maximum(layer.peak, jnp.mean(layer.s)))
        g = _kernel(grads[k])
        lam = jnp.maximum(damping, floor * layer.peak) if protect else damping
        pre[k] = layer.q_in @ (layer.q_in.T @ g @ layer.q_out / (layer.s + lam)) @ layer.q_out.T
        quad = quad + jnp.sum(pre[k] * g)
    clip = jnp.minimum(1.0, jnp.sqrt(kappa / (lr**2 * jnp.abs(quad)))) if protect else 1.0
    direction = {k: _unkernel(clip * pre[k], grads[k]) for k in params}
    # A non-finite step ran no statistics (stats_due & ok), so S and the peak stay as they
    # were; only momentum, weights and count need the select, fused into their updates.
    keep = (lambda new, old: jnp.where(ok, new, old)) if protect else (lambda new, old: new)
    mom = jax.tree.map(lambda m, d: keep(momentum * m + d, m), state.momentum, direction)
    new_params = jax.tree.map(lambda p, m: keep(p - lr * m, p), params, mom)
    return new_params, State(keep(count + 1, count), weight, layers, mom), loss


def bare_step(params, state: State, x, y, key):
    """:func:`minimal_step` without the defaults' protections."""
    return minimal_step(params, state, x, y, key, protect=False)


def _perturbations(params, x) -> dict[str, jax.Array]:
    """Zeros shaped like each layer's output (N, ..., d_out): d loss / d them is u."""
    scalars = {k: jnp.zeros((), x.dtype) for k in params}
    _, inputs = jax.eval_shape(_forward, params, x, scalars)
    out = {}
    for k, h in inputs.items():
        d_out = params[k]["kernel"].shape[-1]
        if k in CONVS:
            stride = CONVS[k]
            spatial = tuple(-(-d // s) for d, s in zip(h.shape[1:3], stride, strict=True))
            out[k] = jnp.zeros((h.shape[0], *spatial, d_out), x.dtype)
        else:
            out[k] = jnp.zeros((h.shape[0], d_out), x.dtype)
    return out


def kernel_count(hlo: str) -> int:
    """Kernels XLA compiles one by one: fusions and library calls."""
    return len(re.findall(r" (?:fusion|custom-call)\(", hlo))


def compile_seconds(fn, args, repeats: int) -> tuple[float, int]:
    best, kernels = float("inf"), 0
    for _ in range(repeats):
        jax.clear_caches()
        t = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        best = min(best, time.perf_counter() - t)
        kernels = kernel_count(compiled.as_text())
    return best, kernels


def tekfax_step(model, opt: optax.GradientTransformation):
    """The step of ``opt`` (a tekfax preset) on ``model``, statistics only when consumed."""

    def step(params, opt_state, x, y, key):
        out = tekfax.loss_and_curvature(
            lambda p: model.apply({"params": p}, x),
            params,
            y,
            loss="softmax_cross_entropy",
            rng=key,
            compute_stats=tekfax.stats_needed(opt_state),
        )
        updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        return optax.apply_updates(params, updates), opt_state, out.loss

    return step


def sgd_step(model, opt: optax.GradientTransformation):
    """The step of a first-order ``opt`` on ``model``."""

    def step(params, opt_state, x, y, key):
        del key

        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def programs(batch: int) -> dict[str, tuple]:
    """Row name -> (step function, its arguments); the model, its inputs and labels."""
    model = models.create_model("cnn", 10, SHAPE)
    params = models.init_variables(model, SHAPE, jax.random.key(0))["params"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *SHAPE)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    key = jax.random.key(1)
    sgd, tekfac = optax.sgd(0.01, momentum=0.9), tekfax.tekfac(0.01, damping=0.1)
    return {
        "sgdm": (sgd_step(model, sgd), (params, sgd.init(params), x, y, key)),
        "minimal tekfac": (minimal_step, (params, init(params), x, y, key)),
        "bare tekfac": (bare_step, (params, init(params), x, y, key)),
        "tekfax tekfac": (tekfax_step(model, tekfac), (params, tekfac.init(params), x, y, key)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    single_threaded_lapack()
    print(header(f"digits CNN, batch {args.batch}; best of {args.repeats} compilations\n"))
    rows = {n: compile_seconds(f, a, args.repeats) for n, (f, a) in programs(args.batch).items()}
    sgd_seconds, sgd_kernels = rows["sgdm"]
    print("| step | kernels | kernels / SGD | compile (s) | compile / SGD |")
    print("|---|---|---|---|---|")
    for name, (seconds, kernels) in rows.items():
        print(
            f"| {name} | {kernels} | {kernels / sgd_kernels:.1f}x | {seconds:.2f} "
            f"| {seconds / sgd_seconds:.1f}x |"
        )


if __name__ == "__main__":
    main()
