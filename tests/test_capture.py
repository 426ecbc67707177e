"""Tests for tekfax.capture.loss_and_curvature against independent references.

References: ``jax.grad`` of a hand-written mean loss, the brute-force per-example gradients of
``tests/reference.py`` (``jax.vmap(jax.grad)`` on one example at a time), and the analytic
expectation of u u^T under the model's predictive distribution for the sampled Fisher.
"""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tekfax
from tekfax.losses import LOSSES, sample_targets
from tekfax.patches import grad_matrix, input_matrix, output_matrix
from tests import reference
from tests.models import MLP, ConvNet, SequenceDense

pytestmark = pytest.mark.usefixtures("x64")

EXACT = {"rtol": 1e-10, "atol": 1e-12}


class _PerPosition(nn.Module):
    """Dense layers applied at every position: logits (N, T, C), one loss term per position."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(jnp.tanh(nn.Dense(4)(x)))


def _init_params(model, x, rng):
    """Params shaped like ``model.init``'s, drawn with NumPy (no JAX random kernels to compile).

    Kernels get variance 1 / fan_in so that tanh stays away from saturation.
    """
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def draw(path, leaf):
        scale = 0.1 if path[-1].key == "bias" else 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _targets(loss, shape, num_classes, rng):
    """Data targets for ``loss``; ``shape`` is the logits' shape."""
    if loss == "softmax_cross_entropy":
        return jnp.asarray(rng.integers(0, num_classes, shape[:-1]))
    if loss == "sigmoid_binary_cross_entropy":
        return jnp.asarray(rng.integers(0, 2, shape), jnp.float64)
    return jnp.asarray(rng.standard_normal(shape))


def _setup(model, x_shape, loss="softmax_cross_entropy", num_classes=3, seed=0, dtype=None):
    """(logits_fn, params, x, targets), float64 unless ``dtype`` says otherwise."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape), dtype or jnp.float64)
    params = _init_params(model, x, rng)
    logits_shape = jax.eval_shape(model.apply, {"params": params}, x).shape
    targets = _targets(loss, logits_shape, num_classes, rng)

    def logits_fn(p):
        return model.apply({"params": p}, x)

    return logits_fn, params, x, targets


def _independent_mean_loss(loss, logits, targets):
    """Batch mean of l_n, the per-element loss summed over all non-batch axes."""
    if loss == "softmax_cross_entropy":
        log_p = jax.nn.log_softmax(logits)
        values = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)
    elif loss == "sigmoid_binary_cross_entropy":
        values = -(
            targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits)
        )
    else:
        values = 0.5 * (logits - targets) ** 2
    return values.reshape(values.shape[0], -1).sum(axis=1).mean()


def _layers(stats, prefix=()):
    """{"A/B": LayerStats} for every layer in a nested stats tree."""
    if isinstance(stats, tekfax.LayerStats):
        return {"/".join(prefix): stats}
    assert isinstance(stats, dict), type(stats)
    out = {}
    for key, value in stats.items():
        out.update(_layers(value, prefix + (key,)))
    return out


def _get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _per_example_from_stats(stats):
    """g_n = sum_t a_{n,t} u_{n,t}^T in kernel layout, ravelled: (S, N, d_in * d_out)."""
    a = input_matrix(stats.inputs, stats.meta)
    u = output_matrix(stats.out_grads)
    g = jnp.einsum("nti,snto->snio", a, u)
    return g.reshape(g.shape[0], g.shape[1], -1)


def _layer_matrices(out, grads):
    """Per layer: a and u reassembled into the batch gradient, the per-example gradients, and
    the reference batch gradient in kernel layout (all inside the caller's jit)."""
    result = {}
    for name, stats in _layers(out.stats).items():
        a = input_matrix(stats.inputs, stats.meta)
        u = output_matrix(stats.out_grads)
        result[name] = {
            "batch_grad": jnp.einsum("nti,snto->io", a, u) / a.shape[0],
            "expected_grad": grad_matrix(_get(grads, name), jnp.float64),
            "per_example": _per_example_from_stats(stats)[0],
        }
    return result


def _exact_run(model, params, x, targets, loss):
    """The capture and its references for :func:`_check_exact` (call under jit)."""

    def logits_fn(p):
        return model.apply({"params": p}, x)

    out = tekfax.loss_and_curvature(logits_fn, params, targets, loss=loss, fisher="empirical")
    value, grads = jax.value_and_grad(
        lambda p: _independent_mean_loss(loss, logits_fn(p), targets)
    )(params)
    per_example = reference.per_example_grads(model, params, x, targets, loss)
    return out, value, grads, per_example, _layer_matrices(out, grads)


def _check_exact(x, results):
    """Loss, grads, batch-gradient reassembly and per-example gradients, all in float64."""
    out, value, grads, per_example, matrices = results
    n = x.shape[0]
    np.testing.assert_allclose(out.loss, value, **EXACT)
    chex.assert_trees_all_close(out.grads, grads, **EXACT)
    assert out.aux is None

    layers = _layers(out.stats)
    assert sorted(layers) == sorted(per_example)  # Every Dense / Conv is captured.
    for name, stats in layers.items():
        assert stats.out_grads.shape[0] == 1  # Empirical: one "sample", the data labels.
        assert stats.out_grads.shape[1] == n
        m = matrices[name]
        np.testing.assert_allclose(m["batch_grad"], m["expected_grad"], err_msg=name, **EXACT)
        # u is d l_n / d s, not divided by N: per-example gradients match the brute force.
        g = np.asarray(m["per_example"])
        np.testing.assert_allclose(g, per_example[name], err_msg=name, **EXACT)
        np.testing.assert_allclose(
            g.T @ g / n, reference.fisher_block(per_example[name]), err_msg=name, **EXACT
        )


MODELS = [
    pytest.param(MLP(), (5, 3), id="mlp"),
    pytest.param(MLP(features=(4, 3), use_bias=False), (4, 2, 3), id="mlp-nobias"),
    pytest.param(
        ConvNet(kernel_size=(3,), strides=2, padding="SAME", dilation=2),
        (3, 9, 2),
        id="cnn1d-same-strided-dilated",
    ),
    pytest.param(
        ConvNet(kernel_size=(3, 2), strides=(2, 1), padding="VALID", channels=(3, 2)),
        (3, 7, 5, 2),
        id="cnn2d-valid-strided-two-convs",
    ),
    pytest.param(
        ConvNet(kernel_size=(2, 2), padding="SAME", dilation=2, use_bias=False),
        (3, 5, 4, 1),
        id="cnn2d-same-dilated-nobias",
    ),
    pytest.param(
        ConvNet(kernel_size=(2, 2, 2), strides=(1, 2, 1), padding="SAME"),
        (2, 3, 4, 3, 2),
        id="cnn3d-same-strided",
    ),
    pytest.param(
        ConvNet(kernel_size=(2, 1, 2), padding="VALID", dilation=(1, 1, 2)),
        (2, 3, 2, 4, 1),
        id="cnn3d-valid-dilated",
    ),
    pytest.param(SequenceDense(), (3, 4, 2), id="sequence-dense"),
]


def _model_classes(model):
    return getattr(model, "num_classes", None) or model.features[-1]


# id -> (model, x_shape, loss, setup keyword arguments) of every exactness check.
EXACT_CASES = {
    **{
        p.id: (*p.values, "softmax_cross_entropy", {"num_classes": _model_classes(p.values[0])})
        for p in MODELS
    },
    **{
        f"loss-{loss}": (_PerPosition(), (3, 4, 2), loss, {"num_classes": 3, "seed": 1})
        for loss in LOSSES
    },
}


@functools.cache
def _exact_results() -> dict:
    """id -> (x, :func:`_exact_run`) for every case of :data:`EXACT_CASES`, in one jit
    (float64: call under the x64 fixture).

    The cases are independent tiny programs; compiling them together pays XLA's fixed
    per-program cost once instead of once per case. Each test checks its own entry.
    """
    inputs = {}
    for key, (model, x_shape, loss, kwargs) in EXACT_CASES.items():
        _, params, x, targets = _setup(model, x_shape, loss=loss, **kwargs)
        inputs[key] = (params, x, targets)

    @jax.jit
    def run(inputs):
        return {
            key: _exact_run(EXACT_CASES[key][0], *args, EXACT_CASES[key][2])
            for key, args in inputs.items()
        }

    results = run(inputs)
    return {key: (inputs[key][1], results[key]) for key in inputs}


@pytest.mark.parametrize("key", [p.id for p in MODELS])
def test_grads_and_per_example_gradients_are_exact(key):
    _check_exact(*_exact_results()[key])


@pytest.mark.parametrize("loss", LOSSES)
def test_losses_value_and_gradients(loss):
    """Each loss on (N, T, C) outputs: l_n sums over positions and classes (or units)."""
    _check_exact(*_exact_results()[f"loss-{loss}"])


# --- Sampled (true) Fisher ------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
def test_sampled_out_grads_equal_empirical_at_sampled_labels(loss):
    model = MLP(features=(4, 3))
    logits_fn, params, x, targets = _setup(model, (5, 3), loss=loss, num_classes=3, seed=2)
    num_samples = 3
    rng = jax.random.key(7)

    @jax.jit
    def run(params, targets, rng):
        sampled = tekfax.loss_and_curvature(
            logits_fn, params, targets, loss=loss, rng=rng, num_samples=num_samples
        )
        data = tekfax.loss_and_curvature(logits_fn, params, targets, loss=loss, fisher="empirical")
        logits = logits_fn(params)
        at_labels = [
            tekfax.loss_and_curvature(
                logits_fn, params, sample_targets(loss, key, logits), loss=loss, fisher="empirical"
            )
            for key in jax.random.split(rng, num_samples)
        ]
        return sampled, data, at_labels

    sampled, data, at_labels = run(params, targets, rng)
    # Loss and grads use the data targets whatever the Fisher mode.
    np.testing.assert_allclose(sampled.loss, data.loss, **EXACT)
    chex.assert_trees_all_close(sampled.grads, data.grads, **EXACT)
    for name, stats in _layers(sampled.stats).items():
        assert stats.out_grads.shape[0] == num_samples
        np.testing.assert_array_equal(stats.inputs, _layers(data.stats)[name].inputs)
        for k, out in enumerate(at_labels):
            np.testing.assert_allclose(
                stats.out_grads[k], _layers(out.stats)[name].out_grads[0], err_msg=name, **EXACT
            )
        # The draws differ from one another: the labels are resampled per key.
        assert not np.allclose(stats.out_grads[0], stats.out_grads[1])


def _output_covariance(loss, logits):
    """E_y[u u^T] at the logits, u = d l / d logits and y ~ p(. | logits): (N, C, C)."""
    if loss == "softmax_cross_entropy":
        p = jax.nn.softmax(logits)
        return jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    if loss == "sigmoid_binary_cross_entropy":
        p = jax.nn.sigmoid(logits)
        return jax.vmap(jnp.diag)(p * (1 - p))
    return jnp.broadcast_to(jnp.eye(logits.shape[-1]), logits.shape + logits.shape[-1:])


@pytest.mark.parametrize("loss", LOSSES)
def test_sampled_g_factor_converges_to_true_fisher(loss):
    """G = E_n[u u^T] from many label draws converges to E_n[J_n^T E_y[dl dl^T] J_n]."""
    model = MLP(features=(4, 3))
    logits_fn, params, x, targets = _setup(model, (6, 3), loss=loss, num_classes=3, seed=3)
    num_samples = 4000

    def hidden_to_logits(h):
        p1 = params["Dense_1"]
        return jnp.tanh(h) @ p1["kernel"] + p1["bias"]

    @jax.jit
    def run(params, targets, rng):
        out = tekfax.loss_and_curvature(
            logits_fn, params, targets, loss=loss, rng=rng, num_samples=num_samples
        )
        # Independent forward pass: s0 = x K0 + b0, logits = tanh(s0) K1 + b1.
        s0 = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
        logits = hidden_to_logits(s0)
        jac = jax.vmap(jax.jacfwd(hidden_to_logits))(s0)  # (N, C, hidden): d logits / d s0
        cov = _output_covariance(loss, logits)
        expected = {
            "Dense_1": cov.mean(axis=0),  # J = identity for the logits layer.
            "Dense_0": jnp.einsum("nci,ncd,ndj->ij", jac, cov, jac) / x.shape[0],
        }
        return out, logits, logits_fn(params), expected

    out, logits, model_logits, expected = run(params, targets, jax.random.key(11))
    np.testing.assert_allclose(logits, model_logits, **EXACT)
    for name, g_expected in expected.items():
        g_expected = np.asarray(g_expected)
        u = np.asarray(out.stats[name].out_grads)  # (S, N, d_out): T = 1 for these layers.
        uu = u[..., :, None] * u[..., None, :]  # (S, N, d, d): one outer product per draw.
        g_hat = uu.mean(axis=(0, 1))
        # Monte Carlo tolerance: g_hat averages S independent draws for each of the N examples,
        # so its per-entry standard error is sqrt(sum_n Var_s[u_i u_j] / S) / N, estimated from
        # the draws themselves. Allow 5 standard errors (deterministic seed).
        se = np.sqrt(uu.var(axis=0, ddof=1).sum(axis=0) / num_samples) / u.shape[1]
        # The tolerance is informative: the standard error is small against the entries.
        assert se.max() < 0.05 * np.abs(g_expected).max(), name
        np.testing.assert_array_less(np.abs(g_hat - g_expected), 5 * se + 1e-12, err_msg=name)


def test_num_samples_sets_leading_axis():
    model = ConvNet(kernel_size=(3, 3), strides=2, channels=(2,))
    logits_fn, params, x, y = _setup(model, (3, 5, 5, 2), num_classes=4)

    @jax.jit
    def run(params, rng):
        return (
            tekfax.loss_and_curvature(logits_fn, params, y, rng=rng, num_samples=4),
            tekfax.loss_and_curvature(logits_fn, params, y, rng=rng),
            tekfax.loss_and_curvature(logits_fn, params, y, fisher="empirical"),
        )

    many, one, empirical = run(params, jax.random.key(0))
    for out, k in ((many, 4), (one, 1), (empirical, 1)):
        conv, dense = out.stats["Conv_0"], out.stats["Dense_0"]
        assert conv.out_grads.shape == (k, 3, 3, 3, 2)
        assert dense.out_grads.shape == (k, 3, 4)
        assert conv.inputs.shape == x.shape
        assert dense.inputs.shape == (3, 3 * 3 * 2)


# --- Errors -------------------------------------------------------------------------------------


@pytest.fixture
def tiny(x64):
    return _setup(MLP(features=(3,)), (2, 3))


def test_unknown_loss_lists_valid_names(tiny):
    logits_fn, params, _, y = tiny
    with pytest.raises(ValueError, match="hinge") as info:
        tekfax.loss_and_curvature(logits_fn, params, y, loss="hinge", rng=jax.random.key(0))
    for name in LOSSES:
        assert name in str(info.value)


def test_sampled_without_rng_raises(tiny):
    logits_fn, params, _, y = tiny
    with pytest.raises(ValueError, match="rng"):
        tekfax.loss_and_curvature(logits_fn, params, y, fisher="sampled")
    with pytest.raises(ValueError, match="rng"):
        tekfax.loss_and_curvature(logits_fn, params, y)  # "sampled" is the default.


def test_unknown_fisher_raises(tiny):
    logits_fn, params, _, y = tiny
    with pytest.raises(ValueError, match="fisher='exact'"):
        tekfax.loss_and_curvature(logits_fn, params, y, fisher="exact", rng=jax.random.key(0))


@pytest.mark.parametrize("num_samples", [0, -1, 1.5])
def test_bad_num_samples_raises(tiny, num_samples):
    logits_fn, params, _, y = tiny
    with pytest.raises(ValueError, match="num_samples"):
        tekfax.loss_and_curvature(
            logits_fn, params, y, rng=jax.random.key(0), num_samples=num_samples
        )


def test_has_aux_requires_a_pair(tiny):
    logits_fn, params, _, y = tiny
    with pytest.raises(ValueError, match="pair"):
        tekfax.loss_and_curvature(logits_fn, params, y, fisher="empirical", has_aux=True)


# --- jit and dtypes ---------------------------------------------------------------------------


def test_under_jit_and_compiles_once():
    model = MLP(features=(3, 2))
    logits_fn, params, x, y = _setup(model, (3, 2), num_classes=2)
    traces = []

    @jax.jit
    def step(params, y, rng):
        traces.append(None)
        out = tekfax.loss_and_curvature(logits_fn, params, y, rng=rng, num_samples=2)
        grads = jax.grad(
            lambda p: _independent_mean_loss("softmax_cross_entropy", logits_fn(p), y)
        )(params)
        return out, grads

    out, grads = step(params, y, jax.random.key(1))
    chex.assert_trees_all_close(out.grads, grads, **EXACT)
    assert isinstance(out.stats["Dense_0"], tekfax.LayerStats)  # meta survives the jit boundary.
    assert out.stats["Dense_0"].meta.d_in == 3 and out.stats["Dense_1"].meta.d_out == 2
    out2, _ = step(params, y, jax.random.key(2))
    assert len(traces) == 1  # A new key does not retrace.
    chex.assert_trees_all_close(out2.grads, out.grads, **EXACT)
    assert not np.allclose(out2.stats["Dense_1"].out_grads, out.stats["Dense_1"].out_grads)


def test_bfloat16_params_give_float32_stats():
    with jax.enable_x64(False):
        model = MLP(features=(4, 3))
        logits_fn, params, x, y = _setup(model, (4, 3), dtype=jnp.bfloat16)
        assert x.dtype == params["Dense_0"]["kernel"].dtype == jnp.bfloat16

        @jax.jit
        def run(params):
            out = tekfax.loss_and_curvature(logits_fn, params, y, fisher="empirical")
            # Reference: the same bf16-representable values, in float32.
            p32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
            x32 = x.astype(jnp.float32)
            ref = tekfax.loss_and_curvature(
                lambda p: model.apply({"params": p}, x32), p32, y, fisher="empirical"
            )
            return out, ref, x32

        out, ref, x32 = run(params)
        chex.assert_trees_all_equal_dtypes(out.grads, params)
        for name, stats in _layers(out.stats).items():
            assert stats.inputs.dtype == jnp.float32, name
            assert stats.out_grads.dtype == jnp.float32, name
        np.testing.assert_array_equal(out.stats["Dense_0"].inputs, np.asarray(x32))
        # The float32 run gives the same statistics, up to bfloat16 rounding inside the
        # forward and backward passes (8-bit mantissa, relative error ~4e-3 per operation).
        for name, stats in _layers(out.stats).items():
            expected = _layers(ref.stats)[name].out_grads
            np.testing.assert_allclose(
                stats.out_grads, expected, atol=3e-2 * float(np.abs(expected).max()), err_msg=name
            )


def test_sampled_labels_follow_the_softmax():
    """Inverse transform sampling: label frequencies within 5 standard errors of softmax(f),
    a class of probability 0 never drawn, and the shape of a sequence model's outputs."""
    logits = jnp.array([[0.0, 1.0, -jnp.inf, 2.0], [3.0, -1.0, 0.5, -jnp.inf]])
    logits = jnp.broadcast_to(logits, (3, 2, 4))  # (N, T, C)
    draws = 20000
    keys = jax.random.split(jax.random.key(0), draws)
    labels = np.asarray(
        jax.vmap(lambda k: sample_targets("softmax_cross_entropy", k, logits))(keys)
    )
    assert labels.shape == (draws, 3, 2) and labels.dtype == np.int32
    p = np.asarray(jax.nn.softmax(logits[0], axis=-1), np.float64)  # (T, C)
    for t in range(2):
        freq = np.stack([np.bincount(labels[:, n, t], minlength=4) for n in range(3)]) / draws
        se = np.sqrt(p[t] * (1 - p[t]) / draws)
        np.testing.assert_array_less(
            np.abs(freq - p[t]), np.broadcast_to(5 * se + 1e-12, freq.shape)
        )
        assert np.all(freq[:, p[t] == 0] == 0)


# --- convolutions inside the statistics conditional ------------------------------------------


def _computations(hlo: str) -> dict[str, str]:
    """name -> body of every computation in an HLO module's text."""
    bodies = re.findall(r"^(?:ENTRY )?%?([\w.\-]+) .*?\{\n(.*?)^\}", hlo, re.M | re.S)
    return dict(bodies)


def _branch_convolutions(hlo: str) -> list[str]:
    """The convolution instructions reachable from any conditional's branches."""
    bodies = _computations(hlo)
    todo = [
        name
        for group in re.findall(r"branch_computations=\{([^}]*)\}", hlo)
        for name in re.findall(r"%?([\w.\-]+)", group)
    ]
    todo += re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", hlo)
    seen, convs = set(), []
    while todo:
        name = todo.pop()
        if name in seen or name not in bodies:
            continue
        seen.add(name)
        convs += [line for line in bodies[name].splitlines() if " convolution(" in line]
        todo += re.findall(r"(?:calls|to_apply|computations?)=%?([\w.\-]+)", bodies[name])
    return convs


@pytest.mark.parametrize(
    ("model", "x_shape"),
    [
        (ConvNet(kernel_size=(3,), strides=2, channels=(4, 3)), (2, 9, 2)),
        (ConvNet(kernel_size=(3, 3), strides=(2, 1), channels=(4, 3)), (2, 7, 5, 2)),
    ],
    ids=["conv1d", "conv2d"],
)
def test_statistics_pass_reads_conv_kernels_in_xla_cpus_layout(model, x_shape):
    # Inside a lax.cond branch XLA:CPU does not transpose a kernel read as (..., out, in), as
    # JAX's input gradient reads it, and runs that convolution 10-20x slower; tagged
    # convolutions store the kernel swapped so that the sampled pass reads (..., in, out).
    with jax.enable_x64(False):
        logits_fn, params, _, y = _setup(model, x_shape, num_classes=4, dtype=jnp.float32)

        def stats(params, flag, rng):
            out = tekfax.loss_and_curvature(logits_fn, params, y, rng=rng, compute_stats=flag)
            return [s.out_grads for _, s in tekfax.capture.iter_layer_stats(out.stats)]

        args = (params, jnp.array(True), jax.random.key(0))
        hlo = jax.jit(stats).lower(*args).compile().as_text()
    convs = _branch_convolutions(hlo)
    assert len(convs) >= 1  # the second convolution's input gradient, at least
    kernels = [re.search(r"dim_labels=\w+_(\w+)->", line).group(1) for line in convs]
    assert all(k.endswith("io") for k in kernels), kernels


def test_transposable_switches_only_jaxs_own_convolution():
    kernel = {"params": {"kernel": jnp.ones((3, 1, 2)), "bias": jnp.zeros(2)}}
    own = nn.Conv(2, (3,)).bind(kernel)
    custom = nn.Conv(2, (3,), conv_general_dilated=jax.lax.conv_general_dilated).bind(kernel)
    linear = nn.Dense(2).bind({"params": {"kernel": jnp.ones((1, 2)), "bias": jnp.zeros(2)}})
    nnx_conv = nnx.Conv(1, 2, (3,), rngs=nnx.Rngs(0))
    for module, switched in [(own, True), (custom, False), (linear, False), (nnx_conv, True)]:
        before = getattr(module, "conv_general_dilated", None)
        with tekfax.modules.transposable(module):
            now = getattr(module, "conv_general_dilated", None)
            assert (now is tekfax.modules.transposable_conv) == switched
        assert getattr(module, "conv_general_dilated", None) is before


@pytest.mark.parametrize("dims", [("NWC", "WIO", "NWC"), ("NCHW", "OIHW", "NCHW")])
def test_transposable_conv_is_the_same_convolution(dims):
    rng = np.random.default_rng(0)
    lhs_shape, rhs_shape = {1: ((2, 9, 3), (3, 3, 4)), 2: ((2, 3, 7, 6), (4, 3, 3, 2))}[
        len(dims[0]) - 2
    ]
    x, w = rng.standard_normal(lhs_shape), rng.standard_normal(rhs_shape)
    kwargs = {"dimension_numbers": dims, "rhs_dilation": (2,) * (len(dims[0]) - 2)}
    strides, padding = (2,) * (len(dims[0]) - 2), [(1, 2)] * (len(dims[0]) - 2)

    def both(conv):
        fn = lambda x, w: conv(x, w, strides, padding, **kwargs)  # noqa: E731
        y, vjp = jax.vjp(fn, x, w)
        return y, vjp(jnp.ones_like(y))

    reference = both(jax.lax.conv_general_dilated)
    chex.assert_trees_all_close(both(tekfax.modules.transposable_conv), reference, **EXACT)
