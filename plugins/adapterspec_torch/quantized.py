"""Quantized base layers: a Linear or Embedding whose weight is not a dense floating tensor (SPEC.md 6.8).

bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (QLoRA), torchao's and other libraries' tensor subclasses, and
float8 weights compute their own output from a weight that is packed, scaled or rounded. An adapter whose
forward adds to the base layer's output or scales its input or output (LoRA, LoHa, LoKr, AdaLoRA, VeRA, IA3,
OFT, BOFT) runs on such a layer as on any other, as PEFT's ``bnb`` layers do: the base layer keeps computing
its output, the adapter's part is computed in the adapter's own dtype (float32 unless asked otherwise).

What reads the base weight's values needs them dense: DoRA's weight norm takes them from :func:`dense_weight`
(bitsandbytes' own dequantization, as PEFT's ``dequantize_module_weight``; other quantizations are refused).
What would write the weight -- a merge, the residual base of ``init_lora_weights`` (PiSSA, OLoRA...),
trainable token rows -- or copy the layer (``modules_to_save``) is refused with a typed error before anything
changes, and the base fingerprint (SPEC.md 9.1) of such a weight is unknown.

>>> quantization(torch.nn.Linear(2, 2)) is None
True
>>> layer = torch.nn.Linear(2, 2)
>>> layer.weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.int8), requires_grad=False)
>>> quantization(layer)
'int8 torch.nn.parameter.Parameter'
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from adapterspec.errors import UnsupportedError

from .devices import FLOAT8_DTYPES

__all__ = ["dense_weight", "quantization", "readable", "refuse_quantized", "weight_quantization", "weight_shape"]

#: The packages whose tensor subclasses hold a quantized weight that reports a floating dtype (torchao's
#: ``AffineQuantizedTensor`` says bfloat16) -- its elements are not the weight's values.
_QUANTIZING_PACKAGES = ("bitsandbytes", "torchao", "hqq", "optimum", "quanto", "compressed_tensors", "awq",
                        "auto_gptq", "gptqmodel", "aqlm", "eetq")


def weight_quantization(weight: Any) -> str | None:
    """What makes ``weight`` not a dense floating tensor of the weight's values, or ``None`` where it is one.

    >>> weight_quantization(torch.zeros(2, dtype=torch.float8_e4m3fn))
    'float8_e4m3fn torch.Tensor'
    """
    if not isinstance(weight, torch.Tensor):
        return None
    kind = type(weight)
    name = f"{kind.__module__}.{kind.__qualname__}".replace("torch._tensor.", "torch.")
    dtype = str(weight.dtype).removeprefix("torch.")
    if not weight.is_floating_point() or weight.dtype in FLOAT8_DTYPES or \
            kind.__module__.split(".", 1)[0] in _QUANTIZING_PACKAGES:
        return f"{dtype} {name}"
    return None


def _weight_of(module: nn.Module) -> Any:
    """``module``'s ``weight`` parameter, else its ``weight`` attribute (a buffer, a property), else ``None``."""
    weight = module._parameters.get("weight")
    return weight if weight is not None else getattr(module, "weight", None)


def quantization(module: nn.Module) -> str | None:
    """:func:`weight_quantization` of ``module``'s ``weight`` (``None`` for a layer without one)."""
    return weight_quantization(_weight_of(module))


def refuse_quantized(module: nn.Module, path: str, method: str) -> None:
    """Refuse ``method`` on a quantized ``module``: PEFT 0.21 has no quantized layer of that method (VB-LoRA,
    GraLoRA, DeLoRA); the Keras backend's :func:`adapterspec_keras.quantized.refuse_quantized` says the same.

    :raises UnsupportedError: naming ``path``.
    """
    mode = quantization(module)
    if mode is not None:
        raise UnsupportedError(f"{method} cannot adapt a quantized layer ({mode}): PEFT 0.21 has no quantized {method} "
                               "layer", key=path, hint="load the adapter onto the unquantized model")


def dense_weight(module: nn.Module, path: str) -> torch.Tensor:
    """``module``'s weight as a dense floating tensor of its values, in the layer's ``[out, in]`` layout: the
    weight itself, or bitsandbytes' dequantization of a 4-bit or 8-bit one (what PEFT's DoRA reads).

    :raises UnsupportedError: another quantization, whose values this backend cannot read (names ``path``).

    >>> layer = torch.nn.Linear(2, 2)
    >>> dense_weight(layer, "q") is layer.weight
    True
    """
    weight = _weight_of(module)
    assert isinstance(weight, torch.Tensor)
    what = weight_quantization(weight)
    if what is None:
        return weight
    dequantize = _dequantizer(module)
    if dequantize is not None:
        return dequantize()
    raise UnsupportedError(f"this layer's weight is quantized ({what}) and the torch backend cannot read its values, "
                           "which DoRA's weight norm needs", key=path,
                           hint="load the adapter onto the unquantized model, or use a LoRA without DoRA")


def readable(module: nn.Module) -> bool:
    """Whether :func:`dense_weight` can give ``module``'s weight values (a dense weight, or bitsandbytes' 4-bit
    or 8-bit one).

    >>> readable(torch.nn.Linear(2, 2))
    True
    """
    return quantization(module) is None or _dequantizer(module) is not None


def _dequantizer(module: nn.Module) -> Callable[[], torch.Tensor] | None:
    """bitsandbytes' own dequantization of ``module``'s 4-bit or 8-bit weight (PEFT's ``dequantize_bnb_weight``),
    or ``None`` for any other weight."""
    weight = module._parameters.get("weight")
    kind = type(weight).__name__
    if weight is None or not type(weight).__module__.startswith("bitsandbytes") or \
            kind not in ("Params4bit", "Int8Params"):
        return None
    import bitsandbytes as bnb

    if kind == "Params4bit":
        state = getattr(weight, "quant_state", None)
        if state is None:
            return None
        if not getattr(state, "packing_format_for_cpu", False):
            return lambda: bnb.functional.dequantize_4bit(weight.data, state)
        # bitsandbytes' CPU inference repacks the weight in place at its first forward; dequantize_4bit reads only the
        # standard layout (PEFT's DoRA reads garbage there), and bitsandbytes' inverse rewrites the state it is given:
        # so it works on a copy, and the layer keeps its packing
        inverse = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
        if inverse is None:
            return None

        def unpacked() -> torch.Tensor:
            packed_absmax = state.absmax
            data, standard = inverse(weight.data.clone(), copy.copy(state))
            if not getattr(state, "original_nested", False):  # the inverse leaves it in the packing's [k, n] layout
                standard.absmax = packed_absmax.T.reshape(-1).to(torch.float32)
            return bnb.functional.dequantize_4bit(data, standard)

        return unpacked
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        return None
    return lambda: cast(torch.Tensor, bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)))


def weight_shape(module: nn.Module, kind: str | None) -> tuple[int, ...]:
    """The shape of ``module``'s weight as the layer computes with it, even where a quantized weight is stored
    packed (bitsandbytes' 4-bit ``[out * in / 2, 1]``): ``[out, in]`` for a Linear, ``[V, d]`` for an Embedding,
    as stored for a transformers Conv1D (``[in, out]``) and a convolution.

    >>> weight_shape(torch.nn.Linear(3, 2), "linear")
    (2, 3)
    """
    if kind == "linear":
        linear = cast(nn.Linear, module)
        return linear.out_features, linear.in_features
    if kind == "embedding":
        embedding = cast(nn.Embedding, module)
        return embedding.num_embeddings, embedding.embedding_dim
    return tuple(cast(torch.Tensor, module.weight).shape)
