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


def _fingerprint(model: nn.Module, adapter_name: str) -> str | None:
    state = require_state(model, adapter_name)
    if state.merged:  # the base weights hold merged deltas now: the base cannot be read off them
        return None
    replaced = {id(o.new): o.old for o in state.base_weights.get(adapter_name, [])}
    found: dict[str, tuple[torch.Tensor, bool]] = {}
    for spec, own in state.modules[adapter_name].items():
        layer = state.wrappers.get(own)
        if isinstance(layer, AdapterLayer):
            base = layer._modules["base_layer"]  # not through __getattr__
            weight = base._parameters.get("weight") if base is not None else None
            if weight is not None:
                found[spec] = (replaced.get(id(weight), weight), layer.fan_in_fan_out)
    if not found and state.configs[adapter_name].is_prompt_learning:
        getter = getattr(model, "get_input_embeddings", None)
        embedding = getter() if getter is not None else None
        path = next((name for name, module in model.named_modules() if module is embedding), None)
        weight = getattr(embedding, "weight", None)
        if path is not None and isinstance(weight, torch.Tensor):
            found[path] = (weight, False)
    if not found or any(w.device.type == "meta" or not w.is_floating_point() for w, _ in found.values()):
        return None
    with torch.no_grad():
        weights = {spec: (tuple(weight.shape[::-1]) if transposed else tuple(weight.shape), _gather(weight, transposed))
                   for spec, (weight, transposed) in found.items()}
    return fingerprint(weights)


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
