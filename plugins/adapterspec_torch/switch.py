"""Per-model bookkeeping and adapter switching: names, active set, delete, merge, unmerge.

All bookkeeping lives in ONE place, :class:`ModelState` at ``model._adapterspec_state``; it is
removed when the last adapter goes. Every layer injected into a model shares the model's
:class:`~adapterspec_torch.layers.ActiveSet`, so switching adapters is a single assignment: base weights
are never copied.

>>> import torch
>>> adapter_names(torch.nn.Linear(2, 2))
[]
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast, overload

import torch

from adapterspec import AdapterConfig
from adapterspec._merge import base_load_refusal
from adapterspec._mix import mix_refusal
from adapterspec.config import merge_refusal
from adapterspec.errors import AdapterNotFoundError, UnsupportedError

from .layers import ActiveSet, AdapterLayer, ModulesToSaveLayer
from .parameters import ParameterLayer

__all__ = [
    "STATE_ATTR",
    "ModelState",
    "active_adapters",
    "adapter_names",
    "check_base_loadable",
    "check_mix",
    "delete",
    "get_state",
    "merge",
    "own_state",
    "require_state",
    "set_active",
    "unmerge",
]

STATE_ATTR = "_adapterspec_state"


@dataclass
class ModelState:
    """What adapterspec knows about one model's adapters.

    :param names: adapter names in load order.
    :param switch: the active adapters, shared by every injected layer.
    :param configs: name -> the config the adapter was injected with.
    :param modules: name -> {spec module path: the model's module name} it adapts or saves whole.
    :param merged: adapters whose deltas are in the base weights now, in merge order.
    :param originals: model module name -> the module object that was there before the first injection.
    :param wrappers: model module name -> the wrapper put there (while it holds an adapter).
    :param base_weights: name -> the base-model parameters it replaced (:class:`~adapterspec_torch.auxiliary.Override`:
        embedding base weights, resized embeddings, trained biases), to put back on delete.
    :param extras: name -> {canonical key: function giving the tensor} for tensors saved with it but never
        applied (VeLoRA's ``lora_velora_embed``, PEFT's bookkeeping copies of modules to save).
    :param prompt_hook: the forward pre-hook of prefix/prompt tuning, while one such adapter is loaded.
    :param freezers: adapters injected trainable with ``freeze_base`` (the base stays frozen while one is loaded).
    :param frozen: (parameter, its ``requires_grad`` before) of every base parameter frozen for them.
    :param stored_dtypes: name -> {canonical key: the dtype its file stored} for tensors loaded into another
        dtype (float32 on a half-precision base, SPEC.md 7.5), so that saving can write them back as stored.
    :param base_samples: model module name -> (the fingerprint samples of its base weight taken just before an
        adapter was merged into it, or ``None``; the samples of what an unmerge left there, or ``None``), so that a
        save while merged, or after an unmerge that rounded differently, records the base (SPEC.md 9.1).
    :param tied: name -> {spec path of a layer tied to the input embedding: (the embedding's spec path, ``"targets"``
        or ``"modules_to_save"``)} for an adapter with ``ensure_weight_tying`` (SPEC.md 15.2).
    :param trainable: adapters injected or loaded trainable.
    :param input_grads: whether adapterspec made the input embeddings' output require grad for them (gradient
        checkpointing, :mod:`~adapterspec_torch.checkpointing`), until the last one goes.
    """

    names: list[str] = field(default_factory=list)
    switch: ActiveSet = field(default_factory=ActiveSet)
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    modules: dict[str, dict[str, str]] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)
    originals: dict[str, torch.nn.Module] = field(default_factory=dict)
    wrappers: dict[str, AdapterLayer | ModulesToSaveLayer | ParameterLayer] = field(default_factory=dict)
    base_weights: dict[str, list[Any]] = field(default_factory=dict)
    extras: dict[str, dict[str, Callable[[], Any]]] = field(default_factory=dict)
    prompt_hook: Any = None
    freezers: list[str] = field(default_factory=list)
    frozen: list[tuple[torch.nn.Parameter, bool]] = field(default_factory=list)
    stored_dtypes: dict[str, dict[str, torch.dtype]] = field(default_factory=dict)
    base_samples: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    tied: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)
    input_grads: bool = False

    @property
    def active(self) -> list[str]:
        """The active adapters, in the order they were activated."""
        return list(self.switch.names)


@overload
def get_state(model: torch.nn.Module, *, create: Literal[True]) -> ModelState: ...
@overload
def get_state(model: torch.nn.Module, *, create: bool = False) -> ModelState | None: ...
def get_state(model: torch.nn.Module, *, create: bool = False) -> ModelState | None:
    """``model``'s :class:`ModelState` (created when ``create``), or ``None`` when it has no adapter.

    >>> get_state(torch.nn.Linear(2, 2)) is None
    True
    """
    state: ModelState | None = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = ModelState()
        object.__setattr__(model, STATE_ATTR, state)
    return state


def own_state(model: torch.nn.Module) -> ModelState | None:
    """``model``'s :class:`ModelState`, or ``None`` when neither it nor any module inside it has adapters.

    :raises AdapterNotFoundError: ``model`` wraps the model the adapters were loaded into (DDP, ``torch.compile``,
        a container): a call on the wrapper did nothing, silently (``adapter_names`` said ``[]``).
    :raises UnsupportedError: ``model`` holds PEFT's own adapter layers (a ``PeftModel``): ``adapter_names`` said
        ``[]``, ``merge_adapters`` did nothing.
    """
    state = get_state(model)
    if state is None:
        peft_layer = _peft_layer_type()
        for path, module in model.named_modules(remove_duplicate=True):
            inner = get_state(module) if path else None
            if inner is not None and inner.names:
                raise AdapterNotFoundError(
                    f"this {type(model).__name__} holds no adapters itself: it wraps the {type(module).__name__} "
                    f"they were loaded into ({path!r}, adapters {inner.names})", key=path,
                    hint=f"call this on model.get_submodule({path!r}), the model they were loaded into (DDP, "
                         "torch.compile and containers wrap it)")
            if peft_layer is not None and isinstance(module, peft_layer):
                raise UnsupportedError(
                    f"this model holds PEFT's own adapter layers ({path!r} is a {type(module).__module__}."
                    f"{type(module).__qualname__}), which adapterspec does not drive", key=path,
                    hint=_peft_layers_hint(model))
    return state


def _peft_layers_hint(model: torch.nn.Module) -> str:
    """The fix for a model holding PEFT's layers, by what put them there: a ``PeftModel``; diffusers' ``add_adapter``
    (its models have ``save_lora_adapter``); transformers' ``add_adapter``; else PEFT's ``inject_adapter_in_model``."""
    peft_model = getattr(sys.modules.get("peft.peft_model"), "PeftModel", None)
    if peft_model is not None and isinstance(model, peft_model):
        return ("use PEFT's own methods on it (set_adapter, merge_and_unload, save_pretrained), or load the folder "
                "PEFT saves into the base model with adapterspec.load_adapter")
    if callable(getattr(model, "save_lora_adapter", None)):
        return ("use diffusers' own methods on it (set_adapters, fuse_lora, unload_lora; save_lora_adapter writes a "
                "diffusers-format file, which adapterspec does not read), or load a PEFT-format adapter folder into "
                "the model without these layers with adapterspec.load_adapter")
    if type(model).__module__.startswith("transformers.") and callable(getattr(model, "add_adapter", None)):
        return ("use transformers' adapter methods on it (set_adapter, disable_adapters; save_pretrained saves the "
                "adapter as a PEFT-format folder), then load that folder into the base model with "
                "adapterspec.load_adapter")
    return ("use PEFT's functions on it (get_peft_model_state_dict gives its adapter's tensors), or load a PEFT-format "
            "adapter folder into the model without these layers with adapterspec.load_adapter")


def _peft_layer_type() -> type | None:
    """PEFT's ``BaseTunerLayer`` where PEFT is imported already (a model cannot hold its layers otherwise)."""
    module = sys.modules.get("peft.tuners.tuners_utils")
    return cast("type | None", getattr(module, "BaseTunerLayer", None)) if module is not None else None


def require_state(model: torch.nn.Module, adapter_name: str) -> ModelState:
    """``model``'s state, checking that ``adapter_name`` is loaded.

    :raises AdapterNotFoundError: it is not (or ``model`` wraps the model that has it, :func:`own_state`).
    """
    state = own_state(model)
    if state is None or adapter_name not in state.configs:
        loaded = state.names if state is not None else []
        raise AdapterNotFoundError(f"no adapter named {adapter_name!r} is loaded (loaded: {loaded})",
                                   key=adapter_name, hint="load_adapter() it first")
    return state


def drop_state_if_empty(model: torch.nn.Module) -> None:
    """Remove the bookkeeping attribute once no adapter is left."""
    state = get_state(model)
    if state is not None and not state.names:
        del model.__dict__[STATE_ATTR]
        from .guard import unguard_save_pretrained

        unguard_save_pretrained(model)


def adapter_names(model: torch.nn.Module) -> list[str]:
    """The adapters loaded in ``model``, in load order.

    >>> adapter_names(model)                                            # doctest: +SKIP
    ['default', 'fr']
    """
    state = own_state(model)
    return list(state.names) if state is not None else []


def active_adapters(model: torch.nn.Module) -> list[str]:
    """The adapters in the forward pass now (``[]`` when disabled or none).

    >>> active_adapters(model)                                          # doctest: +SKIP
    ['default']
    """
    state = own_state(model)
    return state.active if state is not None else []


def set_active(model: torch.nn.Module, adapter_names: Sequence[str]) -> None:
    """Make exactly ``adapter_names`` active (several add up; ``[]`` disables), unmerging first.

    :raises AdapterNotFoundError: a name is not loaded (nothing changes).
    :raises UnsupportedError: two prefix/prompt-tuning adapters at once, or adapters that may not run together on
        one layer (:func:`check_mix`); nothing changes.

    >>> set_active(model, ["fr"])                                       # doctest: +SKIP
    """
    names = tuple(dict.fromkeys(adapter_names))
    state = own_state(model)
    if state is None:
        if names:
            require_state(model, names[0])
        return
    for name in names:
        require_state(model, name)
    prompts = [n for n in names if state.configs[n].is_prompt_learning]
    if len(prompts) > 1:
        raise UnsupportedError(f"only one prefix/prompt-tuning adapter can be active at a time, got {prompts}",
                               key=prompts[1], hint="activate one of them (with any number of layer adapters)")
    check_mix(state, names)
    if state.merged:
        unmerge(model)
    state.switch.names = names


def check_mix(state: ModelState, names: Sequence[str]) -> None:
    """Refuse adapters ``names`` that may not run together on one of the model's layers (the SDK's
    :func:`~adapterspec._mix.mix_refusal`, SPEC.md 8.9: IA3, OFT/BOFT or DoRA with another method, two copies of a
    module saved whole, two adapters replacing one token row), before anything changes.

    :raises UnsupportedError: naming the adapters and the module.
    """
    if len(names) < 2:
        return
    for own, layer in state.wrappers.items():
        if isinstance(layer, (AdapterLayer, ModulesToSaveLayer)):
            refusal = mix_refusal(own, layer.running_of(names))
            if refusal is not None:
                raise refusal


def _wrappers(model: torch.nn.Module, state: ModelState, adapter_name: str) -> list[tuple[str, torch.nn.Module]]:
    return [(own, state.wrappers[own]) for own in state.modules.get(adapter_name, {}).values()]


def delete(model: torch.nn.Module, adapter_name: str, *, unloading: bool = False) -> None:
    """Remove an adapter; a module left without adapters gets its original object back. If the adapter was the only
    active one, the first remaining adapter becomes active (as in PEFT).

    The other adapters stay as they are: merged ones merged, their weights bit for bit; the base tensors the
    adapter's file replaced come back (:func:`~adapterspec_torch.auxiliary.restore`). A merged adapter is unmerged
    first, with every other merged one (:func:`unmerge`).

    :param unloading: ``unload`` deletes every adapter: a merged adapter's delta then stays in the base weights, and
        the copy of a module it saved whole that was running when it was merged stays as that module (``unload(merge=
        True)``, PEFT's ``merge_and_unload``); while any adapter is merged, replaced base tensors stay too.
    :raises AdapterNotFoundError: no adapter of that name.
    :raises UnsupportedError: (not ``unloading``) a base tensor the adapter's file replaced belongs to a module a
        merged adapter is merged into (:func:`~adapterspec_torch.auxiliary.restore_refusal`); nothing changed.

    >>> delete(model, "fr")                                             # doctest: +SKIP
    """
    from .auxiliary import restore_refusal
    from .inject import remove_adapter_modules

    state = require_state(model, adapter_name)
    if not unloading and adapter_name in state.merged:
        unmerge(model)
    refusal = None if unloading else restore_refusal(model, state, adapter_name)
    if refusal is not None:
        raise refusal
    was_active = adapter_name in state.switch.names
    remove_adapter_modules(model, adapter_name, unloading=unloading)
    state.names.remove(adapter_name)
    state.configs.pop(adapter_name)
    state.modules.pop(adapter_name, None)
    state.stored_dtypes.pop(adapter_name, None)
    state.tied.pop(adapter_name, None)
    if adapter_name in state.merged:  # its delta stays in the weights: they are the base now, or unknown
        state.merged.remove(adapter_name)
        state.base_samples.clear()
    remaining = tuple(n for n in state.switch.names if n != adapter_name)
    if was_active and not remaining and state.names:
        remaining = (state.names[0],)
    state.switch.names = remaining
    drop_state_if_empty(model)


def merge(model: torch.nn.Module, adapter_names: Sequence[str]) -> None:
    """Add the adapters' weight deltas into the base weights, in place; the forward then skips them.

    :raises AdapterNotFoundError: a name is not loaded.
    :raises UnsupportedError: prefix/prompt tuning (no weight delta), what a layer cannot merge
        (:meth:`~adapterspec_torch.layers.AdapterLayer.check_merge`), or adapters that may not run together on one
        layer (:func:`check_mix`: the merged ones, those to merge and the active ones); nothing changes then.

    >>> merge(model, ["default"])                                       # doctest: +SKIP
    """
    for name in adapter_names:
        config = require_state(model, name).configs[name]
        if config.is_prompt_learning:
            raise UnsupportedError(f"{config.peft_type} adds virtual tokens; it has no weights to merge",
                                   key=name, hint="keep the adapter unmerged")
        tied = [spec for spec, (_, mode) in require_state(model, name).tied.get(name, {}).items() if mode == "targets"]
        if tied:  # SPEC.md 15.2
            raise UnsupportedError(f"the LoRA of {tied[0]!r} is tied to the input embedding's (ensure_weight_tying) and "
                                   "shares its weight: merging would add the delta twice, as PEFT 0.21 does",
                                   key=name, pointer="/ensure_weight_tying", hint="keep the adapter unmerged")
    state = own_state(model)
    if state is None:  # no adapter loaded, so none was named (require_state refuses every name)
        return
    from .identity import remember_base  # identity imports this module

    todo = [name for name in adapter_names if name not in state.merged]
    from .distributed import check_fsdp1_weight

    for name in todo:  # every layer's refusal first: a refused merge changes no weight
        for own, layer in _wrappers(model, state, name):
            if isinstance(layer, AdapterLayer):
                check_fsdp1_weight(layer.base_layer, own, "merging")
                layer.check_merge([name])
    _check_unshared(model, state, todo)
    refusal = merge_refusal(state.switch.names, state.merged, todo,
                            [(own, layer.adapter_names()) for name in todo
                             for own, layer in _wrappers(model, state, name) if isinstance(layer, AdapterLayer)])
    if refusal is not None:  # SPEC.md 8.9
        raise refusal
    check_mix(state, list(dict.fromkeys([*state.switch.names, *state.merged, *todo])))
    for name in adapter_names:
        if name in state.merged:
            continue
        remember_base(state, name)
        for _, layer in _wrappers(model, state, name):
            if isinstance(layer, (AdapterLayer, ModulesToSaveLayer, ParameterLayer)):
                layer.merge([name])
        state.merged.append(name)


def _check_unshared(model: torch.nn.Module, state: ModelState, names: Sequence[str]) -> None:
    """Refuse to merge into a base weight another module reads too (input embedding and output layer tied
    without ``ensure_weight_tying``): the delta would change that module's output, which the unmerged adapter does
    not (PEFT merges and only warns: its merged model differs from its unmerged one)."""
    readers: dict[int, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        readers.setdefault(id(param), []).append(path)
    for name in names:
        for own, layer in _wrappers(model, state, name):
            if not isinstance(layer, AdapterLayer):
                continue
            weight = getattr(layer._modules["base_layer"], "weight", None)
            others = [p for p in readers.get(id(weight), [])
                      if not p.startswith(own + ".") and not _tied_pair(model, layer, p, name)]
            if others:
                raise UnsupportedError(
                    f"the weight of {own!r} is also {others[0]!r} (tied weights): merging the adapter into it would "
                    f"change {others[0].rsplit('.', 1)[0]!r} too, which the unmerged adapter does not", key=name,
                    hint=f"keep the adapter unmerged, or untie the weights first (give {others[0]!r} its own copy: "
                         "nn.Parameter(weight.clone()), and tie_word_embeddings=False in the model's config)")


def _tied_pair(model: torch.nn.Module, layer: AdapterLayer, path: str, name: str) -> bool:
    """Whether the parameter at ``path`` is the base weight of another layer of adapter ``name`` tied to ``layer``
    (trainable tokens on an embedding and the layers tied to it -- its output layer; T5's and BART's encoder and
    decoder embeddings, which share one weight: one set of rows, merged once)."""
    owner = path.rsplit(".", 1)[0]
    if not owner.endswith(".base_layer"):
        return False
    other = model.get_submodule(owner.rsplit(".", 1)[0])
    if not isinstance(other, AdapterLayer) or name not in other._specs or name not in layer._specs:
        return False
    return (other._specs[name].source or other) is (layer._specs[name].source or layer)


def unmerge(model: torch.nn.Module) -> None:
    """Subtract every merged adapter from the base weights again (no-op when none is merged).

    >>> unmerge(model)                                                  # doctest: +SKIP
    """
    state = own_state(model)
    if state is None or not state.merged:
        return
    from .distributed import check_fsdp1_weight

    for name in state.merged:  # every refusal first: a refused unmerge changes no weight
        for own, layer in _wrappers(model, state, name):
            if isinstance(layer, AdapterLayer):
                check_fsdp1_weight(layer.base_layer, own, "unmerging")
                layer.check_unmerge()  # RoAd: a singular matrix cannot be undone
    seen = set()
    for name in reversed(state.merged):
        for model_name, layer in _wrappers(model, state, name):
            if isinstance(layer, (AdapterLayer, ModulesToSaveLayer, ParameterLayer)) and model_name not in seen:
                seen.add(model_name)
                layer.unmerge()
    state.merged.clear()
    from .identity import unmerged_base

    unmerged_base(state)


def modules_to_save_layers(model: torch.nn.Module, state: ModelState, adapter_name: str) -> list[ModulesToSaveLayer]:
    """The :class:`ModulesToSaveLayer` wrappers holding a copy for ``adapter_name``."""
    return [m for _, m in _wrappers(model, state, adapter_name) if isinstance(m, ModulesToSaveLayer)]


def check_base_loadable(model: torch.nn.Module, *, loading: str = "load_state_dict") -> None:
    """Refuse to read a state dict into ``model`` while an adapter is merged into a module of it (the model the
    adapters were loaded into, a model around it, a part of it): the load would replace the merged weight (base +
    delta), and the next unmerge would subtract the delta from what was loaded. ``load_state_dict`` asks before it
    reads anything (:mod:`~adapterspec_torch.guard`). As Keras' function of the same name, which also refuses while a
    module's copy or a replaced base weight is in the variables; here those are parameters of their own, which a state
    dict of the adapted model restores under their own keys.

    :raises UnsupportedError: naming the module and the adapter (SDK ``base_load_refusal``); nothing loaded.

    >>> check_base_loadable(torch.nn.Linear(2, 2))
    """
    for path, module in model.named_modules():
        merged = module.merged_adapters if isinstance(module, (AdapterLayer, ParameterLayer)) else []
        if merged:
            raise base_load_refusal(loading, path or type(module).__name__, merged[0])
