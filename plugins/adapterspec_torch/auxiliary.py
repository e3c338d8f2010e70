"""Auxiliary tensors (SPEC.md 5.3, 8.8): base-model parameters an adapter's file replaces, and tensors kept as-is.

A PEFT folder may hold, besides the method's tensors, full tensors that replace the base model's while
the adapter is loaded: the base weight of an adapted embedding (``<m>.base_layer.weight``), a resized
embedding (``<emb>.weight``), trained biases (``bias="lora_only"``: ``<m>.base_layer.bias``; ``bias="all"``:
also ``<m>.bias`` of any module). Each becomes a new parameter put in place of the old one -- in every
module holding the old one, so tied weights stay tied -- and the old one comes back when the adapter is
deleted (:func:`restore`). As in PEFT, these replacements stay in place when another adapter is active.

Tensors the spec says to accept but never apply are kept for saving: VeLoRA's ``lora_velora_embed``
and PEFT's bookkeeping copies ``<m>.original_module.<p>`` / ``<m>.modules_to_save.<p>`` (written again
from the live modules they mirror).

>>> plan = plan_auxiliary(model, state, adapter, "default", LoadOptions(), expected)   # doctest: +SKIP
>>> sorted(plan.replace)                                                               # doctest: +SKIP
['base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias', ...]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from adapterspec import Adapter, AdapterConfig, LoadOptions
from adapterspec._merge import replaced_tensor_refusal
from adapterspec._method_checks import velora_state_error
from adapterspec.config import velora_state_size
from adapterspec.errors import (
    AdapterSpecError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnexpectedTensorError,
    UnsupportedError,
)
from adapterspec.naming import (
    BASE_LAYER_BIAS,
    BASE_LAYER_PARAM,
    EMBEDDING_NAMES,
    VELORA_STATE,
    embedding_error,
    make_key,
    parse_key,
)

from ._keys import slot
from .layers import AdapterLayer, ModulesToSaveLayer, check_supported, linear_in_features
from .parameters import ParameterLayer
from .switch import ModelState

__all__ = [
    "AuxiliaryPlan",
    "Override",
    "apply_overrides",
    "auxiliary_tensors",
    "embedding_modules",
    "fresh_bias_overrides",
    "fresh_velora_state",
    "plan_auxiliary",
    "rank_errors",
    "restore",
    "restore_refusal",
    "unwrapped",
]


@dataclass
class Override:
    """A base-model parameter replaced while an adapter is loaded.

    :param keys: the canonical keys it is saved under (two when a file names both of two tied layers).
    :param slots: every (module, parameter name) that held ``old`` and holds ``new`` now.
    :param old: the parameter before; it comes back on delete.
    :param new: the adapter's parameter.
    """

    keys: list[str]
    slots: list[tuple[nn.Module, str]]
    old: nn.Parameter
    new: nn.Parameter


@dataclass
class AuxiliaryPlan:
    """What :func:`plan_auxiliary` found in a file besides the injected parameters.

    :param replace: key -> (module, parameter name) whose parameter the tensor replaces.
    :param keep: key -> a function giving the tensor to save again (the loaded tensor is its argument).
    :param errors: problems, in the order of SPEC.md 10's checks.
    """

    replace: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    keep: dict[str, Callable[[Any], Callable[[], Any]]] = field(default_factory=dict)
    errors: list[AdapterSpecError] = field(default_factory=list)


def unwrapped(module: nn.Module) -> nn.Module:
    """The model's own module behind an adapterspec wrapper (the wrapped layer, or a saved module's original).

    >>> unwrapped(torch.nn.Linear(1, 1)).__class__.__name__
    'Linear'
    """
    if isinstance(module, AdapterLayer):
        return module._modules["base_layer"]
    if isinstance(module, ModulesToSaveLayer):
        return module._modules["original_module"]
    if isinstance(module, ParameterLayer):
        return module._base()
    return module


#: The order of SPEC.md 10's checks: 18 (module exists, supported), 19 (missing/unexpected), 20-21 (shapes).
_RANK = {TargetNotFoundError: 0, UnsupportedError: 0, UnexpectedTensorError: 1, ShapeMismatchError: 2}


def rank_errors(errors: list[AdapterSpecError]) -> list[AdapterSpecError]:
    """``errors`` in the order of SPEC.md 10's model checks (18, then 19, then 20-21), stable otherwise.

    >>> [type(e).__name__ for e in rank_errors([ShapeMismatchError("x"), TargetNotFoundError("y")])]
    ['TargetNotFoundError', 'ShapeMismatchError']
    """
    return sorted(errors, key=lambda e: next((r for cls, r in _RANK.items() if isinstance(e, cls)), 1))


class _Model:
    """Lazy lookups on the model: its modules by name (one walk, only if a key needs it)."""

    def __init__(self, model: nn.Module, options: LoadOptions) -> None:
        self.model, self.options = model, options
        self._modules: dict[str, nn.Module] | None = None

    def find(self, spec_path: str) -> nn.Module | None:
        from .inject import iter_modules, resolve_module

        own = resolve_module(self.model, spec_path, self.options)
        if own is None:
            return None
        if self._modules is None:
            self._modules = dict(iter_modules(self.model))
        return self._modules.get(own)

    def inside(self, spec_path: str) -> str | None:
        """The path of a module the model holds ``spec_path`` as, under a prefix (a wrapper around the model the
        adapter was made for: ``DataParallel``'s ``module``, a container), or ``None``."""
        from .inject import iter_modules

        if self._modules is None:
            self._modules = dict(iter_modules(self.model))
        return next((path for path in self._modules if path.endswith("." + spec_path)), None)


def _absent(key: str, module: str, lookup: _Model) -> TargetNotFoundError:
    inside = lookup.inside(module)
    if inside is not None:
        prefix = inside[:-len(module) - 1]
        return TargetNotFoundError(
            f"the key names module {module!r}, which the model holds as {inside!r}: the model wraps the one the "
            f"adapter was made for (in {prefix!r})", key=key,
            hint=f"load into the wrapped model (model.get_submodule({prefix!r}), e.g. ddp_model.module), and wrap it "
                 "(DataParallel, DistributedDataParallel) after loading")
    return TargetNotFoundError(f"the key names module {module!r}, which is not in the model", key=key,
                               hint="check the adapter was trained for this architecture (module names), "
                                    "or pass module_map")


def _not_taken(key: str, module: str, why: str) -> UnexpectedTensorError:
    return UnexpectedTensorError(f"module {module!r} {why}", key=key,
                                 hint="check the config (target_modules, modules_to_save, bias, "
                                      "trainable_token_indices) matches the tensors")


def embedding_modules(model: nn.Module) -> dict[str, nn.Module] | None:
    """The model's input and output embeddings (transformers' ``get_input_embeddings()`` /
    ``get_output_embeddings()``, the modules PEFT's ``save_embedding_layers`` saves whole), by module name --
    or ``None`` for a model that names none (not a transformers model).

    >>> sorted(embedding_modules(gpt2_lm_head_model))                   # doctest: +SKIP
    ['lm_head', 'transformer.wte']
    """
    found: list[nn.Module] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)() if callable(getattr(model, getter, None)) else None
        except (NotImplementedError, AttributeError):
            layer = None
        if isinstance(layer, nn.Module):
            found.append(unwrapped(layer))
    if not found:
        return None
    from .inject import iter_modules

    return {name: module for name, module in iter_modules(model)
            if any(unwrapped(module) is layer for layer in found)}


def _embedding_error(key: str, module: str, found: nn.Module | None,
                     embeddings: dict[str, nn.Module] | None) -> UnexpectedTensorError | None:
    """:func:`adapterspec.naming.embedding_error`, ``found`` (the module at ``module``) compared by identity."""
    is_embedding = found is not None and embeddings is not None and \
        any(unwrapped(found) is layer for layer in embeddings.values())
    return embedding_error(key, module, embeddings, is_embedding, "get_input_embeddings")


def plan_auxiliary(model: nn.Module, state: ModelState, adapter: Adapter, adapter_name: str, options: LoadOptions,
                   expected: Mapping[str, torch.Tensor]) -> AuxiliaryPlan:
    """Classify every tensor of ``adapter`` that no injected parameter takes, and check it against the model.

    Checks 18-21 of SPEC.md 10 for these keys: the module a key names exists (``TargetNotFoundError``),
    takes such a tensor (``UnexpectedTensorError``), with the shape of the tensor it replaces
    (``ShapeMismatchError``; a resized vocabulary is refused: resize the model's embeddings first).

    :param expected: canonical key -> injected parameter (:func:`~adapterspec_torch.state.expected_params`).
    """
    config: AdapterConfig = state.configs[adapter_name]
    adapted = {spec: state.wrappers[own] for spec, own in state.modules[adapter_name].items()}
    lookup = _Model(model, options)
    plan = AuxiliaryPlan()
    embeddings: list[dict[str, nn.Module] | None] = []  # computed once, for the first embedding key
    for key, info in adapter.tensors.items():
        if key in expected:
            continue
        try:
            name = parse_key(key, config.peft_type, config, with_model=True)
        except UnexpectedTensorError as exc:
            plan.errors.append(exc)
            continue
        module = name.module
        layer = adapted.get(module)
        if name.role == "adapter" and name.param == VELORA_STATE and isinstance(layer, AdapterLayer):
            problem = velora_state_error(config, module, tuple(info.shape), linear_in_features(layer))
            if problem is not None:
                plan.errors.append(problem)
            else:
                plan.keep[key] = _as_loaded
            continue
        if name.role in ("base_layer", "bias") and name.param in (BASE_LAYER_PARAM, BASE_LAYER_BIAS):
            if isinstance(layer, AdapterLayer):
                target: tuple[nn.Module, str] = (layer.base_layer, name.param.rpartition(".")[2])
            else:
                found = lookup.find(module)
                plan.errors.append(_absent(key, module, lookup) if found is None else
                                   _not_taken(key, module, "has no adapter of this adapter, so no base_layer"))
                continue
        elif name.role in ("bias", "embedding"):
            found = lookup.find(module)
            if name.role == "embedding":
                if not embeddings:
                    embeddings.append(embedding_modules(model))
                refused = _embedding_error(key, module, found, embeddings[0])
                # a key no model could account for is check 8's; a missing embedding transformers names, check 18's
                if refused is not None and (found is not None or module.rpartition(".")[2] not in EMBEDDING_NAMES):
                    plan.errors.append(refused)
                    continue
            if found is None:
                plan.errors.append(_absent(key, module, lookup))
                continue
            target = (unwrapped(found), name.param)
        elif name.role == "ignored":
            found = lookup.find(module)
            if found is None:
                plan.errors.append(_absent(key, module, lookup))
                continue
            plan.keep[key] = _mirror(found, adapter_name, name.param)
            continue
        else:  # method tensors, trainable tokens, modules to save: the injected parameters take them all
            found = lookup.find(module)
            if found is None:
                plan.errors.append(_absent(key, module, lookup))
            elif name.role == "adapter" and (problem := _unsupported(unwrapped(found), module, config)) is not None:
                plan.errors.append(problem)
            else:
                plan.errors.append(_not_taken(key, module, f"takes no {name.param!r} tensor of this adapter "
                                                           f"({name.role})"))
            continue
        error = _target_error(key, module, target, tuple(info.shape))
        if error is not None:
            plan.errors.append(error)
        else:
            plan.replace[key] = target
    return plan


def _unsupported(module: nn.Module, path: str, config: AdapterConfig) -> UnsupportedError | None:
    """Check 18's second half: the layer a method tensor names is one this method can adapt."""
    try:
        check_supported(module, path, config)
    except UnsupportedError as exc:
        return exc
    return None


def _target_error(key: str, module: str, target: tuple[nn.Module, str], shape: tuple[int, ...]) -> AdapterSpecError | None:
    holder, attr = target
    current = holder._parameters.get(attr)
    if current is None:
        return _not_taken(key, module, f"has no parameter {attr!r}")
    if tuple(current.shape) != shape:
        resized = attr == "weight" and isinstance(holder, (nn.Embedding, nn.Linear)) and current.dim() == 2 \
            and shape[1:] == tuple(current.shape[1:])
        hint = ("the vocabulary was resized in training: resize the model's embeddings to "
                f"{shape[0]} rows first (transformers: model.resize_token_embeddings({shape[0]}))") if resized else \
            "the adapter was made for a model of other dimensions"
        return ShapeMismatchError(f"shape {list(shape)} does not fit the model's {list(current.shape)}", key=key,
                                  hint=hint)
    return None


def _as_loaded(tensor: Any) -> Callable[[], Any]:
    return lambda: tensor


def _mirror(module: nn.Module, adapter_name: str, param: str) -> Callable[[Any], Callable[[], Any]]:
    """PEFT's bookkeeping copy ``original_module.<p>`` / ``modules_to_save.<p>``: saved again from the live module
    it mirrors (the original, or this adapter's copy); as loaded if there is none."""
    which, _, inner = param.partition(".")

    def getter(tensor: Any) -> Callable[[], Any]:
        def live() -> Any:
            if isinstance(module, ModulesToSaveLayer):
                source = module.original_module if which == "original_module" else \
                    module.modules_to_save._modules.get(slot(adapter_name))
                value = source.state_dict(keep_vars=True).get(inner) if source is not None else None
                if value is not None:
                    return value.detach()
            return tensor
        return live

    return getter


def _holders(model: nn.Module, params: list[nn.Parameter]) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, name) holding it (tied weights have several)."""
    wanted = {id(p) for p in params}
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) in wanted:
                out.setdefault(id(p), []).append((module, attr))
    return out


def apply_overrides(model: nn.Module, state: ModelState, adapter_name: str, plan: AuxiliaryPlan,
                    tensors: Mapping[str, torch.Tensor], options: LoadOptions) -> None:
    """Put the planned replacements in place (all holders of a tied parameter at once) and keep the kept tensors.

    Keys naming the same parameter (a file holding both of two tied layers) give one replacement: the last
    one's values, as PEFT's ``load_state_dict`` would leave them.
    """
    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for key, (holder, attr) in plan.replace.items():
        old = holder._parameters[attr]
        assert old is not None  # the plan replaces parameters that exist (_target_error)
        groups.setdefault(id(old), (old, []))[1].append(key)
    overrides = state.base_weights.setdefault(adapter_name, [])
    if groups:
        holders = _holders(model, [old for old, _ in groups.values()])
        for old_id, (old, keys) in groups.items():
            value = tensors[keys[-1]]
            trainable = old.requires_grad or (bool(options.trainable) and keys[-1].endswith("bias"))
            new = nn.Parameter(value.to(device=old.device, dtype=old.dtype), requires_grad=trainable)
            slots = holders.get(old_id) or [plan.replace[keys[-1]]]
            for holder, attr in slots:
                holder._parameters[attr] = new
            overrides.append(Override(keys, slots, old, new))
    if plan.keep:
        kept = state.extras.setdefault(adapter_name, {})
        for key, make in plan.keep.items():
            kept[key] = make(tensors[key])


def fresh_bias_overrides(model: nn.Module, state: ModelState, config: AdapterConfig, adapter_name: str,
                         options: LoadOptions) -> None:
    """For a new adapter with ``bias`` = ``"lora_only"``/``"all"``: give it its own copy of the biases PEFT
    would train and save (``<m>.base_layer.bias`` of its adapted modules; with ``"all"`` also ``<m>.bias`` of
    every other module, and the bookkeeping copies of its modules to save), trainable if ``options.trainable``."""
    from .inject import _universe

    bias = config.get("bias") if config.peft_type == "LORA" else None
    if bias not in ("lora_only", "all"):
        return
    mine = state.modules[adapter_name]
    replace: dict[str, tuple[nn.Module, str]] = {}
    keep: dict[str, Callable[[Any], Callable[[], Any]]] = {}
    for spec, _, module in _universe(model, options):
        if spec in mine and isinstance(module, AdapterLayer):
            if module.base_layer._parameters.get("bias") is not None:
                replace[make_key(spec, BASE_LAYER_BIAS)] = (module.base_layer, "bias")
            continue
        if bias != "all":
            continue
        if spec in mine and isinstance(module, ModulesToSaveLayer):
            for p in module.original_module.state_dict(keep_vars=True):
                if p == "bias" or p.endswith(".bias"):
                    for which in ("original_module", "modules_to_save"):
                        keep[make_key(spec, f"{which}.{p}")] = _mirror(module, adapter_name, f"{which}.{p}")
            continue
        base = unwrapped(module)
        if base._parameters.get("bias") is not None:
            replace[make_key(spec, "bias")] = (base, "bias")
    tensors: dict[str, Any] = {key: cast(nn.Parameter, holder._parameters["bias"]).detach().clone()  # not None: above
                               for key, (holder, _) in replace.items()}
    tensors.update(dict.fromkeys(keep))
    apply_overrides(model, state, adapter_name, AuxiliaryPlan(replace=replace, keep=keep), tensors, options)
    for override in state.base_weights.get(adapter_name, []):
        override.new.requires_grad_(bool(options.trainable))


def fresh_velora_state(state: ModelState, config: AdapterConfig, adapter_name: str) -> None:
    """For a new adapter with ``velora_config``: the ``lora_velora_embed`` PEFT gives each adapted module at creation
    (zeros of ``[ceil(in_features / num_groups)]`` in the base weight's dtype; ``init_type`` ``"random"``: a random
    unit vector), kept to be saved, so that PEFT loads the saved folder without a missing key (SPEC.md 5.2)."""
    velora = config.get("velora_config")
    for spec, own in state.modules[adapter_name].items():
        layer = state.wrappers.get(own)
        if not isinstance(layer, AdapterLayer) or adapter_name not in layer.adapter_names():
            continue
        in_features = linear_in_features(layer)
        if in_features is None:  # VeLoRA adapts linear layers only (check_supported refused the others)
            continue
        weight = layer.base_layer.weight
        size = velora_state_size(config, in_features)
        if size is None:
            return
        if isinstance(velora, Mapping) and velora.get("init_type") == "random":
            value = torch.randn(size, device=weight.device)
            value = (value / torch.linalg.vector_norm(value)).to(weight.dtype)
        else:
            value = torch.zeros(size, dtype=weight.dtype, device=weight.device)
        state.extras.setdefault(adapter_name, {})[make_key(spec, VELORA_STATE)] = _as_loaded(value)


def restore(model: nn.Module, state: ModelState, adapter_name: str, *, unloading: bool = False) -> None:
    """Put back the parameters ``adapter_name`` replaced and forget its kept tensors.

    While ``unloading`` with any adapter merged (``unload(merge=True)`` deletes adapters with the active ones merged),
    the replacements stay: the forward pass used them, whichever adapter was active, and the merged model keeps
    what it computed. Where a later adapter replaced a parameter again, that adapter inherits the one to restore.
    (``delete_adapter`` with another adapter merged: :func:`restore_refusal` first.)
    """
    overrides = state.base_weights.pop(adapter_name, [])
    state.extras.pop(adapter_name, None)
    if state.merged and unloading:
        return
    for override in overrides:
        for holder, attr in override.slots:
            if holder._parameters.get(attr) is override.new:
                holder._parameters[attr] = override.old
        for others in state.base_weights.values():
            for other in others:
                if other.old is override.new:
                    other.old = override.old


def restore_refusal(model: nn.Module, state: ModelState, adapter_name: str) -> UnsupportedError | None:
    """Why the parameters ``adapter_name``'s file replaced cannot come back exactly now, or ``None``: one belongs
    to a module a merged adapter is merged into (a merge may have written into it -- IA3 scales the bias -- and
    restoring the old one would drop that delta). The same rule as Keras' function of the same name.

    >>> restore_refusal(model, get_state(model), "v")                    # doctest: +SKIP
    """
    if not state.merged:
        return None
    merged: dict[int, tuple[str, str]] = {}  # id(parameter) -> (module path, a merged adapter)
    for path, module in model.named_modules():
        if isinstance(module, (AdapterLayer, ParameterLayer)) and module.merged_adapters:
            for param in module.base_layer.parameters():
                merged.setdefault(id(param), (path, module.merged_adapters[0]))
    for override in state.base_weights.get(adapter_name, []):
        if not any(holder._parameters.get(attr) is override.new for holder, attr in override.slots):
            continue  # replaced again by a later adapter: that one inherits the parameter to restore
        found = merged.get(id(override.new))
        if found is not None:
            return replaced_tensor_refusal(adapter_name, override.keys[0] if override.keys else found[0], *found)
    return None


def auxiliary_tensors(state: ModelState, adapter_name: str) -> dict[str, Any]:
    """Canonical key -> tensor of every auxiliary tensor ``adapter_name`` saves (replacements, kept tensors).

    >>> auxiliary_tensors(get_state(model), "default")                 # doctest: +SKIP
    {'base_model.model.model.embed_tokens.base_layer.weight': tensor(...)}
    """
    out: dict[str, Any] = {}
    for override in state.base_weights.get(adapter_name, []):
        for key in override.keys:
            out[key] = override.new.detach()
    for key, get in state.extras.get(adapter_name, {}).items():
        value = get()
        if value is not None:
            out[key] = value
    return out
