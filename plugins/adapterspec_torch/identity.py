"""Which base model an adapter sits on: its name, its task and the fingerprint of its weights (SPEC.md 9.1).

>>> base_identity(model, "default")                                   # doctest: +SKIP
{'base_model_name_or_path': 'meta-llama/Llama-3.2-1B', 'task_type': 'CAUSAL_LM', 'fingerprint': 'v1:5d1f...'}
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from adapterspec.identity import fingerprint, sample_indices

from .layers import AdapterLayer
from .switch import require_state

__all__ = ["base_identity", "task_type_of"]

#: transformers' auto-class mappings -> PEFT's task types (``AutoPeftModelFor...`` picks its class by it).
_TASKS = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
          ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
          ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
          ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
          ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
          ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"))

#: weight -> (its version counter, its samples): a load samples each base weight once, not once per load.
_SAMPLES = WeakIdKeyDictionary()  # tensors compare elementwise: keyed by identity


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class (``LlamaForCausalLM`` -> ``"CAUSAL_LM"``), or ``None``.

    >>> task_type_of(torch.nn.Linear(2, 2)) is None
    True
    """
    if "transformers" not in sys.modules:
        return None
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for mapping, task in _TASKS:
        names = getattr(modeling_auto, mapping, {})
        if any(name == n or (isinstance(n, tuple) and name in n) for n in names.values()):
            return task
    return None


def _samples(weight: torch.Tensor, transposed: bool) -> tuple[tuple[int, ...], list[float]] | None:
    if weight.device.type == "meta" or not weight.is_floating_point():
        return None
    shape = tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)
    cached = _SAMPLES.get(weight)
    if cached is not None and cached[0] == weight._version:
        return shape, cached[1]
    flat = torch.tensor(sample_indices(weight.numel()), dtype=torch.long, device=weight.device)
    with torch.no_grad():
        view = weight.detach().t() if transposed else weight.detach()
        values = view.reshape(-1)[flat] if view.is_contiguous() else view[torch.unravel_index(flat, view.shape)]
        samples = values.to(torch.float32).cpu().tolist()
    _SAMPLES[weight] = (weight._version, samples)
    return shape, samples


def _fingerprint(model: nn.Module, adapter_name: str) -> str | None:
    state = require_state(model, adapter_name)
    if state.merged:  # the base weights hold merged deltas now: the base cannot be read off them
        return None
    replaced = {id(o.new): o.old for o in state.base_weights.get(adapter_name, [])}
    weights: dict[str, Any] = {}
    for spec, own in state.modules[adapter_name].items():
        layer = state.wrappers.get(own)
        if not isinstance(layer, AdapterLayer):
            continue
        weight = layer.base_layer._parameters.get("weight")
        if weight is None:
            continue
        sampled = _samples(replaced.get(id(weight), weight), layer.fan_in_fan_out)
        if sampled is None:
            return None
        weights[spec] = sampled
    if not weights and state.configs[adapter_name].is_prompt_learning:
        getter = getattr(model, "get_input_embeddings", None)
        embedding = getter() if getter is not None else None
        weight = getattr(embedding, "weight", None)
        path = next((name for name, module in model.named_modules() if module is embedding), None)
        sampled = _samples(weight, False) if isinstance(weight, torch.Tensor) and path else None
        if sampled is None:
            return None
        weights[path] = sampled
    return fingerprint(weights) if weights else None


def base_identity(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """What ``model`` tells about the base ``adapter_name`` sits on: ``base_model_name_or_path`` (transformers'
    ``name_or_path``), ``task_type`` (from the model class) and ``fingerprint`` -- each only when known.

    :raises AdapterNotFoundError: no such adapter.
    """
    out: dict[str, str] = {}
    name = getattr(model, "name_or_path", None)
    if isinstance(name, str) and name:
        out["base_model_name_or_path"] = name
    task = task_type_of(model)
    if task is not None:
        out["task_type"] = task
    fp = _fingerprint(model, adapter_name)
    if fp is not None:
        out["fingerprint"] = fp
    return out
