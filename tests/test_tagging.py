"""Tests for tekfax.tagging: the layer interceptor, its metadata and its error paths.

The im2col check is the core one: for every Dense / Conv configuration the input matrix built
from the captured inputs and metadata, times the layer's kernel matrix, must reproduce the
layer's own output exactly (float64). That pins down the patch ordering, the padding and the
bias row of the kernel layout.
"""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tekfax
from tekfax.patches import grad_matrix, input_matrix, output_matrix

pytestmark = pytest.mark.usefixtures("x64")

FEATURES = 2


def _random(shape, seed=1, scale=1.0):
    """float64 normal draws from NumPy: no JAX random kernels to compile."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape))


def _abstract_init(model, x):
    return jax.eval_shape(model.init, jax.random.key(0), x)


def _init(model, x, seed=0):
    """float64 variables shaped like ``model.init``'s, with random values (variances > 0)."""
    abstract = _abstract_init(model, x)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    values = []
    for i, (path, leaf) in enumerate(leaves):
        value = 0.5 * np.random.default_rng(100 * seed + i).standard_normal(leaf.shape)
        if getattr(path[-1], "key", None) == "var":
            value = 1.0 + np.abs(value)
        values.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, values)


def _layer_paths(params):
    """Paths ("A/B") of every dict holding a "kernel" leaf, i.e. every Dense / Conv."""
    found = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if "kernel" in node and not isinstance(node["kernel"], dict):
            found.append("/".join(path))
            return
        for key, value in node.items():
            walk(value, path + (key,))

    walk(params, ())
    return sorted(found)


def _stats_paths(stats):
    found = []

    def walk(node, path):
        if isinstance(node, tekfax.LayerStats):
            found.append("/".join(path))
            return
        assert isinstance(node, dict), type(node)
        for key, value in node.items():
            walk(value, path + (key,))

    walk(stats, ())
    return sorted(found)


def _get(tree, path):
    for key in path.split("/") if path else ():
        tree = tree[key]
    return tree


def _expected_padding(padding, spatial, kernel, strides, dilation):
    """Explicit (lo, hi) pads, computed independently of tekfax and lax.padtype_to_pads."""
    rank = len(kernel)
    if isinstance(padding, int):
        return tuple((padding, padding) for _ in range(rank))
    if padding == "VALID":
        return ((0, 0),) * rank
    if padding == "CAUSAL":
        return ((dilation[0] * (kernel[0] - 1), 0),)
    if padding in ("SAME", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(spatial, kernel, strides, dilation, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if padding == "SAME" else (large, small))
        return tuple(pads)
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _per_axis(value, rank):
    return (value,) * rank if isinstance(value, int) else tuple(value)


# (kernel_size, strides, padding, dilation, use_bias, input shape). Inputs are channels-last;
# one 1-D case carries an extra batch axis, which Flax flattens into the batch.
CONV_CONFIGS = [
    pytest.param((3,), 1, "SAME", 1, True, (2, 7, 3), id="1d-same"),
    pytest.param((3,), 2, "VALID", 1, True, (2, 8, 2), id="1d-valid-s2"),
    pytest.param((4,), 3, "SAME", 1, True, (2, 10, 2), id="1d-same-even-kernel-s3"),
    pytest.param((4,), 2, "SAME_LOWER", 1, True, (2, 7, 2), id="1d-same-lower-s2"),
    pytest.param((3,), 1, "CAUSAL", 2, True, (2, 7, 2), id="1d-causal-dil2"),
    pytest.param((2,), 2, "CAUSAL", 1, False, (2, 7, 2), id="1d-causal-s2-nobias"),
    pytest.param((3,), 2, 2, 1, True, (2, 7, 2), id="1d-int-pad"),
    pytest.param((3,), 1, [(2, 1)], 2, True, (2, 8, 2), id="1d-explicit-dil2"),
    pytest.param((3,), 2, "SAME", 1, True, (2, 3, 6, 2), id="1d-extra-batch-axis"),
    pytest.param((3, 3), 1, "SAME", 1, True, (2, 5, 6, 2), id="2d-same"),
    pytest.param((3, 3), 2, "SAME", 1, True, (2, 6, 5, 2), id="2d-same-s2"),
    pytest.param((2, 3), (1, 2), "VALID", 1, True, (2, 5, 7, 2), id="2d-valid-mixed-strides"),
    pytest.param(
        (3, 2), (2, 1), [(1, 0), (2, 1)], (1, 2), True, (2, 6, 5, 2), id="2d-explicit-mixed"
    ),
    pytest.param((3, 3), 1, "SAME", 2, False, (2, 6, 6, 2), id="2d-same-dil2-nobias"),
    pytest.param((3, 3), 1, (1, 2), 1, True, (2, 4, 5, 1), id="2d-per-axis-int-pad"),
    pytest.param((2, 2), 2, 1, 1, True, (2, 5, 5, 2), id="2d-int-pad-s2"),
    pytest.param((2, 2, 2), 1, "SAME", 1, True, (2, 4, 3, 4, 2), id="3d-same"),
    pytest.param(
        (3, 2, 2), (2, 1, 2), "VALID", (1, 2, 1), True, (2, 5, 5, 4, 1), id="3d-valid-mixed"
    ),
    pytest.param(
        (2, 3, 2),
        (1, 2, 1),
        [(1, 0), (1, 1), (0, 2)],
        1,
        False,
        (2, 3, 4, 3, 2),
        id="3d-explicit-nobias",
    ),
]

DENSE_CONFIGS = [
    pytest.param(shape, bias, id=f"dense-{len(shape) - 1}axes-{'bias' if bias else 'nobias'}")
    for shape in [(3, 4), (3, 5, 4), (3, 2, 3, 4)]
    for bias in (True, False)
]


def _conv(kernel_size, strides, padding, dilation, use_bias):
    return nn.Conv(
        FEATURES,
        kernel_size,
        strides=strides,
        padding=padding,
        kernel_dilation=dilation,
        use_bias=use_bias,
    )


def _run_root_layer(layer, params, x, targets):
    """Captures a root layer with a squared-error loss; a, u, W and the reference values."""
    out = tekfax.loss_and_curvature(
        lambda p: layer.apply({"params": p}, x),
        params,
        targets,
        loss="squared_error",
        fisher="empirical",
    )
    a = input_matrix(out.stats.inputs, out.stats.meta)
    u = output_matrix(out.stats.out_grads)
    w = grad_matrix(params, jnp.float64)
    batch_grad = jnp.einsum("nti,snto->io", a, u) / x.shape[0]
    expected_grad = grad_matrix(out.grads, jnp.float64)
    outputs = layer.apply({"params": params}, x)
    return out, a, u, w, batch_grad, expected_grad, a @ w, outputs


# Every root-layer configuration: id -> (layer, input shape, use_bias).
ROOT_LAYERS = {
    **{p.id: (_conv(*p.values[:5]), p.values[5], p.values[4]) for p in CONV_CONFIGS},
    **{
        p.id: (nn.Dense(FEATURES, use_bias=p.values[1]), p.values[0], p.values[1])
        for p in DENSE_CONFIGS
    },
}


@functools.cache
def _root_layer_results() -> dict:
    """id -> (input, targets, :func:`_run_root_layer`) for every configuration of
    :data:`ROOT_LAYERS`, all run in one jit (float64: call under the x64 fixture).

    The configurations are independent tiny programs; compiling them together pays XLA's
    fixed per-program cost once instead of 25 times. Each test checks its own entry.
    """
    inputs = {}
    for key, (layer, x_shape, _) in ROOT_LAYERS.items():
        x = _random(x_shape)
        params = _init(layer, x)["params"]
        targets = _random(jax.eval_shape(layer.apply, {"params": params}, x).shape, seed=2)
        inputs[key] = (params, x, targets)

    @jax.jit
    def run(inputs):
        return {key: _run_root_layer(ROOT_LAYERS[key][0], *args) for key, args in inputs.items()}

    results = run(inputs)
    return {key: (x, targets, results[key]) for key, (_, x, targets) in inputs.items()}


def _check_root_layer(key):
    """Checks a root layer's captured a, u and its output, with a squared-error loss."""
    use_bias = ROOT_LAYERS[key][2]
    x, targets, results = _root_layer_results()[key]
    out, *arrays = results
    # NumPy from here: eager jax ops on these arrays would compile one program per shape.
    a, u, w, batch_grad, expected_grad, reconstructed, outputs = (np.asarray(v) for v in arrays)
    x, targets = np.asarray(x), np.asarray(targets)
    stats = out.stats
    assert isinstance(stats, tekfax.LayerStats)  # A root layer's stats are not nested.
    assert stats.meta.name == ""
    assert stats.has_bias == use_bias
    np.testing.assert_array_equal(stats.inputs, x)

    n = x.shape[0]
    assert a.shape[-1] == w.shape[0] == stats.meta.d_in
    assert w.shape[1] == stats.meta.d_out == FEATURES
    np.testing.assert_allclose(
        reconstructed, np.reshape(outputs, (n, -1, FEATURES)), rtol=1e-12, atol=1e-12
    )
    if use_bias:
        np.testing.assert_array_equal(a[..., 0], 1.0)

    # For 0.5 |s - y|^2 the output gradient of l_n is s - y.
    np.testing.assert_allclose(
        u[0], np.reshape(outputs - targets, (n, -1, FEATURES)), rtol=1e-12, atol=1e-12
    )
    # The kernel-layout batch gradient reassembles from a and u.
    np.testing.assert_allclose(batch_grad, expected_grad, atol=1e-12)


@pytest.mark.parametrize("key", [p.id for p in CONV_CONFIGS])
def test_conv_patches_reproduce_output(key):
    _check_root_layer(key)


@pytest.mark.parametrize("key", [p.id for p in DENSE_CONFIGS])
def test_dense_inputs_reproduce_output(key):
    _check_root_layer(key)


@pytest.mark.parametrize("kernel_size, strides, padding, dilation, use_bias, x_shape", CONV_CONFIGS)
def test_conv_meta_from_discovery(kernel_size, strides, padding, dilation, use_bias, x_shape):
    layer = _conv(kernel_size, strides, padding, dilation, use_bias)
    x = _random(x_shape)
    variables = _abstract_init(layer, x)
    with tekfax.tag_layers() as found:
        outputs = jax.eval_shape(lambda v: layer.apply(v, x), variables)
    assert list(found) == [""]
    meta = found[""].meta
    rank = len(kernel_size)
    strides_t = _per_axis(strides, rank)
    dilation_t = _per_axis(dilation, rank)
    c_in = x_shape[-1]
    assert meta.kind == "conv" and meta.is_conv
    assert meta.kernel_size == tuple(kernel_size)
    assert meta.strides == strides_t
    assert meta.dilation == dilation_t
    assert meta.padding == _expected_padding(
        padding, x_shape[-rank - 1 : -1], kernel_size, strides_t, dilation_t
    )
    assert meta.has_bias == use_bias
    assert meta.in_features == c_in and meta.out_features == FEATURES
    assert meta.d_in == c_in * math.prod(kernel_size) + int(use_bias)
    assert meta.d_out == FEATURES
    assert found[""].inputs.shape == x.shape
    assert found[""].outputs.shape == outputs.shape


class _Net(nn.Module):
    """Two convolutions and two Dense layers with different settings, for discovery."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), strides=2, padding="SAME")(x)
        x = nn.Conv(2, (2, 3), padding="VALID", kernel_dilation=(2, 1), use_bias=False)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(5)(x)
        return nn.Dense(3, use_bias=False)(x)


def test_tag_layers_discovers_every_layer_with_meta():
    model = _Net()
    x = _random((2, 7, 6, 2))
    variables = _abstract_init(model, x)
    with tekfax.tag_layers() as found:
        jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert sorted(found) == _layer_paths(variables["params"])
    conv0, conv1 = found["Conv_0"].meta, found["Conv_1"].meta
    dense0, dense1 = found["Dense_0"].meta, found["Dense_1"].meta

    assert (conv0.kind, conv0.kernel_size, conv0.strides, conv0.dilation) == (
        "conv",
        (3, 3),
        (2, 2),
        (1, 1),
    )
    assert conv0.padding == _expected_padding("SAME", (7, 6), (3, 3), (2, 2), (1, 1))
    assert conv0.has_bias and conv0.d_in == 2 * 9 + 1 and conv0.d_out == 3
    assert conv0.name == "Conv_0"

    assert (conv1.kind, conv1.kernel_size, conv1.strides, conv1.dilation) == (
        "conv",
        (2, 3),
        (1, 1),
        (2, 1),
    )
    assert conv1.padding == ((0, 0), (0, 0))
    assert not conv1.has_bias and conv1.d_in == 3 * 6 and conv1.d_out == 2

    spatial = found["Conv_1"].outputs.shape[1:3]  # (4 - 2, 3 - 2): VALID with dilation 2.
    assert spatial == (2, 1)
    for meta in (dense0, dense1):
        assert meta.kind == "dense" and not meta.is_conv
        assert meta.kernel_size == meta.strides == meta.padding == meta.dilation == ()
    assert dense0.has_bias and dense0.d_in == 2 * 2 * 1 + 1 and dense0.d_out == 5
    assert not dense1.has_bias and dense1.d_in == 5 and dense1.d_out == 3


def test_discovery_is_not_active_outside_the_context():
    model = _Net()
    x = _random((2, 7, 6, 2))
    variables = _abstract_init(model, x)
    with tekfax.tag_layers() as found:
        pass
    jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert found == {}


# --- Models exercising module structure -------------------------------------------------------


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(3, (3,), padding="SAME")(x))
        return jnp.tanh(nn.Dense(4)(x))


class _Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = _Block()(x)
        x = _Block()(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.remat(nn.Conv)(3, (2, 2), padding="SAME")(x))
        x = x.reshape(x.shape[0], -1)
        x = jnp.tanh(nn.remat(nn.Dense)(4)(x))
        return nn.remat(_Block)()(x[:, :, None]).reshape(x.shape[0], -1)


class _ScaledDense(nn.Dense):
    """A Dense subclass whose __call__ goes through super().__call__."""

    @nn.compact
    def __call__(self, inputs):
        return 2.0 * super().__call__(inputs)


class _UsesSubclass(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _ScaledDense(3)(jnp.tanh(_ScaledDense(4)(x)))


class _WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(3, (3, 3), padding="SAME")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        x = jnp.tanh(x).reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


def _reassembled(out):
    """Per layer: (batch gradient from a and u, out.grads) in kernel layout; call under jit."""
    result = {}
    for path in _stats_paths(out.stats):
        stats = _get(out.stats, path)
        a = input_matrix(stats.inputs, stats.meta)
        u = output_matrix(stats.out_grads)
        batch_grad = jnp.einsum("nti,snto->io", a, u) / a.shape[0]
        result[path] = (batch_grad, grad_matrix(_get(out.grads, path), jnp.float64))
    return result


def _check_reassembled(reassembled):
    """For the empirical Fisher, every layer's a and u reassemble its batch gradient."""
    for path, (batch_grad, expected) in reassembled.items():
        np.testing.assert_allclose(batch_grad, expected, rtol=1e-10, atol=1e-12, err_msg=path)


def _capture(model, x, seed=0):
    """Empirical-Fisher capture under jit; checks grads against jax.grad and a, u against them."""
    variables = _init(model, x)
    params = variables["params"]
    y = jnp.asarray(np.random.default_rng(seed + 5).integers(0, 3, x.shape[0]))

    def logits_fn(p):
        return model.apply({"params": p}, x)

    @jax.jit
    def run(params):
        out = tekfax.loss_and_curvature(logits_fn, params, y, fisher="empirical")
        expected_grads = jax.grad(
            lambda p: -jnp.take_along_axis(jax.nn.log_softmax(logits_fn(p)), y[:, None], 1).mean()
        )(params)
        return out, expected_grads, _reassembled(out)

    out, expected_grads, reassembled = run(params)
    chex.assert_trees_all_close(out.grads, expected_grads, rtol=1e-10, atol=1e-12)
    _check_reassembled(reassembled)
    return params, out


def test_nested_modules_stats_mirror_params():
    params, out = _capture(_Nested(), _random((2, 5, 2)))
    assert _stats_paths(out.stats) == _layer_paths(params)
    assert isinstance(out.stats["_Block_0"]["Dense_0"], tekfax.LayerStats)
    assert out.stats["_Block_1"]["Conv_0"].meta.name == "_Block_1/Conv_0"
    assert out.stats["_Block_1"]["Conv_0"].kind == "conv"
    assert out.stats["Dense_0"].kind == "dense"


def test_remat_wrapped_modules_are_tagged():
    params, out = _capture(_Remat(), _random((2, 3, 4, 2)))
    paths = _stats_paths(out.stats)
    assert paths == _layer_paths(params)
    assert "CheckpointConv_0" in paths and "CheckpointDense_0" in paths
    assert "Checkpoint_Block_0/Conv_0" in paths


def test_dense_subclass_calling_super_is_tagged_once():
    params, out = _capture(_UsesSubclass(), _random((3, 4)))
    assert _stats_paths(out.stats) == _layer_paths(params) == ["_ScaledDense_0", "_ScaledDense_1"]
    assert out.stats["_ScaledDense_0"].out_grads.shape == (1, 3, 3)
    assert out.stats["_ScaledDense_1"].out_grads.shape == (1, 3, 4)


def test_batchnorm_model_with_mutable_aux():
    model = _WithBatchNorm()
    x = _random((4, 4, 3, 2))
    y = jnp.asarray(np.random.default_rng(3).integers(0, 3, 4))
    variables = _init(model, x)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def logits_fn(p):
        return model.apply(
            {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )

    @jax.jit
    def run(params):
        out = tekfax.loss_and_curvature(logits_fn, params, y, fisher="empirical", has_aux=True)
        return out, logits_fn(params), _reassembled(out)

    out, (logits, updates), reassembled = run(params)
    chex.assert_trees_all_close(out.aux, updates, rtol=1e-12)
    # The running statistics moved away from their initial values.
    assert not np.allclose(out.aux["batch_stats"]["BatchNorm_0"]["mean"], 0.0)
    assert _stats_paths(out.stats) == ["Conv_0", "Dense_0"]
    assert _layer_paths(params) == ["Conv_0", "Dense_0"]  # BatchNorm has no kernel.
    z = np.asarray(logits) - np.asarray(logits).max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    expected_loss = -np.take_along_axis(log_p, np.asarray(y)[:, None], 1).mean()
    np.testing.assert_allclose(out.loss, expected_loss, rtol=1e-12)
    _check_reassembled(reassembled)


def test_bare_dense_as_root_model():
    model = nn.Dense(3)
    params, out = _capture(model, _random((4, 5)))
    assert isinstance(out.stats, tekfax.LayerStats)
    assert out.stats.meta.name == "" and out.stats.meta.d_in == 6


# --- Error paths --------------------------------------------------------------------------------


class _Shared(nn.Module):
    def setup(self):
        self.shared = nn.Dense(4)
        self.head = nn.Dense(3)

    def __call__(self, x):
        return self.head(self.shared(jnp.tanh(self.shared(x))))


class _SharedCompact(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.Conv(2, (3,), padding="SAME")
        x = layer(jnp.tanh(layer(x)))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _ConvHead(nn.Module):
    conv_kwargs: dict

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(2)(x)
        x = nn.Conv(2, (3, 3), name="bad_conv", **self.conv_kwargs)(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _NoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(), (x.shape[-1], 3))
        return x @ w


def _capture_raises(model, x, match, exc=ValueError):
    variables = _init(model, x)
    y = jnp.zeros((x.shape[0],), jnp.int32)
    with pytest.raises(exc, match=match):
        tekfax.loss_and_curvature(
            lambda p: model.apply({"params": p}, x),
            variables["params"],
            y,
            rng=jax.random.key(0),
        )


def test_shared_module_called_twice_raises():
    _capture_raises(_Shared(), _random((2, 4)), r"'shared'.*more than once")


def test_shared_compact_conv_called_twice_raises():
    _capture_raises(_SharedCompact(), _random((2, 5, 2)), r"'Conv_0'.*more than once")


@pytest.mark.parametrize(
    "conv_kwargs, match",
    [
        pytest.param({"feature_group_count": 2}, r"'bad_conv'.*feature_group_count=2", id="groups"),
        pytest.param(
            {"input_dilation": 2, "padding": 1}, r"'bad_conv'.*input_dilation", id="input-dilation"
        ),
        pytest.param({"padding": "CIRCULAR"}, r"'bad_conv'.*CIRCULAR", id="circular"),
        pytest.param({"padding": "REFLECT"}, r"'bad_conv'.*REFLECT", id="reflect"),
    ],
)
def test_unsupported_conv_raises_naming_layer(conv_kwargs, match):
    _capture_raises(_ConvHead(conv_kwargs), _random((2, 5, 5, 2)), match)


def test_unsupported_conv_raises_under_tag_layers():
    model = _ConvHead({"feature_group_count": 2})
    x = _random((2, 5, 5, 2))
    variables = _init(model, x)
    with pytest.raises(ValueError, match=r"'bad_conv'.*feature_group_count"):
        with tekfax.tag_layers():
            jax.eval_shape(lambda v: model.apply(v, x), variables)


def test_logits_fn_without_layers_raises():
    _capture_raises(_NoLayers(), _random((2, 4)), "called no supported layer")
