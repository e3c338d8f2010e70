"""Injecting adapters: find the targeted modules, wrap them, save modules whole, attach virtual tokens.

* LoRA/IA3/LoHa/LoKr: each targeted module is replaced in its parent by an
  :class:`~adapterspec_torch.layers.AdapterLayer` wrapping the original object (one wrapper per module,
  shared by all adapters on it);
* ``modules_to_save``: each listed module is replaced by a
  :class:`~adapterspec_torch.layers.ModulesToSaveLayer` holding one full copy per adapter;
* prefix/prompt tuning: :mod:`~adapterspec_torch.prompts`.

>>> inject(model, AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"]}),
...        "default", LoadOptions())                                  # doctest: +SKIP
['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj']
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar, cast

import torch
from torch import nn

from adapterspec import AdapterConfig, LoadOptions
from adapterspec._lora_init import acted_init
from adapterspec._vblora import topk_only
from adapterspec.config import peft_fan_in_fan_out, training_refusals, unsupported_features
from adapterspec.errors import AdapterExistsError, ShapeMismatchError, TargetNotFoundError, UnsupportedError
from adapterspec.naming import TRAINABLE_TOKENS_PARAM, make_key
from adapterspec.targets import is_all_linear

from . import distributed
from ._keys import slot
from .devices import adapter_target_of, check_options
from .guard import guard_save_pretrained
from . import hra, vblora, vera
from .layers import AdapterLayer, ModulesToSaveLayer, PendingParam, check_supported, layer_kind
from .ln_tuning import LN_PREFIX
from .ln_tuning import METHOD as LN_TUNING
from .parameters import ParameterLayer, check_moe_conversion, find_parameter_targets
from .tokens import DELTA, METHOD, method_token_targets
from .prompts import PROMPTS_ATTR, inject_prefix, remove_prefix
from .tying import check_tied_layer, is_tied, tie, tie_rewrite, tied_layers
from .switch import ModelState, drop_state_if_empty, get_state

__all__ = [
    "PROMPTS_ATTR",
    "check_features",
    "expand_all_linear",
    "find_modules_to_save",
    "find_targets",
    "find_token_targets",
    "freeze_base",
    "inject",
    "iter_modules",
    "remove_adapter_modules",
    "resolve_module",
    "unwrap",
    "wrap",
]

def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` as the spec sees them: a wrapper stands for the module it wraps (its
    insides are not listed) and adapterspec's own prompt storage is left out.

    >>> [name for name, _ in iter_modules(torch.nn.Sequential(torch.nn.Linear(1, 1)))]
    ['', '0']
    """
    wrappers = (AdapterLayer, ModulesToSaveLayer, ParameterLayer)
    stack = [(prefix, model)]  # depth first, children in order (as named_modules), without nested generators
    while stack:
        path, module = stack.pop()
        yield path, module
        if isinstance(module, wrappers):
            continue
        children = module._modules
        if not children:
            continue
        stack.extend(reversed([(f"{path}.{name}" if path else name, child) for name, child in children.items()
                               if child is not None and (path or name != PROMPTS_ATTR)]))


def resolve_module(model: nn.Module, path: str, options: LoadOptions) -> str | None:
    """The model's own name for spec module ``path`` (through ``options.module_map``), or ``None``.

    >>> resolve_module(torch.nn.Linear(1, 1), "x", LoadOptions(module_map={"x": "y"}))
    'y'
    """
    mapping = options.module_map
    if mapping is None:
        return path
    if callable(mapping):
        return mapping(path)
    return mapping.get(path)


def _universe(model: nn.Module, options: LoadOptions | None,
              modules: dict[str, nn.Module] | None = None) -> list[tuple[str, str, nn.Module]]:
    """(spec path, model name, module) for every module the spec can name."""
    modules = dict(iter_modules(model)) if modules is None else modules
    mapping = options.module_map if options is not None else None
    if mapping is None:
        return [(name, name, module) for name, module in modules.items() if name]
    if callable(mapping):
        out = []
        for name in modules:
            target = mapping(name) if name else None
            if target is not None and target in modules:
                out.append((name, target, modules[target]))
        return out
    return [(spec, own, modules[own]) for spec, own in mapping.items() if own in modules]


def find_targets(model: nn.Module, config: AdapterConfig, options: LoadOptions | None = None, *,
                 universe: list[tuple[str, str, nn.Module]] | None = None) -> list[str]:
    """The module paths ``config`` adapts in ``model``, in model order (PEFT's matching rules).

    A module already wrapped by adapterspec counts as the module it wraps (never its inner ``base_layer``).

    :raises TargetNotFoundError: nothing matches.

    >>> from adapterspec import AdapterConfig
    >>> find_targets(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()),
    ...              AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["0"]}))
    ['0']
    """
    universe = _universe(model, options) if universe is None else universe
    entries = config.get("target_modules")
    if isinstance(entries, (list, tuple)) and entries:
        # a list entry matches a path equal to it or ending in "." + it: the last segments agree. Checking that
        # first spares the full rules for the (many) modules that cannot match
        tails = {str(entry).rpartition(".")[2] for entry in entries}
        found = [spec for spec, _, _ in universe if spec.rpartition(".")[2] in tails and config.matches(spec)]
    else:
        found = [spec for spec, _, _ in universe if config.matches(spec)]
    if not found:
        raise TargetNotFoundError(
            f"no module of the model matches target_modules={config.get('target_modules')!r}",
            pointer="/target_modules",
            hint="check the adapter was trained for this architecture (module names), or pass module_map")
    return found


def expand_all_linear(model: nn.Module, config: AdapterConfig, options: LoadOptions | None = None) -> AdapterConfig:
    """``config`` with ``target_modules: "all-linear"`` replaced by the paths it stands for (SPEC.md 4.3, PEFT's
    ``_maybe_include_all_linear_layers``): every ``nn.Linear`` and transformers ``Conv1D`` (adapted or not)
    except the output layer -- which only a transformers model has: ``get_output_embeddings()``, else for
    ``task_type`` SEQ_CLS its ``score`` or ``classifier``. Other configs are returned as they are.

    :raises TargetNotFoundError: the model has no such module.

    >>> from adapterspec import AdapterConfig
    >>> expand_all_linear(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()),
    ...                   AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": "all-linear"}))["target_modules"]
    ['0']
    """
    if not is_all_linear(config.get("target_modules")):
        return config
    output = _output_layer(model, config)
    names = [spec for spec, _, module in _universe(model, options) if module is not output and layer_kind(
        module.base_layer if isinstance(module, AdapterLayer) else module) in ("linear", "conv1d_hf")]
    if not names:
        raise TargetNotFoundError("target_modules is 'all-linear' but the model has no Linear or Conv1D module "
                                  "other than its output layer", pointer="/target_modules",
                                  hint="list the modules to adapt in target_modules")
    return config.replace(target_modules=names)


def _output_layer(model: nn.Module, config: AdapterConfig) -> nn.Module | None:
    """The layer ``all-linear`` leaves out: PEFT looks for it in a transformers ``PreTrainedModel`` only."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    output = model.get_output_embeddings()  # type: ignore[no-untyped-call]  # unannotated in transformers
    if output is None and config.get("task_type") == "SEQ_CLS":
        output = next((head for head in (getattr(model, n, None) for n in ("score", "classifier"))
                       if isinstance(head, nn.Module)), None)
    return output if isinstance(output, nn.Module) else None


def find_modules_to_save(model: nn.Module, config: AdapterConfig, options: LoadOptions | None = None, *,
                         universe: list[tuple[str, str, nn.Module]] | None = None) -> list[str]:
    """The module paths saved whole (``modules_to_save``; PEFT matches them by plain name suffix).

    Entries that match nothing are ignored, as PEFT does (it adds ``classifier`` and ``score`` for
    sequence classification whether or not they exist).

    >>> from adapterspec import AdapterConfig
    >>> find_modules_to_save(torch.nn.Sequential(torch.nn.Linear(2, 2)),
    ...     AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["x"], "modules_to_save": ["0"]}))
    ['0']
    """
    entries = config.get("modules_to_save") or []
    if isinstance(entries, str):
        entries = [entries]
    if not entries:
        return []
    chosen: list[str] = []
    for spec, _, _ in _universe(model, options) if universe is None else universe:
        if any(spec.endswith(entry) for entry in entries) and not any(spec.startswith(c + ".") for c in chosen):
            chosen.append(spec)
    return chosen


def _unwrapped(module: nn.Module) -> nn.Module:
    return module._modules["base_layer"] if isinstance(module, AdapterLayer) else module


def _parent(model: nn.Module, name: str, modules: dict[str, nn.Module] | None = None) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    if modules is not None and parent_name in modules:
        return modules[parent_name], child
    return model.get_submodule(parent_name), child


_Wrapper = TypeVar("_Wrapper", AdapterLayer, ModulesToSaveLayer, ParameterLayer)


def wrap(model: nn.Module, name: str, wrapper_type: type[_Wrapper], *,
         modules: dict[str, nn.Module] | None = None) -> _Wrapper:
    """The wrapper at model module ``name``: the existing one, or a new ``wrapper_type(original)`` put in
    its place (the original object is remembered for :func:`unwrap`).

    :param modules: the model's modules by name, if the caller has them (saves lookups).
    :raises UnsupportedError: the module is already wrapped by the other kind of wrapper.
    """
    state = get_state(model, create=True)
    module = modules.get(name) if modules is not None else None
    if module is None:
        module = model.get_submodule(name)
    if isinstance(module, wrapper_type):
        return module
    if isinstance(module, (AdapterLayer, ModulesToSaveLayer, ParameterLayer)):
        what = "saved whole (modules_to_save)" if isinstance(module, ModulesToSaveLayer) else \
            "adapted on its parameters (target_parameters)" if isinstance(module, ParameterLayer) else "adapted"
        raise UnsupportedError(f"module is already {what} by another adapter", key=name,
                               hint="an adapter cannot adapt a module another adapter saves whole, or vice versa")
    wrapper = wrapper_type(module)
    wrapper.__dict__["_switch"] = state.switch
    if wrapper.training != module.training:
        wrapper.train(module.training)
    parent, child = _parent(model, name, modules)
    parent._modules[child] = wrapper
    state.originals[name] = module
    state.wrappers[name] = wrapper
    if modules is not None:
        modules[name] = wrapper
    return wrapper


def unwrap(model: nn.Module, name: str) -> None:
    """Put the original module object back at model module ``name`` (its wrapper holds no adapter any more)."""
    state = get_state(model)
    assert state is not None  # a module is unwrapped after wrap() made the state
    original = state.originals.pop(name)
    state.wrappers.pop(name, None)
    parent, child = _parent(model, name)
    parent._modules[child] = original


#: LoRA variants that change the computation and that this backend does not implement: refused rather
#: than silently run as plain LoRA.


def _check_called(modules: dict[str, nn.Module], spec: str, own: str) -> None:
    """Refuse to adapt a module its parent never calls: the ``out_proj`` of an ``nn.MultiheadAttention``, whose
    forward passes ``out_proj.weight`` and ``out_proj.bias`` to ``F.multi_head_attention_forward`` itself. An
    adapter there (any method, or ``target_parameters``) would change nothing unmerged and the output merged --
    PEFT's too; its ``all-linear`` selects such a layer (SigLIP's pooling head).

    :raises UnsupportedError: naming the module.
    """
    parent_name, _, child = own.rpartition(".")
    parent = modules.get(parent_name)
    if child == "out_proj" and isinstance(parent, nn.MultiheadAttention):
        raise UnsupportedError(
            f"this Linear is the out_proj of nn.MultiheadAttention {parent_name or '(the model)'!r}, whose forward "
            "reads out_proj.weight and out_proj.bias itself and never calls out_proj: an adapter on it would change "
            "nothing unmerged and the output once merged (PEFT's does the same)", key=spec,
            hint=f"leave it out of target_modules / target_parameters; with target_modules 'all-linear' (which "
                 f"selects every Linear, as PEFT's does) exclude it: exclude_modules=[{spec!r}]")


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


def _input_embedding(model: nn.Module, universe: list[tuple[str, str, nn.Module]]) -> str | None:
    """The spec path of the model's input embedding (transformers' ``get_input_embeddings``), or ``None``."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        embedding = getter()
    except (NotImplementedError, AttributeError):
        return None
    return next((spec for spec, _, module in universe if module is embedding), None)


def _weight_of(module: nn.Module) -> Any:
    base = module._modules.get("base_layer") if isinstance(module, AdapterLayer) else module
    return base._parameters.get("weight") if base is not None else None


def find_token_targets(model: nn.Module, config: AdapterConfig, universe: list[tuple[str, str, nn.Module]],
                       taken: set[str]) -> list[tuple[str, list[int], str | None]]:
    """LoRA ``trainable_token_indices``: (spec path, indices, tied source path or ``None``) per layer whose rows
    the adapter replaces, PEFT's rules (``_set_trainable`` and its weight tying):

    * an array names the model's input embedding; an object maps names to indices, each name selecting every
      module whose path ends with it;
    * with ``tie_word_embeddings``, the layers sharing the input embedding's weight (the output layer) replace
      the same rows (one tensor, saved once) -- unless the object gives them other indices.

    :raises TargetNotFoundError: a name of the object selects no module.
    :raises UnsupportedError: a selected module is also adapted or saved whole by this adapter.

    >>> find_token_targets(model, cfg, _universe(model, None), set())          # doctest: +SKIP
    [('model.embed_tokens', [3, 7], None), ('lm_head', [3, 7], 'model.embed_tokens')]
    """
    indices = config.get("trainable_token_indices") if config.peft_type == "LORA" else None
    if indices is None:
        return []
    embedding = _input_embedding(model, universe)
    if isinstance(indices, list):
        layers = {embedding or "embed_tokens": list(indices)}
    else:
        layers = {name: list(rows) for name, rows in indices.items()}
    model_config = getattr(model, "config", None)
    tied = bool(getattr(model_config, "tie_word_embeddings", False)) and embedding is not None
    embedding_module = next((m for s, _, m in universe if s == embedding), None)
    shared = _weight_of(embedding_module) if embedding_module is not None else None
    tied_paths = [spec for spec, _, module in universe
                  if tied and spec != embedding and shared is not None and _weight_of(module) is shared]
    mismatch, skip = False, set()
    if len(layers) > 1 and tied and embedding is not None:
        keys = [name for name in layers if embedding.endswith(name) or any(
            path.endswith(name) or name in path.split(".") for path in tied_paths)]
        if len(keys) >= 2:
            mismatch = not all(layers[k] == layers[keys[0]] for k in keys[1:])
            if not mismatch:
                skip = set(keys) & set(tied_paths)
    found: list[tuple[str, list[int], str | None]] = []
    for name, rows in layers.items():
        if name in skip:
            continue
        matches = [spec for spec, _, _ in universe if spec.endswith(name)]
        if not matches:
            raise TargetNotFoundError(f"trainable_token_indices names {name!r}, which matches no module of the model",
                                      pointer="/trainable_token_indices", hint="name the embedding layer")
        found.extend((spec, rows, None) for spec in matches)
    chosen = {spec for spec, _, _ in found}
    if tied and embedding in chosen and not mismatch:
        rows = next(r for s, r, _ in found if s == embedding)
        found.extend((path, rows, embedding) for path in tied_paths if path not in chosen)
    for spec, rows, _ in found:
        if spec in taken:
            raise UnsupportedError("module is named by trainable_token_indices and also adapted or saved whole by "
                                   "this adapter", key=spec,
                                   hint="remove it from target_modules / modules_to_save, or from trainable_token_indices")
    return found


def _check_token_rows(model: nn.Module, universe: dict[str, tuple[str, nn.Module]],
                      tokens: list[tuple[str, list[int], str | None]], param: str = TRAINABLE_TOKENS_PARAM) -> None:
    for spec, rows, _ in tokens:
        weight = _weight_of(universe[spec][1])
        if weight is None or weight.dim() != 2:
            raise UnsupportedError("trainable_token_indices needs a layer with a 2-D weight (an embedding)", key=spec,
                                   hint="name the embedding layer in trainable_token_indices")
        bad = [i for i in rows if not 0 <= i < weight.shape[0]]
        if bad:
            raise ShapeMismatchError(f"trainable_token_indices {bad} are outside the layer's {weight.shape[0]} rows",
                                     key=make_key(spec, param),
                                     hint="resize the model's embeddings first, or check the indices")


def _inject_layers(model: nn.Module, state: ModelState, config: AdapterConfig, adapter_name: str,
                   options: LoadOptions, tying: tuple[str | None, list[str], str | None] = (None, [], None),
                   ) -> dict[str, str]:
    check_features(config)
    for pointer, reason, hint in training_refusals(config) if options.trainable else ():
        raise UnsupportedError(reason, pointer=pointer, hint=hint)
    if config.peft_type == "ADALORA" and options.trainable:
        raise UnsupportedError("training AdaLoRA (its rank allocation and orthogonality loss) is not implemented "
                               "by the torch backend; its adapters load for inference and merging",
                               pointer="/peft_type", hint="train with PEFT's AdaLoRA (update_and_allocate), then "
                                                          "load the saved adapter without trainable")
    if config.peft_type in hra.METHODS and options.initialize:  # SPEC.md 17.3: PEFT's GS init has no defined output
        hra.check_inject(config, adapter_name)
    modules = dict(iter_modules(model))
    universe_list = _universe(model, options, modules)
    universe = {spec: (own, module) for spec, own, module in universe_list}
    if config.peft_type == METHOD:  # SPEC.md 15.2
        return _inject_token_method(model, state, config, adapter_name, options, modules, universe_list)
    if config.peft_type == LN_TUNING:  # SPEC.md 15.3
        return _inject_ln_tuning(model, config, adapter_name, options, modules, universe_list)
    embedding, tied, tie_mode = tying  # SPEC.md 15.2
    parameters = find_parameter_targets(config, universe_list)  # SPEC.md 15.1
    targets: list[str] = []
    if not config.is_prompt_learning:  # a prompt adapter may still save its classifier head whole (SPEC.md 15.9)
        try:
            targets = find_targets(model, config, options, universe=universe_list)
        except TargetNotFoundError:
            if not parameters:
                raise
    saved = find_modules_to_save(model, config, options, universe=universe_list)
    heads: list[str] = []
    if tie_mode == "targets":
        heads = [spec for spec, _, _ in universe_list if is_tied(spec, tied)]
        targets = [spec for spec in targets if spec not in heads]
    elif tie_mode == "modules_to_save":
        heads = [spec for spec, _, _ in universe_list if is_tied(spec, tied)]
        saved = [spec for spec in saved if spec not in heads]
    for spec in heads:
        assert tie_mode is not None and embedding is not None
        check_tied_layer(universe[spec][1], spec, tie_mode)
        if tie_mode == "targets" and config.rank_for(spec) != config.rank_for(embedding):
            raise UnsupportedError(f"ensure_weight_tying ties the LoRA of {spec!r} to the input embedding's, but "
                                   "rank_pattern gives them different ranks", key=spec, pointer="/rank_pattern",
                                   hint="give the tied layers the same rank")
    for spec in parameters:
        module = universe[spec][1]
        if spec in targets or spec in saved or spec in heads or isinstance(module, (AdapterLayer, ModulesToSaveLayer)):
            raise UnsupportedError(f"target_parameters selects a parameter of module {spec!r}, which is also adapted or "
                                   "saved whole (PEFT refuses this too)", key=spec, pointer="/target_parameters",
                                   hint="remove the module from target_modules / modules_to_save, or its parameter "
                                        "from target_parameters")
    for spec in [*targets, *saved, *parameters]:
        own, module = universe[spec]
        if isinstance(module, (AdapterLayer, ModulesToSaveLayer)) and state.wrappers.get(own) is not module:
            raise UnsupportedError("this module already holds the adapters of another model that shares it (a "
                                   "backbone or layer used by two models); one module cannot keep two models' "
                                   "adapter bookkeeping", key=spec,
                                   hint="load all adapters through the model that loaded the first one "
                                        "(adapter_name=... and set_active_adapters switch between them)")
    for spec in [*targets, *parameters]:
        _check_called(modules, spec, universe[spec][0])
    for spec in targets:
        module = universe[spec][1]
        if isinstance(module, ModulesToSaveLayer):
            raise UnsupportedError("module is saved whole (modules_to_save) by another adapter", key=spec,
                                   hint="an adapter cannot adapt a module another adapter saves whole")
        check_supported(module.base_layer if isinstance(module, AdapterLayer) else module, spec, config)
    for spec in saved:
        if isinstance(universe[spec][1], AdapterLayer):
            raise UnsupportedError("module is adapted by another adapter; it cannot be saved whole too", key=spec,
                                   hint="remove it from modules_to_save")
    tokens = find_token_targets(model, config, universe_list, set(targets) | set(saved) | set(parameters) | set(heads))
    _check_token_rows(model, universe, tokens)
    done: dict[str, str] = {}
    fsdp = distributed.fsdp_layouts(model) if distributed.is_sharded(model) else None
    try:
        shared = _add_shared(model, config, adapter_name, options, [universe[spec][1] for spec in targets])
        for spec in targets:
            own = universe[spec][0]
            base = _unwrapped(universe[spec][1])
            distributed.check_fsdp1_weight(base, spec, "adapting")
            layout = distributed.layout_of(base, fsdp) if fsdp is not None else None
            if layout is not None:  # SPEC.md 16
                distributed.check_sharded_adapter(base, layer_kind(base), config, spec, layout)
            layer = wrap(model, own, AdapterLayer, modules=modules)
            done[spec] = own
            layer.add_adapter(adapter_name, config, spec, options, checked=True, shared=shared)
            if layout is not None:
                weights = cast(nn.Module, layer._modules["adapter_weights"]._modules[slot(adapter_name)])
                distributed.shard_adapter(weights, layer._specs[adapter_name].names, layout)
                layer.__dict__["_sharding"] = layout
        for spec in saved:
            own = universe[spec][0]
            whole = wrap(model, own, ModulesToSaveLayer, modules=modules)
            done[spec] = own
            whole.add_adapter(adapter_name, options)
        for spec in heads:
            own = universe[spec][0]
            done[spec] = own
            if tie_mode == "targets":
                wrap(model, own, AdapterLayer, modules=modules).add_adapter(adapter_name, config, spec, options,
                                                                            checked=True)
            else:
                wrap(model, own, ModulesToSaveLayer, modules=modules).add_adapter(adapter_name, options)
            assert embedding is not None and tie_mode is not None
            state.tied.setdefault(adapter_name, {})[spec] = (embedding, tie_mode)
        for spec, names in parameters.items():
            own = universe[spec][0]
            on_parameters = wrap(model, own, ParameterLayer, modules=modules)
            done[spec] = own
            on_parameters.add_adapter(adapter_name, config, spec, names, options)
        for spec, indices, source in tokens:
            own = universe[spec][0]
            layer = wrap(model, own, AdapterLayer, modules=modules)
            done[spec] = own
            source_layer = state.wrappers[universe[source][0]] if source is not None else None
            assert source_layer is None or isinstance(source_layer, AdapterLayer)  # wrap() refused others above
            layer.add_tokens(adapter_name, indices, options, source=source_layer)
    except BaseException:
        state.tied.pop(adapter_name, None)
        _remove_layers(model, state, adapter_name, done)
        raise
    return done


def _inject_ln_tuning(model: nn.Module, config: AdapterConfig, adapter_name: str, options: LoadOptions,
                      modules: dict[str, nn.Module], universe_list: list[tuple[str, str, nn.Module]]) -> dict[str, str]:
    """LN tuning: a copy of each targeted layer per adapter (its tensors under ``ln_tuning_layers.``), and the
    modules to save."""
    universe = {spec: (own, module) for spec, own, module in universe_list}
    targets = find_targets(model, config, options, universe=universe_list)
    saved = [spec for spec in find_modules_to_save(model, config, options, universe=universe_list)
             if spec not in targets]
    for spec in [*targets, *saved]:
        if isinstance(universe[spec][1], (AdapterLayer, ParameterLayer)):
            raise UnsupportedError("module is adapted by another adapter; LN tuning (or modules_to_save) replaces it "
                                   "whole", key=spec, hint="load the adapters on separate models")
    done: dict[str, str] = {}
    try:
        for spec in [*targets, *saved]:
            own = universe[spec][0]
            layer = wrap(model, own, ModulesToSaveLayer, modules=modules)
            done[spec] = own
            layer.add_adapter(adapter_name, options, prefix=LN_PREFIX if spec in targets else "")
    except BaseException:
        _remove_layers(model, get_state(model, create=True), adapter_name, done)
        raise
    return done


def _inject_token_method(model: nn.Module, state: ModelState, config: AdapterConfig, adapter_name: str,
                         options: LoadOptions, modules: dict[str, nn.Module],
                         universe_list: list[tuple[str, str, nn.Module]]) -> dict[str, str]:
    """The ``TRAINABLE_TOKENS`` method: token rows on the selected layers and on those tied to them."""
    universe = {spec: (own, module) for spec, own, module in universe_list}
    tokens = method_token_targets(model, config, universe_list)
    for spec, _, _ in tokens:
        if isinstance(universe[spec][1], (ModulesToSaveLayer, ParameterLayer)):
            raise UnsupportedError("module is saved whole or adapted on its parameters by another adapter", key=spec,
                                   hint="load the adapters on separate models")
    _check_token_rows(model, universe, tokens, DELTA)
    done: dict[str, str] = {}
    try:
        for spec, indices, source in tokens:
            own = universe[spec][0]
            layer = wrap(model, own, AdapterLayer, modules=modules)
            done[spec] = own
            source_layer = state.wrappers[universe[source][0]] if source is not None else None
            assert source_layer is None or isinstance(source_layer, AdapterLayer)
            layer.add_tokens(adapter_name, indices, options, source=source_layer, param=DELTA,
                             saved_when_tied=True,  # PEFT: init_weights false (or null: a truth test) draws randn
                             random_rows=not config.get("init_weights", True))
            if source is not None:
                state.tied.setdefault(adapter_name, {})[spec] = (source, "tokens")
    except BaseException:
        state.tied.pop(adapter_name, None)
        _remove_layers(model, state, adapter_name, done)
        _remove_shared(model, adapter_name)
        raise
    return done


def _add_shared(model: nn.Module, config: AdapterConfig, adapter_name: str, options: LoadOptions,
                targets: list[nn.Module]) -> vera.Shared | None:
    """VeRA: the adapter's shared ``vera_A``/``vera_B`` (frozen), sized over its targets, kept on the model under
    :data:`~adapterspec_torch.vera.SHARED_ATTR` (``None`` for other methods)."""
    if config.peft_type not in vera.METHODS + vblora.METHODS:
        return None
    bases = [t.base_layer if isinstance(t, AdapterLayer) else t for t in targets]
    kinds = [cast(str, layer_kind(b)) for b in bases]
    device, dtype = adapter_target_of(bases[0], options)
    shared = vera.Shared()
    is_vblora = config.peft_type in vblora.METHODS  # VB-LoRA: the vector bank, trained (SPEC.md 17.4)
    if is_vblora and options.initialize and topk_only(config):
        raise UnsupportedError("a new VB-LoRA adapter with save_only_topk_weights true: adapterspec holds such an "
                               "adapter as PEFT saves it (top-k indices and weights, for inference), and PEFT trains "
                               "the full logits", pointer="/save_only_topk_weights",
                               hint="inject with save_only_topk_weights false (train, then save with PEFT to keep "
                                    "only the top-k)")
    grad = is_vblora and bool(options.trainable)
    sizes = vblora.shared_shapes(config) if is_vblora else vera.shared_shapes(list(zip(bases, kinds)), config)
    for name, shape in sizes.items():
        if options.initialize:
            shared._parameters[name] = nn.Parameter(torch.empty(shape, device=device, dtype=dtype),
                                                    requires_grad=grad)
        else:
            shared.__dict__["pending"][name] = PendingParam(shape, device, dtype, grad)
    if options.initialize and device.type != "meta" and not is_vblora:  # VB-LoRA: drawn with each module
        with torch.no_grad():
            vera.initialise_shared(cast("dict[str, torch.Tensor]", dict(shared._parameters)), config)
    holder = cast("nn.ModuleDict | None", model._modules.get(vera.SHARED_ATTR))
    if holder is None:
        holder = nn.ModuleDict()
        model.add_module(vera.SHARED_ATTR, holder)
    holder[slot(adapter_name)] = shared
    return shared


def _remove_shared(model: nn.Module, adapter_name: str) -> None:
    holder = cast("nn.ModuleDict | None", model._modules.get(vera.SHARED_ATTR))
    if holder is not None and slot(adapter_name) in holder:
        del holder[slot(adapter_name)]
    if holder is not None and len(holder) == 0:
        del model._modules[vera.SHARED_ATTR]


def _remove_layers(model: nn.Module, state: ModelState, adapter_name: str, modules: dict[str, str]) -> None:
    for own in modules.values():
        layer = state.wrappers.get(own)
        if layer is None:
            continue
        layer.remove_adapter(adapter_name)
        if isinstance(layer, ModulesToSaveLayer):  # a merged copy it kept is the module now
            state.originals[own] = layer.original_module
        if not layer.adapter_names():
            unwrap(model, own)


# -- the hook ------------------------------------------------------------------------------
def inject(model: nn.Module, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> list[str]:
    """Add adapter ``adapter_name`` to every module ``config`` targets (inactive), all or nothing.

    :returns: the module paths that received the adapter, adapted ones then saved-whole ones
        (``[]`` for prefix/prompt tuning).
    :raises AdapterExistsError: the name is taken.
    :raises TargetNotFoundError: no module matches.
    :raises UnsupportedError: a target's layer type cannot take this method (names the module).

    >>> inject(model, cfg, "default", LoadOptions())                    # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', ...]
    """
    check_options(options)
    existing = get_state(model)
    if existing is not None and adapter_name in existing.configs:
        raise AdapterExistsError(f"the model already has an adapter named {adapter_name!r}", key=adapter_name,
                                 hint="delete it first, or choose another name")
    state = get_state(model, create=True)
    freezing = bool(options.trainable and options.freeze_base)
    before = {id(p) for p in model.parameters()} if freezing else set()
    try:
        if config.is_prompt_learning:
            config = inject_prefix(model, state, config, adapter_name, options)
            modules: dict[str, str] = {}
            if config.get("modules_to_save"):  # the classifier head of SEQ_CLS / TOKEN_CLS (SPEC 15.9)
                try:
                    modules = _inject_layers(model, state, config, adapter_name, options)
                except BaseException:
                    remove_prefix(model, state, adapter_name)
                    raise
        else:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            check_moe_conversion(config, model_type)  # SPEC 15.1
            config = config.for_model(model_type)  # SPEC 14.2
            config = expand_all_linear(model, config, options)  # SPEC 4.3
            embedding, tied = tied_layers(model, _universe(model, options))
            config, tie_mode = tie_rewrite(config, embedding, tied)  # SPEC 15.2
            modules = _inject_layers(model, state, config, adapter_name, options, (embedding, tied, tie_mode))
    except BaseException:
        drop_state_if_empty(model)
        raise
    if options.initialize:  # the value PEFT's get_peft_model records for a new adapter on these layers
        kinds = [getattr(state.wrappers.get(own), "kind", None) for own in modules.values()]
        flipped = peft_fan_in_fan_out(config, kinds)
        config = config if flipped is None else config.replace(fan_in_fan_out=flipped)
    state.names.append(adapter_name)
    state.configs[adapter_name] = config
    state.modules[adapter_name] = modules
    tie(state, adapter_name)
    if options.initialize and config.get("bias", "none") != "none":
        from .auxiliary import fresh_bias_overrides
        from .switch import delete

        try:
            fresh_bias_overrides(model, state, config, adapter_name, options)
        except BaseException:
            delete(model, adapter_name)
            raise
    if options.initialize and config.get("velora_config") is not None:
        from .auxiliary import fresh_velora_state

        fresh_velora_state(state, config, adapter_name)
    if acted_init(config, fresh=bool(options.initialize)) is not None:  # PiSSA/OLoRA's residual base (SPEC.md 8.1)
        from .lora_init import apply_init
        from .switch import delete

        try:
            apply_init(model, state, config, adapter_name, options)
        except BaseException:
            delete(model, adapter_name)
            raise
    if freezing:
        freeze_base(model, state, adapter_name, before)
    if options.trainable:  # gradient checkpointing: the inputs require grad, as PEFT makes them
        from .checkpointing import require_input_grads, watch_checkpointing

        state.trainable.append(adapter_name)
        watch_checkpointing()
        require_input_grads(model)
    guard_save_pretrained(model)
    return list(modules)


def freeze_base(model: nn.Module, state: ModelState, adapter_name: str, before: set[int]) -> None:
    """Make every parameter that belongs to no adapter untrainable, as PEFT's ``get_peft_model`` does.

    An adapter's parameters are those its injection created (absent from ``before``, the ids of the
    model's parameters just before it) and those of the adapters loaded earlier; all others -- the base,
    the originals of modules saved whole, replaced biases -- are frozen, their flags remembered in
    ``state.frozen`` and given back when the last adapter in ``state.freezers`` is deleted.

    >>> freeze_base(model, get_state(model), "default", set())          # doctest: +SKIP
    """
    from .state import expected_params

    owned = {id(t) for name in state.names if name != adapter_name for t in expected_params(model, name).values()}
    owned.update(id(o.new) for overrides in state.base_weights.values() for o in overrides)
    for param in model.parameters():
        if id(param) in before and id(param) not in owned and param.requires_grad:
            state.frozen.append((param, True))
            param.requires_grad_(False)
    state.freezers.append(adapter_name)


def _unfreeze_base(state: ModelState, adapter_name: str) -> None:
    if adapter_name not in state.freezers:
        return
    state.freezers.remove(adapter_name)
    if not state.freezers:
        for param, flag in reversed(state.frozen):
            param.requires_grad_(flag)
        state.frozen.clear()


def remove_adapter_modules(model: nn.Module, adapter_name: str, *, unloading: bool = False) -> None:
    """Remove everything :func:`inject` added for ``adapter_name`` (layers, copies, prompts, hook), putting
    back the original module objects (and base weights its file replaced: not while ``unloading`` with an adapter
    merged, :func:`~adapterspec_torch.auxiliary.restore`) where nothing is left."""
    state = get_state(model)
    if state is None:
        return
    from .state import restore_base_weights

    _unfreeze_base(state, adapter_name)
    if adapter_name in state.trainable:
        from .checkpointing import release_input_grads

        state.trainable.remove(adapter_name)
        release_input_grads(model)
    restore_base_weights(model, adapter_name, unloading=unloading)
    config = state.configs.get(adapter_name)
    if config is not None and config.is_prompt_learning:
        remove_prefix(model, state, adapter_name)
    _remove_layers(model, state, adapter_name, state.modules.get(adapter_name, {}))
    _remove_shared(model, adapter_name)
