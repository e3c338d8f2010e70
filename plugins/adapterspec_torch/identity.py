"""Which base model an adapter sits on: its name, its task and the fingerprint of its weights (SPEC.md 9.1).

>>> base_identity(model, "default")                                   # doctest: +SKIP
{'base_model_name_or_path': 'meta-llama/Llama-3.2-1B', 'task_type': 'CAUSAL_LM', 'fingerprint': 'v1:5d1f...'}
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterspec._rules import task_takes
from adapterspec.identity import fingerprint, sample_indices

from .layers import AdapterLayer
from .quantized import weight_quantization
from .switch import ModelState, require_state

__all__ = ["base_identity", "remember_base", "task_type_of", "unmerged_base"]

#: transformers' auto-class mappings -> PEFT's task types (``AutoPeftModelFor...`` picks its class by it).
_TASKS = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
          ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
          ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
          ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
          ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
          ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"))


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class (``LlamaForCausalLM`` -> ``"CAUSAL_LM"``), or ``None``.

    Only where PEFT's class for that task can call the model (:func:`adapterspec._rules.task_takes`): the
    FEATURE_EXTRACTION wrapper passes ``input_ids=`` and ``inputs_embeds=`` to a bare model, which an image model
    (``ViTModel``: its main input is ``pixel_values``) or a dual encoder (``CLIPModel``, ``SiglipModel``: their
    forward has no ``inputs_embeds``) cannot take, so such a model's adapter records no task type (PEFT then wraps it in a plain ``PeftModel``, as
    PEFT's own save of a config without one).

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
            return task if task_takes(task, type(model)) else None
    return None


@functools.lru_cache(maxsize=256)
def _indices(shape: tuple[int, ...], transposed: bool) -> np.ndarray:
    """Flat indices into a contiguous weight of ``shape`` of the elements sampled from its spec layout."""
    spec = np.asarray(sample_indices(math.prod(shape)), dtype=np.int64)
    if not transposed:
        return spec
    rows, cols = np.divmod(spec, shape[0])  # spec layout [out, in] = the weight [in, out] transposed
    return cols * shape[1] + rows


def _gather(weight: torch.Tensor, transposed: bool) -> Any:
    """The elements of ``weight`` sampled from its spec layout (``fan_in_fan_out`` weights are transposed), as float32.

    On the CPU through NumPy: a fancy index there costs a few microseconds, torch's about fifty (and NumPy's
    flattening of the array, which follows its strides, less than torch's ``reshape``).
    """
    index = _indices(tuple(weight.shape), transposed)
    if weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.float32, torch.float64):
        values: Any = weight.detach().numpy().reshape(-1)[index].astype(np.float32)
        return values
    flat = weight.detach()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    flat = flat.reshape(-1)
    if flat.device.type != "cpu":
        return flat[torch.from_numpy(index).to(flat.device)].to(torch.float32).cpu().numpy()
    if flat.dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits are the top half of a float32's
        bits = flat.view(torch.int16).numpy()[index].astype(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return flat[torch.from_numpy(index)].to(torch.float32).numpy()


def _base_weights(state: ModelState, adapter_name: str) -> dict[str, tuple[str, torch.Tensor, bool]]:
    """Spec module path -> (model module name, the base weight under the adapter, ``fan_in_fan_out``): the weight
    the base model had (one the adapter's file replaced, SPEC.md 5.3, is read from the original)."""
    replaced = {id(o.new): o.old for o in state.base_weights.get(adapter_name, [])}
    found: dict[str, tuple[str, torch.Tensor, bool]] = {}
    for spec, own in state.modules[adapter_name].items():
        layer = state.wrappers.get(own)
        if isinstance(layer, AdapterLayer):
            base = layer._modules["base_layer"]  # not through __getattr__
            weight = base._parameters.get("weight") if base is not None else None
            if weight is not None:
                found[spec] = (own, replaced.get(id(weight), weight), layer.fan_in_fan_out)
    return found


def _samples(weight: torch.Tensor, transposed: bool) -> tuple[tuple[int, ...], Any] | None:
    """SPEC.md 9.1's (shape, samples) of a weight, or ``None`` where it has no values to read."""
    if weight.device.type == "meta" or weight_quantization(weight) is not None:  # no values to read as they were
        return None
    with torch.no_grad():
        if hasattr(weight, "full_tensor"):  # a sharded weight (SPEC.md 16): every process gathers it, in turn
            weight = weight.full_tensor()
        return (tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)), _gather(weight, transposed)


def remember_base(state: ModelState, adapter_name: str) -> None:
    """Before ``adapter_name`` is merged: keep the samples of each module it goes into that holds no merged adapter
    yet (its weight is the base), so that a save while merged records the base, not the merged weights.

    >>> remember_base(get_state(model), "default")                      # doctest: +SKIP
    """
    for own, weight, transposed in _base_weights(state, adapter_name).values():
        layer = state.wrappers[own]
        if isinstance(layer, AdapterLayer) and not layer.merged_adapters:
            state.base_samples[own] = (_samples(weight, transposed), None)


def unmerged_base(state: ModelState) -> None:
    """After an unmerge: note what each module's weight holds now. Subtracting a delta can round differently from
    the addition, so the weight may differ from the base in the last bit; while it stays as the unmerge left it,
    the fingerprint still describes the base the adapter was trained on (the samples kept by :func:`remember_base`).
    """
    for own in list(state.base_samples):
        layer = state.wrappers.get(own)
        base = layer._modules.get("base_layer") if isinstance(layer, AdapterLayer) else None
        weight = base._parameters.get("weight") if base is not None else None
        kept = state.base_samples[own][0]
        if weight is None or kept is None or layer is None:
            del state.base_samples[own]
            continue
        state.base_samples[own] = (kept, _samples(weight, layer.fan_in_fan_out))


def _same(a: tuple[tuple[int, ...], Any] | None, b: tuple[tuple[int, ...], Any] | None) -> bool:
    return a is not None and b is not None and a[0] == b[0] and bytes(np.asarray(a[1]).data) == bytes(
        np.asarray(b[1]).data)


def _fingerprint(model: nn.Module, adapter_name: str) -> str | None:
    state = require_state(model, adapter_name)
    weights: dict[str, tuple[tuple[int, ...], Any]] = {}
    for spec, (own, weight, transposed) in _base_weights(state, adapter_name).items():
        layer = state.wrappers[own]
        kept, after_unmerge = state.base_samples.get(own, (None, None))
        if isinstance(layer, AdapterLayer) and layer.merged_adapters:
            sampled = kept  # merged deltas are in the weight: only the samples taken before describe the base
        else:
            sampled = _samples(weight, transposed)
            if kept is not None and _same(sampled, after_unmerge):
                sampled = kept
        if sampled is None:
            return None
        weights[spec] = sampled
    if not weights and state.configs[adapter_name].is_prompt_learning:
        getter = getattr(model, "get_input_embeddings", None)
        embedding = getter() if getter is not None else None
        path = next((name for name, module in model.named_modules() if module is embedding), None)
        embedding_weight = getattr(embedding, "weight", None)
        if path is None or not isinstance(embedding_weight, torch.Tensor):
            return None
        sampled = _samples(embedding_weight, False)
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
