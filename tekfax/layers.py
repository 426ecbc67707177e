"""Layers in a parameter tree: the kernel/bias pairs the optimizer preconditions.

A layer is a node of the params tree whose only children are ``kernel`` (rank >= 2) and
optionally ``bias``, or an ``embedding`` table of at most ``tekfax.modules.MAX_EMBED_VOCAB``
rows, named by its path joined with ``/`` (``"Block_0/Dense_1"``). The trees
may be Linen dicts or NNX ``nnx.State`` objects, whose leaves are ``nnx.Variable``s or plain
arrays: paths are read with ``jax.tree_util`` and a Variable's value counts as the leaf, so
the same code serves both and the trees it rebuilds keep their types.

A kernel is read as a (d_in, d_out) matrix in row-major order, bias in row 0
(:mod:`tekfax.patches`): d_out is the bias's size, or without a bias the kernel's last axis.
A bias-free kernel whose output features span several axes (an attention projection
``DenseGeneral(features=(heads, head_dim), use_bias=False)``) needs its dims from a trace of
the model: pass ``layer_dims=tekfax.layer_dims(logits_fn, params)`` to the optimizer
(docs/algorithms.md, section 10).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax

from tekfax import modules

_PARAMS = ("kernel", "bias")
# An embedding's table is its kernel: (V, features), a Dense on one-hot rows.
_ALIASES = {"embedding": "kernel"}


def _key(key: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def key_paths(tree: Any, is_leaf: Any = None) -> tuple[list[tuple[Any, ...]], list[Any], Any]:
    """(paths of keys, leaves, treedef) of ``tree``; a Variable's ``value`` adds no key.

    The keys are the tree's own (strings, or the integers of an ``nnx.List``).

    Example:
      >>> from tekfax.layers import key_paths
      >>> paths, leaves, _ = key_paths({"Dense_0": {"bias": 1, "kernel": 2}})
      >>> paths
      [('Dense_0', 'bias'), ('Dense_0', 'kernel')]
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    paths = []
    for path, _ in flat:
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
            path = path[:-1]
        paths.append(tuple(_key(k) for k in path))
    return paths, [leaf for _, leaf in flat], treedef


def leaf_paths(tree: Any, is_leaf: Any = None) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """:func:`key_paths` with every key as a string, as layer names are written.

    Example:
      >>> from tekfax.layers import leaf_paths
      >>> leaf_paths({"layers": [{"kernel": 1}]})[0]
      [('layers', '0', 'kernel')]
    """
    paths, leaves, treedef = key_paths(tree, is_leaf)
    return [tuple(str(k) for k in path) for path in paths], leaves, treedef


def _layer_leaves(paths: list[tuple[str, ...]]) -> dict[str, dict[str, int]]:
    """Layer name -> {"kernel": leaf index, "bias": leaf index} for nodes shaped like layers.

    A node is a layer when its children are leaves named ``kernel`` and optionally ``bias``,
    or a single leaf ``embedding`` (an embedding table, returned as its ``kernel``).
    """
    children: dict[tuple[str, ...], dict[str, int]] = {}
    for i, path in enumerate(paths):
        for k in range(len(path)):  # -1 marks a child that is a subtree, not a leaf
            children.setdefault(path[:k], {})[path[k]] = i if k == len(path) - 1 else -1
    layers = {}
    for parent, kids in children.items():
        if set(kids) == {"embedding"}:
            kids = {"kernel": kids["embedding"]}
        if set(kids) <= set(_PARAMS) and kids.get("kernel", -1) >= 0 and kids.get("bias", 0) >= 0:
            layers["/".join(parent)] = kids
    return layers


def find_layers(tree: Any) -> dict[str, dict[str, Any]]:
    """Layer name -> {"kernel", "bias"} arrays for every node of ``tree`` shaped like a layer.

    Example:
      >>> from tekfax.layers import find_layers
      >>> {name: sorted(layer) for name, layer in find_layers(params).items()}
      {'Dense_0': ['bias', 'kernel'], 'Dense_1': ['bias', 'kernel']}
    """
    paths, leaves, _ = leaf_paths(tree)
    layers = {}
    for name, kids in _layer_leaves(paths).items():
        layer = {k: leaves[i] for k, i in kids.items()}
        is_embed = paths[kids["kernel"]][-1] in _ALIASES
        if is_embed and layer["kernel"].shape[0] > modules.MAX_EMBED_VOCAB:
            continue  # too large to tag (tekfax.modules.MAX_EMBED_VOCAB)
        if getattr(layer["kernel"], "ndim", 0) >= 2 and _bias_fits(layer):
            layers[name] = layer
    return layers


def _bias_fits(layer: Mapping[str, Any]) -> bool:
    kernel, bias = layer["kernel"], layer.get("bias")
    return bias is None or (0 < bias.size and kernel.size % bias.size == 0)


def layer_dims(layer: Mapping[str, Any], d_out: int | None = None) -> tuple[int, int]:
    """(d_in, d_out) of a layer's kernel matrix, the bias row included in d_in.

    ``d_out`` defaults to the bias's size, or the kernel's last axis without a bias.

    Example:
      >>> from tekfax.layers import layer_dims
      >>> layer_dims({"kernel": jnp.zeros((4, 2, 3)), "bias": jnp.zeros((2, 3))})
      (5, 6)
      >>> kernel_only = {"kernel": jnp.zeros((4, 2, 3))}
      >>> layer_dims(kernel_only), layer_dims(kernel_only, d_out=6)
      ((8, 3), (4, 6))
    """
    kernel, bias = layer["kernel"], layer.get("bias")
    if d_out is None:
        d_out = bias.size if bias is not None else kernel.shape[-1]
    return math.prod(kernel.shape) // d_out + int(bias is not None), d_out


def fits(layer: Mapping[str, Any], dims: tuple[int, int]) -> bool:
    """Whether the kernel (and bias) of ``layer`` are a (d_in, d_out) matrix, bias row first.

    Example:
      >>> from tekfax.layers import fits
      >>> fits({"kernel": jnp.zeros((4, 2, 3)), "bias": jnp.zeros((2, 3))}, (5, 6))
      True
    """
    d_in, d_out = dims
    bias = layer.get("bias")
    return layer["kernel"].size == (d_in - (bias is not None)) * d_out and (
        bias is None or bias.size == d_out
    )


def replace_layers(tree: Any, new: Mapping[str, Mapping[str, Any]]) -> Any:
    """``tree`` with the kernel/bias of every layer in ``new`` replaced, structure kept.

    Example:
      >>> from tekfax.layers import replace_layers
      >>> zero = {"kernel": jnp.zeros((4, 16)), "bias": jnp.zeros(16)}
      >>> float(replace_layers(params, {"Dense_0": zero})["Dense_0"]["kernel"].sum())
      0.0
    """
    paths, leaves, treedef = leaf_paths(tree)
    leaves = list(leaves)
    for name, kids in _layer_leaves(paths).items():
        for param, i in kids.items():
            if name in new:
                leaves[i] = new[name][param]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def leaf_names(tree: Any) -> dict[int, str]:
    """id(leaf) -> its path joined with ``/``: names an NNX module's kernel inside a trace.

    Example:
      >>> from tekfax.layers import leaf_names
      >>> names = leaf_names(params)
      >>> names[id(params["Dense_1"]["kernel"])]
      'Dense_1/kernel'
    """
    paths, leaves, _ = leaf_paths(tree)
    return {id(leaf): "/".join(path) for path, leaf in zip(paths, leaves, strict=True)}
