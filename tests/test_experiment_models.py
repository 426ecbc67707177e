"""tekfax.experiments.models: architecture sizes, tagging, shapes and one optimizer step."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tekfax
from tekfax.experiments import models
from tests.conftest import jit

DIGITS = (8, 8, 1)
CIFAR = (32, 32, 3)
SHAPES = {
    "mlp": DIGITS,
    "autoencoder": DIGITS,
    "cnn": DIGITS,
    "gapcnn": DIGITS,
    "resnet20": CIFAR,
    "vgg16": CIFAR,
}
VGG16_CONVS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def dense(d_in, d_out):
    return d_in * d_out + d_out


def conv(c_in, c_out, k=3, bias=True):
    return k * k * c_in * c_out + (c_out if bias else 0)


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def abstract_variables(name, num_classes=10, shape=None):
    shape = shape or SHAPES[name]
    model = models.create_model(name, num_classes, shape)
    return model, jax.eval_shape(lambda: models.init_variables(model, shape, jax.random.key(0)))


def resnet20_params(num_classes, blocks_per_stage=3):
    """Stem; 3n basic blocks of 2 convs + 2 BN; 1x1 conv + BN projections where widths change."""
    total = conv(3, 16, bias=False) + 2 * 16
    c_in = 16
    for c_out in (16, 32, 64):
        for _ in range(blocks_per_stage):
            total += conv(c_in, c_out, bias=False) + conv(c_out, c_out, bias=False) + 4 * c_out
            if c_in != c_out:
                total += conv(c_in, c_out, k=1, bias=False) + 2 * c_out
            c_in = c_out
    return total + dense(64, num_classes)


def test_parameter_counts_match_the_architectures():
    expected = {
        "mlp": dense(64, 128) + dense(128, 64) + dense(64, 10),
        # The documented digits widths (82, 41, 20, 8): 784-1000-500-250-30 scaled by 64/784.
        "autoencoder": sum(
            dense(a, b)
            for a, b in zip(
                (64, 82, 41, 20, 8, 20, 41, 82), (82, 41, 20, 8, 20, 41, 82, 64), strict=True
            )
        ),
        # conv16 3x3, conv32 3x3 stride 2 (8x8 -> 4x4x32 = 512), dense 64, dense 10.
        "cnn": conv(1, 16) + conv(16, 32) + dense(4 * 4 * 32, 64) + dense(64, 10),
        # conv16, conv32/s2, conv64/s2, global average pooling (64 features), dense 10.
        "gapcnn": conv(1, 16) + conv(16, 32) + conv(32, 64) + dense(64, 10),
        "resnet20": resnet20_params(10),
        "vgg16": sum(
            conv(a, b, bias=False) + 2 * b
            for a, b in zip((3, *VGG16_CONVS[:-1]), VGG16_CONVS, strict=True)
        )
        + dense(512, 10),
    }
    for name, want in expected.items():
        _, variables = abstract_variables(name)
        assert count(variables["params"]) == want, name
    _, resnet = abstract_variables("resnet20")
    assert 0.26e6 < count(resnet["params"]) < 0.28e6  # He et al.: 0.27M.
    resnet8 = models.ResNet20(num_classes=10, blocks_per_stage=1)  # test_one_tekfac_step's
    variables = jax.eval_shape(lambda: models.init_variables(resnet8, CIFAR, jax.random.key(0)))
    assert count(variables["params"]) == resnet20_params(10, blocks_per_stage=1)
    assert count(resnet["batch_stats"]) == 2 * (16 + 6 * 16 + 7 * 32 + 7 * 64)
    _, vgg = abstract_variables("vgg16", num_classes=100)
    assert 14.7e6 < count(vgg["params"]) < 14.8e6
    assert count(vgg["batch_stats"]) == 2 * sum(VGG16_CONVS)


def test_autoencoder_is_the_papers_on_mnist_and_scales_down():
    assert models.autoencoder_sizes(784) == (1000, 500, 250, 30)
    assert models.autoencoder_sizes(64) == (82, 41, 20, 8)
    model, variables = abstract_variables("autoencoder", shape=(28, 28, 1))
    widths = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
    assert count(variables["params"]) == sum(map(dense, widths[:-1], widths[1:]))
    assert model.input_dim == 784


def kernel_paths(params, prefix=()):
    found = set()
    for key, value in params.items():
        if isinstance(value, dict):
            if "kernel" in value:
                found.add("/".join((*prefix, key)))
            found |= kernel_paths(value, (*prefix, key))
    return found


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_weight_layer_is_tagged_and_shapes(name):
    model, variables = abstract_variables(name, num_classes=7)
    x = jax.ShapeDtypeStruct((3, *SHAPES[name]), jnp.float32)
    with tekfax.tag_layers() as layers:
        logits, updates = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
        )
    assert set(layers) == kernel_paths(variables["params"])
    assert (
        len(layers)
        == {"mlp": 3, "autoencoder": 8, "cnn": 4, "gapcnn": 4, "resnet20": 22, "vgg16": 14}[name]
    )
    out = math.prod(SHAPES[name]) if name == "autoencoder" else 7
    assert logits.shape == (3, out)
    assert jax.tree.structure(updates) == jax.tree.structure(
        {k: v for k, v in variables.items() if k == "batch_stats"}
    )
    test_logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert test_logits.shape == (3, out)


def test_registry_and_losses():
    assert list(models.MODELS) == ["mlp", "autoencoder", "cnn", "gapcnn", "resnet20", "vgg16"]
    with pytest.raises(ValueError, match="mlp, autoencoder, cnn, gapcnn, resnet20, vgg16"):
        models.create_model("resnet50", 10, CIFAR)
    with pytest.raises(ValueError, match="choose one of"):
        models.model_loss("resnet50")
    assert models.model_loss("autoencoder") == "sigmoid_binary_cross_entropy"
    for name in ("mlp", "cnn", "gapcnn", "resnet20", "vgg16"):
        assert models.model_loss(name) == "softmax_cross_entropy"
    assert isinstance(models.create_model("resnet20", 100, CIFAR), models.ResNet20)
    assert models.create_model("resnet20", 100, CIFAR).blocks_per_stage == 3
    assert models.create_model("vgg16", 100, CIFAR).num_classes == 100


def random_variables(model, shape, seed=0):
    """Random variables of init's structure, without compiling init (BatchNorm var = 1)."""
    abstract = jax.eval_shape(lambda: models.init_variables(model, shape, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), abstract["params"]
    )
    stats = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.full(s.shape, float(path[-1].key == "var"), s.dtype),
        abstract.get("batch_stats", {}),
    )
    return {"params": params, **({"batch_stats": stats} if stats else {})}


def test_init_variables_are_real_arrays():
    for name in ("mlp", "cnn"):
        model = models.create_model(name, 10, DIGITS)
        variables = models.init_variables(model, DIGITS, jax.random.key(0))
        abstract = jax.eval_shape(
            lambda m=model: models.init_variables(m, DIGITS, jax.random.key(0))
        )
        assert set(variables) == {"params"}
        chex.assert_trees_all_equal_shapes(variables, abstract)
        chex.assert_tree_all_finite(variables)
        assert all(np.std(layer["kernel"]) > 0 for layer in variables["params"].values())


def make_step(model, loss, opt):
    @jit  # XLA backend optimisation off (tests/conftest.py): the big models compile faster
    def step(variables, opt_state, x, targets, rng):
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}

        def logits_fn(p):
            return model.apply({"params": p, **rest}, x, train=True, mutable=list(rest))

        out = tekfax.loss_and_curvature(
            logits_fn, params, targets, loss=loss, fisher="sampled", rng=rng, has_aux=True
        )
        updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        new = {"params": optax.apply_updates(params, updates), **out.aux}
        # BatchNorm models: evaluation with the new params, under the old and new statistics.
        evals = [
            model.apply({**v, "params": new["params"]}, x, train=False)
            for v in ((variables, new) if rest else ())
        ]
        return new, opt_state, out.loss, out.stats, evals

    return step


def batch(name, shape, num_classes, n=2):
    x = jax.random.uniform(jax.random.key(2), (n, *shape), minval=-1.0, maxval=2.0)
    if models.model_loss(name) == "sigmoid_binary_cross_entropy":
        x = (x + 1.0) / 3.0
        return x, x.reshape(n, -1)
    return x, jnp.arange(n) % num_classes


def stats_paths(stats):
    leaves = jax.tree_util.tree_flatten_with_path(
        stats, is_leaf=lambda s: isinstance(s, tekfax.LayerStats)
    )[0]
    return {"/".join(k.key for k in path) for path, _ in leaves}


def changed_layer(changed, path):
    for key in path.split("/"):
        changed = changed[key]
    return changed["kernel"]


# Compiling a step costs about a second per weight layer, so the step test runs shallower
# instances of the deep models' classes, with every layer kind of the full ones; the full-size
# CIFAR steps are checked shape-wise (test_full_step_traces). ResNet-8 (one basic block a
# stage) still has an identity-shortcut block and two projection-shortcut blocks; the VGG
# config has conv-BN-ReLU layers back to back and after a max pool, two pools, and the Dense
# head; the auto-encoder 64-20-8-20-64 has tanh layers, the linear code and the logits layer.
STEP_MODELS = {
    "autoencoder": models.Autoencoder(input_dim=64, sizes=(20, 8)),
    "resnet20": models.ResNet20(num_classes=10, blocks_per_stage=1),
    "vgg16": models.VGG16(num_classes=10, config=(8, 8, "M", 8, "M")),
}


@pytest.mark.parametrize("name", list(models.MODELS))
def test_one_tekfac_step(name):
    """One TEKFAC step of each model (shallower versions of the deep ones, see STEP_MODELS)."""
    shape = (8, 8, 3) if SHAPES[name] == CIFAR else DIGITS  # Small images compile faster.
    model = STEP_MODELS.get(name) or models.create_model(name, 10, shape)
    variables = random_variables(model, shape)
    opt = tekfax.tekfac(learning_rate=0.1, damping=1e-2)
    opt_state = jit(opt.init)(variables["params"])  # one program: op by op costs more here
    x, targets = batch(name, shape, 10)
    step = make_step(model, models.model_loss(name), opt)
    new, _, loss, stats, evals = step(variables, opt_state, x, targets, jax.random.key(3))
    assert np.isfinite(loss) and loss > 0
    chex.assert_tree_all_finite((new, evals))
    assert stats_paths(stats) == kernel_paths(variables["params"])
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), variables, new)
    assert all(changed_layer(changed["params"], path) for path in kernel_paths(variables["params"]))
    if "batch_stats" not in variables:
        assert set(new) == {"params"}
        return
    assert all(jax.tree.leaves(changed["batch_stats"]))
    # Evaluation reads the running statistics.
    eval_old, eval_new = evals
    assert eval_old.shape == (2, 10)
    assert not np.allclose(eval_old, eval_new)
    # The first BatchNorm's running statistics move 10% of the way to the batch's (momentum
    # 0.9) from 0 and 1; its input is the first convolution of x.
    first = nn.Conv(
        variables["params"]["Conv_0"]["kernel"].shape[-1], (3, 3), use_bias=False
    ).apply({"params": variables["params"]["Conv_0"]}, x)
    running = new["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(running["mean"], 0.1 * first.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(
        running["var"], 0.9 + 0.1 * first.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_full_step_traces(name):
    """The full-size ResNet-20 and VGG16 steps hold together shape-wise (test_one_tekfac_step
    runs smaller copies; running full VGG16 needs 4608^2 eigh's)."""
    model = models.create_model(name, 10, CIFAR)
    variables = jax.eval_shape(lambda: models.init_variables(model, CIFAR, jax.random.key(0)))
    opt = tekfax.tekfac(learning_rate=0.1, damping=1e-2)
    opt_state = jax.eval_shape(opt.init, variables["params"])
    x, targets = batch(name, CIFAR, 10)
    step = make_step(model, "softmax_cross_entropy", opt)
    new, new_state, loss, stats, _ = jax.eval_shape(
        step, variables, opt_state, x, targets, jax.random.key(3)
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(new, variables)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, opt_state)
    assert loss.shape == ()
    assert stats_paths(stats) == kernel_paths(variables["params"])
