"""AdaLoRA (SPEC.md 15.4): LoRA in SVD form, ``delta = B @ (A * E) * scale``, PEFT 0.21's math.

``A`` is ``[k, in]`` (``[k, in * kh * kw]`` for a Conv2d), ``B`` ``[out, k]``, ``E`` ``[k, 1]`` (the singular
values), ``k`` the ranks rank allocation kept for the module, and ``scale`` = ``lora_alpha / (init_r + 1e-5)``
(:func:`adapterspec._adalora.scale`). The functions here are pure: :class:`~adapterspec_torch.layers.AdapterLayer`
calls them with its base layer and one adapter's tensors.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "ADALORA", "target_modules": ["q"], "init_r": 3, "total_step": 10})
>>> shapes(torch.nn.Linear(8, 5), "linear", cfg, "q")
{'lora_A': (3, 8), 'lora_B': (5, 3), 'lora_E': (3, 1)}
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from adapterspec import AdapterConfig
from adapterspec._adalora import RANKNUM_EPS, ranknum, scaling, stored_rank
from adapterspec.errors import UnsupportedError

from .quantized import weight_shape

__all__ = ["KINDS", "METHODS", "check", "delta_weight", "factors", "initialise", "output", "shapes"]

#: The methods this module computes.
METHODS = ("ADALORA",)
#: The layer kinds PEFT's AdaLoRA adapts (``SVDLinear`` on Linear and transformers Conv1D, ``SVDConv2d``).
KINDS = ("linear", "conv1d_hf", "conv2d")


def check(module: nn.Module, kind: str | None, path: str, config: AdapterConfig) -> None:
    """Refuse what PEFT cannot build: a Conv2d with groups > 1 (its delta ``[out, in * k]`` does not fit the weight).

    :raises UnsupportedError: naming ``path``.
    """
    if kind == "conv2d" and cast(nn.Conv2d, module).groups != 1:
        raise UnsupportedError("AdaLoRA cannot adapt a Conv2d with groups > 1 (PEFT's SVDConv2d delta does not fit "
                               "its weight)", key=path, hint="do not target this layer")


def shapes(module: nn.Module, kind: str, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """``lora_A`` ``[k, in]``, ``lora_B`` ``[out, k]``, ``lora_E`` ``[k, 1]`` (PEFT's layout)."""
    k = stored_rank(config, path)
    shape = weight_shape(module, kind)
    if kind == "conv1d_hf":
        in_f, out_f = shape[0], shape[1]
    else:
        in_f, out_f = math.prod(shape[1:]), shape[0]
    return {"lora_A": (k, in_f), "lora_B": (out_f, k), "lora_E": (k, 1)}


def factors(config: AdapterConfig, path: str) -> tuple[float, int]:
    """``(scaling, ranknum)`` of module ``path``: ``lora_alpha`` and ``init_r`` (:mod:`adapterspec._adalora`)."""
    return scaling(config, path), ranknum(config, path)


def _divide(value: torch.Tensor, scale: float, rank: int) -> torch.Tensor:
    """``value * scaling / (ranknum + 1e-5)`` with ``ranknum`` a one-element tensor of ``value``'s dtype, as PEFT
    computes it (so the results are PEFT's to the last bit)."""
    return value * scale / (torch.full((1,), float(rank), dtype=value.dtype, device=value.device) + RANKNUM_EPS)


def initialise(params: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """PEFT's init: ``E`` zeros (the adapter starts as the identity), ``A`` and ``B`` normal with std 0.02
    (``init_lora_weights`` false: all three standard normal)."""
    if config.get("init_lora_weights", True) is False:
        for tensor in params.values():
            tensor.normal_()
        return
    nn.init.zeros_(params["lora_E"])
    nn.init.normal_(params["lora_A"], mean=0.0, std=0.02)
    nn.init.normal_(params["lora_B"], mean=0.0, std=0.02)


def delta_weight(base: nn.Module, kind: str, params: dict[str, torch.Tensor], scale: float, rank: int) -> torch.Tensor:
    """``B @ (A * E) * scaling / (ranknum + 1e-5)`` in the base weight's layout (transposed for Conv1D, reshaped
    for a Conv2d)."""
    delta = _divide(params["lora_B"] @ (params["lora_A"] * params["lora_E"]), scale, rank)
    if kind == "conv1d_hf":
        return delta.T
    return delta.reshape(weight_shape(base, kind))


def output(base: nn.Module, kind: str, params: dict[str, torch.Tensor], scale: float, rank: int, x: torch.Tensor,
           dropout: float, training: bool) -> torch.Tensor:
    """The adapter's term added to ``base(x)``: ``dropout(x) @ (A * E).T @ B.T * scaling / (ranknum + 1e-5)`` (a
    convolution with the reshaped delta for a Conv2d), as PEFT's ``SVDLinear`` / ``SVDConv2d`` compute it."""
    a, b, e = params["lora_A"], params["lora_B"], params["lora_E"]
    x = x.to(a.dtype)
    if dropout and training:
        x = F.dropout(x, dropout, training=True)
    if kind == "conv2d":
        conv = cast(nn.Conv2d, base)
        delta = _divide(b @ (a * e), scale, rank).reshape(conv.weight.shape)
        return F.conv2d(x, delta, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                        groups=conv.groups)
    return _divide(x @ (a * e).T @ b.T, scale, rank)
