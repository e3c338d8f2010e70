"""Adapter tensors in and out: load a file's tensors into injected layers, extract them with canonical keys.

Loading checks every key against the injected parameters and the model (module exists, missing,
unexpected, shape) before it assigns anything, reads the tensors straight onto their device, and makes
them the parameters' data (no initialise-then-copy). Auxiliary tensors (embedding base weights, resized
embeddings, trained biases, SPEC.md 5.3) replace the base-model parameters they name until the adapter
is deleted, and are saved again with it (:mod:`adapterspec_torch.auxiliary`).

>>> load_state(model, adapterspec.read_adapter("my-lora"), "default", LoadOptions())  # doctest: +SKIP
['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', ...]
>>> config, tensors = extract_state(model, "default")                  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from adapterspec import Adapter, AdapterConfig, LoadOptions
from adapterspec.errors import AdapterSpecError, MissingTensorError, ShapeMismatchError
from adapterspec._vera import shared_key
from adapterspec.naming import PROMPT_KEY, SHARED_PARAMETERS, make_key

from . import vblora, vera
from ._keys import slot
from .auxiliary import AuxiliaryPlan, apply_overrides, auxiliary_tensors, plan_auxiliary, rank_errors, restore
from .layers import AdapterLayer
from .prompts import PROMPTS_ATTR
from .switch import require_state
from .tying import check_tied_tensors, tie

__all__ = ["expected_params", "extract_state", "load_state", "restore_base_weights"]


def _slots(model: nn.Module, adapter_name: str) -> dict[str, tuple[Any, Any, str]]:
    """Canonical key -> (parameter or :class:`PendingParam`, the ``_Weights`` holding a pending one, its attribute)."""
    state = require_state(model, adapter_name)
    out: dict[str, tuple[Any, Any, str]] = {}
    prompt = state.configs[adapter_name].is_prompt_learning
    if prompt:  # and the modules it saves whole (SPEC 15.9), under base_model.<module>
        out[PROMPT_KEY] = (cast(nn.ParameterDict, model._modules[PROMPTS_ATTR])[slot(adapter_name)], None, "")
    wrappers = state.wrappers
    for spec, own in state.modules[adapter_name].items():
        prefix = make_key(spec, "", prompt_learning=prompt)
        layer = wrappers[own]
        if type(layer) is AdapterLayer:  # inlined adapter_params: this runs for every module of every load
            weights = cast(nn.Module, layer._modules["adapter_weights"]._modules[slot(adapter_name)])
            params, pending = weights._parameters, weights.__dict__["pending"]
            for param, attr in layer._specs[adapter_name].names.items():
                out[prefix + param] = (params[attr], None, attr) if attr in params else (pending[attr], weights, attr)
        else:
            for param, tensor in layer.adapter_params(adapter_name).items():
                out[prefix + param] = (tensor, None, "")
    holder = model._modules.get(vera.SHARED_ATTR)
    if holder is not None and slot(adapter_name) in holder._modules:  # VeRA's projections, stored once (SPEC.md 15.5)
        shared = cast(vera.Shared, holder._modules[slot(adapter_name)])
        params, pending = shared._parameters, shared.__dict__["pending"]
        for name in SHARED_PARAMETERS[state.configs[adapter_name].peft_type]:  # VeRA, VB-LoRA (SPEC.md 17.4)
            out[shared_key(name)] = (params[name], None, name) if name in params else (pending[name], shared, name)
    return out


def expected_params(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """Canonical key -> the injected parameter (or buffer) it fills, for every tensor ``adapter_name`` stores
    (a :class:`~adapterspec_torch.layers.PendingParam` -- shape, device, dtype -- for one injected without
    initialisation and not loaded yet).

    :raises AdapterNotFoundError: no such adapter.

    >>> sorted(expected_params(model, "default"))[:1]                    # doctest: +SKIP
    ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight']
    """
    return {key: target for key, (target, _, _) in _slots(model, adapter_name).items()}


def _problems(adapter: Adapter, expected: dict[str, torch.Tensor]) -> list[AdapterSpecError]:
    """Missing injected parameters and shape disagreements of the tensors they take."""
    infos = adapter.tensors
    errors: list[AdapterSpecError] = []
    for key, param in expected.items():
        info = infos.get(key)
        if info is None:
            errors.append(MissingTensorError("the model's injected adapter has this parameter but the file does not",
                                             key=key, hint="save the adapter again, complete"))
        elif param.shape != info.shape:
            errors.append(ShapeMismatchError(f"shape {list(info.shape)} does not fit the model's {list(param.shape)}",
                                             key=key, hint="the adapter was made for a model of other dimensions"))
    return errors


def _read(adapter: Adapter, targets: list[Any]) -> tuple[dict[str, torch.Tensor], torch.device]:
    """The file's tensors, on the one device all ``targets`` are on (else the CPU), and that device."""
    devices = {t.device for t in targets}
    if len(devices) > 1 and torch.cuda.is_available():  # "cuda" (from options.device) is the model's "cuda:N"
        devices = {torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
                   for d in devices}
    if devices and all(d.type == "meta" for d in devices):
        meta = torch.device("meta")
        return {k: torch.empty(info.shape, device=meta) for k, info in adapter.tensors.items()}, meta
    device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    return adapter.load_tensors("pt", device=str(device)), device


def _sharded_places(slots: dict[str, tuple[Any, Any, str]]) -> dict[str, Any] | None:
    """Canonical key -> (mesh, placements) of each sharded slot (``None`` for the others), or ``None`` when no
    slot is sharded (:func:`adapterspec_torch.distributed.shard_adapter` put the layouts there)."""
    places: dict[str, Any] = {}
    for key, (param, pending_in, attr) in slots.items():
        layouts = pending_in.__dict__.get("layouts") if pending_in is not None else None
        if layouts is not None and attr in layouts:
            places[key] = layouts[attr]
        elif hasattr(param, "device_mesh"):  # a DTensor parameter created already
            places[key] = (param.device_mesh, tuple(param.placements))
        else:
            places[key] = None
    return places if any(v is not None for v in places.values()) else None


def _fill_sharded(param: Any, pending_in: Any, attr: str, value: Any) -> None:
    """Make (pending) or fill (created) sharded parameter ``attr`` from ``value``, a DTensor of its slices."""
    if pending_in is None:
        param.to_local().copy_(value.to_local())
        return
    spec = pending_in.__dict__["pending"].pop(attr)
    value = value.to(dtype=spec.dtype)
    pending_in._parameters[attr] = nn.Parameter(value, requires_grad=spec.requires_grad)


def load_state(model: nn.Module, adapter: Adapter, adapter_name: str, options: LoadOptions) -> list[str]:
    """Put ``adapter``'s tensors into the layers injected for ``adapter_name``: all checks first, then assign.

    Tensors are read with ``adapter.load_tensors("pt", device=...)`` straight onto the parameters'
    device and become their data, cast to the parameter's dtype (set at injection from ``options`` or
    the wrapped layer). Auxiliary tensors (SPEC.md 5.3) replace the base-model parameters they name
    until the adapter is deleted.

    :returns: the canonical keys loaded.
    :raises TargetNotFoundError: a key names a module the model does not have (SPEC.md 10, check 18).
    :raises MissingTensorError: an injected parameter has no tensor in the file (check 19).
    :raises UnexpectedTensorError: a tensor has no injected parameter and is no auxiliary tensor the model takes.
    :raises ShapeMismatchError: a tensor's shape does not fit its parameter (checks 20, 21).

    >>> load_state(model, adapter, "default", LoadOptions())           # doctest: +SKIP
    """
    state = require_state(model, adapter_name)
    slots = _slots(model, adapter_name)
    expected = {key: target for key, (target, _, _) in slots.items()}
    errors = _problems(adapter, expected)
    found = len(expected) - sum(isinstance(e, MissingTensorError) for e in errors)
    plan = plan_auxiliary(model, state, adapter, adapter_name, options, expected) \
        if len(adapter.tensors) > found else AuxiliaryPlan()
    errors = rank_errors(plan.errors + errors)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            first.message += f" ({len(errors) - 1} more problem(s), e.g. {errors[1].key})"
            first.args = (str(first),)
        raise first
    targets = list(expected.values()) + [holder._parameters[attr] for holder, attr in plan.replace.values()]
    sharded = _sharded_places(slots)
    if sharded is not None:  # SPEC.md 16: this process's slices only
        from .distributed import read_slices

        read_to = targets[0].device if targets else torch.device("cpu")
        tensors = read_slices(adapter, sharded, read_to)
    else:
        tensors, read_to = _read(adapter, targets)
    vblora.check_values(adapter.config, tensors)  # SPEC.md 17.4: index and weight values, before anything is assigned
    check_tied_tensors(state, adapter_name, tensors)  # SPEC.md 15.2
    stored = {}
    with torch.no_grad():
        for key, (param, pending_in, attr) in slots.items():
            value = tensors[key]
            if value.dtype in (torch.float16, torch.bfloat16) and param.dtype == torch.float32:  # SPEC.md 7.5
                stored[key] = value.dtype
            if sharded is not None and sharded[key] is not None:
                _fill_sharded(param, pending_in, attr, value)
                continue
            if pending_in is not None:  # created from the loaded tensor itself
                pending_in.fill(attr, value, device=read_to)
                continue
            if value.dtype != param.dtype or value.device != param.device:
                value = value.to(device=param.device, dtype=param.dtype)
            param.data = value
        apply_overrides(model, state, adapter_name, plan, tensors, options)
        tie(state, adapter_name)
    if stored:
        state.stored_dtypes[adapter_name] = stored
    return list(expected) + list(plan.replace) + list(plan.keep)


def restore_base_weights(model: nn.Module, adapter_name: str, *, unloading: bool = False) -> None:
    """Give back the base-model parameters ``adapter_name``'s file replaced (:func:`adapterspec_torch.auxiliary.restore`).

    While ``unloading`` with an adapter merged they stay (with any delta merged in): that is ``unload(merge=True)``.
    """
    restore(model, require_state(model, adapter_name), adapter_name, unloading=unloading)


def extract_state(model: nn.Module, adapter_name: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """``adapter_name``'s config and tensors, canonical keys, spec (PEFT) layout, without gradient (no copies).

    :raises AdapterNotFoundError: no such adapter.

    >>> config, tensors = extract_state(model, "default")              # doctest: +SKIP
    """
    state = require_state(model, adapter_name)
    from .distributed import check_fsdp1_tensors, gathered  # DTensors (SPEC.md 16) whole: every process of a sharded model runs this

    params = expected_params(model, adapter_name)
    check_fsdp1_tensors(state.configs[adapter_name], params)
    tensors = gathered({key: t.detach() if t.requires_grad else t for key, t in params.items()})
    for key, dtype in state.stored_dtypes.get(adapter_name, {}).items():
        if key not in tensors:
            continue
        as_stored = tensors[key].to(dtype)  # back in the file's dtype, when that loses nothing (SPEC.md 7.5)
        if torch.equal(as_stored.to(tensors[key].dtype), tensors[key]):
            tensors[key] = as_stored
    tensors.update(auxiliary_tensors(state, adapter_name))
    for key, tensor in tensors.items():
        if not tensor.is_contiguous():
            tensors[key] = tensor.contiguous()
    return state.configs[adapter_name], tensors
