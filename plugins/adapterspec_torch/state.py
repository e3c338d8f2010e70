"""Adapter tensors in and out: load a file's tensors into injected layers, extract them with canonical keys.

Loading checks every key against the injected parameters (missing, unexpected, shape) before it
assigns anything, reads the tensors straight onto their device, and makes them the parameters' data
(no initialise-then-copy). A file may also hold the full weight of an adapted layer
(``<module>.base_layer.weight``, PEFT's resized embeddings); it then replaces that layer's weight
parameter until the adapter is deleted, and is saved again with the adapter.

>>> load_state(model, adapterspec.read_adapter("my-lora"), "default", LoadOptions())  # doctest: +SKIP
['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', ...]
>>> config, tensors = extract_state(model, "default")                  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from adapterspec import Adapter, AdapterConfig, LoadOptions
from adapterspec.errors import AdapterSpecError, MissingTensorError, ShapeMismatchError, UnexpectedTensorError
from adapterspec.naming import BASE_LAYER_PARAM, PROMPT_KEY, make_key

from .inject import PROMPTS_ATTR
from .layers import AdapterLayer
from .switch import require_state

__all__ = ["expected_params", "extract_state", "load_state", "restore_base_weights"]


def expected_params(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Canonical key -> the injected parameter (or buffer) it fills, for every tensor ``adapter_name`` stores.

    :raises AdapterNotFoundError: no such adapter.

    >>> sorted(expected_params(model, "default"))[:1]                    # doctest: +SKIP
    ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight']
    """
    state = require_state(model, adapter_name)
    if state.configs[adapter_name].is_prompt_learning:
        return {PROMPT_KEY: model._modules[PROMPTS_ATTR][adapter_name]}
    out: dict[str, torch.Tensor] = {}
    for spec, own in state.modules[adapter_name].items():
        prefix = make_key(spec, "")
        for param, tensor in state.wrappers[own].adapter_params(adapter_name).items():
            out[prefix + param] = tensor
    return out


def _base_targets(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, AdapterLayer]]:
    """``<module>.base_layer.weight`` key -> (model module name, wrapper) for this adapter's adapted modules."""
    state = require_state(model, adapter_name)
    out = {}
    for spec, own in state.modules[adapter_name].items():
        layer = state.wrappers[own]
        if isinstance(layer, AdapterLayer):
            out[make_key(spec, BASE_LAYER_PARAM)] = (own, layer)
    return out


def _problems(adapter: Adapter, expected: dict[str, torch.Tensor],
              bases: dict[str, tuple[str, AdapterLayer]]) -> list[AdapterSpecError]:
    infos = adapter.tensors
    errors: list[AdapterSpecError] = []
    for key in expected:
        if key not in infos:
            errors.append(MissingTensorError("the model's injected adapter has this parameter but the file does not",
                                             key=key, hint="save the adapter again, complete"))
    for key, info in infos.items():
        if key in expected:
            want = tuple(expected[key].shape)
        elif key in bases:
            want = tuple(bases[key][1].base_layer.weight.shape)
        else:
            errors.append(UnexpectedTensorError("no injected parameter of the model takes this tensor", key=key,
                                                hint="check the config (target_modules, use_dora, lora_bias, "
                                                     "modules_to_save) matches the tensors"))
            continue
        if tuple(info.shape) != want:
            errors.append(ShapeMismatchError(f"shape {list(info.shape)} does not fit the model's {list(want)}",
                                             key=key, hint="the adapter was made for a model of other dimensions"))
    return errors


def _read(adapter: Adapter, targets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    devices = {t.device for t in targets}
    if devices and all(d.type == "meta" for d in devices):
        return {k: torch.empty(info.shape, device="meta") for k, info in adapter.tensors.items()}
    device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    return adapter.load_tensors("pt", device=str(device))


def load_state(model: nn.Module, adapter: Adapter, adapter_name: str, options: LoadOptions) -> list[str]:
    """Put ``adapter``'s tensors into the layers injected for ``adapter_name``: all checks first, then assign.

    Tensors are read with ``adapter.load_tensors("pt", device=...)`` straight onto the parameters'
    device and become their data, cast to the parameter's dtype (set at injection from ``options`` or
    the wrapped layer). ``<module>.base_layer.weight`` replaces that layer's weight parameter.

    :returns: the canonical keys loaded.
    :raises MissingTensorError: an injected parameter has no tensor in the file.
    :raises UnexpectedTensorError: a tensor has no injected parameter.
    :raises ShapeMismatchError: a tensor's shape does not fit its parameter.

    >>> load_state(model, adapter, "default", LoadOptions())           # doctest: +SKIP
    """
    state = require_state(model, adapter_name)
    expected = expected_params(model, adapter_name)
    bases = {k: v for k, v in _base_targets(model, adapter_name).items() if k in adapter.tensors and k not in expected}
    errors = _problems(adapter, expected, bases)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            first.message += f" ({len(errors) - 1} more problem(s), e.g. {errors[1].key})"
            first.args = (str(first),)
        raise first
    tensors = _read(adapter, list(expected.values()) + [layer.base_layer.weight for _, layer in bases.values()])
    with torch.no_grad():
        for key, param in expected.items():
            param.data = tensors[key].to(device=param.device, dtype=param.dtype)
        replaced = state.base_weights.setdefault(adapter_name, {})
        for key, (own, layer) in bases.items():
            old = layer.base_layer._parameters["weight"]
            new = nn.Parameter(tensors[key].to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)
            layer.base_layer._parameters["weight"] = new
            replaced[own] = (old, new)
    return list(expected) + list(bases)


def restore_base_weights(model: nn.Module, adapter_name: str) -> None:
    """Give the layers whose weight ``adapter_name``'s file replaced their previous weight parameter back.

    A merged adapter keeps its weight (with its delta merged in): that is ``unload(merge=True)``.
    """
    state = require_state(model, adapter_name)
    replaced = state.base_weights.pop(adapter_name, {})
    if adapter_name in state.merged:
        return
    for own, (old, new) in replaced.items():
        base = state.wrappers[own].base_layer
        if base._parameters["weight"] is new:
            base._parameters["weight"] = old
            continue
        for other in state.base_weights.values():  # a later adapter replaced it again: hand our "old" on
            if own in other and other[own][0] is new:
                other[own] = (old, other[own][1])


def extract_state(model: nn.Module, adapter_name: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """``adapter_name``'s config and tensors, canonical keys, spec (PEFT) layout, detached (no copies).

    :raises AdapterNotFoundError: no such adapter.

    >>> config, tensors = extract_state(model, "default")              # doctest: +SKIP
    """
    state = require_state(model, adapter_name)
    tensors = {key: t.detach() for key, t in expected_params(model, adapter_name).items()}
    replaced = state.base_weights.get(adapter_name, {})
    if replaced:
        by_name = {own: spec for spec, own in state.modules[adapter_name].items()}
        for own in replaced:
            layer = state.wrappers[own]
            tensors[make_key(by_name[own], BASE_LAYER_PARAM)] = layer.base_layer.weight.detach()
    for key, tensor in tensors.items():
        if not tensor.is_contiguous():
            tensors[key] = tensor.contiguous()
    return state.configs[adapter_name], tensors
