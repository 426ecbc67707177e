"""Degenerate curvature: random layer configurations against brute force, and finiteness.

Hypothesis draws one Dense or Conv layer (kernel sizes, strides, dilations, SAME / VALID /
explicit padding, channel counts, extra leading axes for Dense, bias or not, batch size) in
front of a Dense head. Two properties:

1. float64: the KFAC factors the optimizer holds equal A and G built here by brute force:
   a numpy im2col written with explicit loops over output positions and kernel offsets, and
   per-example output gradients u from ``jax.vmap(jax.grad)`` of one example's loss with
   respect to the layer's output. The brute-force per-example gradient sum_t a_t (x) u_t is
   itself checked against tests/reference.py (``jax.vmap(jax.grad)`` in the parameters).
2. float32: for every preset and both damping schemes, an update on degenerate batches
   (zero inputs, a dead ReLU layer, rank-deficient inputs, inputs scaled 1e-20 .. 1e20,
   batch size 1) are finite and every damped eigenvalue respects its damping floor.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given

import tekfax
from tests import _formulas as fm
from tests import reference
from tests.conftest import PRESETS, examples

CLASSES = 3
LAMBDA = 1e-2
NU = 1e-1


def make_layer(config: tuple, **kwargs) -> nn.Module:
    """The Dense or Conv layer a drawn ``config`` describes."""
    kind, spec = config[0], dict(config[1:])
    if kind == "dense":
        return nn.Dense(spec["features"], use_bias=spec["bias"], **kwargs)
    return nn.Conv(
        spec["features"],
        spec["kernel"],
        strides=spec["strides"],
        padding=spec["padding"],
        kernel_dilation=spec["dilation"],
        use_bias=spec["bias"],
        **kwargs,
    )


class Probe(nn.Module):
    """The drawn layer (named ``first``), tanh (ReLU where ``relu`` is true), a Dense head.

    ``relu`` may be a traced boolean, so one compiled program serves both activations.
    """

    config: tuple

    @nn.compact
    def __call__(self, x, relu=False):
        h = make_layer(self.config, name="first")(x)
        h = jnp.tanh(h) if relu is False else jnp.where(relu, nn.relu(h), jnp.tanh(h))
        return nn.Dense(CLASSES, name="head")(h.reshape(h.shape[0], -1))


@st.composite
def layers(draw):
    """(config, input shape) of one random Dense or Conv layer."""
    n = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    features = draw(st.integers(1, 3))
    c_in = draw(st.integers(1, 3))
    if draw(st.booleans()):
        lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
        config = ("dense", ("features", features), ("bias", bias))
        return config, (n, *lead, c_in)
    rank = draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    padding = draw(
        st.one_of(
            st.sampled_from(["SAME", "VALID"]),
            st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2)) for _ in range(rank)]),
        )
    )
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    spatial = tuple(draw(st.integers(r, r + 3)) for r in reach)
    config = (
        "conv",
        ("features", features),
        ("bias", bias),
        ("kernel", kernel),
        ("strides", strides),
        ("dilation", dilation),
        ("padding", padding),
    )
    return config, (n, *spatial, c_in)


def _pads(spec: dict, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """Explicit (low, high) padding, SAME and VALID written out as XLA defines them."""
    padding = spec["padding"]
    if not isinstance(padding, str):
        return list(padding)
    if padding == "VALID":
        return [(0, 0)] * len(spatial)
    pads = []
    geometry = zip(spatial, spec["kernel"], spec["strides"], spec["dilation"], strict=True)
    for size, k, s, d in geometry:
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _im2col(x: np.ndarray, config: tuple) -> np.ndarray:
    """a_{n,t} (N, T, d_in) by explicit loops: bias 1 first, then offsets-major patches."""
    kind, spec = config[0], dict(config[1:])
    n = x.shape[0]
    if kind == "dense":
        a = x.reshape(n, -1, x.shape[-1])
    else:
        rank = len(spec["kernel"])
        pads = _pads(spec, x.shape[1:-1])
        xp = np.pad(x, [(0, 0), *pads, (0, 0)])
        outs = [
            (xp.shape[1 + i] - (spec["kernel"][i] - 1) * spec["dilation"][i] - 1)
            // spec["strides"][i]
            + 1
            for i in range(rank)
        ]
        rows = []
        for pos in itertools.product(*[range(o) for o in outs]):
            patch = []
            for off in itertools.product(*[range(k) for k in spec["kernel"]]):
                idx = tuple(
                    p * s + o * d
                    for p, s, o, d in zip(pos, spec["strides"], off, spec["dilation"], strict=True)
                )
                patch.append(xp[(slice(None), *idx)])  # (N, c_in)
            rows.append(np.concatenate(patch, axis=-1))
        a = np.stack(rows, axis=1)
    if spec["bias"]:
        a = np.concatenate([np.ones(a.shape[:-1] + (1,)), a], axis=-1)
    return a


def _brute_u(model: Probe, params, x, y) -> jax.Array:
    """u_{n,t} = d l_n / d s_{n,t}, (N, T, d_out), by jax.grad of one example's loss."""
    h = make_layer(model.config).apply({"params": params["first"]}, x)

    def example_loss(h_n, y_n):
        z = jnp.tanh(h_n).reshape(1, -1)
        logits = z @ params["head"]["kernel"] + params["head"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_n[None]).sum()

    u = jax.vmap(jax.grad(example_loss))(h, y)
    return u.reshape(h.shape[0], -1, h.shape[-1])


@given(layers())
@examples()  # the profile's count: 4 in ci, 1,000 with the thorough profile
def test_kfac_factors_match_brute_force_float64(drawn):
    config, x_shape = drawn
    with jax.enable_x64(True):
        model = Probe(config)
        opt = tekfax.scale_by_kfac(damping=LAMBDA, curvature_every=1, eigen_every=1)

        @fm.jit  # everything in one program: a compile per drawn layer, not one per operation
        def run(key):
            kx, ky, kp = jax.random.split(key, 3)
            x = jax.random.normal(kx, x_shape, jnp.float64)
            y = jax.random.randint(ky, (x_shape[0],), 0, CLASSES)
            params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(kp, x)["params"])
            out = tekfax.loss_and_curvature(
                lambda p: model.apply({"params": p}, x), params, y, fisher="empirical"
            )
            state = opt.update(out.grads, opt.init(params), params, stats=out.stats)[1]
            want_g = reference.per_example_grads(model, params, x, y)["first"]
            block = tekfax.diagnostics.approx_fisher_blocks(state)["first"]
            return x, state, block, want_g, _brute_u(model, params, x, y)

        x, state, block, want_g, u = run(jax.random.key(len(str(drawn))))
        a = _im2col(np.asarray(x, np.float64), config)
        u = np.asarray(u, np.float64)
        n, t = a.shape[:2]
        # The brute-force a and u give the true per-example gradients (independent check).
        g = np.einsum("nti,nto->nio", a, u).reshape(n, -1)
        fm.assert_close(g, want_g, 1e-10)

        big_a = np.einsum("nti,ntj->ij", a, a) / (n * t)
        big_g = np.einsum("nti,ntj->ij", u, u) / n
        got_a, got_g = fm.held_estimates(state, "first")
        fm.assert_close(got_a, big_a, 1e-10)
        fm.assert_close(got_g, big_g, 1e-10)
        fm.assert_close(block, np.kron(big_a, big_g), 1e-9)


SCENARIOS = ("zeros", "dead_relu", "rank_deficient", "scaled", "batch_1")
SCALES = {"scaled": (1e-20, 1e-10, 1e10, 1e18, 1e20)}


def _degenerate_batch(scenario: str, x_shape, key, scale: float):
    if scenario == "batch_1":
        x_shape = (1, *x_shape[1:])
    x = jax.random.normal(key, x_shape, jnp.float32)
    if scenario == "zeros":
        x = jnp.zeros_like(x)
    elif scenario == "rank_deficient":  # every example and feature is one number times another
        x = jnp.broadcast_to(x[:1, ..., :1], x.shape)
    elif scenario in SCALES:
        x = x * scale
    return x


def _floor(preset: str, scheme: str, layer) -> float:
    """The smallest damped eigenvalue each rule allows (docs/algorithms.md, section 4)."""
    if scheme == "damping":
        return LAMBDA
    d_in, d_out = layer.damped.shape
    if preset in ("ekfac", "tekfac"):  # S~ >= delta~ / dim >= nu / dim
        return NU / (d_in * d_out)
    return NU**2 / (d_in * d_out)  # (sqrt(d~) phi + d~/d_in)(sqrt(d~) psi + d~/d_out)


OPTIMIZERS = [(p, s) for p in PRESETS for s in ("damping", "nu")]


@given(drawn=layers())
@examples(0.5)  # each example runs every scenario
def test_degenerate_batches_give_finite_updates_float32(drawn):
    """All four presets with both damping schemes, compiled together, on every scenario of
    ``SCENARIOS`` for the drawn layer. The scenarios' batches of one shape (all but
    ``batch_1``, and it too when the drawn batch has one example) and every scale of
    ``SCALES`` run through one compiled update: the activation (ReLU for ``dead_relu``,
    tanh otherwise), the parameters and the labels are its arguments."""
    config, x_shape = drawn
    model = Probe(config)
    kx, ky, kp, kr = jax.random.split(jax.random.key(len(str(drawn))), 4)
    opts = {
        (preset, scheme): getattr(tekfax, f"scale_by_{preset}")(
            **({"damping": LAMBDA} if scheme == "damping" else {"nu": NU}),
            curvature_every=1,
            eigen_every=1,
            rescale_every=1,
        )
        for preset, scheme in OPTIMIZERS
    }

    @fm.jit  # one compile per batch shape, shared by the scenarios
    def update(params, x, y, relu):
        out = tekfax.loss_and_curvature(
            lambda p: model.apply({"params": p}, x, relu), params, y, rng=kr
        )
        results = {}
        for key, opt in opts.items():
            results[key] = opt.update(out.grads, opt.init(params), params, stats=out.stats)
        return out.grads, results

    for scenario in SCENARIOS:
        scales = SCALES.get(scenario, (1.0,))
        batches = [_degenerate_batch(scenario, x_shape, kx, s) for s in scales]
        y = jax.random.randint(ky, (batches[0].shape[0],), 0, CLASSES)
        params = model.init(kp, batches[0])["params"]
        if scenario == "dead_relu":  # every pre-activation negative: u = 0, the head sees zeros
            first = jax.tree.map(jnp.zeros_like, params["first"])
            if "bias" in first:
                first["bias"] = -jnp.ones_like(first["bias"])
            params = {**params, "first": first}
        relu = jnp.asarray(scenario == "dead_relu")
        for scale, x in zip(scales, batches, strict=True):
            grads, results = update(params, x, y, relu)
            assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
            for (preset, scheme), (updates, state) in results.items():
                where = (preset, scheme, scenario, scale)
                for leaf in jax.tree.leaves((updates, state)):
                    assert np.all(np.isfinite(np.asarray(leaf))), where
                for name, layer in state.layers.items():
                    floor = _floor(preset, scheme, layer)
                    assert np.min(np.asarray(layer.damped, np.float64)) >= floor * (1 - 1e-5), (
                        name,
                        where,
                    )
                if scenario == "zeros" and not dict(config[1:])["bias"]:  # no input: no move
                    np.testing.assert_array_equal(np.asarray(updates["first"]["kernel"]), 0.0)
