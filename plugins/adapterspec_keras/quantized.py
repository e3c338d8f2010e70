"""Quantized base layers: a Keras layer that ``model.quantize(...)`` turned int8, int4, float8, GPTQ or AWQ
(SPEC.md 6.8) -- the mirror of :mod:`adapterspec_torch.quantized`.

Such a layer runs ``quantized_call`` instead of ``call`` (the backend patches both), from a kernel that is
packed, scaled or rounded. On a quantized Dense or EinsumDense, an adapter whose part adds to the layer's output
or scales its input or output (LoRA, LoHa, LoKr, AdaLoRA, VeRA, IA3) runs as on any other layer: the layer keeps
computing its own output, the adapter's part is computed in float32 unless asked otherwise. What reads the
kernel's values (DoRA's norm, OFT's rotated kernel, a parent that reads the kernel itself) or writes or copies
them (a merge, the residual of ``init_lora_weights``, token rows, ``modules_to_save``), and quantized embeddings,
are refused with a typed error before anything changes, and the base fingerprint (SPEC.md 9.1) of such a layer
is unknown. A layer whose kernel no longer has its shape (int4
packs two values a byte) is not found by the converters' maps: targets that miss for that reason are refused as
quantized (:func:`refuse_unmapped`).

>>> import keras
>>> quantization(keras.layers.Dense(2)) is None
True
"""

from __future__ import annotations

from typing import Any

from adapterspec.errors import UnsupportedError

__all__ = ["HINT", "adapter_dtype", "quantization", "refuse_unmapped"]

#: What a user can do about a quantized layer the backend cannot adapt as asked.
HINT = ("load the adapter onto the model before model.quantize(...) (model.quantize leaves adapted layers as they "
        "are), or use the torch backend, which also reads bitsandbytes' weights for DoRA")


def quantization(layer: Any) -> str | None:
    """The layer's quantization mode (``"int8"``, ``"int4"``, ``"float8"``, ...), or ``None`` for a plain layer.

    >>> import keras
    >>> layer = keras.layers.Dense(4)
    >>> layer.build((None, 8)); layer.quantize("int8"); quantization(layer)
    'int8'
    """
    mode = getattr(layer, "quantization_mode", None)
    return str(mode) if mode else None


def adapter_dtype(layer: Any) -> str:
    """The dtype a quantized layer's adapter variables get without a ``dtype`` option: its variable dtype (the
    dtype of its float variables, float32 for Keras' quantization policies), not its kernel's int8."""
    return str(getattr(layer, "variable_dtype", None) or "float32")


def refuse_unmapped(model: Any) -> None:
    """Where targets are not found in a model with quantized layers, say that, not "no module matches".

    :raises UnsupportedError: a layer of ``model`` is quantized.
    """
    flatten = getattr(model, "_flatten_layers", None)
    layers = list(flatten(include_self=False, recursive=True)) if callable(flatten) else []
    quantized = [layer for layer in layers if quantization(layer)]
    if quantized:
        raise UnsupportedError(f"{type(quantized[0]).__name__} {quantized[0].path!r} and {len(quantized) - 1} more layers "
                               f"of this {type(model).__name__} are quantized ({quantization(quantized[0])}) and the "
                               "modules target_modules names were not found among them (the converters' maps read "
                               "kernel shapes, which int4 packs)", key=quantized[0].path, hint=HINT)
