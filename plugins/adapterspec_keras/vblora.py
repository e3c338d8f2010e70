"""VB-LoRA (SPEC.md 17.4) on Keras layers: LoRA factors mixed from one vector bank shared by all modules, PEFT 0.21's
math.

The bank ``[N, L]`` (``base_model.vblora_vector_bank``) is one row of the adapter's bank held by a
:class:`~adapterspec_keras.vera.Shared` (the holder VeRA's projections use) that every adapted layer of the adapter
refers to. Each module's logits ``[r, in/L, N]`` / ``[out/L, r, N]`` (the file's layout) pick their ``topk``
vectors; the softmax of those logits mixes them into ``A`` ``[r, in]`` and ``B`` ``[out, r]``. :func:`views`
gives ``(A.T, B.T)`` (``[in, r]``, ``[r, out]``) so that ``x @ first @ second`` is PEFT's ``x @ A.T @ B.T``. The
torch backend's module of the same name computes the same on torch layers.

This backend adapts Dense and EinsumDense layers (an ``nn.Linear`` or a transformers ``Conv1D``, GPT-2's fused
``c_attn`` included); embeddings and convolutions are refused, as PEFT refuses them. An adapter saved with
``save_only_topk_weights`` is held as stored (the integer indices frozen in PEFT's dtype, the weights), for
inference and merging; its logits are PEFT's loader's (``log`` of the weights in float32). A new adapter's bank and logits are drawn from Keras' generator with PEFT's
distributions (``U(-bound, bound)``, ``N(0, std)``), not torch's stream (SPEC.md 17.4: reproducible on torch only).

>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "VBLORA", "target_modules": ["q"], "r": 2, "num_vectors": 6,
...                                "vector_length": 4})
>>> shapes(cfg, 8, 4)
{'vblora_logits_A': (2, 2, 6), 'vblora_logits_B': (1, 2, 6)}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from keras import ops

from adapterspec import AdapterConfig
from adapterspec._vblora import SHARED, index_dtype, settings, topk_only, value_errors
from adapterspec.errors import UnsupportedError

from .quantized import refuse_quantized
from .sites import ModuleSite
from .vera import Shared

if TYPE_CHECKING:
    from .bank import AdapterBank, GroupKey

__all__ = ["METHODS", "SHARED", "check", "check_values", "dtypes", "inits", "reserve", "shapes", "views"]

#: The methods this module computes.
METHODS = ("VBLORA",)

_KERAS_INDEX = {"U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64"}


def check(site: ModuleSite, path: str, config: AdapterConfig) -> None:
    """Refuse what this backend does not compute exactly for VB-LoRA.

    :raises UnsupportedError: an embedding, a logits projection or a convolution (PEFT's VB-LoRA adapts Linear and
        Conv1D only); sizes not divisible by ``vector_length`` (PEFT refuses them, ``/vector_length``); a quantized
        layer (as the torch backend: PEFT's VB-LoRA has no quantized layers).
    """
    layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
    refuse_quantized([p.layer for p in site.pieces], path, "VB-LoRA")
    if site.kind != "linear" or any(piece.kind not in ("dense", "einsum") for piece in site.pieces):
        raise UnsupportedError(f"the keras backend adapts only Dense/EinsumDense layers with VBLORA (module on "
                               f"{layers}; PEFT's VB-LoRA adapts Linear and Conv1D)", key=path,
                               hint="remove the module from target_modules, or use the torch backend")
    length = settings(config)[2]
    for what, size in (("in_features", site.in_features), ("out_features", site.out_features)):
        if size % length:
            raise UnsupportedError(f"{what} {size} of this layer is not divisible by vector_length {length} (PEFT "
                                   "refuses it)", key=path, pointer="/vector_length",
                                   hint="pick a vector_length dividing every adapted layer's sizes, or do not "
                                        "target this layer")


def check_values(config: AdapterConfig, arrays: Mapping[str, Any]) -> None:
    """Refuse top-k indices outside the bank or repeated in a row, and top-k weights that are negative or sum above 1
    in a row (SPEC.md 17.4), before anything is assigned: a gather on JAX clamps an index past the bank (another mix,
    silently), PEFT's loader keeps one of repeated weights and computes NaN on such weights. The torch backend's
    ``check_values`` refuses the same.

    :raises TensorError: naming the tensor's key (:func:`adapterspec._vblora.value_errors`).
    """
    if config.peft_type not in METHODS:
        return
    errors = value_errors(config, arrays)
    if errors:
        raise errors[0]


def shapes(config: AdapterConfig, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """The logits ``[r, in/L, N]`` and ``[out/L, r, N]``, or (``save_only_topk_weights``) their ``_topk_indices``
    ``[..., topk]`` and ``_topk_weights`` ``[..., topk - 1]``."""
    r, num_vectors, length, topk = settings(config)
    a, b = (r, in_features // length), (out_features // length, r)
    if not topk_only(config):
        return {"vblora_logits_A": (*a, num_vectors), "vblora_logits_B": (*b, num_vectors)}
    return {"vblora_logits_A_topk_indices": (*a, topk), "vblora_logits_A_topk_weights": (*a, topk - 1),
            "vblora_logits_B_topk_indices": (*b, topk), "vblora_logits_B_topk_weights": (*b, topk - 1)}


def dtypes(config: AdapterConfig) -> dict[str, str]:
    """The tensors not in the adapter's float dtype: the top-k indices, in PEFT's integer dtype for ``num_vectors``
    (held frozen, as stored)."""
    if not topk_only(config):
        return {}
    dtype = _KERAS_INDEX[index_dtype(settings(config)[1])]
    return {"vblora_logits_A_topk_indices": dtype, "vblora_logits_B_topk_indices": dtype}


def _std(config: AdapterConfig) -> float:
    value = config.get("init_logits_std")
    return 0.1 if value is None else float(value)


def inits(config: AdapterConfig) -> dict[str, tuple[Any, ...]]:
    """PEFT's distribution of the logits, ``N(0, init_logits_std)`` (Keras' generator)."""
    return {"vblora_logits_A": ("normal", _std(config)), "vblora_logits_B": ("normal", _std(config))}


def reserve(bank: AdapterBank, config: AdapterConfig, dtype: str, device: str | None, initialize: bool,
            trainable: bool) -> Shared:
    """The adapter's :class:`~adapterspec_keras.vera.Shared` bank: one row ``[N, L]`` of ``bank``, trained with the
    logits (PEFT trains it), ``U(-init_vector_bank_bound, init_vector_bank_bound)`` for a new adapter."""
    from .bank import GroupKey
    from .layers import Layout

    _, num_vectors, length, _ = settings(config)
    shape = (num_vectors, length)
    bound = config.get("init_vector_bank_bound")
    init = ("uniform", 0.02 if bound is None else float(bound)) if initialize else ("zeros",)
    keys: dict[str, GroupKey] = {"vblora_vector_bank": GroupKey("vblora_vector_bank", shape, dtype, device, init,
                                                                trainable)}
    return Shared(bank, {"vblora_vector_bank": Layout(shape, shape, (0, 1))}, bank.reserve_keys(keys))


def _mix(logits: Any, vectors: Any, topk: int) -> Any:
    """PEFT's ``_get_low_rank_matrix``: the softmax of the top-k logits mixes their vectors, ``[..., N] -> [..., L]``."""
    top, indices = ops.top_k(logits, topk)
    weights = ops.softmax(top, axis=-1)
    return ops.sum(ops.expand_dims(weights, -1) * ops.take(vectors, indices, axis=0), axis=-2)


def _mix_topk(get: Callable[[str], Any], name: str, vectors: Any, topk: int) -> Any:
    """The top-k form's mix, as PEFT's loader rebuilds it: ``log`` of the weights (the last ``1 - sum``) in float32
    are the only finite logits, so PEFT's top-k of them is their descending order (:func:`ops.top_k` over the k)."""
    weights = ops.cast(get(name + "_topk_weights"), "float32")
    weights = ops.concatenate([weights, 1 - ops.sum(weights, axis=-1, keepdims=True)], axis=-1)
    logits = ops.log(weights)
    top, order = ops.top_k(logits, topk)
    indices = ops.take_along_axis(ops.cast(get(name + "_topk_indices"), "int32"), order, axis=-1)
    mixed = ops.softmax(ops.cast(top, vectors.dtype), axis=-1)
    return ops.sum(ops.expand_dims(mixed, -1) * ops.take(vectors, indices, axis=0), axis=-2)


def views(get: Callable[[str], Any], shared: Shared, config: AdapterConfig, dtype: Any) -> tuple[Any, Any]:
    """``(A.T, B.T)`` in ``dtype``: ``[in, r]`` and ``[r, out]`` (PEFT's ``_get_lora_matrices``, computed in the
    adapter's dtype and cast)."""
    r, _, _, topk = settings(config)
    vectors = shared.get("vblora_vector_bank")
    if topk_only(config):
        mix_a, mix_b = (_mix_topk(get, name, vectors, topk) for name in ("vblora_logits_A", "vblora_logits_B"))
    else:
        mix_a = _mix(get("vblora_logits_A"), vectors, topk)
        mix_b = _mix(get("vblora_logits_B"), vectors, topk)
    a = ops.reshape(mix_a, (r, -1))  # [r, in/L, L] -> [r, in]
    b = ops.reshape(ops.transpose(mix_b, (0, 2, 1)), (-1, r))  # -> [out, r]
    return ops.cast(ops.transpose(a), dtype), ops.cast(ops.transpose(b), dtype)
