"""The sequence task of ``tekfax-compare``: progressions data, the Transformer, the tool.

The model tests use a narrow transformer (d 16, one or two layers); the tool's smoke run
trains a one-layer one on a small progressions task for 2 epochs.
"""

import csv
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tekfax
from tekfax.experiments import compare, data, models, train
from tests.conftest import jit

V, L = 11, 7  # A small progressions task: 121 pairs, 21 of them held out.
TINY = dict(d_model=16, num_layers=2, num_heads=2)


def tiny(embedding="lookup", **kwargs):
    return models.Transformer(vocab_size=V, max_len=L, embedding=embedding, **{**TINY, **kwargs})


def tokens(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (n, L)), jnp.int32)


# --- progressions -------------------------------------------------------------------------


def pair_of(row):
    """(a, b) of a progression's first two tokens."""
    return int(row[0]), int((row[1] - row[0]) % V)


def test_progressions_follow_the_rule_with_a_fixed_pair_disjoint_split():
    ds = data.progressions(vocab_size=V, length=L, num_test=21, seed=3)
    assert ds.is_sequence and (ds.vocab_size, ds.num_classes, ds.augment) == (V, V, False)
    assert ds.x_train.shape == ds.y_train.shape == (V * V - 21, L)
    assert ds.x_test.shape == ds.y_test.shape == (21, L) and ds.input_shape == (L,)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == y.dtype == np.int32 and x.min() >= 0 and x.max() < V
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # next-token targets
        for x_row, y_row in zip(x, y, strict=True):
            a, b = pair_of(x_row)
            want = [(a + t * b) % V for t in range(L + 1)]  # s_t = a + t b mod V
            assert list(x_row) + [int(y_row[-1])] == want
    train_pairs = {pair_of(row) for row in ds.x_train}
    test_pairs = {pair_of(row) for row in ds.x_test}
    # Every progression once, none of the test ones in training.
    assert len(train_pairs) == len(ds.x_train) and len(test_pairs) == 21
    assert not train_pairs & test_pairs
    assert train_pairs | test_pairs == {(a, b) for a in range(V) for b in range(V)}
    # Fixed by the seed; another seed holds out other pairs.
    again = data.progressions(vocab_size=V, length=L, num_test=21, seed=3)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(ds, field), getattr(again, field))
    other = data.progressions(vocab_size=V, length=L, num_test=21, seed=4)
    assert {pair_of(row) for row in other.x_test} != test_pairs
    with pytest.raises(ValueError, match="num_test"):
        data.progressions(vocab_size=V, length=L, num_test=V * V)


def test_progressions_irreducible_loss():
    """Given s_0 the first target is uniform; later ones follow from the two before them."""
    ds = data.progressions(vocab_size=V, length=L, num_test=21)
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    for a in range(V):
        np.testing.assert_array_equal(np.bincount(y[x[:, 0] == a, 0], minlength=V), np.ones(V))
    np.testing.assert_array_equal(y[:, 1:], (2 * x[:, 1:] - x[:, :-1]) % V)
    assert ds.irreducible_loss == pytest.approx(math.log(V) / L)


def test_default_progressions_task():
    ds = data.load_dataset("progressions")
    assert ds.name == "progressions" and ds.vocab_size == data.PROGRESSION_VOCAB == 32
    n = data.PROGRESSION_VOCAB**2 - data.PROGRESSION_TEST
    assert ds.x_train.shape == (n, data.PROGRESSION_LENGTH) and len(ds.x_test) == 256
    assert ds.irreducible_loss == pytest.approx(math.log(32) / 16)
    assert "progressions" in data.DATASETS and "tiny_shakespeare" in data.DATASETS


def test_train_val_split_of_sequences_is_random_and_disjoint():
    ds = data.progressions(vocab_size=V, length=L, num_test=21)
    fit, val = data.train_val_split(ds, 0.2, seed=1)
    assert len(val.x_train) == round(0.2 * len(ds.x_train)) == len(fit.x_test)
    rows = {tuple(r) for r in np.concatenate([fit.x_train, val.x_train])}
    assert rows == {tuple(r) for r in ds.x_train} and len(rows) == len(ds.x_train)
    np.testing.assert_array_equal(fit.y_test, val.y_train)
    assert fit.is_sequence and fit.vocab_size == V


def test_char_windows_against_a_loop():
    text = "".join(np.random.default_rng(0).choice(list("abcde\n?"), 103))
    vocabulary = "\nabcde"  # '?' is unknown
    x, y = data.char_windows(text, vocabulary, 10)
    assert x.shape == y.shape == (10, 10) and x.dtype == np.int32
    ids = [vocabulary.index(c) if c in vocabulary else len(vocabulary) for c in text]
    for i in range(10):
        assert list(x[i]) == ids[10 * i : 10 * i + 10]
        assert list(y[i]) == ids[10 * i + 1 : 10 * i + 11]
    assert data.char_windows("abc", "abc", 5)[0].shape == (0, 5)


# --- the model ----------------------------------------------------------------------------


@functools.cache
def tiny_variables(embedding="lookup"):
    return jit(tiny(embedding).init)(jax.random.key(0), tokens(1))


def test_logits_shape_and_causality():
    model, variables = tiny(), tiny_variables()
    apply = jit(model.apply)
    x = tokens(3)
    logits = apply(variables, x)
    assert logits.shape == (3, L, V) and logits.dtype == jnp.float32
    for t in (0, 3, L - 1):
        changed = x.at[:, t].set((x[:, t] + 1) % V)
        other = apply(variables, changed)
        np.testing.assert_allclose(other[:, :t], logits[:, :t], rtol=0, atol=1e-6)
        assert np.all(np.abs(other[:, t:] - logits[:, t:]).max(axis=-1) > 1e-4)
    # Sequences do not interact: changing one changes no other's logits.
    other = apply(variables, x.at[0].set((x[0] + 1) % V))
    np.testing.assert_allclose(other[1:], logits[1:], rtol=0, atol=1e-6)


def test_one_hot_and_lookup_embeddings_agree():
    lookup, one_hot = tiny_variables("lookup"), tiny_variables("one_hot")
    table = lookup["params"]["token_embed"]["embedding"]
    assert table.shape == (V, TINY["d_model"])
    # The same key and distribution: the two variants even start from the same weights.
    np.testing.assert_array_equal(one_hot["params"]["token_embed"]["kernel"], table)
    params = dict(lookup["params"], token_embed={"kernel": table + 0.5})
    lookup_params = dict(lookup["params"], token_embed={"embedding": table + 0.5})
    x = tokens(4, seed=1)
    got = jit(tiny("one_hot").apply)({"params": params}, x)
    want = jit(tiny().apply)({"params": lookup_params}, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="embedding"):
        tiny("hashed").init(jax.random.key(0), x)


def test_registry_of_the_sequence_models():
    net = models.create_model("transformer", 32, (16,))
    assert (net.vocab_size, net.max_len, net.embedding) == (32, 16, "lookup")
    assert models.create_model("transformer-onehot", 32, (16,)).embedding == "one_hot"
    assert models.model_loss("transformer") == "softmax_cross_entropy"
    assert models.is_sequence_model("transformer") and not models.is_sequence_model("mlp")
    assert "transformer" not in models.MODELS  # MODELS stays the image models
    variables = jax.eval_shape(lambda: models.init_variables(net, (16,), jax.random.key(0)))
    assert variables["params"]["token_embed"]["embedding"].shape == (32, 64)


@pytest.mark.parametrize("embedding", ["lookup", "one_hot"])
def test_curvature_statistics_of_the_transformer(embedding):
    model, variables = tiny(embedding), tiny_variables(embedding)
    x = tokens(5, seed=2)
    y = jnp.roll(x, -1, axis=1)
    out = jit(
        lambda p: tekfax.loss_and_curvature(
            lambda q: model.apply({"params": q}, x),
            p,
            y,
            loss="softmax_cross_entropy",
            rng=jax.random.key(1),
        )
    )(variables["params"])
    d = TINY["d_model"]
    dense = {"head": (d, V), "token_embed": (V, d)}  # nn.Embed is a Dense on one-hot rows
    for i in range(TINY["num_layers"]):
        dense |= {f"block_{i}/mlp_in": (d, 4 * d), f"block_{i}/mlp_out": (4 * d, d)}
        for proj in ("query", "key", "value"):
            dense[f"block_{i}/attention/{proj}"] = (d, d)
        dense[f"block_{i}/attention/out"] = (d, d)
    stats = {
        "/".join(k.key for k in path): s
        for path, s in jax.tree_util.tree_flatten_with_path(
            out.stats, is_leaf=lambda s: isinstance(s, tekfax.LayerStats)
        )[0]
    }
    assert set(dense) <= set(stats)
    for name, (d_in, d_out) in dense.items():
        assert stats[name].inputs.shape == (5, L, d_in)  # positions as extra rows
        assert stats[name].out_grads.shape[1:] == (5, L, d_out)
    # The embedding's input is one-hot: its input factor is diag(token frequencies).
    a = np.asarray(stats["token_embed"].inputs).reshape(-1, V)
    np.testing.assert_array_equal(a, np.eye(V)[np.asarray(x).reshape(-1)])
    frequencies = np.bincount(np.asarray(x).reshape(-1), minlength=V) / x.size
    np.testing.assert_allclose(a.T @ a / len(a), np.diag(frequencies), atol=1e-7)


def test_evaluation_is_per_token():
    """train.evaluate: loss in nats per token and token accuracy, against numpy."""
    ds = data.progressions(vocab_size=V, length=L, num_test=21)
    model, variables = tiny(), tiny_variables()
    fn = train._make_eval(model, "softmax_cross_entropy")
    loss, accuracy = train.evaluate(fn, variables["params"], {}, ds, "softmax_cross_entropy")
    logits = np.asarray(model.apply(variables, ds.x_test), np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(log_p, ds.y_test[..., None], axis=-1)
    assert loss == pytest.approx(nll.mean(), rel=1e-5)
    assert accuracy == pytest.approx((logits.argmax(-1) == ds.y_test).mean())
    assert train.positions_per_example("softmax_cross_entropy", ds.y_test) == L


# --- tekfax-compare --model transformer ---------------------------------------------------


@pytest.fixture
def small_task(monkeypatch):
    """The tool's transformer narrowed to one layer, on a small progressions task."""
    narrow = functools.partial(models.Transformer, d_model=16, num_layers=1, num_heads=2)
    monkeypatch.setitem(models.SEQUENCE_MODELS, "transformer", narrow)
    small = data.progressions(vocab_size=V, length=L, num_test=21)
    loaded = []

    def load(name, data_dir=None):
        loaded.append(name)
        return small

    monkeypatch.setattr(compare, "load_dataset", load)
    return small, loaded


def test_compare_transformer_smoke(small_task, tmp_path, capsys):
    small, loaded = small_task
    out = tmp_path / "seq"
    flags = ["--model", "transformer", "--optimizers", "adam", "kfac", "--epochs", "2"]
    assert compare.main(["--output", str(out), *flags, "--batch-size", "25"]) == 0
    assert loaded == ["progressions"]  # the sequence models' default dataset
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    target = compare.SEQUENCE_TARGETS["progressions"]
    assert (config["dataset"], config["target_accuracy"]) == ("progressions", target)
    assert (
        config["hyperparameters"]["adam"]["learning_rate"]
        == (compare.SEQUENCE_HYPERPARAMETERS["lr"]["adam"])
    )
    assert results["dataset"]["vocab_size"] == V and results["dataset"]["input_shape"] == [L]
    assert results["dataset"]["irreducible_loss"] == pytest.approx(math.log(V) / L)
    for run in results["runs"]:
        assert len(run["records"]) == 2 and run["steps"] == 2 * (len(small.x_train) // 25)
        assert run["warning"] is None and run["initial_loss"] == pytest.approx(math.log(V), 0.3)
        for record in run["records"]:
            assert 0 <= record["test_accuracy"] <= 1 and 0 <= record["train_accuracy"] <= 1
            assert 0 < record["test_loss"] < 2 * math.log(V)  # nats per token
        assert run["records"][-1]["train_loss"] < run["initial_loss"]  # it learns
    table = (out / "table.md").read_text()
    assert table == results["table"] and "| progressions | transformer |" in table
    assert "| optimizer | test token accuracy (%) | test loss (nats/token) |" in table
    assert f"Irreducible test loss: {math.log(V) / L:.4f} nats/token." in table
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * 2
    assert (out / "curves_epoch.png").exists() and (out / "curves_seconds.png").exists()
    assert "| progressions | transformer |" in capsys.readouterr().out


def test_compare_refuses_mismatched_model_and_dataset(tmp_path, capsys):
    for flags in (["--model", "transformer", "--dataset", "digits"], ["--dataset", "progressions"]):
        with pytest.raises(SystemExit) as err:
            compare.main(["--output", str(tmp_path / "x"), *flags])
        assert err.value.code == 2 and "needs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sequence_defaults_leave_room_for_the_flags():
    fill = compare.with_task_defaults
    lr = compare.SEQUENCE_HYPERPARAMETERS["lr"]
    assert fill({"lr": None}, ["sgdm", "kfac"], "transformer")["lr"] == [
        f"sgdm={lr['sgdm']!r}",
        f"kfac={lr['kfac']!r}",
    ]
    assert fill({"lr": ["sgdm=1"]}, ["sgdm", "adam"], "transformer")["lr"] == [
        f"adam={lr['adam']!r}",
        "sgdm=1",
    ]
    assert fill({"lr": ["0.1"]}, ["sgdm"], "transformer") == {"lr": ["0.1"]}
    assert fill({"lr": None}, ["sgdm"], "cnn") == {"lr": None}
    args = compare.build_parser().parse_args(["--model", "transformer-onehot"])
    compare._check_args(args, compare.build_parser())
    assert (args.dataset, args.epochs) == ("progressions", compare.SEQUENCE_EPOCHS)


def test_both_embeddings_are_the_same_kronecker_block():
    """nn.Embed is tagged as the bias-free Dense on one-hot rows that the other variant is."""
    x = tokens(2)
    metas = {}
    for embedding in ("lookup", "one_hot"):
        model, params = tiny(embedding), tiny_variables(embedding)["params"]
        layers = tekfax.capture.discover_layers(
            lambda p, model=model: model.apply({"params": p}, x), params
        )
        metas[embedding] = layers["token_embed"].meta
        assert "pos_embed" not in layers  # looked up without a batch axis: shared, untagged
    assert (metas["lookup"].kind, metas["one_hot"].kind) == ("embed", "dense")
    assert (metas["lookup"].d_in, metas["lookup"].d_out) == (
        metas["one_hot"].d_in,
        metas["one_hot"].d_out,
    )
