"""Module paths of an NNX model, and the one piece of bookkeeping the backend keeps on it.

A module's path is its attribute path joined with dots -- ``model.layers[0].self_attn.q_proj``
is ``"model.layers.0.self_attn.q_proj"``, the name PEFT and transformers give the same layer --
found with ``nnx.iter_graph``. A wrapper counts as the layer it wraps; its insides are not modules
of the model.

>>> from flax import nnx
>>> class Block(nnx.Module):
...     def __init__(self, rngs):
...         self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs)])
>>> [path for path, _, _ in iter_modules(Block(nnx.Rngs(0)))]
['layers.0', 'layers']
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, MutableSequence
from dataclasses import dataclass, field
from typing import Any

from flax import nnx

from adapterspec import AdapterConfig
from adapterspec.errors import UnsupportedError

from .layers import AdaptedEmbed, AdaptedLinear

__all__ = ["STATE_ATTR", "ModelState", "check_settable", "get_node", "get_state", "iter_modules", "iter_wrappers", "set_node",
           "set_state"]

#: The attribute of the model that holds its :class:`ModelState` (absent when no adapter is loaded).
STATE_ATTR = "_adapterspec_state"

Key = str | int


@dataclass(frozen=True)
class ModelState:
    """What the backend knows about one model's adapters -- immutable, replaced on every change.

    It is static NNX data (hashable, no arrays), so ``nnx.split``/``nnx.merge`` carry it along.

    :param names: adapter names in load order.
    :param configs: the config each adapter was injected with, parallel to ``names``.
    :param active: the active adapters.
    :param merged: adapters whose deltas are in the base weights, in merge order.
    :param stored: ``(adapter, canonical key, dtype name)`` of each tensor whose file stored it in float16/bfloat16
        and that is held in float32 (SPEC.md 7.5): saved back in the file's dtype when that loses nothing.
    :param freezers: adapters injected trainable with ``freeze_base``: the base parameters stay
        :class:`~adapterspec_flax.layers.FrozenParam` while one is loaded.
    """

    names: tuple[str, ...] = ()
    configs: tuple[AdapterConfig, ...] = field(default=(), compare=False)
    active: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()
    stored: tuple[tuple[str, str, str], ...] = field(default=(), compare=False)
    freezers: tuple[str, ...] = ()

    def config(self, name: str) -> AdapterConfig:
        """The config adapter ``name`` was injected with.

        >>> ModelState(names=("a", "b"), configs=("cfg-a", "cfg-b")).config("b")
        'cfg-b'
        """
        return self.configs[self.names.index(name)]


def get_state(model: nnx.Module) -> ModelState:
    """The model's :class:`ModelState` (an empty one if no adapter is loaded).

    >>> get_state(nnx.Linear(2, 2, rngs=nnx.Rngs(0))).names
    ()
    """
    return getattr(model, STATE_ATTR, None) or ModelState()


def set_state(model: nnx.Module, state: ModelState) -> None:
    """Store ``state`` on the model; an empty one removes the attribute, leaving the model as it was.

    >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    >>> set_state(layer, ModelState(names=("a",), configs=(None,)))
    >>> get_state(layer).names, hasattr(layer, STATE_ATTR)
    (('a',), True)
    >>> set_state(layer, ModelState()); hasattr(layer, STATE_ATTR)
    False
    """
    if state.names:
        setattr(model, STATE_ATTR, state)
    elif hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)


def _dotted(path: tuple[Key, ...]) -> str:
    return ".".join(str(k) for k in path)


def iter_modules(model: nnx.Module) -> Iterator[tuple[str, tuple[Key, ...], nnx.Module]]:
    """``(module path, attribute path, module)`` of every sub-module, children before parents (NNX graph order).

    Shared modules appear once. Wrappers are yielded as themselves; what is inside them is skipped.
    """
    found = [(path, node) for path, node in nnx.iter_graph(model) if path and isinstance(node, nnx.Module)]
    wrappers = {path for path, node in found if isinstance(node, (AdaptedLinear, AdaptedEmbed))}
    for path, node in found:
        if not any(path[:i] in wrappers for i in range(1, len(path))):
            yield _dotted(path), tuple(path), node


def iter_wrappers(model: nnx.Module) -> Iterator[tuple[str, tuple[Key, ...], AdaptedLinear | AdaptedEmbed]]:
    """The adapter wrappers in the model, as :func:`iter_modules` yields them.

    >>> list(iter_wrappers(nnx.Linear(2, 2, rngs=nnx.Rngs(0))))
    []
    """
    for dotted, path, node in iter_modules(model):
        if isinstance(node, (AdaptedLinear, AdaptedEmbed)):
            yield dotted, path, node


def _child(node: Any, key: Key) -> Any:
    if isinstance(key, int) or (isinstance(node, Mapping) and not isinstance(node, nnx.Module)):
        return node[key]
    return getattr(node, key)


def get_node(model: nnx.Module, path: tuple[Key, ...]) -> Any:
    """The object at attribute path ``path`` (``("layers", 0, "q_proj")``).

    >>> model = nnx.Dict(layers=nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0))]))
    >>> get_node(model, ("layers", 0)).out_features
    3
    """
    node: Any = model
    for key in path:
        node = _child(node, key)
    return node


def check_settable(model: nnx.Module, path: tuple[Key, ...]) -> None:
    """Raise if the object at ``path`` cannot be replaced (it sits in a tuple or another immutable container).

    :raises UnsupportedError: naming the module.

    >>> check_settable(nnx.Dict(layers=nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0))])), ("layers", 0))
    """
    parent = get_node(model, path[:-1])
    key = path[-1]
    if isinstance(key, int) and not isinstance(parent, MutableSequence):
        raise UnsupportedError(
            f"the layer sits in an immutable {type(parent).__name__}, so it cannot be wrapped",
            key=_dotted(path), hint="hold sub-modules in nnx.List / nnx.Dict (or a list/dict marked nnx.data)")


def set_node(model: nnx.Module, path: tuple[Key, ...], value: Any) -> None:
    """Put ``value`` at attribute path ``path`` (attribute, ``nnx.List``/``nnx.Dict`` item, or list/dict item).

    >>> model = nnx.Dict(layers=nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0))]))
    >>> set_node(model, ("layers", 0), nnx.Linear(2, 5, rngs=nnx.Rngs(0)))
    >>> model["layers"][0].out_features
    5
    """
    parent = get_node(model, path[:-1])
    key = path[-1]
    if isinstance(parent, (MutableSequence, MutableMapping)) and (
            isinstance(key, int) or not isinstance(parent, nnx.Module)):
        parent[key] = value
    else:
        setattr(parent, key, value)
