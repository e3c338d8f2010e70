"""Auxiliary tensors on Keras (SPEC.md 5.3, 8.8): base-model variables an adapter's file replaces.

The mirror of :mod:`adapterspec_torch.auxiliary`. A PEFT folder may hold, besides the method's tensors, full
tensors that replace the base model's while the adapter is loaded: an embedding saved whole
(``<emb>.weight``, PEFT's ``save_embedding_layers``) and trained biases (``bias="lora_only"``:
``<m>.base_layer.bias``; ``bias="all"``: also ``<m>.bias`` of any module). Each is written into the Keras
variable(s) holding that tensor -- found through the module's site (the Keras layers and index maps that compute
it: a GPT-2 ``c_attn`` bias goes to the query, key and value layers' biases), else through keras-hub's converter
record (a layer norm's ``beta``) -- so tied weights (a ``ReversibleEmbedding``'s ``embeddings``) stay tied. The
variable's value before comes back when the adapter is deleted (:func:`restore`); as in PEFT the replacement stays
in place while another adapter is active, or none. Saving writes the file's tensors again
(:func:`auxiliary_tensors`). A resized vocabulary is refused (``ShapeMismatchError``): keras-hub models are not
resized here. The ``<m>.base_layer.weight`` of an adapted layer is the adapter layer's own business
(:meth:`~adapterspec_keras.layers.AdapterLayer.replace_base_weight`).

>>> plan = plan_auxiliary(model, key, name, (64,), owner, sites, options)      # doctest: +SKIP
>>> apply_overrides(state, "default", {key: plan}, arrays)                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._merge import replaced_tensor_refusal
from adapterspec.config import velora_state_size
from adapterspec.errors import ShapeMismatchError, TargetNotFoundError, UnexpectedTensorError, UnsupportedError
from adapterspec.naming import EMBEDDING_NAMES, VELORA_STATE, TensorName, embedding_error, make_key

from . import _ops
from .bank import _np_dtype
from .layers import AdapterLayer
from .sites import ModuleSite, Piece
from .switch import ModelState

__all__ = ["Override", "Target", "absent_module", "absent_modules", "apply_overrides", "auxiliary_tensors",
           "embedding_modules", "fresh_bias_overrides", "fresh_velora_state", "plan_auxiliary", "restore",
           "restore_refusal"]

#: (the variable's value, the file's tensor) -> the variable's new value.
Writer = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(eq=False)
class Target:
    """One Keras variable a file tensor is written into, and how.

    :param variable: the Keras variable.
    :param write: (its value, the tensor in the file's layout) -> its new value.
    """

    variable: Any
    write: Writer


@dataclass(eq=False)
class Override:
    """A base-model variable whose value an adapter replaced while it is loaded.

    :param keys: the canonical keys that wrote it (two when a file names both of two tied layers).
    :param variable: the Keras variable.
    :param old: its value before; it comes back on delete (unless a later adapter replaced it again, which
        then inherits it: ``superseded_by``).
    :param new: the value this adapter gave it.
    :param superseded_by: the override of an adapter loaded later that replaced the variable again, or ``None``.
    """

    keys: list[str]
    variable: Any
    old: np.ndarray
    new: np.ndarray
    superseded_by: Override | None = field(default=None, repr=False)


def _not_taken(key: str, module: str, why: str) -> UnexpectedTensorError:
    return UnexpectedTensorError(f"module {module!r} {why}", key=key,
                                 hint="check the config (target_modules, bias) matches the tensors")


def absent_module(model: Any, key: str, module: str) -> TargetNotFoundError:
    """Check 18: tensor ``key`` names ``module``, which the Keras model does not have (see :func:`absent_modules`)."""
    return absent_modules(model, [module], key, f"the key names module {module!r}, which has")


def absent_modules(model: Any, modules: list[str], key: str, what: str = "") -> TargetNotFoundError:
    """Check 18: the adapter's ``modules`` (``key`` the first) have no counterpart in the Keras model.

    On a keras-hub model whose converter ports none of their weights, keras-hub does not build them (XLM-RoBERTa's
    and ESM's ``pooler.dense``, ESM's ``contact_head.regression``): a ``module_map`` helps only if the model has
    them under other names, so the fix says that and the others (the torch backend; the adapter made without them).

    :param what: the message's subject (default: ``"modules [...] of the adapter have"``).

    >>> str(absent_modules(xlm_roberta, ["pooler.dense"], "pooler.dense"))          # doctest: +SKIP
    "pooler.dense: modules ['pooler.dense'] of the adapter have no counterpart ... (XLMRobertaBackbone does not ..."
    """
    from .converters import backbone_of
    from .modules_to_save import converter_modules

    what = what or f"modules {modules} of the adapter have"
    ported = converter_modules(model)
    if not ported or any(module in ported for module in modules):  # no converter: the layers have other names
        return TargetNotFoundError(f"{what} no counterpart in this Keras model", key=key,
                                   hint="pass module_map={spec module path: keras layer path}")
    return TargetNotFoundError(
        f"{what} no counterpart in this Keras model: keras-hub's converter ports none of their weights "
        f"({type(backbone_of(model)).__name__} does not build them)", key=key,
        hint=f"if this Keras model has them under other names, pass module_map={{spec module path: keras layer "
             f"path}}; else load this adapter with the torch backend, or make it without them (PEFT's "
             f"exclude_modules={modules!r})")


def _bias_targets(site: ModuleSite, key: str, shape: tuple[int, ...]) -> list[Target]:
    """The bias variables of ``site``'s pieces, each taking its outputs' entries of the file's ``[out]`` bias."""
    module = site.path
    if site.kind == "embedding" or not site.pieces:
        raise _not_taken(key, module, "has no bias")
    biases = [piece.bias_variable for piece in site.pieces]
    if all(b is None for b in biases):  # check 19 before 21, as on torch
        raise _not_taken(key, module, f"has no bias (Keras layer(s) {[p.layer.path for p in site.pieces]})")
    if shape != (site.out_features,):
        raise ShapeMismatchError(f"shape {list(shape)} does not fit the bias of {module!r}: expected "
                                 f"[{site.out_features}]", key=key,
                                 hint="the adapter was trained for another base model (or a different size)")
    targets = []
    for piece, bias in zip(site.pieces, biases):
        if bias is None or (piece.out_slice is None and tuple(int(d) for d in bias.shape) != piece.out_shape) or \
                (piece.out_slice is not None and len(bias.shape) != 1):
            raise UnsupportedError(f"the bias of {module!r} does not map onto Keras layer {piece.layer.path!r}'s "
                                   f"bias ({None if bias is None else list(bias.shape)}, outputs {list(piece.out_shape)})",
                                   key=key, hint="load this adapter with the torch backend")
        targets.append(Target(bias, _bias_writer(piece)))
    return targets


def _bias_writer(piece: Piece) -> Writer:
    index, out_slice = piece.out_index, piece.out_slice

    def write(value: np.ndarray, tensor: np.ndarray) -> np.ndarray:
        taken: np.ndarray = np.asarray(tensor)[index]
        if out_slice is None:
            return taken.astype(value.dtype)
        new = value.copy()
        new[out_slice[0]:out_slice[1]] = taken.ravel()
        return new

    return write


def _weight_targets(site: ModuleSite, key: str, shape: tuple[int, ...]) -> list[Target]:
    """The kernel (embeddings) variable of a module that is one plain Keras layer, for its whole weight."""
    piece = site.pieces[0] if site.pieces else None
    if piece is None or len(site.pieces) != 1 or piece.out_slice is not None or site.kind == "conv" or \
            not np.array_equal(piece.in_index.ravel(), np.arange(site.in_features)) or \
            not np.array_equal(piece.out_index.ravel(), np.arange(site.out_features)):
        raise UnsupportedError(f"an embedding saved whole can only replace a module that is one plain Keras layer; "
                               f"{site.path!r} is not", key=key, hint="load this adapter with the torch backend")
    expected = (site.in_features, site.out_features) if site.kind == "embedding" else \
        (site.out_features, site.in_features)
    if shape != expected:
        rows = len(shape) == 2 and shape[1] == expected[1] and shape[0] != expected[0]
        hint = (f"the vocabulary was resized in training ({shape[0]} rows, the Keras model has {expected[0]}): "
                "keras-hub models cannot be resized here; load it with the torch backend after "
                "model.resize_token_embeddings") if rows else \
            "the adapter was made for a model of other dimensions"
        raise ShapeMismatchError(f"shape {list(shape)} does not fit {piece.layer.path!r}: expected {list(expected)}",
                                 key=key, hint=hint)
    embedding = site.kind == "embedding"

    def write(value: np.ndarray, tensor: np.ndarray) -> np.ndarray:
        flat = np.asarray(tensor) if embedding else np.asarray(tensor).T
        return np.asarray(ops.convert_to_numpy(_ops.kernel_from_flat(piece, ops.convert_to_tensor(flat)))) \
            .astype(value.dtype)

    return [Target(piece.kernel_variable, write)]


def _converter_targets(model: Any, module: str, param: str, key: str, shape: tuple[int, ...]) -> list[Target] | None:
    """``param`` of ``module`` as keras-hub's converter ports it (a copy or a transpose), or ``None``."""
    from .modules_to_save import converter_layout, converter_modules

    entries = [(variable, hook) for p, variable, hook in converter_modules(model).get(module, []) if p == param]
    if not entries:
        return None
    if len(entries) > 1:
        raise UnsupportedError(f"keras-hub's converter spreads {key!r} over several variables", key=key,
                               hint="load this adapter with the torch backend")
    variable, hook = entries[0]
    size = int(np.prod([int(d) for d in variable.shape]))
    layout = converter_layout(key, variable, hook, None, shape if int(np.prod(shape)) == size else None)
    if shape != tuple(layout.spec_shape):
        raise ShapeMismatchError(f"shape {list(shape)} does not fit {variable.path!r}: expected "
                                 f"{list(layout.spec_shape)}", key=key,
                                 hint="the adapter was trained for another base model (or a different size)")
    return [Target(variable, lambda value, tensor: np.asarray(layout.to_keras(np.asarray(tensor))).astype(value.dtype))]


def embedding_modules(model: Any, sites: dict[str, ModuleSite]) -> dict[str, ModuleSite] | None:
    """The model's input and output embeddings (PEFT's ``get_input_embeddings()`` / ``get_output_embeddings()``,
    the modules its ``save_embedding_layers`` saves whole) by spec module path: the sites computed by keras-hub's
    ``token_embedding`` (its lookup, and its reverse -- tied or not -- for the logits); ``None`` for a model
    without one (a plain Keras model). The mirror of :func:`adapterspec_torch.auxiliary.embedding_modules`.

    >>> sorted(embedding_modules(gpt2_causal_lm, spec_sites(gpt2_causal_lm, LoadOptions())))  # doctest: +SKIP
    ['lm_head', 'transformer.wte']
    """
    from .converters import backbone_of

    token = getattr(backbone_of(model), "token_embedding", None)
    if token is None:
        return None
    return {path: site for path, site in sites.items()
            if site.pieces and all(p.layer is token and p.kind in ("embedding", "reverse") for p in site.pieces)}


def _embedding_error(model: Any, key: str, module: str, site: ModuleSite | None,
                     sites: dict[str, ModuleSite]) -> UnexpectedTensorError | None:
    """:func:`adapterspec.naming.embedding_error`, the module's site compared with those of ``token_embedding``."""
    embeddings = embedding_modules(model, sites)
    is_embedding = site is not None and embeddings is not None and \
        any(other.key == site.key for other in embeddings.values())
    return embedding_error(key, module, embeddings, is_embedding, "no token_embedding")


def plan_auxiliary(model: Any, key: str, name: TensorName, shape: tuple[int, ...], owner: Any,
                   sites: Callable[[], dict[str, ModuleSite]], options: LoadOptions) -> list[Target]:
    """Where auxiliary tensor ``key`` (role ``"bias"`` or ``"embedding"``) goes, checked against the model.

    :param owner: the adapter layer of ``name.module`` for this adapter, or ``None``.
    :param sites: the model's sites (:func:`~adapterspec_keras.mapping.spec_sites`), computed on demand.
    :raises TargetNotFoundError: the module has no counterpart in the Keras model.
    :raises UnexpectedTensorError: the module has no such tensor (no bias; a ``base_layer`` of a module this
        adapter does not adapt).
    :raises ShapeMismatchError: the shape does not fit (a resized vocabulary: with a hint).
    :raises UnsupportedError: the Keras layers hold the tensor in a way this backend does not write.
    """
    from .mapping import find_site

    module = name.module
    if name.param == "base_layer.bias":
        if owner is None:
            if find_site(sites(), module) is None:
                raise absent_module(model, key, module)
            raise _not_taken(key, module, "has no adapter of this adapter, so no base_layer")
        return _bias_targets(owner.site, key, shape)
    site = owner.site if owner is not None else find_site(sites(), module)
    if name.role == "embedding":
        from .modules_to_save import converter_modules

        refused = _embedding_error(model, key, module, site, sites())
        exists = site is not None or module in converter_modules(model)
        # a key no model could account for is check 8's; a missing embedding transformers names, check 18's
        if refused is not None and (exists or module.rpartition(".")[2] not in EMBEDDING_NAMES):
            raise refused
        if site is None:
            raise absent_module(model, key, module)
        if name.param != "weight":
            raise UnsupportedError(f"{name.param!r} of an embedding saved whole ({module!r}): keras-hub's embedding "
                                   "layers have no such variable", key=key, hint="load this adapter with the torch backend")
        return _weight_targets(site, key, shape)
    if site is not None and site.pieces:
        return _bias_targets(site, key, shape)
    found = _converter_targets(model, module, name.param, key, shape)
    if found is None:
        raise absent_module(model, key, module)
    return found


def apply_overrides(state: ModelState, adapter_name: str, plan: Mapping[str, list[Target]],
                    arrays: Mapping[str, Any]) -> None:
    """Write the planned tensors into their variables (a variable several keys name takes them in file order: the
    last one's values where they overlap, as PEFT's ``load_state_dict`` would leave them) and keep them to save.
    """
    groups: dict[int, tuple[Any, list[tuple[str, Writer]]]] = {}
    for key, targets in plan.items():
        for target in targets:
            groups.setdefault(id(target.variable), (target.variable, []))[1].append((key, target.write))
    tops = {id(o.variable): o for overrides in state.base_weights.values() for o in overrides
            if o.superseded_by is None}
    mine = state.base_weights.setdefault(adapter_name, [])
    for variable_id, (variable, writes) in groups.items():
        before = tops.get(variable_id)
        old = before.new if before is not None else np.array(ops.convert_to_numpy(variable))
        new = old
        for key, write in writes:
            new = write(new, arrays[key])
        variable.assign(new)
        override = Override(list(dict.fromkeys(k for k, _ in writes)), variable, old, new)
        if before is not None:
            before.superseded_by = override
        mine.append(override)
    kept = state.auxiliary.setdefault(adapter_name, {})
    for key in plan:
        kept[key] = np.ascontiguousarray(arrays[key]).copy()


def _current(key: str, targets: list[Target], shape: tuple[int, ...]) -> np.ndarray:
    """The tensor in the file's layout that ``targets`` hold now (the inverse of their writers, found by writing
    index values): what PEFT saves for a bias it has not trained yet.

    :raises UnsupportedError: the variables do not hold every entry of the tensor.
    """
    size = int(np.prod(shape))
    out = np.zeros(size, dtype=np.float64)
    seen = np.zeros(size, dtype=bool)
    dtype: Any = None
    for target in targets:
        value = np.asarray(ops.convert_to_numpy(target.variable))
        dtype = value.dtype if dtype is None else dtype
        where = np.asarray(target.write(np.full(value.shape, -1.0), np.arange(size, dtype=np.float64).reshape(shape)))
        taken = where >= 0
        out[where[taken].astype(np.int64)] = value[taken]
        seen[where[taken].astype(np.int64)] = True
    if not seen.all():
        raise UnsupportedError(f"the Keras variables do not hold every entry of {key!r}", key=key,
                               hint="set bias to 'none', or use the torch backend")
    return out.reshape(shape).astype(dtype)


def fresh_bias_overrides(model: Any, state: ModelState, config: AdapterConfig, adapter_name: str,
                         options: LoadOptions) -> None:
    """For a new adapter with ``bias`` = ``"lora_only"``/``"all"``: keep the (untrained) biases PEFT saves, as
    on torch -- ``<m>.base_layer.bias`` of its adapted modules that have one; with ``"all"`` also ``<m>.bias`` of
    every other module keras-hub's converter ports a bias into (a layer norm's ``beta``), or whose site has one.
    They are saved as they are (the Keras backend does not train them: ``inject`` refuses ``trainable``).

    :raises UnsupportedError: a bias the Keras variables do not hold whole.
    """
    from .mapping import spec_sites
    from .modules_to_save import _records

    bias = config.get("bias") if config.peft_type == "LORA" else None
    if bias not in ("lora_only", "all"):
        return
    mine = {layer.path_of(adapter_name): layer for layer in state.adapter_layers.values()
            if isinstance(layer, AdapterLayer) and adapter_name in layer.adapter_names()}
    sites: dict[str, ModuleSite] | None = None

    def get_sites() -> dict[str, ModuleSite]:
        nonlocal sites
        if sites is None:
            sites = spec_sites(model, options)
        return sites

    wanted: dict[str, tuple[str, AdapterLayer | None]] = {}  # key -> (module, owner)
    for path, layer in mine.items():
        if any(piece.bias_variable is not None for piece in layer.site.pieces):
            wanted[make_key(path, "base_layer.bias")] = (path, layer)
    if bias == "all":
        modules = [key[: -len(".bias")] for key, _, _ in _records(model) if key.endswith(".bias")]
        if not modules:
            modules = [path for path, site in get_sites().items()
                       if any(piece.bias_variable is not None for piece in site.pieces)]
        for module in dict.fromkeys(modules):
            if module in mine:
                continue
            wanted[make_key(module, "bias")] = (module, None)
    plan: dict[str, list[Target]] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, (module, owner) in wanted.items():
        param = "base_layer.bias" if owner is not None else "bias"
        name = TensorName(key=key, module=module, param=param, role="bias")
        shape = (owner.site.out_features,) if owner is not None else _bias_shape(model, module, get_sites)
        plan[key] = plan_auxiliary(model, key, name, shape, owner, get_sites, options)
        arrays[key] = _current(key, plan[key], shape)
    apply_overrides(state, adapter_name, plan, arrays)


def _bias_shape(model: Any, module: str, sites: Callable[[], dict[str, ModuleSite]]) -> tuple[int, ...]:
    """The ``[out]`` shape of ``module``'s bias: its site's outputs, else the converter's variable."""
    from .mapping import find_site
    from .modules_to_save import converter_modules

    site = find_site(sites(), module)
    if site is not None and site.pieces:
        return (site.out_features,)
    for param, variable, _ in converter_modules(model).get(module, []):
        if param == "bias":
            return tuple(int(d) for d in variable.shape)
    raise absent_module(model, make_key(module, "bias"), module)


def fresh_velora_state(state: ModelState, config: AdapterConfig, adapter_name: str, layers: list[Any]) -> None:
    """For a new adapter with ``velora_config``: the ``lora_velora_embed`` PEFT gives each adapted module at creation
    (zeros of ``[ceil(in_features / num_groups)]`` in the base kernel's dtype; ``init_type`` ``"random"``: a random
    unit vector), kept to be saved, so that PEFT loads the saved folder without a missing key (SPEC.md 5.2)."""
    velora = config.get("velora_config")
    for layer in layers:
        if not isinstance(layer, AdapterLayer) or adapter_name not in layer._slots:
            continue
        size = velora_state_size(config, layer.site.in_features)
        if size is None:
            return
        dtype = _np_dtype(str(layer.site.pieces[0].kernel_variable.dtype))
        if isinstance(velora, Mapping) and velora.get("init_type") == "random":
            value = np.random.default_rng().standard_normal(size)
            value = (value / np.linalg.norm(value)).astype(np.float32).astype(dtype)
        else:
            value = np.zeros(size, dtype=dtype)
        state.auxiliary.setdefault(adapter_name, {})[make_key(layer.path_of(adapter_name), VELORA_STATE)] = value


def restore(state: ModelState, adapter_name: str, *, unloading: bool = False) -> None:
    """Give back the values ``adapter_name`` replaced and forget its tensors.

    While ``unloading`` with any adapter merged (``unload(merge=True)``), the replacements stay, as on torch. Where a
    later adapter replaced a variable again, that adapter inherits the value to restore. (``delete_adapter`` with
    another adapter merged: :func:`restore_refusal` first.)
    """
    overrides = state.base_weights.pop(adapter_name, [])
    state.auxiliary.pop(adapter_name, None)
    if state.merged and unloading:
        return
    others = [o for overrides_ in state.base_weights.values() for o in overrides_]
    for override in overrides:
        before = next((o for o in others if o.superseded_by is override), None)
        if override.superseded_by is not None:
            override.superseded_by.old = override.old
        else:
            override.variable.assign(override.old)
        if before is not None:
            before.superseded_by = override.superseded_by


def restore_refusal(state: ModelState, adapter_name: str) -> UnsupportedError | None:
    """Why the values ``adapter_name``'s file replaced cannot come back exactly now, or ``None``: one is in a layer a
    merged adapter is merged into (a merge may have written into it -- IA3 scales the bias -- and restoring the old
    value would drop that delta). The same rule as torch's function of the same name.

    >>> restore_refusal(get_state(model), "v")                           # doctest: +SKIP
    """
    if not state.merged:
        return None
    merged: dict[int, tuple[str, str]] = {}  # id(variable) -> (module path, a merged adapter)
    for layer in state.adapter_layers.values():
        if layer.merged:
            for piece in layer.site.pieces:
                for variable in piece.layer.weights:
                    merged.setdefault(id(variable), (layer.site.path, layer.merged[0]))
    for override in state.base_weights.get(adapter_name, []):
        if override.superseded_by is not None:
            continue  # replaced again by a later adapter: that one inherits the value to restore
        found = merged.get(id(override.variable))
        if found is not None:
            return replaced_tensor_refusal(adapter_name, override.keys[0] if override.keys else override.variable.path,
                                           *found)
    return None


def auxiliary_tensors(state: ModelState, adapter_name: str) -> dict[str, np.ndarray]:
    """Canonical key -> tensor (the file's, as loaded) of every auxiliary tensor ``adapter_name`` saves again.

    >>> auxiliary_tensors(get_state(model), "default")                 # doctest: +SKIP
    {'base_model.model.model.embed_tokens.weight': array(...)}
    """
    return dict(state.auxiliary.get(adapter_name, {}))
