"""``modules_to_save`` on keras-hub models: a module saved whole per adapter (PEFT's ``ModulesToSaveWrapper``).

PEFT keeps a trained copy of each module ``modules_to_save`` names (matched by plain name suffix, as PEFT does:
``"norm"`` selects every ``*norm`` module) and runs it instead of the original while the adapter is active; the
file holds the copy's parameters under the module's own keys (``base_model.model.lm_head.weight``, SPEC.md 5.3).

Here the copy lives in the adapter's bank, in the file's layout; which Keras variable each parameter is, and
how it is laid out, comes from keras-hub's converter (the record of ``port_weight`` calls, probed with index
tensors: a copy or a 2-D transpose; anything else is refused). While the adapter is the first active one holding
a copy, its values are in those variables -- the forward pass and ``generate`` see them with no change to the graph
-- and the original values come back when it is not (switching, disabling, deleting). As in torch, merging marks
the running copy: deleting its adapter then keeps it as the module's weights.

The copies are frozen: training them in Keras is refused (typed), as are modules the backend cannot locate (a
tied ``lm_head``: it is the embedding's matrix), an input embedding tied to the logits projection (one variable:
the copy would run in the logits too, where PEFT keeps the base matrix) and modules another adapter adapts.

>>> find_modules_to_save(model, cfg, LoadOptions())                         # doctest: +SKIP
[('lm_head', [('weight', <Variable reverse_embeddings>, Layout(...))])]
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._mix import SAVED_WHOLE, Running
from adapterspec.errors import UnsupportedError

from .bank import AdapterBank, GroupKey, Ref
from .layers import Layout
from .sites import ModuleSite

__all__ = ["ModulesToSaveLayer", "converter_layout", "converter_modules", "find_modules_to_save", "module_params", "site_key"]

#: (param name relative to the module, the Keras variable, its layout): one parameter of a saved module.
Param = tuple[str, Any, Layout]

_RECORDS: weakref.WeakKeyDictionary[Any, list[tuple[str, Any, Any]]] = weakref.WeakKeyDictionary()


def _records(model: Any) -> list[tuple[str, Any, Any]]:
    """(spec key, Keras variable, converter hook) of every weight keras-hub's converter ports into ``model``."""
    from .converters import _record, backbone_of
    from .mapping import BASE_MODEL_PREFIX, spec_name

    cached = _RECORDS.get(model)
    if cached is not None:
        return cached
    backbone = backbone_of(model)
    recorded = _record(backbone)
    out: list[tuple[str, Any, Any]] = []
    if recorded is not None:
        records, model_type = recorded
        prefix = BASE_MODEL_PREFIX.get(model_type or "")
        task_model = backbone is not model
        out = [(_torch_name(spec_name(r.key, prefix, task_model)), r.variable, r.hook) for r in records]
    _RECORDS[model] = out
    return out


def _torch_name(key: str) -> str:
    """A checkpoint key as the torch module's parameter: transformers' legacy rename (``LayerNorm.gamma`` /
    ``LayerNorm.beta`` are ``LayerNorm.weight`` / ``LayerNorm.bias``; keras-hub's BERT converter reads the old
    names), so a module saved whole is keyed as PEFT keys it."""
    for old, new in (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")):
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def converter_layout(key: str, variable: Any, hook: Any, field: str | None = "modules_to_save",
                     torch_shape: tuple[int, ...] | None = None) -> Layout:
    """How the converter lays the file's tensor into ``variable``, found by running the converter's hook on index
    tensors: a plain copy or a 2-D transpose; given the tensor's shape in PEFT's file, also a transpose of the Keras
    axes with a reshape (GPT-2's attention ``c_proj`` ``[in, out]`` is the EinsumDense kernel ``[heads, head_dim,
    out]``).

    :param field: the config field that selected the module (named in the hint), ``None`` for a tensor the file
        holds without one (an embedding saved whole, a trained bias).
    :param torch_shape: the tensor's shape in PEFT's file, where known (the file's, the module's).

    :raises UnsupportedError: any other layout (a split, a computed value), or a reshape without ``torch_shape``
        (the shape PEFT saves would be unknown: writing the Keras shape made a file PEFT cannot load).
    """
    from .converters import _probe

    shape = tuple(int(d) for d in variable.shape)
    size = int(np.prod(shape))
    if torch_shape is not None:
        candidates = [Layout(shape, tuple(torch_shape), perm) for perm in _perms(len(shape))] \
            if int(np.prod(torch_shape)) == size else []
    else:
        if len(shape) > 1 and _probe(hook, (size,), shape) is not None:  # the hook reshapes whatever it is given
            raise UnsupportedError(f"keras-hub's converter reshapes {key!r} into {variable.path!r}, and the shape "
                                   "PEFT saves it in is not known here, so the module cannot be saved whole by this "
                                   "backend", key=key, hint=_refused_hint(field))
        candidates = [Layout(shape, shape, tuple(range(len(shape))))]
        if len(shape) == 2:
            candidates.append(Layout(shape, shape[::-1], (1, 0)))
    for layout in candidates:
        probe = _probe(hook, layout.spec_shape, shape)
        if probe is None:
            continue
        expected = layout.to_keras(np.arange(int(np.prod(shape)), dtype=np.int64).reshape(layout.spec_shape))
        if np.array_equal(probe, expected):
            return layout
    raise UnsupportedError(f"keras-hub's converter does not copy {key!r} into {variable.path!r} as it is or "
                           "transposed, so the module cannot be saved whole by this backend", key=key,
                           hint=_refused_hint(field))


def _perms(rank: int) -> list[tuple[int, ...]]:
    """The orders of ``rank`` axes to try, the likeliest first (as they are, reversed)."""
    first = [tuple(range(rank)), tuple(reversed(range(rank)))]
    return list(dict.fromkeys([*first, *itertools.permutations(range(rank))]))


def _torch_shapes(site: ModuleSite | None) -> dict[str, tuple[int, ...]]:
    """The shapes of a module's ``weight`` and ``bias`` in PEFT's file, from its site (a Linear's ``[out, in]``, a
    transformers Conv1D's ``[in, out]``, an Embedding's ``[num, dim]``); empty where the site does not tell."""
    if site is None or site.in_features <= 0 or site.out_features <= 0:
        return {}
    if site.kind == "linear":
        weight = (site.in_features, site.out_features) if site.hf_conv1d else (site.out_features, site.in_features)
        return {"weight": weight, "bias": (site.out_features,)}
    if site.kind == "embedding":
        return {"weight": (site.in_features, site.out_features)}
    return {}


def _site_params(site: ModuleSite) -> list[Param] | None:
    """The parameters of a module that is one whole Keras layer (a ``module_map`` entry, a hand-built model):
    ``weight`` in PEFT's layout (Dense ``[out, in]``, Embedding ``[num, dim]``, Conv ``[out, in, *k]``, an untied
    logits projection ``[vocab, dim]``) and ``bias`` if the layer has one; ``None`` for anything else."""
    piece = site.pieces[0] if len(site.pieces) == 1 else None
    if piece is None or piece.tied or piece.kind == "einsum" or piece.out_slice is not None or \
            not np.array_equal(piece.in_index.ravel(), np.arange(site.in_features)) or \
            not np.array_equal(piece.out_index.ravel(), np.arange(site.out_features)):
        return None
    variable = piece.kernel_variable
    shape = tuple(int(d) for d in variable.shape)
    if piece.kind == "embedding":
        weight = Layout(shape, shape, (0, 1))
    elif piece.kind == "conv":
        nd = len(shape) - 2
        perm = (nd + 1, nd, *range(nd))
        weight = Layout(shape, tuple(shape[i] for i in perm), perm)
    else:
        weight = Layout(shape, shape[::-1], (1, 0))
    params: list[Param] = [("weight", variable, weight)]
    bias = piece.bias_variable
    if bias is not None:
        params.append(("bias", bias, Layout(tuple(int(d) for d in bias.shape), tuple(int(d) for d in bias.shape), (0,))))
    return params


def find_modules_to_save(model: Any, config: AdapterConfig, sites: dict[str, ModuleSite],
                         trainable: bool) -> list[tuple[str, list[Param]]]:
    """The modules saved whole (``modules_to_save``; PEFT matches them by plain name suffix), each with its
    parameters, in model order (as the torch backend's function of the same name).

    Entries that match nothing are ignored, as PEFT does (it adds ``classifier`` and ``score`` for sequence
    classification whether or not they exist).

    :raises UnsupportedError: training requested, a matched module the converter does not lay out plainly, a
        tied ``lm_head`` (its matrix is the embedding's), or an embedding tied to the logits projection (the copy
        would change the logits too).
    """
    entries = config.get("modules_to_save") or []
    if isinstance(entries, str):
        entries = [entries]
    if not entries:
        return []
    by_module = converter_modules(model)
    universe = list(by_module) + [path for path in sites if path not in by_module]
    chosen: list[str] = []
    for module in universe:
        if any(module.endswith(e) for e in entries) and not any(module.startswith(c + ".") for c in chosen):
            chosen.append(module)
    for path, site in sites.items():
        if any(path.endswith(e) for e in entries) and path not in by_module and \
                any(p.kind == "reverse" and p.tied for p in site.pieces):
            raise UnsupportedError(f"modules_to_save names {path!r}, whose matrix is the tied input embedding's",
                                   pointer="/modules_to_save",
                                   hint="save the embedding whole instead, or use the torch backend")
    if chosen and trainable:
        raise UnsupportedError(f"the keras backend cannot train modules_to_save {chosen}", pointer="/modules_to_save",
                               hint="load it frozen (trainable=False), or train with the torch backend")
    found = [(module, module_params(module, by_module, sites)) for module in chosen]
    tied = {id(layer.embeddings): layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if getattr(layer, "tie_weights", False) is True and getattr(layer, "embeddings", None) is not None}
    for module, params in found:
        shared = [tied[id(variable)] for _, variable, _ in params if id(variable) in tied]
        if shared:  # the copy goes into the variables: the logits would read it too
            raise UnsupportedError(
                f"modules_to_save names {module!r}, whose matrix is also the logits projection of "
                f"{shared[0].path!r} (tied weights): its copy would change the logits too, which PEFT's does not (it "
                "swaps in the input embedding alone, the output layer keeps the base matrix)", key=module,
                pointer="/modules_to_save", hint="load this adapter with the torch backend")
    return found


def converter_modules(model: Any) -> dict[str, list[tuple[str, Any, Any]]]:
    """Every module path (and each of its ancestors) keras-hub's converter ports weights into -> (the parameter's
    name relative to it, the Keras variable, the converter's hook); empty for a model without a converter.

    >>> converter_modules(causal_lm)["model.norm"]                         # doctest: +SKIP
    [('weight', <Variable sequence_output_layernorm/scale>, <function ...>)]
    """
    by_module: dict[str, list[tuple[str, Any, Any]]] = {}
    for key, variable, hook in _records(model):
        parts = key.split(".")
        for i in range(1, len(parts)):
            by_module.setdefault(".".join(parts[:i]), []).append((".".join(parts[i:]), variable, hook))
    return by_module


def _refused_hint(field: str | None) -> str:
    return f"remove the module from {field}, or use the torch backend" if field else \
        "load this adapter with the torch backend"


def module_params(module: str, by_module: dict[str, list[tuple[str, Any, Any]]],
                  sites: dict[str, ModuleSite], field: str = "modules_to_save") -> list[Param]:
    """The parameters of ``module`` saved whole: from the converter's record, else of the one plain Keras layer
    its site is.

    :raises UnsupportedError: the converter does not lay a tensor out plainly, or the site is not one plain layer.
    """
    if module in by_module:
        shapes = _torch_shapes(sites.get(module))
        return [(param, variable, converter_layout(f"{module}.{param}", variable, hook, field, shapes.get(param)))
                for param, variable, hook in by_module[module]]
    params = _site_params(sites[module]) if module in sites else None
    if params is None:
        raise UnsupportedError(f"module {module!r} is not one plain Keras layer, so this backend cannot save it "
                               "whole", key=module, hint=_refused_hint(field))
    return params


def site_key(path: str) -> tuple[Any, ...]:
    """The key of a saved module's layer among the model state's adapter layers."""
    return ("modules_to_save", path)


class ModulesToSaveLayer:
    """A module saved whole: one copy per adapter; the first active adapter's copy is in the module's variables.

    It stands among the model state's adapter layers and answers the same questions (:meth:`parameters`,
    :meth:`set_active`, :meth:`merge`...), so loading, saving and switching treat it like an adapter layer.

    :param path: the spec module path (``lm_head``).
    :param params: the module's parameters (:func:`find_modules_to_save`).
    """

    #: The loader takes every parameter of this layer under its own key (not only a method's tensor names).
    saves_whole = True

    def __init__(self, path: str, params: list[Param]) -> None:
        self.site = ModuleSite(path, "saved", 0, 0, [])
        self.params = params
        self._refs: dict[str, dict[str, Ref]] = {}
        self._banks: dict[str, AdapterBank] = {}
        self._paths: dict[str, str] = {}
        self._prefixes: dict[str, str] = {}  # adapter -> before its tensors' names ("ln_tuning_layers.": LN tuning)
        self._active_names: list[str] = []
        self._running: str | None = None  # the adapter whose copy is in the variables now
        self._original: list[np.ndarray] | None = None  # the module's own values while a copy is in
        self._merged: str | None = None

    @property
    def variables(self) -> list[Any]:
        """The Keras variables of the module."""
        return [variable for _, variable, _ in self.params]

    def add_adapter(self, name: str, path: str, bank: AdapterBank, options: LoadOptions, *, prefix: str = "") -> None:
        """Reserve adapter ``name``'s copy in ``bank``: a copy of the current values once materialized
        (:meth:`finish_init`); a loaded adapter's values come from its file.

        :param prefix: put before the copy's tensor names (``"ln_tuning_layers."``: LN tuning, SPEC.md 15.3).
        """
        from .devices import target_of

        keys = {}
        for param, variable, layout in self.params:
            device, dtype = target_of(variable, options)
            keys[prefix + param] = GroupKey(param, layout.stored_shape, dtype, device, ("zeros",), False)
        self._refs[name] = bank.reserve_keys(keys)
        self._banks[name] = bank
        self._paths[name] = path
        self._prefixes[name] = prefix

    def prefix_of(self, name: str) -> str:
        """What adapter ``name`` puts before its tensors' names (``"ln_tuning_layers."`` for LN tuning)."""
        return self._prefixes[name]

    def finish_init(self, name: str) -> None:
        """After the bank is materialized: the copy starts as the module's values (PEFT's deep copy)."""
        values = self._original if self._original is not None else [ops.convert_to_numpy(v) for v in self.variables]
        prefix = self._prefixes[name]
        for (param, _, layout), value in zip(self.params, values):
            self._banks[name].assign(self._refs[name][prefix + param], layout.to_stored(layout.to_spec(value)))

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s copy; a merged one stays as the module's values (PEFT's ``merge_and_unload``)."""
        if name == self._merged:
            self._original = None  # the copy is the module now
            self._running, self._merged = None, None
        elif name == self._running:
            self._swap(None)
        self._refs.pop(name, None)
        self._banks.pop(name, None)
        self._paths.pop(name, None)
        self._prefixes.pop(name, None)
        self._active_names = [n for n in self._active_names if n != name]

    def adapter_names(self) -> list[str]:
        """The adapters holding a copy, in insertion order."""
        return list(self._refs)

    def path_of(self, name: str) -> str:
        """The spec module path adapter ``name`` gave this module."""
        return self._paths[name]

    def rename(self, name: str, path: str) -> None:
        """Give adapter ``name``'s copy another spec path (its keys use it)."""
        self._paths[name] = path

    def parameters(self, name: str) -> tuple[str, dict[str, Layout], dict[str, Ref]]:
        """Adapter ``name``'s module path, and its parameters' layouts and bank rows."""
        return self._paths[name], self.layouts(name), dict(self._refs[name])

    def layouts(self, name: str) -> dict[str, Layout]:
        """Parameter name (with adapter ``name``'s prefix) -> its :class:`~adapterspec_keras.layers.Layout`."""
        prefix = self._prefixes[name]
        return {prefix + param: layout for param, _, layout in self.params}

    def refs(self, name: str) -> dict[str, Ref]:
        """Parameter name -> where adapter ``name``'s copy of it lives in its bank."""
        return dict(self._refs[name])

    def bank(self, name: str) -> AdapterBank:
        """The bank holding adapter ``name``'s copy."""
        return self._banks[name]

    def saves_base_weight(self, name: str) -> bool:
        """Never: the copy's own parameters are what it saves."""
        return False

    def adapter_params(self, name: str) -> dict[str, Any]:
        """Parameter name (with adapter ``name``'s prefix) -> adapter ``name``'s copy of it (Keras layout)."""
        bank, prefix = self._banks[name], self._prefixes[name]
        out = {}
        for param, _, layout in self.params:
            value = bank.get(self._refs[name][prefix + param])
            out[prefix + param] = ops.transpose(value) if layout.spec_stored else value
        return out

    # -- switching -------------------------------------------------------------------------------
    def set_active(self, names: list[str]) -> None:
        """Put the copy of the first active adapter holding one into the variables (else the original values)."""
        self._active_names = list(names)
        self._swap(next((n for n in names if n in self._refs), None))

    def _swap(self, name: str | None) -> None:
        if name == self._running:
            return
        if self._running is None:
            self._original = [np.array(ops.convert_to_numpy(v)) for v in self.variables]
        if name is None:
            assert self._original is not None
            values = self._original
        else:
            copy, prefix = self.adapter_params(name), self._prefixes[name]
            values = [copy[prefix + param] for param, _, _ in self.params]
        for variable, value in zip(self.variables, values):
            variable.assign(ops.cast(value, variable.dtype))
        if name is None:
            self._original = None
        self._running = name

    @property
    def merged(self) -> list[str]:
        """The adapter whose copy was running when merged, if any."""
        return [self._merged] if self._merged is not None else []

    def in_variables(self) -> list[str]:
        """The adapter whose copy is in the module's variables now (running), if any."""
        return [self._running] if self._running is not None else []

    def runs(self, piece: Any = None) -> bool:
        """Never in a patched ``call``: the copy is in the variables."""
        return False

    def running_of(self, names: Sequence[str]) -> list[Running]:
        """The adapters of ``names`` holding a copy here, as the SDK's :func:`~adapterspec._mix.mix_refusal` judges
        whether they may run together (one copy runs at a time; PEFT 0.21 refuses more, SPEC.md 15.3)."""
        return [Running(n, SAVED_WHOLE) for n in names if n in self._refs]

    def check_merge(self, names: list[str]) -> None:
        """Refuse merging an LN tuning copy that is not the one running (PEFT merges one at a time; merging only
        marks the running copy).

        :raises UnsupportedError: naming the module.
        """
        for name in names:
            if self._prefixes.get(name) and name != self._running:
                raise UnsupportedError(f"LN tuning adapter {name!r} is not the one running on {self.site.path!r}, so "
                                       "it cannot merge", key=self.site.path,
                                       hint="activate it alone, then merge")

    def merge(self, names: list[str]) -> None:
        """Mark the copy running now as merged if it belongs to one of ``names``: deleting its adapter keeps it."""
        if self._merged is None and self._running in names:
            self._merged = self._running

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        self._merged = None
