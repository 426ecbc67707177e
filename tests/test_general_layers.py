"""DenseGeneral, Einsum and attention: each is a Dense on flattened feature axes.

References: the equivalent ``nn.Dense`` model with the kernel reshaped (the updates must
agree to float64 rounding, for every optimizer and both Fisher modes), and the gradient
identity grad W = (1/N) sum_{n,t} a_{n,t} u_{n,t}^T, which checks the captured inputs and
output gradients of every attention projection. Also: the errors for layers that are not one
matrix product, ``layer_dims`` for bias-free kernels, and the coverage report.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tekfax
from tests.conftest import jit, make_optimizer

N, L, D, H, K, C = 6, 5, 4, 2, 3, 3
F64 = {"param_dtype": jnp.float64}


class _General(nn.Module):
    """q: (N, L, D) -> (N, L, H, K); o: (N, L, H, K) -> (N, L, D), the attention shapes."""

    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.DenseGeneral((H, K), name="q", use_bias=self.use_bias, **F64)(x))
        o = nn.DenseGeneral(D, axis=(-2, -1), name="o", use_bias=self.use_bias, **F64)(h)
        return nn.Dense(C, name="head", **F64)(jnp.tanh(o).mean(axis=1))


class _Flat(nn.Module):
    """The same model with Dense layers on the flattened feature axes."""

    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(H * K, name="q", use_bias=self.use_bias, **F64)(x))
        o = nn.Dense(D, name="o", use_bias=self.use_bias, **F64)(h)
        return nn.Dense(C, name="head", **F64)(jnp.tanh(o).mean(axis=1))


def _flat_params(params):
    """_General's params as _Flat's: kernels (D, H, K) -> (D, H K), (H, K, D) -> (H K, D)."""
    flat = jax.tree.map(lambda v: v, dict(params))
    flat["q"] = {
        k: v.reshape(D, H * K) if k == "kernel" else v.reshape(-1) for k, v in params["q"].items()
    }
    flat["o"] = {k: v.reshape(H * K, D) if k == "kernel" else v for k, v in params["o"].items()}
    return flat


def _data():
    x = jax.random.normal(jax.random.key(1), (N, L, D), jnp.float64)
    return x, jnp.arange(N) % C


def _train(model, params, case, fisher, steps=3, **overrides):
    """``steps`` updates of ``make_optimizer(case)``; returns the updates of every step."""
    x, y = _data()
    opt = make_optimizer(case, **overrides)

    @jit
    def step(params, opt_state, key):
        out = tekfax.loss_and_curvature(
            lambda p: model.apply({"params": p}, x), params, y, fisher=fisher, rng=key
        )
        updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        return jax.tree.map(jnp.add, params, updates), opt_state, updates

    opt_state, history = opt.init(params), []
    for i in range(steps):
        params, opt_state, updates = step(params, opt_state, jax.random.key(10 + i))
        history.append(updates)
    return history


@pytest.mark.parametrize(
    "case, fisher",
    [("kfac", "sampled"), ("ekfac", "sampled"), ("tkfac-nu", "sampled")]
    + [("tekfac", "sampled"), ("kfac", "empirical")],
)
def test_dense_general_equals_dense_with_reshaped_kernel(x64, case, fisher):
    params = _General().init(jax.random.key(0), _data()[0])["params"]
    general = _train(_General(), params, case, fisher)
    flat = _train(_Flat(), _flat_params(params), case, fisher)
    for got, want in zip(general, flat, strict=True):
        got = _flat_params(got)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


class _Einsums(nn.Module):
    """A DenseGeneral contracting the middle axis, and an Einsum with a permuted output."""

    @nn.compact
    def __call__(self, x):  # x: (N, L, D)
        xt = jnp.swapaxes(x, 1, 2)  # (N, D, L): contracted axis in the middle
        h = nn.DenseGeneral(H * K, axis=1, name="a", **F64)(xt)  # (N, L, H K)
        h = nn.Einsum((H * K, D), "nlk,kd->ldn", name="b", **F64)(jnp.tanh(h))
        h = jnp.transpose(h, (2, 0, 1))  # back to (N, L, D)
        return nn.Dense(C, name="head", **F64)(jnp.tanh(h).mean(axis=1))


class _EinsumTwin(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(H * K, name="a", **F64)(x)
        h = nn.Dense(D, name="b", **F64)(jnp.tanh(h))
        return nn.Dense(C, name="head", **F64)(jnp.tanh(h).mean(axis=1))


@pytest.mark.parametrize("case", ["tekfac"])
def test_permuted_feature_axes_equal_dense(x64, case):
    params = _Einsums().init(jax.random.key(0), _data()[0])["params"]
    got = _train(_Einsums(), params, case, "sampled")
    want = _train(_EinsumTwin(), params, case, "sampled")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.SelfAttention(num_heads=H, qkv_features=H * K, name="attn", **F64)(
            x, mask=nn.make_causal_mask(x[..., 0])
        )
        return nn.Dense(C, name="head", **F64)(h.mean(axis=1))


def test_attention_projections_are_tagged_and_exact(x64):
    """Every projection's a and u reproduce its gradient: grad W = (1/N) sum a u^T."""
    x, y = _data()
    params = _Attention().init(jax.random.key(0), x)["params"]
    out = tekfax.loss_and_curvature(
        lambda p: _Attention().apply({"params": p}, x), params, y, fisher="empirical"
    )
    dims = {"query": (D + 1, H * K), "key": (D + 1, H * K), "value": (D + 1, H * K)}
    dims["out"] = (H * K + 1, D)
    assert {k: (s.meta.d_in, s.meta.d_out) for k, s in out.stats["attn"].items()} == dims
    for name, st in out.stats["attn"].items():
        a = np.asarray(tekfax.patches.input_matrix(st.inputs, st.meta))
        u = np.asarray(tekfax.patches.output_matrix(st.out_grads))[0]
        expected = np.einsum("ntd,nte->de", a, u) / N
        grad = tekfax.patches.grad_matrix(out.grads["attn"][name], jnp.float64)
        np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15)
    assert (
        tekfax.diagnostics.unpreconditioned(lambda p: _Attention().apply({"params": p}, x), params)
        == []
    )


class _Wrap(nn.Module):
    inner: nn.Module

    def __call__(self, x):
        return self.inner(x).reshape(x.shape[0], -1)


def _capture(module, x, **kwargs):
    model = _Wrap(module)
    params = model.init(jax.random.key(0), x)["params"]
    y = jnp.zeros(x.shape[0], jnp.int32)
    return tekfax.loss_and_curvature(lambda p: model.apply({"params": p}, x), params, y, **kwargs)


@pytest.mark.parametrize(
    "module, message",
    [
        (nn.DenseGeneral(3, batch_dims=(0,)), "batch_dims"),
        (nn.DenseGeneral(3, axis=0), "first \\(batch\\) axis"),
        (nn.Einsum((L, D, 3), "nld,ldk->nk"), "'nld,ldk->nk'"),  # fine: contracts l and d
        (nn.Einsum((L, D, 3), "nld,ldk->nlk"), "shared by the input and the output"),
        (nn.Einsum((D, 3), "nld,dk->nk"), "sums an input axis"),
        (nn.Einsum((H, D, K), "nld,hdk->nlhk"), "orders the kernel axes"),
    ],
)
def test_layers_that_are_not_one_matrix_product_raise(module, message):
    x = jax.random.normal(jax.random.key(1), (N, L, D))
    if message == "'nld,ldk->nk'":
        assert _capture(module, x, fisher="empirical").stats["inner"].meta.d_in == L * D + 1
        return
    with pytest.raises(ValueError, match=message) as err:
        _capture(module, x, fisher="empirical")
    assert "layer 'inner'" in str(err.value)


def test_bias_free_kernels_need_layer_dims(x64):
    x, y = _data()
    model = _General(use_bias=False)
    params = model.init(jax.random.key(0), x)["params"]
    out = tekfax.loss_and_curvature(
        lambda p: model.apply({"params": p}, x), params, y, rng=jax.random.key(3)
    )
    opt = make_optimizer("kfac")
    with pytest.raises(ValueError, match="layer_dims=tekfax.layer_dims"):
        opt.update(out.grads, opt.init(params), params, stats=out.stats)
    dims = tekfax.layer_dims(lambda p: model.apply({"params": p}, x), params)
    assert dims["q"] == (D, H * K) and dims["o"] == (H * K, D)
    got = _train(model, params, "kfac", "sampled", layer_dims=dims)
    want = _train(_Flat(use_bias=False), _flat_params(params), "kfac", "sampled")
    for a, b in zip(
        jax.tree.leaves([_flat_params(g) for g in got]), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="does not fit its kernel"):
        make_optimizer("kfac", layer_dims={"q": (D + 1, H * K)}).init(params)
    with pytest.raises(ValueError, match="not layers of the params"):
        make_optimizer("kfac", layer_dims={"nowhere": (1, 1)}).init(params)


class _Embedded(nn.Module):
    """A token embedding, written as ``nn.Embed`` or as a bias-free Dense on one-hot rows."""

    one_hot: bool = False

    @nn.compact
    def __call__(self, tokens):
        if self.one_hot:
            rows = jax.nn.one_hot(tokens, 11, dtype=jnp.float64)
            h = nn.Dense(D, use_bias=False, name="emb", **F64)(rows)
        else:
            h = nn.Embed(11, D, name="emb", **F64)(tokens)
        return nn.Dense(C, name="head", **F64)(jnp.tanh(h).mean(axis=1))


def _tokens():
    return jax.random.randint(jax.random.key(4), (N, L), 0, 11)


def _train_tokens(model, params, case):
    tokens, y = _tokens(), jnp.arange(N) % C
    opt = make_optimizer(case)

    @jit
    def step(params, opt_state, key):
        out = tekfax.loss_and_curvature(
            lambda p: model.apply({"params": p}, tokens), params, y, rng=key
        )
        updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        return jax.tree.map(jnp.add, params, updates), opt_state, updates

    opt_state, history = opt.init(params), []
    for i in range(3):
        params, opt_state, updates = step(params, opt_state, jax.random.key(20 + i))
        history.append(updates)
    return history


@pytest.mark.parametrize("case", ["kfac", "tekfac"])
def test_embedding_equals_dense_on_one_hot_rows(x64, case):
    """An nn.Embed is a Kronecker block whose input factor is diag(token frequencies)."""
    params = _Embedded().init(jax.random.key(0), _tokens())["params"]
    dense = {"emb": {"kernel": params["emb"]["embedding"]}, "head": params["head"]}
    got = _train_tokens(_Embedded(), params, case)
    want = _train_tokens(_Embedded(one_hot=True), dense, case)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(
            g["emb"]["embedding"], w["emb"]["kernel"], rtol=1e-10, atol=1e-14
        )
        np.testing.assert_allclose(g["head"]["kernel"], w["head"]["kernel"], rtol=1e-10, atol=1e-14)
    out = tekfax.loss_and_curvature(
        lambda p: _Embedded().apply({"params": p}, _tokens()),
        params,
        jnp.arange(N) % C,
        fisher="empirical",
    )
    a = tekfax.patches.input_matrix(out.stats["emb"].inputs, out.stats["emb"].meta)
    counts = np.bincount(np.asarray(_tokens()).ravel(), minlength=11) / (N * L)
    np.testing.assert_allclose(np.einsum("ntv,ntw->vw", a, a) / (N * L), np.diag(counts))


class _Tied(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(11, D)
        h = nn.Dense(D)(jnp.tanh(embed(tokens)).mean(axis=1))
        return embed.attend(h)


def test_tied_and_large_embeddings_pass_through(monkeypatch):
    tokens = _tokens()
    params = _Tied().init(jax.random.key(0), tokens)["params"]
    untagged = tekfax.diagnostics.unpreconditioned(
        lambda p: _Tied().apply({"params": p}, tokens), params
    )
    assert untagged == ["Embed_0/embedding"]
    monkeypatch.setattr(tekfax.modules, "MAX_EMBED_VOCAB", 10)
    params = _Embedded().init(jax.random.key(0), tokens)["params"]
    model = _Embedded()
    assert tekfax.diagnostics.unpreconditioned(
        lambda p: model.apply({"params": p}, tokens), params
    ) == ["emb/embedding"]
    state = tekfax.kronecker.find_kronecker_state(make_optimizer("kfac").init(params))
    assert sorted(state.layers) == ["head"]


class _Partly(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.LayerNorm()(nn.Embed(11, D)(tokens))
        return nn.Dense(C)(h.mean(axis=1))


def test_unpreconditioned_params_are_listed_and_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(tekfax.capture, "_REPORTED", set())
    tokens = jnp.arange(N * L).reshape(N, L) % 11
    params = _Partly().init(jax.random.key(0), tokens)["params"]

    def logits_fn(p):
        return _Partly().apply({"params": p}, tokens)

    expected = ["LayerNorm_0/bias", "LayerNorm_0/scale"]
    assert tekfax.diagnostics.unpreconditioned(logits_fn, params) == expected
    y = jnp.zeros(N, jnp.int32)
    with caplog.at_level(logging.WARNING, logger="tekfax"):
        for _ in range(2):
            tekfax.loss_and_curvature(logits_fn, params, y, fisher="empirical")
    logged = [r.getMessage() for r in caplog.records if r.name == "tekfax"]
    assert len(logged) == 1 and all(name in logged[0] for name in expected)


class _Batchless(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(D, name="shared")(jnp.ones((L, D)))  # no batch axis
        return nn.Dense(C)((x + shared).mean(axis=1))


def test_a_layer_without_the_batch_axis_raises():
    """Its gradient sums over the examples: it has no per-example statistics."""
    x = _data()[0].astype(jnp.float32)
    with pytest.raises(ValueError, match="layer 'inner/shared' got an input of shape \\(5, 4\\)"):
        _capture(_Batchless(), x, fisher="empirical")


def test_nnx_attention_projections_are_tagged_and_exact(x64):
    """nnx.MultiHeadAttention's LinearGeneral projections: grad W = (1/N) sum a u^T."""
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(
                num_heads=H,
                in_features=D,
                qkv_features=H * K,
                decode=False,
                rngs=rngs,
                param_dtype=jnp.float64,
            )
            self.head = nnx.Linear(D, C, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.head(self.attn(x, mask=nn.make_causal_mask(x[..., 0])).mean(axis=1))

    x, y = _data()
    graphdef, params, rest = nnx.split(Model(nnx.Rngs(0)), nnx.Param, ...)
    out = tekfax.loss_and_curvature(
        lambda p: nnx.merge(graphdef, p, rest)(x), params, y, fisher="empirical"
    )
    assert sorted(out.stats["attn"]) == ["key", "out", "query", "value"]
    for name, st in out.stats["attn"].items():
        a = np.asarray(tekfax.patches.input_matrix(st.inputs, st.meta))
        u = np.asarray(tekfax.patches.output_matrix(st.out_grads))[0]
        layer = {k: v[...] for k, v in out.grads["attn"][name].items()}
        grad = tekfax.patches.grad_matrix(layer, jnp.float64)
        np.testing.assert_allclose(grad, np.einsum("ntd,nte->de", a, u) / N, rtol=1e-12, atol=1e-15)
