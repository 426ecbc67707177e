"""The shared keyword arguments are defined once (tekfax.hyperparams) and used everywhere.

Every preset, full optimizer and ``scale_by_kronecker`` takes each shared hyperparameter with
the same default, documents it with the same text, and ``optax.inject_hyperparams`` (which
reads the signature) sees all of them. The full optimizers override the defaults of
``alias.FULL_DEFAULTS`` (the robust defaults) and document them in their own words.
"""

import inspect

import jax.numpy as jnp
import optax
import pytest

import tekfax
from tekfax import alias
from tekfax.hyperparams import DOCS, Hyperparams, args_doc, shared_parameters
from tests.conftest import PRESETS

SCALE_BY = ["scale_by_kronecker"] + [f"scale_by_{p}" for p in PRESETS]
FACTORIES = SCALE_BY + list(PRESETS)

# The defaults as they stand; another change re-chooses them, and updates this table.
DEFAULTS = {
    "damping": None,
    "nu": None,
    "ema": 0.95,
    "rescale_ema": 0.95,
    "curvature_every": 10,
    "eigen_every": 100,
    "rescale_every": 10,
    "conv_rescale": "per_example",
    "positions": "expand",
    "norm_constraint": None,
    "damping_floor": 0.0,
    "learning_rate": None,
    "pi_adjusted": False,
    "eigen_mesh": None,
    "eigen_axis": "data",
    "layer_dims": None,
}


def test_one_table_holds_the_names_defaults_and_docs():
    assert Hyperparams._field_defaults == DEFAULTS
    assert set(DOCS) == set(Hyperparams._fields)
    assert all(text.strip() for text in DOCS.values())


@pytest.mark.parametrize("name", FACTORIES)
def test_every_factory_takes_the_shared_arguments_with_their_defaults(name):
    parameters = inspect.signature(getattr(tekfax, name)).parameters
    for hp, default in DEFAULTS.items():
        if hp == "learning_rate" and name in PRESETS:
            assert parameters[hp].default is inspect.Parameter.empty  # required, positional
            continue
        assert parameters[hp].kind is inspect.Parameter.KEYWORD_ONLY, hp
        if name in PRESETS:
            default = alias.FULL_DEFAULTS.get(hp, default)
        assert parameters[hp].default == default, hp


@pytest.mark.parametrize("name", FACTORIES)
def test_every_docstring_documents_each_argument_from_the_table(name):
    doc = inspect.getdoc(getattr(tekfax, name))
    for parameter in inspect.signature(getattr(tekfax, name)).parameters.values():
        assert f"\n  {parameter.name}: " in doc, parameter.name
    for hp in DEFAULTS:
        if hp == "learning_rate" and name in PRESETS:
            continue
        text = alias._FULL_DOCS[hp] if name in PRESETS and hp in alias._FULL_DOCS else DOCS[hp]
        first_words = " ".join(text.split()[:4])
        assert first_words in " ".join(doc.split()), hp


def test_the_shared_doc_is_generated_from_the_table():
    assert alias._SHARED_DOC == args_doc(shared_parameters(), DOCS)


@pytest.mark.parametrize("name", PRESETS)
def test_full_optimizers_take_learning_rate_first_and_momentum(name):
    parameters = list(inspect.signature(getattr(tekfax, name)).parameters.values())
    assert parameters[0].name == "learning_rate"
    assert parameters[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    momentum = inspect.signature(getattr(tekfax, name)).parameters["momentum"]
    assert momentum.default == 0.9


@pytest.mark.parametrize("name", FACTORIES)
def test_unknown_or_positional_arguments_raise_like_a_plain_function(name):
    factory = getattr(tekfax, name)
    with pytest.raises(TypeError, match="dampening"):
        factory(0.1, dampening=1e-3) if name in PRESETS else factory(dampening=1e-3)
    if name not in PRESETS:
        with pytest.raises(TypeError):
            factory(1e-3)


@pytest.mark.parametrize("name", FACTORIES)
def test_inject_hyperparams_sees_every_numeric_argument(name):
    args = {"learning_rate": 0.1} if name in PRESETS else {}
    opt = optax.inject_hyperparams(getattr(tekfax, name))(damping=1e-3, ema=0.9, **args)
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    hyperparams = opt.init(params).hyperparams
    assert {"damping", "ema", "rescale_ema", "curvature_every"} <= set(hyperparams)
    assert float(hyperparams["damping"]) == pytest.approx(1e-3)
    assert float(hyperparams["ema"]) == pytest.approx(0.9)
