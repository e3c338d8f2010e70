"""Adapter tensors in and out: canonical keys and spec layout on disk, Flax layout in the model.

Flax kernels are ``[in, out]``, the transpose of torch's, so every LoRA matrix is transposed on the
way in and out: the file's ``lora_A.weight`` ``[r, in]`` is the model's ``lora_A`` ``[in, r]``.
IA3 vectors are stored ``[out, 1]`` (``[1, in]`` feed-forward) and held flat.

>>> load_state(model, adapterspec.read_adapter("my-lora"), "default", LoadOptions())  # doctest: +SKIP
['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', ...]
>>> config, tensors = extract_state(model, "default")                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adapterspec import Adapter, AdapterConfig, LoadOptions
from adapterspec.errors import (
    AdapterNotFoundError,
    MissingTensorError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnexpectedTensorError,
    UnsupportedError,
)
from adapterspec.naming import make_key, parse_key

from .devices import place
from .graph import get_state, iter_modules, iter_wrappers, set_state
from .inject import spec_names
from .layers import AdaptedEmbed, IA3Weights, LoraWeights

__all__ = ["Slot", "expected_params", "extract_state", "load_state"]


@dataclass(frozen=True)
class Slot:
    """Where one stored tensor lives in the model.

    :param variable: the NNX variable holding it (Flax layout).
    :param spec_shape: its shape on disk.
    :param to_flax: file layout -> Flax layout.
    :param to_spec: Flax layout -> file layout.
    """

    variable: nnx.Variable
    spec_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_spec: Callable[[np.ndarray], np.ndarray]


#: safetensors dtypes of half-precision tensors -> their NumPy/JAX names.
_HALF = {"F16": "float16", "BF16": "bfloat16"}


def _transposed(variable: nnx.Variable) -> Slot:
    shape = tuple(variable.get_value().shape[::-1])
    return Slot(variable, shape, np.transpose, np.transpose)


def _vector(variable: nnx.Variable, spec_shape: tuple[int, ...]) -> Slot:
    return Slot(variable, spec_shape, lambda a: a.reshape(-1), lambda a: a.reshape(spec_shape))


def _slots(weights: LoraWeights | IA3Weights, embedding: bool) -> dict[str, Slot]:
    m = weights.module
    if isinstance(weights, IA3Weights):
        size = weights.ia3_l.get_value().shape[0]
        return {make_key(m, "ia3_l"): _vector(weights.ia3_l, (1, size) if weights.feedforward else (size, 1))}
    if embedding:
        return {make_key(m, "lora_embedding_A"): _transposed(weights.lora_A),
                make_key(m, "lora_embedding_B"): _transposed(weights.lora_B)}
    slots = {make_key(m, "lora_A.weight"): _transposed(weights.lora_A),
             make_key(m, "lora_B.weight"): _transposed(weights.lora_B)}
    if weights.lora_B_bias is not None:
        slots[make_key(m, "lora_B.bias")] = _vector(weights.lora_B_bias, weights.lora_B_bias.get_value().shape)
    if weights.magnitude is not None:
        slots[make_key(m, "lora_magnitude_vector")] = _vector(weights.magnitude, weights.magnitude.get_value().shape)
    return slots


def expected_params(model: nnx.Module, adapter_name: str) -> dict[str, Slot]:
    """Canonical key -> the :class:`Slot` it fills, for every tensor adapter ``adapter_name`` stores.

    :raises AdapterNotFoundError: no such adapter.

    >>> sorted(expected_params(model, "default"))[:1]                   # doctest: +SKIP
    ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight']
    """
    if adapter_name not in get_state(model).names:
        raise AdapterNotFoundError(f"no adapter named {adapter_name!r} is loaded", key=adapter_name,
                                   hint=f"loaded: {list(get_state(model).names)}")
    slots: dict[str, Slot] = {}
    for _, _, wrapper in iter_wrappers(model):
        if adapter_name in wrapper.adapters:
            slots.update(_slots(wrapper.adapters[adapter_name], isinstance(wrapper, AdaptedEmbed)))
    return slots


#: The auxiliary tensors (SPEC.md 5.3, :class:`adapterspec.naming.TensorName`'s roles) that replace base-model weights,
#: which this backend does not do, and what each one is.
_REPLACING_ROLES = {
    "base_layer": "the full weight of an adapted embedding (a resized vocabulary)",
    "embedding": "an embedding saved whole (PEFT's save_embedding_layers)",
    "modules_to_save": "a module saved whole (modules_to_save)",
    "bias": "a trained base-layer bias (bias='lora_only' or 'all')",
    "trainable_tokens": "trainable token rows (trainable_token_indices)",
}


def _refuse_unexpected(key: str, config: AdapterConfig, modules: set[str]) -> None:
    try:
        name = parse_key(key, config.peft_type, config)
    except UnexpectedTensorError:
        raise UnexpectedTensorError("no injected layer takes this tensor", key=key,
                                    hint="the key does not follow the naming convention of the spec") from None
    if name.module not in modules:
        raise TargetNotFoundError(f"the file has tensors for module {name.module!r}, which the model does not have",
                                  key=key, hint="load the adapter into the model it was made for, or pass module_map")
    if name.role in _REPLACING_ROLES:
        raise UnsupportedError(f"the file replaces base-model weights ({_REPLACING_ROLES[name.role]}), which the flax "
                               "backend does not do", key=key, hint="load this adapter with the torch backend")
    raise UnexpectedTensorError(f"module {name.module!r} has no injected parameter for this tensor", key=key,
                                hint="the config does not target this module; fix target_modules or remove the tensor")


def load_state(model: nnx.Module, adapter: Adapter, adapter_name: str, options: LoadOptions) -> list[str]:
    """Put ``adapter``'s tensors into the layers injected for ``adapter_name``: all checks first, then assign.

    Names and shapes are checked from the header alone; the data is then read as NumPy
    (``adapter.load_tensors("numpy")``), transposed to Flax layout and put on each variable's device
    in its dtype (or ``options``'); a float16/bfloat16 tensor held in float32 is remembered, to be saved back so.

    :returns: the canonical keys loaded.
    :raises MissingTensorError: an injected parameter has no tensor in the file.
    :raises UnexpectedTensorError: a tensor has no injected parameter.
    :raises ShapeMismatchError: a tensor's shape does not fit its parameter.
    :raises TargetNotFoundError: a tensor is for a module the model does not have.
    :raises UnsupportedError: the file holds tensors that replace base-model weights (an embedding or module saved
        whole, a resized embedding, a trained bias, token rows).

    >>> load_state(model, adapter, "default", LoadOptions())           # doctest: +SKIP
    """
    slots = expected_params(model, adapter_name)
    unexpected = [key for key in adapter.tensors if key not in slots]
    if unexpected:
        spec_of = spec_names(options)
        modules = {spec_of(dotted) for dotted, _, _ in iter_modules(model)}
        for key in unexpected:
            _refuse_unexpected(key, adapter.config, modules)
    for key, slot in slots.items():
        if key not in adapter.tensors:
            raise MissingTensorError("the model has an injected parameter for it but the file has no such tensor",
                                     key=key, hint="the file belongs to another config; check target_modules")
        shape = tuple(adapter.tensors[key].shape)
        if shape != slot.spec_shape:
            raise ShapeMismatchError(f"shape {list(shape)} does not fit the layer, which needs {list(slot.spec_shape)}",
                                     key=key, hint="the adapter was trained on a model of another size")
    arrays = adapter.load_tensors("numpy")
    new = {key: place(slot.to_flax(np.asarray(arrays[key])), slot.variable.get_value(), options)
           for key, slot in slots.items()}
    stored = tuple((adapter_name, key, _HALF[adapter.tensors[key].dtype]) for key in slots
                   if adapter.tensors[key].dtype in _HALF and new[key].dtype == np.float32)
    for key, slot in slots.items():
        slot.variable.set_value(new[key])
    if stored:  # SPEC.md 7.5: saved back in the file's dtype (the torch backend's stored_dtypes)
        state = get_state(model)
        set_state(model, dataclasses.replace(state, stored=(*state.stored, *stored)))
    return list(slots)


def _as_stored(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` in the dtype its file stored it in (``"bfloat16"``, ``"float16"``) when that loses nothing, else as is.

    >>> _as_stored(np.array([1.5], np.float32), "bfloat16").dtype.name
    'bfloat16'
    >>> _as_stored(np.array([0.1], np.float32), "float16").dtype.name
    'float32'
    """
    as_stored = array.astype(jnp.dtype(dtype))
    return as_stored if np.array_equal(as_stored.astype(array.dtype), array) else array


def extract_state(model: nnx.Module, adapter_name: str) -> tuple[AdapterConfig, dict[str, Any]]:
    """``adapter_name``'s config and tensors, canonical keys, spec layout, as contiguous NumPy arrays; a tensor its
    file stored in float16/bfloat16 and held in float32 goes back in the file's dtype when that loses nothing
    (SPEC.md 7.5: a load -> save round trip writes the stored values exactly).

    :raises AdapterNotFoundError: no such adapter.

    >>> config, tensors = extract_state(model, "default")              # doctest: +SKIP
    """
    slots = expected_params(model, adapter_name)
    tensors = {key: np.ascontiguousarray(slot.to_spec(np.asarray(jax.device_get(slot.variable.get_value()))))
               for key, slot in slots.items()}
    state = get_state(model)
    for name, key, dtype in state.stored:
        if name == adapter_name and key in tensors:
            tensors[key] = _as_stored(tensors[key], dtype)
    return state.config(adapter_name), tensors
