"""Quantized base layers: a Keras layer that ``model.quantize(...)`` turned int8, int4, float8, GPTQ or AWQ
(SPEC.md 6.8) -- the mirror of :mod:`adapterspec_torch.quantized`.

Such a layer runs ``quantized_call`` instead of ``call`` (the backend patches both), from a kernel that is
packed, scaled or rounded. On a quantized Dense or EinsumDense, an adapter whose part adds to the layer's output
or scales its input or output (LoRA, LoHa, LoKr, AdaLoRA, VeRA, IA3) runs as on any other layer: the layer keeps
computing its own output, the adapter's part is computed in float32 unless asked otherwise. What reads the
kernel's values (DoRA's norm, OFT's rotated kernel, a parent that reads the kernel itself) or writes or copies
them (a merge, the residual of ``init_lora_weights``, token rows, ``modules_to_save``), and quantized embeddings,
are refused with a typed error before anything changes, and the base fingerprint (SPEC.md 9.1) of such a layer
is unknown. The fix offered (:func:`hint`) is the unquantized model, or one quantized without those layers: Keras'
``model.quantize`` refuses a model that holds adapters (:mod:`.guard`), so an adapter cannot go on before it. A
layer whose kernel is stored packed (int4 holds two values a byte) no longer has its shape, but the converters'
maps find it all the same (:mod:`.converters` replays the converter on a stand-in of the unpacked weight's shape)
and it takes an adapter as any other quantized layer; targets that miss a packed layer the maps did not find are
refused as packed (:func:`refuse_unmapped`), with ``module_map`` as the fix (:func:`packed_hint`).

>>> import keras
>>> quantization(keras.layers.Dense(2)) is None
True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from adapterspec.errors import UnsupportedError

from .sites import layer_kind, packed

__all__ = ["adapter_dtype", "hint", "packed_hint", "quantization", "refuse_quantized", "refuse_unmapped"]


def packed_hint(targets: str = "every module the adapter targets", *, int8: bool = True) -> str:
    """What a user can do about packed layers the converters' maps cannot find: name them in ``module_map`` (such a
    layer then takes adapters as any other quantized one), or (``int8``) quantize int8, which keeps kernel shapes.

    >>> packed_hint(int8=False)[:54]
    'pass module_map={spec module path: keras layer path} n'
    """
    text = (f"pass module_map={{spec module path: keras layer path}} naming the Keras layer of {targets} (keras-hub's "
            "Llama: {'model.layers.0.self_attn.q_proj': 'transformer_layer_0/self_attention/query', ...})")
    return text + (", or quantize the unquantized model int8, whose layers the maps find" if int8 else "")


def hint(layers: Sequence[Any], *, torch: bool = False) -> str:
    """What a user can do about quantized ``layers`` (or their paths) whose kernel values an adapter reads, writes
    or copies.

    Keras' ``model.quantize`` refuses a model holding adapters, so the adapter goes onto the unquantized model, or
    onto one quantized without those layers (``filters``). ``torch``: the torch backend runs the method on
    bitsandbytes' quantized layers (DoRA, OFT, BOFT), so it is offered too.

    >>> import keras
    >>> layer = keras.layers.Dense(2, name="down")
    >>> hint([layer]).split("adapters): ")[1]
    "model.quantize(mode, filters=lambda layer: layer.path not in ['down'])"
    """
    paths = sorted({layer if isinstance(layer, str) else str(getattr(layer, "path", None) or layer.name)
                    for layer in layers})
    which = "this layer" if len(paths) == 1 else "these layers"
    text = (f"load the adapter onto the unquantized model, or onto one quantized without {which} "
            "and any other the adapter targets so, quantized before the load (model.quantize refuses a model holding "
            f"adapters): model.quantize(mode, filters=lambda layer: layer.path not in {paths!r})")
    if torch:
        text += "; or use the torch backend, which runs DoRA, OFT and BOFT on bitsandbytes' 4-bit and 8-bit layers"
    return text


def quantization(layer: Any) -> str | None:
    """The layer's quantization mode (``"int8"``, ``"int4"``, ``"float8"``, ...), or ``None`` for a plain layer.

    >>> import keras
    >>> layer = keras.layers.Dense(4)
    >>> layer.build((None, 8)); layer.quantize("int8"); quantization(layer)
    'int8'
    """
    mode = getattr(layer, "quantization_mode", None)
    return str(mode) if mode else None


def refuse_quantized(layers: Sequence[Any], path: str, method: str) -> None:
    """Refuse ``method`` on a module whose Keras layers (``layers``) include a quantized one: PEFT 0.21 has no
    quantized layer of that method (VB-LoRA, GraLoRA, DeLoRA); the torch backend's ``refuse_quantized`` says the same.

    :raises UnsupportedError: naming ``path`` and the layers.
    """
    mode = next((mode for mode in map(quantization, layers) if mode is not None), None)
    if mode is not None:
        names = ", ".join(f"{type(layer).__name__} {layer.path!r}" for layer in layers)
        raise UnsupportedError(f"{method} cannot adapt a quantized layer ({mode}; module on {names}): PEFT 0.21 has no "
                               f"quantized {method} layer", key=path,
                               hint="load the adapter onto the unquantized model, or quantize without this layer")


def adapter_dtype(layer: Any) -> str:
    """The dtype a quantized layer's adapter variables get without a ``dtype`` option: its variable dtype (the
    dtype of its float variables, float32 for Keras' quantization policies), not its kernel's int8."""
    return str(getattr(layer, "variable_dtype", None) or "float32")


def refuse_unmapped(model: Any, mapped: Iterable[Any] = ()) -> None:
    """Where targets are not found in a model with packed layers the maps did not find, say that, not "no module
    matches". The converters' maps find packed layers too (int4 Dense, EinsumDense, Embedding: the converter's
    replay reads a stand-in of the packed weight's shape); one they miss (a weight unpacked by other means, a
    converter that computes with it) has lost its shape. A target missing where every packed layer is ``mapped``
    (the layers of the sites found) is missing.

    :raises UnsupportedError: a layer of ``model`` is packed and not mapped, naming one that is no embedding where
        there is one.
    """
    flatten = getattr(model, "_flatten_layers", None)
    layers = list(flatten(include_self=False, recursive=True)) if callable(flatten) else []
    known = {id(layer) for layer in mapped}
    found = sorted((layer for layer in layers if packed(layer) and id(layer) not in known),
                   key=lambda layer: layer_kind(layer) == "embedding")
    if found:
        first = found[0]
        raise UnsupportedError(f"{type(first).__name__} {first.path!r} and {len(found) - 1} more layers of this "
                               f"{type(model).__name__} are quantized {quantization(first)}, their kernels stored "
                               "packed, not in their shape, and the converters' maps did not find them; the modules "
                               "target_modules names were not found", key=first.path,
                               hint=packed_hint())
