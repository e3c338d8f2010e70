"""BEFT, bias-efficient fine-tuning (SPEC.md 17.8): PEFT 0.21.2's math on ``nn.Linear``.

An adapter's ``beft_bias`` ``[1, out]`` is a trained bias. Unmerged, the layer adds the sum of its active BEFT
adapters' biases (summed in their dtype) to the base output once, and rounds to the output's dtype; merged, each is
added in place to the base layer's bias (one rounding to the bias's dtype), and unmerging subtracts it the same way.
The functions here are pure: :class:`~adapterspec_torch.layers.AdapterLayer` calls them with its base layer and its
adapters' tensors.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "BEFT", "target_modules": ["v"]})
>>> shapes(torch.nn.Linear(8, 4), cfg, "v")
{'beft_bias': (1, 4)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adapterspec import AdapterConfig
from adapterspec._beft import PARAM, merge_refusal, param_shapes, starts_at_zero
from adapterspec.errors import UnsupportedError

__all__ = ["KINDS", "METHODS", "PARAM", "check_merge", "initialise", "merge", "output", "shapes", "unmerge"]

#: The methods this module computes.
METHODS = ("BEFT",)
#: The layer kinds PEFT's BEFT adapts (``nn.Linear`` only: PEFT raises TypeError on anything else).
KINDS = ("linear",)


def shapes(module: nn.Module, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """``beft_bias`` ``[1, out_features]``.

    :raises UnsupportedError: ``module`` is no ``nn.Linear`` (PEFT refuses every other layer), naming ``path``.
    """
    if not isinstance(module, nn.Linear):
        raise UnsupportedError(f"BEFT adapts nn.Linear layers, not a {type(module).__qualname__} (PEFT 0.21.2 refuses "
                               "it too)", key=path, hint="remove the module from target_modules")
    return param_shapes(int(module.out_features))


def initialise(params: Mapping[str, torch.Tensor], weight: torch.Tensor | None, config: AdapterConfig) -> None:
    """PEFT's ``update_layer``: ``torch.randn((1, out))`` drawn in float32 on the CPU whatever ``init_weights`` says
    (so later draws match PEFT's), then zeros when ``init_weights`` is truthy. PEFT then casts the tensor to a
    floating base ``weight``'s dtype and its ``autocast_adapter_dtype`` back to float32: on a float16/bfloat16 base
    the values are rounded to that dtype, here too."""
    bias = params[PARAM]
    value = torch.randn(tuple(bias.shape))
    if starts_at_zero(config):
        value.zero_()
    if weight is not None and weight.is_floating_point():
        value = value.to(weight.dtype)
    with torch.no_grad():
        bias.copy_(value)


def output(biases: Sequence[torch.Tensor], result: torch.Tensor) -> torch.Tensor:
    """``result`` plus the active adapters' ``beft_bias`` (flattened), summed first in their dtype as PEFT sums them,
    then added once and rounded to ``result``'s dtype."""
    total: torch.Tensor | None = None
    for bias in biases:
        flat = bias.flatten()
        total = flat if total is None else total + flat
    if total is None:
        return result
    return (result + total).to(result.dtype)


def check_merge(base: nn.Module, path: str) -> None:
    """Refuse a merge into a layer without a bias (:func:`adapterspec._beft.merge_refusal`).

    :raises UnsupportedError: naming ``path``.
    """
    refusal = merge_refusal(path, getattr(base, "bias", None) is not None)
    if refusal is not None:
        raise refusal


def merge(bias: torch.Tensor, beft_bias: torch.Tensor) -> None:
    """PEFT's ``bias.data.add_(beft_bias.squeeze())``: in place, one rounding to the bias's dtype."""
    bias.data.add_(beft_bias.data.squeeze())


def unmerge(bias: torch.Tensor, beft_bias: torch.Tensor) -> None:
    """PEFT's ``bias.data = (bias.data - beft_bias.squeeze()).to(bias dtype)``."""
    bias.data = (bias.data - beft_bias.data.squeeze()).to(bias.dtype)
