"""Injecting adapters: find the targeted modules, give them adapter layers, patch the Keras layers' ``call``.

How a layer of a built (functional) keras-hub model is wrapped. Keras' own ``enable_lora`` adds
variables to the layer and branches inside ``Dense.call``; keras-hub models call their sublayers
from Python (``self._query_dense(x)``) and the functional graph calls its nodes' layers, all through
``Layer.__call__``, which runs ``self.call``. So the layer object stays where it is and only its
``call`` is replaced, on the instance, by a dispatcher that runs the original ``call`` (with the
activation / logit soft-cap held back) and adds the active adapters' parts (PEFT adds the delta
before the activation). The adapter variables live in the adapter's :class:`~adapterspec_keras.bank.AdapterBank`, tracked
as a sublayer of a wrapped layer, so ``model.trainable_variables`` -- and ``fit`` -- see them.
This works in eager calls, in ``tf.function``-traced ``fit``/``predict``/``generate`` (Python state is
read at trace time; every change drops the traced functions) and needs no rebuild of the graph.
:func:`unwrap` deletes the instance attribute (or restores a previous one), so the layer is the very
object it was, with its original ``call`` and sublayers.

>>> inject(model, AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"]}),
...        "default", LoadOptions())                                  # doctest: +SKIP
['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj']
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._lora_init import acted_init
from adapterspec._moe import check_moe_conversion
from adapterspec._vblora import topk_only
from adapterspec.config import peft_fan_in_fan_out, training_refusals, unsupported_features
from adapterspec.errors import AdapterExistsError, AdapterSpecWarning, TargetNotFoundError, UnsupportedError
from adapterspec.targets import is_all_linear, refuse_containers

from .bank import AdapterBank
from .converters import backbone_of, converter_sites
from .devices import check_options, target_of
from .guard import guard_save, unguard_save
from .layers import AdapterLayer, check_supported
from .mapping import find_site, spec_sites
from .modules_to_save import ModulesToSaveLayer, find_modules_to_save
from .modules_to_save import site_key as saved_key
from .ln_tuning import LN_PREFIX, find_ln_targets, split_norms
from .ln_tuning import METHOD as LN_TUNING
from .parameters import EXPERT_TABLE, ParameterLayer, ParameterTarget, find_parameter_targets
from .quantized import hint as quantized_hint
from .quantized import quantization, refuse_unmapped
from .tokens import METHOD as TOKEN_METHOD
from .tokens import DELTA, find_token_targets, method_token_targets
from . import vblora, vera
from .sites import ModuleSite, Piece, model_layers
from .reach import (note_entry, parents_of, reach_report, read_through_kernel, read_through_refusal, reads_through,
                    refuse, restore_kernel)
from .switch import (
    ModelState,
    drop_state_if_empty,
    get_state,
    invalidate,
    note_caller,
    note_patched,
    park_inactive,
    watch_compiled,
)
from .tying import check_tied_layer, tie, tie_rewrite, tied_heads, tied_layers

__all__ = ["check_features", "expand_all_linear", "find_targets", "inject", "remove_adapter_modules", "resolve_module", "site_key",
           "unwrap", "wrap"]


def site_key(site: ModuleSite) -> tuple[Any, ...]:
    """Identity of a module's Keras side: its pieces' layers and roles (two spec names may share it)."""
    return site.key


def resolve_module(model: Any, path: str, options: LoadOptions) -> ModuleSite | None:
    """The Keras site of spec module ``path`` (through ``options.module_map``), or ``None``.

    >>> resolve_module(model, "model.layers.0.self_attn.q_proj", LoadOptions()).pieces[0].layer.path  # doctest: +SKIP
    'transformer_layer_0/self_attention/query'
    """
    return find_site(spec_sites(model, options), path)


def _entry_matches(entry: str, path: str) -> bool:
    return path == entry or path.endswith("." + entry)


def find_targets(model: Any, config: AdapterConfig, options: LoadOptions | None = None) -> list[str]:
    """The spec module paths ``config`` adapts in ``model``, in model order (PEFT's matching rules).

    Every entry of a list ``target_modules`` must name at least one mapped module: a module that
    exists in the transformers model but has no Keras counterpart is an error, never skipped. (A load
    relaxes this: its file's tensors show which modules were adapted, see :func:`_match`.)

    :raises TargetNotFoundError: nothing matches, or a ``target_modules`` entry has no mapped module.

    >>> find_targets(model, cfg)                                        # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', ...]
    """
    return _match(model, spec_sites(model, options), config)


def expand_all_linear(model: Any, config: AdapterConfig, sites: dict[str, ModuleSite],
                      model_type: str | None = None) -> AdapterConfig:
    """``config`` with ``target_modules: "all-linear"`` replaced by the paths it stands for (SPEC.md 4.3, as the
    torch backend's function of the same name): every module PEFT sees as ``nn.Linear`` / ``Conv1D`` (a
    ``Dense`` or ``EinsumDense`` site) except the output layer (a ``ReversibleEmbedding``'s projection) and, on a
    MoE ``model_type``, the router: a ``Dense`` in keras-hub, a module holding a parameter in transformers 5
    (:data:`~adapterspec_keras.parameters.EXPERT_TABLE`), which PEFT's ``all-linear`` does not adapt.

    :raises TargetNotFoundError: the model has no such module.

    >>> expand_all_linear(model, AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": "all-linear"}),
    ...                   spec_sites(model, None))["target_modules"]                      # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', ...]
    """
    if not is_all_linear(config.get("target_modules")):
        return config
    # a layer reachable under several spec paths (its Keras name and a module_map/converter path) counts once,
    # under the path a torch model would give it
    rank = {"module_map": 0, "converter": 1}
    chosen: dict[tuple[Any, ...], str] = {}
    not_linear = set(_parameter_modules(sites, model_type))
    for path, site in sites.items():
        if site.kind == "linear" and site.key not in not_linear and \
                not any(piece.kind == "reverse" for piece in site.pieces):
            held = chosen.get(site.key)
            if held is None or rank.get(site.source, 2) < rank.get(sites[held].source, 2):
                chosen[site.key] = path
    names = sorted(chosen.values(), key=list(sites).index)
    if not names:
        raise TargetNotFoundError(f"target_modules is 'all-linear' but this {type(model).__name__} has no linear "
                                  "module other than its output layer", pointer="/target_modules",
                                  hint="list the modules to adapt in target_modules")
    return config.replace(target_modules=names)


def _parameter_modules(sites: dict[str, ModuleSite], model_type: str | None) -> dict[tuple[Any, ...], str]:
    """Site key -> path of the sites that transformers 5 holds as a module's parameter on a MoE ``model_type``
    (:data:`~adapterspec_keras.parameters.EXPERT_TABLE`: the router, a ``Dense`` in keras-hub)."""
    table = EXPERT_TABLE.get(model_type or "", ())
    return {site.key: path for path, site in sites.items() if any(path.endswith("." + e.module) for e in table)}


def _refuse_parameter_modules(paths: list[str], sites: dict[str, ModuleSite], model_type: str | None) -> None:
    """Refuse a module adapter on a MoE router: transformers 5 holds it as a parameter of a router module that is
    not an ``nn.Linear``, which PEFT cannot adapt as a module (a folder saved so would not load in PEFT)."""
    routers = _parameter_modules(sites, model_type)
    for path in paths:
        if sites[path].key in routers:
            raise UnsupportedError(
                f"module {path!r} is the MoE router of this {model_type} model: transformers 5 holds it as the "
                "parameter of a router module that is not a linear layer, which PEFT cannot adapt as a module",
                key=path, pointer="/target_modules",
                hint="adapt the router with LoRA target_parameters: ['gate.weight'] (SPEC.md 15.1)")


def _mapped_layers(sites: dict[str, ModuleSite]) -> list[Any]:
    """The Keras layers the sites found (each piece's layer)."""
    return [piece.layer for site in sites.values() for piece in site.pieces]


def _match(model: Any, sites: dict[str, ModuleSite], config: AdapterConfig, *, allow_empty: bool = False,
           every_entry: bool = True) -> list[str]:
    """The targeted paths (see :func:`find_targets`).

    :param every_entry: refuse a ``target_modules`` entry that names no mapped module. A load passes ``False``:
        its file's tensors say which modules PEFT adapted, and a tensor of a module without a Keras counterpart
        is refused by ``load_state``; an entry with neither is one PEFT ignored too (a config written for
        several architectures, ``["q_proj", "v_proj", "query_key_value"]``).
    """
    # a module known by two names (the checkpoint key and transformers 5's module path) takes the adapter once,
    # under the first name that matches; loading renames it to the name the file uses
    taken: set[tuple[Any, ...]] = set()
    targets = []
    for path, site in sites.items():
        if config.matches(path) and site.key not in taken:
            taken.add(site.key)
            targets.append(path)
    refuse_containers(config.matches, sites, config.peft_type)
    wanted = config.get("target_modules")
    if every_entry and isinstance(wanted, (list, tuple, set)):
        missing = sorted(e for e in wanted if not any(_entry_matches(e, p) for p in sites))
        if missing:
            refuse_unmapped(model, _mapped_layers(sites))
            raise TargetNotFoundError(
                f"target_modules {missing} match no layer of this {type(model).__name__} "
                f"(mapped modules: {_summary(sites)})", key=",".join(missing),
                hint="pass module_map={spec module path: keras layer path} for them, or remove them from target_modules")
    if not targets and not allow_empty:  # allow_empty: target_parameters selects parameters (SPEC.md 15.1)
        refuse_unmapped(model, _mapped_layers(sites))
        raise TargetNotFoundError(
            f"no module of this {type(model).__name__} matches target_modules={wanted!r} "
            f"(mapped modules: {_summary(sites)})", pointer="/target_modules",
            hint="check target_modules / layers_to_transform, or pass module_map for a hand-built model")
    return targets


def _refuse_quantized_copies(model: Any, sites: dict[str, ModuleSite],
                             token_targets: list[tuple[str, list[int], str | None]],
                             saved: list[tuple[str, list[Any]]]) -> None:
    """Token rows and modules saved whole replace or copy a layer's weights, which a quantized layer holds packed
    or scaled (SPEC.md 6.8), as the torch backend refuses them. A module saved whole is quantized where one of its
    layers is, or where a weight the converter recorded is no longer a variable of the model (``model.quantize``
    replaced it) or not a floating-point one.

    :raises UnsupportedError: naming the module and the quantized layer.
    """
    def quantized_layers(path: str) -> list[Any]:
        site = sites.get(path)
        return [piece.layer for piece in site.pieces if quantization(piece.layer)] if site else []

    for path, _, _ in token_targets:
        layers = quantized_layers(path)
        if layers:
            raise UnsupportedError(f"trainable token rows replace rows of {type(layers[0]).__name__} "
                                   f"{layers[0].path!r}, which is quantized ({quantization(layers[0])})", key=path,
                                   hint=quantized_hint(layers))
    current = {id(variable) for variable in model.variables} if saved else set()
    for path, params in saved:
        layers = quantized_layers(path)
        stale = [v for _, v, _ in params if id(v) not in current or
                 not str(getattr(v, "dtype", "")).startswith(("float", "bfloat")) or "float8" in str(v.dtype)]
        if layers or stale:
            where = layers[0].path if layers else _layer_path(stale[0]) or path
            raise UnsupportedError(f"a module saved whole (modules_to_save) cannot hold a quantized layer ({where!r}): "
                                   "the adapter's file carries its floating-point weights", key=path,
                                   hint=quantized_hint(layers or [_layer_path(v) for v in stale]))


def _layer_path(variable: Any) -> str:
    """The path of the layer a Keras variable belongs to (``'a/b/kernel'`` -> ``'a/b'``)."""
    return str(getattr(variable, "path", "")).rpartition("/")[0]


def _summary(sites: dict[str, ModuleSite]) -> str:
    names = sorted({re.sub(r"\.\d+\.", ".N.", p) for p in sites})
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "none"


def check_features(config: AdapterConfig) -> None:
    """Refuse config features (LoRA variants) whose math this backend does not implement.

    :raises UnsupportedError: with the JSON pointer of the field.

    >>> from adapterspec import AdapterConfig
    >>> check_features(AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "use_qalora": True}))
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: /use_qalora: ...
    """
    for pointer, reason in unsupported_features(config):  # the spec's list (SPEC.md 10, check 5)
        raise UnsupportedError(reason, pointer=pointer, hint="load this adapter with PEFT itself")


def inject(model: Any, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> list[str]:
    """Add adapter ``adapter_name`` to every module ``config`` targets (inactive), all or nothing.

    Each targeted module gets (or shares) an :class:`~adapterspec_keras.layers.AdapterLayer`; the
    Keras layers it maps to get their ``call`` patched (:func:`wrap`). With ``options.trainable`` (and
    ``options.freeze_base``, the default), the adapters' variables are the only trainable ones afterwards.

    :returns: the module paths that received the adapter.
    :raises AdapterExistsError: the name is taken.
    :raises TargetNotFoundError: no module matches, or a target has no Keras counterpart.
    :raises UnsupportedError: a target's layer type cannot take this method, or the model's forward does not
        run its layer's ``call`` (:func:`~adapterspec_keras.reach.check_reached`; names the module).

    >>> inject(model, cfg, "default", LoadOptions())                    # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', ...]
    """
    check_options(options)
    state = get_state(model)
    if state is not None and adapter_name in state.names:
        raise AdapterExistsError(f"the model already has an adapter named {adapter_name!r}", key=adapter_name,
                                 hint="delete it first, or choose another name")
    check_features(config)
    for pointer, reason, hint in training_refusals(config) if options.trainable else ():
        raise UnsupportedError(reason, pointer=pointer, hint=hint)
    if options.trainable and config.peft_type == "LORA" and config.get("bias", "none") != "none":
        raise UnsupportedError(f"bias={config.get('bias')!r} trains the base model's biases, which the keras backend "
                               "keeps frozen (it loads and saves them, SPEC.md 5.3, but does not train them)",
                               pointer="/bias", hint="load it frozen (trainable=False), set bias to 'none', or train "
                                                     "with the torch backend")
    if config.is_prompt_learning:
        from .prompts import check_prompt_learning

        config = check_prompt_learning(model, config)
        return _inject_prompt(model, config, adapter_name, options)
    if config.peft_type == LN_TUNING:  # SPEC.md 15.3
        return _inject_ln_tuning(model, config, adapter_name, options)
    model_type = converter_sites(backbone_of(model))[1]
    check_moe_conversion(config, model_type)  # SPEC 15.1, as the torch backend
    sites = spec_sites(model, options)
    parameters: dict[str, tuple[Any, list[ParameterTarget]]] = {}
    embedding: str | None = None
    heads: list[str] = []
    if config.peft_type == TOKEN_METHOD:  # SPEC.md 15.2: only token rows
        paths: list[str] = []
        token_targets = method_token_targets(model, config, sites)
        saved: list[tuple[str, list[Any]]] = []
    else:
        if config.get("target_modules") is None or config.get("feedforward_modules", []) is None:
            config = config.for_model(model_type)  # SPEC 14.2: the HF model_type
        config = expand_all_linear(model, config, sites, model_type)  # SPEC 4.3
        embedding, tied = tied_layers(model, sites)
        config, tie_mode = tie_rewrite(config, embedding, tied)  # SPEC 15.2
        parameters = find_parameter_targets(model, config, sites, options.module_map)  # SPEC 15.1
        paths = _match(model, sites, config, allow_empty=bool(parameters), every_entry=options.initialize)
        if tie_mode is not None:
            assert embedding is not None
            heads = tied_heads(sites, tied)
            for head in heads:
                check_tied_layer(config, head, embedding, tie_mode, options)
            paths = [path for path in paths if path not in heads] + heads
        _refuse_parameter_modules(paths, sites, model_type)
        for path in paths:
            check_supported(sites[path], path, config)
        token_targets = find_token_targets(model, config, sites, set(paths))
        saved = find_modules_to_save(model, config, sites, bool(options.trainable))
    _refuse_quantized_copies(model, sites, token_targets, saved)
    adapted = [sites[p] for p in paths] + [sites[p] for p, _, _ in token_targets]
    _check_saved_overlap(get_state(model), saved, adapted)
    _check_parameter_overlap(get_state(model), parameters, saved, adapted)
    state = get_state(model, create=True)
    assert state is not None
    state.names.append(adapter_name)
    state.configs[adapter_name] = config
    token_paths = [p for p, _, _ in token_targets] if config.peft_type == TOKEN_METHOD else []
    state.modules[adapter_name] = [*paths, *parameters, *token_paths]
    if heads:
        assert embedding is not None
        state.tied[adapter_name] = {head: (embedding, "targets") for head in heads}
    try:
        bank = AdapterBank(adapter_name)
        host = (sites[(paths or token_paths)[0]].pieces[0].layer if paths or token_paths
                else next(iter(parameters.values()))[0])
        _track(host, bank)
        state.banks[adapter_name] = (bank, host)
        layers: list[AdapterLayer | ModulesToSaveLayer | ParameterLayer] = []
        shared = _add_shared(config, bank, [sites[path] for path in paths], options)
        for path in paths:
            layer = _adapter_layer(model, state, sites[path])
            layer.add_adapter(adapter_name, config, path, options, bank, check=False,  # checked above
                              shared=shared)
            layer.set_active(state.active)
            layers.append(layer)
        token_layers: dict[str, AdapterLayer] = {}
        for path, indices, source in token_targets:  # sources (the embedding) come first
            layer = _adapter_layer(model, state, sites[path])
            if config.peft_type == TOKEN_METHOD:
                layer.add_tokens(adapter_name, indices, options, bank,
                                 source=token_layers[source] if source is not None else None, param=DELTA,
                                 saved_when_tied=True,  # PEFT: init_weights false (or null: a truth test) draws randn
                                 random_rows=not config.get("init_weights", True))
            else:
                layer.add_tokens(adapter_name, indices, options, bank,
                                 source=token_layers[source] if source is not None else None)
            layer.set_active(state.active)
            token_layers[path] = layer
            layers.append(layer)
        for path, (holder, targets) in parameters.items():
            on_parameters = state.adapter_layers.get(("parameters", id(holder)))
            if on_parameters is None:
                on_parameters = state.adapter_layers[("parameters", id(holder))] = ParameterLayer(path, holder)
            on_parameters.attach()
            on_parameters.add_adapter(adapter_name, config, path, targets, options, bank)
            on_parameters.set_active(state.active)
            layers.append(on_parameters)
        layers += [_save_whole(state, path, params, adapter_name, bank, options) for path, params in saved]
        if getattr(options, "initialize", True):
            bank.materialize()
            for each in layers:
                each.finish_init(adapter_name)
            tie(state, adapter_name)  # SPEC.md 15.2: the tied layers' LoRA is the embedding's, transposed
            if config.get("bias", "none") != "none":  # the untrained biases PEFT saves (SPEC.md 5.3)
                from .auxiliary import fresh_bias_overrides

                fresh_bias_overrides(model, state, config, adapter_name, options)
            if config.get("velora_config") is not None:  # VeLoRA's state, as PEFT creates it (SPEC.md 5.2)
                from .auxiliary import fresh_velora_state

                fresh_velora_state(state, config, adapter_name, layers)
            kinds = [("conv1d_hf" if sites[path].hf_conv1d else sites[path].kind) for path in paths]
            flipped = peft_fan_in_fan_out(config, kinds)  # the value PEFT's get_peft_model records for these layers
            if flipped is not None:
                state.configs[adapter_name] = config.replace(fan_in_fan_out=flipped)
        if acted_init(config, fresh=bool(getattr(options, "initialize", True))) is not None:  # SPEC.md 8.1
            from .lora_init import apply_init  # PiSSA/OLoRA's residual base, as PEFT builds it; an orthogonal start

            apply_init(model, state, config, adapter_name, options)
        _reach(model, state, config, {path: sites[path] for path in paths}, options.trainable)
        _reach_parameters(model, parameters)
        if options.trainable and options.freeze_base:
            _train_only_adapters(model, state, adapter_name)
    except BaseException:
        _forget(model, state, adapter_name)
        raise
    park_inactive(state)  # (activating it, next, unfreezes it)
    guard_save(model)
    invalidate(model)
    return list(state.modules[adapter_name])


def _inject_ln_tuning(model: Any, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> list[str]:
    """LN tuning: a copy of each targeted layer per adapter (its tensors under ``ln_tuning_layers.``), and the
    modules to save (as the torch backend's function of the same name)."""
    norms, rest = split_norms(model, options)
    sites = spec_sites(model, rest)
    if config.get("target_modules") is None:
        config = config.for_model(converter_sites(backbone_of(model))[1])  # SPEC 14.2: the HF model_type
    targets = find_ln_targets(model, config, sites, norms, bool(options.trainable))
    chosen = {path for path, _ in targets}
    saved = [(path, params) for path, params in find_modules_to_save(model, config, sites, bool(options.trainable))
             if path not in chosen]
    _check_saved_overlap(get_state(model), [*targets, *saved], [])
    _check_parameter_overlap(get_state(model), {}, [*targets, *saved], [])
    state = get_state(model, create=True)
    assert state is not None
    state.names.append(adapter_name)
    state.configs[adapter_name] = config
    state.modules[adapter_name] = [path for path, _ in [*targets, *saved]]
    try:
        bank = AdapterBank(adapter_name)
        host = _owner_layer(model, targets[0][1][0][1])
        _track(host, bank)
        state.banks[adapter_name] = (bank, host)
        layers: list[ModulesToSaveLayer] = []
        layers += [_save_whole(state, path, params, adapter_name, bank, options, prefix)
                   for (path, params), prefix in [*((t, LN_PREFIX) for t in targets), *((t, "") for t in saved)]]
        if getattr(options, "initialize", True):
            bank.materialize()
            for each in layers:
                each.finish_init(adapter_name)
            tie(state, adapter_name)  # SPEC.md 15.2: the tied layers' LoRA is the embedding's, transposed
            if config.get("bias", "none") != "none":  # the untrained biases PEFT saves (SPEC.md 5.3)
                from .auxiliary import fresh_bias_overrides

                fresh_bias_overrides(model, state, config, adapter_name, options)
    except BaseException:
        _forget(model, state, adapter_name)
        raise
    guard_save(model)
    invalidate(model)
    return list(state.modules[adapter_name])


def _save_whole(state: ModelState, path: str, params: list[Any], adapter_name: str, bank: AdapterBank,
                options: LoadOptions, prefix: str = "") -> ModulesToSaveLayer:
    """Module ``path``'s copy for ``adapter_name`` (``modules_to_save``; LN tuning's, under ``prefix``), its
    :class:`ModulesToSaveLayer` made on first use and shared by the adapters that save it."""
    whole = state.adapter_layers.get(saved_key(path))
    if whole is None:
        whole = state.adapter_layers[saved_key(path)] = ModulesToSaveLayer(path, params)
    whole.add_adapter(adapter_name, path, bank, options, prefix=prefix)
    whole.set_active(state.active)
    return whole


def _owner_layer(model: Any, variable: Any) -> Any:
    """The layer whose own variable ``variable`` is (it hosts an adapter bank that has no wrapped layer)."""
    for layer in model_layers(model):
        if any(v is variable for v in [*layer._trainable_variables, *layer._non_trainable_variables]):
            return layer
    raise UnsupportedError(f"no layer of the model owns {variable.path!r}", key=variable.path,
                           hint="pass module_map naming the layer")


def _add_shared(config: AdapterConfig, bank: AdapterBank, targets: list[ModuleSite],
                options: LoadOptions) -> vera.Shared | None:
    """VeRA: the adapter's shared ``vera_A``/``vera_B`` (frozen rows of its bank), sized over its targets, in the
    dtype its other tensors get (``None`` for other methods)."""
    if config.peft_type not in vera.METHODS + vblora.METHODS:
        return None
    device, dtype = target_of(targets[0].pieces[0].kernel_variable, options)
    if options.dtype is None and dtype in ("float16", "bfloat16"):
        dtype = "float32"  # SPEC.md 7.5, as AdapterLayer.add_adapter
    if config.peft_type in vblora.METHODS:  # VB-LoRA's vector bank: trained with the logits (SPEC.md 17.4)
        for site in targets:
            vblora.check(site, site.path, config)
        if topk_only(config) and bool(getattr(options, "initialize", True)):
            raise UnsupportedError("a new VB-LoRA adapter with save_only_topk_weights true: adapterspec holds such an "
                                   "adapter as PEFT saves it (top-k indices and weights, for inference), and PEFT "
                                   "trains the full logits", pointer="/save_only_topk_weights",
                                   hint="inject with save_only_topk_weights false (train, then save with PEFT to "
                                        "keep only the top-k)")
        return vblora.reserve(bank, config, dtype, device, bool(getattr(options, "initialize", True)),
                              bool(options.trainable))
    return vera.reserve(bank, config, [(site.in_features, site.out_features) for site in targets], dtype, device,
                        bool(getattr(options, "initialize", True)))


def _check_saved_overlap(state: ModelState | None, saved: list[tuple[str, list[Any]]],
                         adapted: list[ModuleSite]) -> None:
    """Refuse a module saved whole (``modules_to_save``) whose variables an adapter layer also changes, and the
    reverse (the torch backend refuses both too: a module is adapted or saved whole, never both)."""
    held: dict[int, str] = {}
    layers = list(state.adapter_layers.values()) if state is not None else []
    for layer in layers:
        if isinstance(layer, ModulesToSaveLayer):
            held.update({id(v): layer.site.path for v in layer.variables})
    if not held and not saved:  # nothing saved whole, here or before: no overlap to look for
        return
    kernels = {id(piece.kernel_variable): site.path for site in adapted for piece in site.pieces}
    for layer in layers:
        if not isinstance(layer, ModulesToSaveLayer):
            kernels.update({id(piece.kernel_variable): layer.site.path for piece in layer.site.pieces})
    for site in adapted:
        for piece in site.pieces:
            if id(piece.kernel_variable) in held:
                raise UnsupportedError(f"module is saved whole (modules_to_save) by another adapter, as "
                                       f"{held[id(piece.kernel_variable)]!r}", key=site.path,
                                       hint="an adapter cannot adapt a module another adapter saves whole")
    for path, params in saved:
        for _, variable, _ in params:
            if id(variable) in kernels:
                raise UnsupportedError(f"module is adapted (as {kernels[id(variable)]!r}); it cannot be saved whole "
                                       "too", key=path, hint="remove it from modules_to_save")


def _check_parameter_overlap(state: ModelState | None, parameters: dict[str, tuple[Any, list[ParameterTarget]]],
                             saved: list[tuple[str, list[Any]]], adapted: list[ModuleSite]) -> None:
    """Refuse a parameter ``target_parameters`` selects whose variables a module adapter, or a module saved whole,
    also changes -- in this adapter or another one (PEFT and the torch backend refuse it too) -- and the reverse."""
    held = {id(variable): path for path, (_, targets) in parameters.items()
            for target in targets for variable, _, _ in target.parts}
    layers = list(state.adapter_layers.values()) if state is not None else []
    for layer in layers:
        if isinstance(layer, ParameterLayer):
            held.update({id(variable): layer.site.path for variable in layer.variables()})
    if not held:  # no parameter adapted, here or before: no overlap to look for
        return
    others: list[tuple[str, Any]] = []  # (module path, variable) of the other adapters' layers
    for layer in layers:
        if isinstance(layer, ModulesToSaveLayer):
            others += [(layer.site.path, variable) for variable in layer.variables]
        elif not isinstance(layer, ParameterLayer):
            others += [(layer.site.path, piece.kernel_variable) for piece in layer.site.pieces]
    mine = [(site.path, piece.kernel_variable) for site in adapted for piece in site.pieces]
    mine += [(path, variable) for path, params in saved for _, variable, _ in params]
    for path, variable in [*mine, *(others if parameters else [])]:
        if id(variable) in held:
            raise UnsupportedError(f"module {path!r} is adapted or saved whole, and target_parameters adapts its "
                                   f"parameter (as {held[id(variable)]!r}): PEFT refuses this too", key=path,
                                   pointer="/target_parameters" if parameters else None,
                                   hint="remove the module from target_modules / modules_to_save, or its parameter "
                                        "from target_parameters")


def _reach(model: Any, state: ModelState, config: AdapterConfig, sites: dict[str, ModuleSite],
           trainable: bool) -> None:
    """Layers whose ``call`` the forward never runs (keras-hub's Gemma 4 MLP reads ``self.gating_ffw.kernel``) take
    the adapter through their kernel (:func:`~adapterspec_keras.reach.read_through_kernel`), unless a kernel cannot
    carry it (:func:`~adapterspec_keras.reach.read_through_refusal`): refused, naming them and why. Layers the check
    could not decide (a multimodal model's parent that cannot run alone, a model that cannot run on its own) take it
    through their kernel too, exact whether or not their ``call`` runs; for one a kernel cannot carry, the whole
    model is run on guessed sizes (one image and as many tokens as it takes: T5Gemma 2), and if that does not
    decide it, it is refused when it sits inside another layer (it might read its kernel itself: the adapter
    would change nothing), warned about when the model holds it directly (a container whose layers the user
    calls)."""
    unused, unknown = reach_report(model, sites)
    why = {path: read_through_refusal(config, path, pieces, trainable)
           for path, pieces in [*unused.items(), *unknown.items()]}
    refuse({path: pieces for path, pieces in unused.items() if why[path]}, why, config.peft_type)
    undecided = [path for path in unknown if why[path]]
    if undecided:  # the answer decides: the whole model on guessed sizes (one image, as many tokens as it takes)
        never, still = reach_report(model, {path: sites[path] for path in undecided}, search=True)
        refuse(never, why, config.peft_type)
        unknown = {path: pieces for path, pieces in unknown.items() if path in still or path not in undecided}
        undecided = [path for path in undecided if path in still]
    parents = parents_of(model) if undecided else {}
    nested = [path for path in undecided if any(parents.get(id(p.layer)) not in (None, model) for p in unknown[path])]
    if nested:
        more = f" and {len(nested) - 8} more" if len(nested) > 8 else ""
        reasons = "; ".join(f"{path}: {why[path]}" for path in nested[:8])
        raise UnsupportedError(
            f"adapterspec cannot check that {type(model).__name__}'s forward runs the Keras layers of "
            f"{', '.join(nested[:8])}{more} (neither the model nor their parent layers run on a dummy input): "
            f"if a parent reads their kernel itself, this {config.peft_type} adapter would change nothing, and it "
            f"cannot run through their kernel ({reasons})",
            key=nested[0], hint="an adapter whose forward is a change of the kernel (LoRA without lora_bias, DoRA, "
                                "IA3 on a layer without bias, LoHa, LoKr, OFT, BOFT, AdaLoRA, VeRA) runs through it, "
                                "exact either way; or merge the adapter into the base model (PEFT's merge_and_unload) "
                                "and convert that")
    if undecided:
        warnings.warn(f"adapterspec could not check that {type(model).__name__}'s forward runs the Keras layers of "
                      f"{', '.join(undecided[:8])}{f' and {len(undecided) - 8} more' if len(undecided) > 8 else ''}: "
                      "the model holds them directly and cannot run on a dummy input; if its call reads their "
                      "kernel itself, the adapter on them changes nothing", AdapterSpecWarning, stacklevel=4)
    for path, pieces in [*unused.items(), *((p, ps) for p, ps in unknown.items() if p not in undecided)]:
        for piece in pieces:
            read_through_kernel(piece.layer, state.entries[id(piece.layer)])


def _reach_parameters(model: Any, parameters: dict[str, tuple[Any, list[ParameterTarget]]]) -> None:
    """Refuse ``target_parameters`` on a layer whose ``call`` the forward never runs (a parent reading its variables
    itself): the unmerged delta runs inside that ``call`` (:class:`~adapterspec_keras.parameters.ParameterLayer`),
    so it would change nothing. As for module adapters, a layer the check cannot decide is refused when it sits
    inside another layer, and warned about when the model holds it directly."""
    if not parameters:
        return
    empty = np.zeros(0, dtype=np.int64)
    holders = {path: ModuleSite(path, "parameters", 0, 0, [Piece(holder, "parameters", empty, empty)])
               for path, (holder, _) in parameters.items()}
    unused, unknown = reach_report(model, holders)
    parents = parents_of(model) if unknown else {}
    nested = {path: pieces for path, pieces in unknown.items()
              if any(parents.get(id(p.layer)) not in (None, model) for p in pieces)}
    never = {**unused, **nested}
    if never:
        listed = ", ".join(f"{path} -> {pieces[0].layer.path}" for path, pieces in list(never.items())[:8])
        raise UnsupportedError(f"target_parameters adapts the variables of Keras layers whose call the model's forward "
                               f"does not run (or cannot be shown to run): {listed}; a parent reading them itself "
                               f"would not see the unmerged delta", key=next(iter(never)), pointer="/target_parameters",
                               hint="map (module_map) the module to the layer whose call reads the variables, or merge "
                                    "the adapter (merge_adapters) right after loading it")
    if unknown:
        warnings.warn(f"adapterspec could not check that {type(model).__name__}'s forward runs the Keras layers of "
                      f"{', '.join(list(unknown)[:8])} (target_parameters): the model holds them directly and cannot "
                      "run on a dummy input; if its call reads their variables itself, the adapter changes nothing",
                      AdapterSpecWarning, stacklevel=4)


def _forget(model: Any, state: ModelState, adapter_name: str) -> None:
    """Undo a half-done injection: its layers and every trace of ``adapter_name`` in the model's state."""
    remove_adapter_modules(model, adapter_name)
    state.names.remove(adapter_name)
    state.configs.pop(adapter_name, None)
    state.modules.pop(adapter_name, None)
    state.tied.pop(adapter_name, None)
    drop_state_if_empty(model)


def _inject_prompt(model: Any, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> list[str]:
    from .prompts import decoder_layers, inject_prefix

    state = get_state(model, create=True)
    assert state is not None
    state.names.append(adapter_name)
    state.configs[adapter_name] = config
    state.modules[adapter_name] = []
    try:
        bank = AdapterBank(adapter_name)
        host = decoder_layers(model)[0]
        _track(host, bank)
        state.banks[adapter_name] = (bank, host)
        inject_prefix(model, state, config, adapter_name, bank, options)
        if getattr(options, "initialize", True):
            bank.materialize()
        if options.trainable and options.freeze_base:
            _train_only_adapters(model, state, adapter_name)
    except BaseException:
        _forget(model, state, adapter_name)
        raise
    park_inactive(state)  # (activating it, next, unfreezes it)
    guard_save(model)
    invalidate(model)
    return []


def _track(host: Any, layer: Any) -> None:
    """Make ``layer`` a sublayer of ``host`` (built and locked already), so Keras sees its variables."""
    tracker = host._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        tracker.add_to_store("layers", layer)
    finally:
        if locked:
            tracker.locked = True


def _adapter_layer(model: Any, state: ModelState, site: ModuleSite) -> AdapterLayer:
    key = site_key(site)
    layer: AdapterLayer | None = state.adapter_layers.get(key)
    if layer is not None:
        return layer
    layer = AdapterLayer(site)
    state.adapter_layers[key] = layer
    for piece in site.pieces:
        wrap(model, piece.layer)
        state.entries[id(piece.layer)].append((layer, piece))
    return layer


def _train_only_adapters(model: Any, state: ModelState, adapter_name: str) -> None:
    """Base variables frozen (remembered for :func:`_restore_trainable`), the adapter's trainable."""
    if not state.trainable:
        adapter_vars = {id(v) for bank, _ in state.banks.values() for v in bank.variables}
        layers = [model, *model_layers(model)]
        for layer in layers:
            if not isinstance(layer, AdapterBank):
                state.frozen.append((layer, "_trainable", layer.__dict__.get("_trainable", True)))
        for variable in model.variables:
            if id(variable) not in adapter_vars:
                state.frozen.append((variable, "trainable", variable.trainable))
        for layer in layers:
            if not isinstance(layer, AdapterBank):
                object.__setattr__(layer, "_trainable", True)
        for variable in model.variables:
            if id(variable) not in adapter_vars:
                variable.trainable = False
    state.trainable.append(adapter_name)


def _restore_trainable(state: ModelState) -> None:
    for obj, attr, value in reversed(state.frozen):
        if attr == "trainable":
            obj.trainable = value
        else:
            object.__setattr__(obj, attr, value)
    state.frozen.clear()


def _check_trainable(state: ModelState, layer: Any, entries: list[tuple[AdapterLayer, Piece]]) -> None:
    """Refuse to train while ``layer.trainable`` disagrees with the trainability of the adapters it runs.

    A trainable adapter keeps its tensors in a few variables shared by all its layers (:mod:`.bank`), tracked
    under one of them: ``trainable = False`` on one adapted layer froze every layer's rows (on the tracking
    layer) or none (on another), where Keras' own LoRA freezes that layer's. Freezing the whole model is
    consistent (nothing trains) and allowed.

    :raises UnsupportedError: naming the layer.
    """
    for adapter_layer, _ in entries:
        for name in adapter_layer._active:
            if name in state.trainable and name in state.banks and \
                    bool(layer.trainable) != bool(state.banks[name][0].trainable):
                raise UnsupportedError(
                    f"layer {layer.name!r} is {'frozen' if not layer.trainable else 'trainable'} (layer.trainable) but "
                    f"adapter {name!r} is {'frozen' if not state.banks[name][0].trainable else 'trainable'}: one "
                    "adapter's tensors are shared variables across its layers, so one layer's flag cannot freeze "
                    "only its part", key=layer.name,
                    hint="freeze the whole model (model.trainable = False) or none of it, or load the adapters "
                         "that should stay frozen without trainable=True")


def _training(context: Any) -> bool:
    """Whether Keras' call context says training -- or may: under ``keras.RematScope`` on JAX the flag is a traced
    array (``jax.checkpoint`` traces every argument of the call), which has no truth value until it runs."""
    training = getattr(context, "training", None)
    return training if isinstance(training, bool) else training is not None


#: The attribute of a patched ``call`` naming the :class:`ModelState` it runs (one layer, one model's adapters).
_PATCHED_BY = "_adapterspec_state"


def wrap(model: Any, layer: Any) -> None:
    """Patch ``layer.call`` (once) to run the adapters :class:`ModelState` lists for it.

    >>> wrap(model, model.get_layer("dense"))                           # doctest: +SKIP
    """
    state = get_state(model, create=True)
    assert state is not None
    if id(layer) in state.originals:
        return
    own = layer.__dict__.get("call")
    if getattr(own, _PATCHED_BY, state) is not state:
        raise UnsupportedError(f"layer {layer.name!r} already holds the adapters of another model that shares it (a "
                               "backbone inside a task model, a layer used by two models); its calls would run both "
                               "models' adapters", key=layer.name,
                               hint="load all adapters through the model that loaded the first one (adapter_name=... "
                                    "and set_active_adapters switch between them)")
    original = own if own is not None else type(layer).call.__get__(layer)
    note_patched(layer)
    watch_compiled()
    entries: list[tuple[AdapterLayer, Piece]] = []
    reversible = hasattr(layer, "tie_weights") and hasattr(layer, "logit_soft_cap")

    def patched(run: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            context = note_caller(state)
            if state.trainable and _training(context):
                _check_trainable(state, layer, entries)
            return _dispatch(layer, run, entries, reversible, args, kwargs)

        return call

    call = patched(original)
    setattr(call, _PATCHED_BY, state)
    object.__setattr__(layer, "call", call)
    if quantization(layer):  # Layer.__call__ runs quantized_call, not call (SPEC.md 6.8)
        object.__setattr__(layer, "quantized_call", patched(type(layer).quantized_call.__get__(layer)))
    if getattr(layer, "_remat_mode", None) is not None:
        object.__setattr__(layer, "rematerialized_call", _fresh_remat(type(layer).rematerialized_call.__get__(layer)))
    state.originals[id(layer)] = (layer, own)
    state.entries[id(layer)] = entries
    guard_save(layer, names=("save_own_variables",))  # saving any model around it would drop the adapter


def unwrap(model: Any, layer: Any) -> None:
    """Put ``layer``'s original ``call`` back (its adapters are all gone).

    >>> unwrap(model, model.get_layer("dense"))                         # doctest: +SKIP
    """
    state = get_state(model)
    if state is None or id(layer) not in state.originals:
        return
    _, own = state.originals.pop(id(layer))
    state.entries.pop(id(layer), None)
    unguard_save(layer)
    restore_kernel(layer)
    if own is None:
        object.__delattr__(layer, "call")
    else:
        object.__setattr__(layer, "call", own)
    for attr in ("quantized_call", "rematerialized_call"):
        if attr in layer.__dict__:
            object.__delattr__(layer, attr)


def _fresh_remat(rematerialized_call: Any) -> Any:
    """A layer made under ``keras.RematScope`` hands its ``call`` to ``jax.checkpoint``, which caches what it traced
    by the function: a plain layer's bound ``call`` is a new object at each access, the patched one is not, so the
    cached trace came back with the adapter's variables of an earlier trace (JAX: an escaped tracer, or ``fit`` that
    never moved the adapter, silently). Each call gets a new function here, as a plain layer's."""
    def remat(layer_call: Any, *args: Any, **kwargs: Any) -> Any:
        return rematerialized_call(lambda *a, **k: layer_call(*a, **k), *args, **kwargs)

    return remat


def remove_adapter_modules(model: Any, adapter_name: str, *, unloading: bool = False) -> None:
    """Remove everything :func:`inject` added for ``adapter_name``, unwrapping layers left without adapters (the base
    tensors its file replaced come back: not while ``unloading`` with an adapter merged,
    :func:`~adapterspec_keras.auxiliary.restore`).

    >>> remove_adapter_modules(model, "default")                         # doctest: +SKIP
    """
    state = get_state(model)
    if state is None:
        return
    from .auxiliary import restore

    restore(state, adapter_name, unloading=unloading)  # the base tensors its file replaced (SPEC.md 8.8)
    for key, layer in list(state.adapter_layers.items()):
        if adapter_name in layer.adapter_names():
            layer.remove_adapter(adapter_name)
        if layer.adapter_names():
            continue
        del state.adapter_layers[key]
        if isinstance(layer, ParameterLayer):
            layer.detach()
        for piece in layer.site.pieces:
            entries = state.entries.get(id(piece.layer))
            if entries is None:
                continue
            entries[:] = [(al, p) for al, p in entries if al is not layer]
            if not entries:
                unwrap(model, piece.layer)
    if adapter_name in state.prompts:
        from .prompts import remove_prefix

        remove_prefix(model, state, adapter_name)
    bank_host = state.banks.pop(adapter_name, None)
    if bank_host is not None:
        bank, host = bank_host
        host._tracker.untrack(bank)
        bank.release()
    state.parked.discard(adapter_name)
    if adapter_name in state.trainable:
        state.trainable.remove(adapter_name)
        if not state.trainable:
            _restore_trainable(state)


# ---------------------------------------------------------------------------------------------------
# The patched call


@contextlib.contextmanager
def _held_back(layer: Any, reverse: bool) -> Iterator[Any]:
    """Run the original call without its final non-linearity; yields the function that applies it."""
    if reverse:
        cap = getattr(layer, "logit_soft_cap", None)
        if cap is None:
            yield lambda y: y
            return
        object.__setattr__(layer, "logit_soft_cap", None)
        try:
            yield lambda y: ops.multiply(ops.tanh(ops.divide(y, cap)), cap)
        finally:
            object.__setattr__(layer, "logit_soft_cap", cap)
        return
    activation = layer.__dict__.get("activation")
    if activation is None or getattr(activation, "__name__", "") == "linear":
        yield lambda y: y
        return
    object.__setattr__(layer, "activation", None)
    try:
        yield activation
    finally:
        object.__setattr__(layer, "activation", activation)


def _dispatch(layer: Any, original: Any, entries: list[tuple[AdapterLayer, Piece]], reversible: bool,
              args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    reverse = bool(kwargs.get("reverse", args[1] if len(args) > 1 else False)) if reversible else False
    role = "reverse" if reverse else "forward"
    note_entry(layer, role)
    if reads_through(layer):  # its call reads the kernel, which holds the adapters already
        return original(*args, **kwargs)
    running = [(al, p) for al, p in entries if p.role == role and al.runs()]
    if not running:
        return original(*args, **kwargs)
    if args:
        x, rest = args[0], args[1:]
    else:
        kwargs = dict(kwargs)
        x, rest = kwargs.pop("inputs"), ()
    for adapter_layer, piece in running:
        x = adapter_layer.scale_input(piece, x)
    with _held_back(layer, reverse) as finish:
        y = original(x, *rest, **kwargs)
        mask = getattr(y, "_keras_mask", None)
        for adapter_layer, piece in running:
            y = adapter_layer.apply(piece, x, y)
    y = finish(y)
    if mask is not None:
        from keras.src.backend import set_keras_mask

        set_keras_mask(y, mask)
    return y
