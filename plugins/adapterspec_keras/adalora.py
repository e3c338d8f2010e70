"""AdaLoRA (SPEC.md 15.4) on Keras layers: LoRA in SVD form, ``delta = B @ (A * E) * scale``, PEFT 0.21's math.

``A`` is ``[k, in]``, ``B`` ``[out, k]``, ``E`` ``[k, 1]`` (the singular values), ``k`` the ranks rank
allocation kept for the module, and ``scale`` = ``lora_alpha / (init_r + 1e-5)`` (:mod:`adapterspec._adalora`).
The variables keep the file's layout; the layer reads ``A`` and ``B`` transposed (``[in, k]``, ``[k, out]``, as
LoRA's), so :func:`views` gives the factors of ``x @ (A * E).T @ B.T`` in Keras layout. The torch backend's
module of the same name computes the same on torch layers.

This backend adapts what PEFT's ``SVDLinear`` / ``SVDConv2d`` adapt: Dense and EinsumDense layers (an
``nn.Linear`` or a transformers ``Conv1D``, GPT-2's fused ``c_attn`` split over three layers included) and
ungrouped 2-D convolutions (``A`` ``[k, in * kh * kw]``, the delta reshaped to the kernel, :func:`delta_spec`);
embeddings, 1-D/3-D or grouped convolutions are refused (:func:`check`), as is training (no rank allocation here).

>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "ADALORA", "target_modules": ["q"], "init_r": 3, "total_step": 10})
>>> shapes(cfg, "q", 8, 5)
{'lora_A': (3, 8), 'lora_B': (5, 3), 'lora_E': (3, 1)}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from keras import ops

from adapterspec import AdapterConfig
from adapterspec._adalora import RANKNUM_EPS, ranknum, scaling, stored_rank
from adapterspec.errors import UnsupportedError

from .sites import ModuleSite

__all__ = ["METHODS", "check", "delta_spec", "divide", "factors", "inits", "shapes", "views"]

#: The methods this module computes.
METHODS = ("ADALORA",)


def check(site: ModuleSite, path: str, config: AdapterConfig, *, trainable: bool = False) -> None:
    """Refuse what this backend does not compute exactly for AdaLoRA.

    :raises UnsupportedError: an embedding, a logits projection or a convolution (naming the module and its
        Keras layers); training (``/peft_type``: no rank allocation, no orthogonality loss), as the torch
        backend refuses it.
    """
    if trainable:
        raise UnsupportedError("training AdaLoRA (its rank allocation and orthogonality loss) is not implemented "
                               "by the keras backend; its adapters load for inference and merging",
                               pointer="/peft_type", hint="train with PEFT's AdaLoRA (update_and_allocate), then "
                                                          "load the saved adapter without trainable")
    conv = site.kind == "conv" and all(p.kind == "conv" and getattr(p.layer, "groups", 1) == 1
                                       for p in site.pieces) and len(site.conv_spatial) == 2
    if not conv and (site.kind != "linear" or any(piece.kind not in ("dense", "einsum") for piece in site.pieces)):
        layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
        raise UnsupportedError(f"the keras backend adapts only Dense/EinsumDense and ungrouped 2-D convolution layers "
                               f"with ADALORA (module on {layers}; PEFT's AdaLoRA adapts Linear, Conv1D and "
                               f"Conv2d)", key=path, hint="remove the module from target_modules, or use the torch "
                                                         "backend")


def shapes(config: AdapterConfig, path: str, in_features: int, out_features: int,
           kernel: tuple[int, ...] = ()) -> dict[str, tuple[int, ...]]:
    """``lora_A`` ``[k, in]`` (a convolution's ``[k, in * kh * kw]``), ``lora_B`` ``[out, k]``, ``lora_E``
    ``[k, 1]`` (PEFT's layout; ``k`` the kept ranks)."""
    k = stored_rank(config, path)
    return {"lora_A": (k, in_features * math.prod(kernel)), "lora_B": (out_features, k), "lora_E": (k, 1)}


def factors(config: AdapterConfig, path: str) -> tuple[float, int]:
    """``(scaling, ranknum)`` of module ``path``: ``lora_alpha`` and ``init_r`` (:mod:`adapterspec._adalora`)."""
    return scaling(config, path), ranknum(config, path)


def inits(config: AdapterConfig, params: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Any, ...]]:
    """Initialiser descriptions (:func:`~adapterspec_keras.bank.make_initializer`) as PEFT initialises: ``E``
    zeros (the adapter starts as the identity), ``A`` and ``B`` normal with std 0.02 (``init_lora_weights``
    false: all three standard normal)."""
    if config.get("init_lora_weights", True) is False:
        return {param: ("normal", 1.0) for param in params}
    return {"lora_A": ("normal", 0.02), "lora_B": ("normal", 0.02), "lora_E": ("zeros",)}


def views(get: Callable[[str], Any], dtype: Any) -> tuple[Any, Any]:
    """``((A * E).T, B.T)`` in ``dtype``: ``[in, k]`` and ``[k, out]`` (``get``: the layer's reads, ``lora_A``
    and ``lora_B`` already transposed)."""
    a = ops.cast(get("lora_A"), dtype)
    e = ops.cast(get("lora_E"), dtype)
    return a * ops.transpose(e), ops.cast(get("lora_B"), dtype)


def divide(value: Any, scale: float, rank: int) -> Any:
    """``value * scaling / (ranknum + 1e-5)`` in ``value``'s dtype, in PEFT's order (so the results are PEFT's to
    the last bit where the product is)."""
    dtype = value.dtype
    return value * ops.cast(scale, dtype) / (ops.cast(float(rank), dtype) + ops.cast(RANKNUM_EPS, dtype))


def delta_spec(get: Callable[[str], Any], scale: float, rank: int, dtype: Any, shape: tuple[int, ...]) -> Any:
    """``B @ (A * E) * scaling / (ranknum + 1e-5)`` in ``dtype``, reshaped to the base weight's ``shape`` in torch's
    layout (``[out, in, kh, kw]`` for a convolution), as PEFT's ``SVDConv2d`` builds its delta."""
    a, b = views(get, dtype)
    return ops.reshape(divide(ops.transpose(ops.matmul(a, b)), scale, rank), shape)
