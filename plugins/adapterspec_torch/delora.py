"""DeLoRA (SPEC.md 17.6): a low-rank term with a bounded, decoupled norm, PEFT 0.21's math op for op.

Each adapted ``nn.Linear`` holds ``delora_A`` ``[r, in]``, ``delora_B`` ``[out, r]``, ``delora_lambda`` ``[1]`` and
``delora_w_norm`` ``[in]`` (the base weight's column norms when the adapter was made; stored, never trained). The
layer adds ``((x * w_norm) @ A.T * (lambda / r) / (|A_i| |B^i|)) @ B.T``. The functions here are pure:
:class:`~adapterspec_torch.layers.AdapterLayer` calls them with one adapter's tensors.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "DELORA", "target_modules": ["q"], "r": 2})
>>> shapes(torch.nn.Linear(8, 4), cfg, "q")
{'delora_A': (2, 8), 'delora_B': (4, 2), 'delora_lambda': (1,), 'delora_w_norm': (8,)}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapterspec import AdapterConfig
from adapterspec._delora import CLAMP, FROZEN, lambda_for, param_shapes, rank_for
from adapterspec.errors import UnsupportedError

from .quantized import refuse_quantized

__all__ = ["FROZEN", "KINDS", "METHODS", "check", "delta_weight", "initialise", "output", "rank", "shapes"]

#: The methods this module computes.
METHODS = ("DELORA",)
#: The layer kinds PEFT's DeLoRA adapts (``nn.Linear`` only: PEFT refuses every other layer).
KINDS = ("linear",)


def check(module: nn.Module, kind: str | None, path: str, config: AdapterConfig) -> None:
    """Refuse a quantized Linear: PEFT 0.21 has no quantized DeLoRA layer (its ``w_norm`` would be the norm of the
    quantized integers), and a ``lambda_pattern`` key this module reaches that does not compile (PEFT's
    ``get_pattern_key`` raises there).

    :raises UnsupportedError: naming ``path`` (and ``/lambda_pattern/<key>``).
    """
    if kind not in KINDS:
        return
    refuse_quantized(module, path, "DeLoRA")
    lambda_for(config, path)  # PEFT matches lambda_pattern at every load: a key this module reaches must compile


def rank(config: AdapterConfig, path: str) -> int:
    """The module's rank: ``rank_pattern``'s or ``r`` (the ``r`` of PEFT's ``lambda / r``)."""
    return rank_for(config, path)


def shapes(module: nn.Module, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """``delora_A`` ``[r, in]``, ``delora_B`` ``[out, r]``, ``delora_lambda`` ``[1]``, ``delora_w_norm`` ``[in]``."""
    linear = module if isinstance(module, nn.Linear) else None
    if linear is None:
        raise UnsupportedError(f"DeLoRA adapts nn.Linear layers, not a {type(module).__qualname__}", key=path,
                               hint="remove the module from target_modules")
    return param_shapes(linear.in_features, linear.out_features, rank(config, path))


def _kaiming(tensor: torch.Tensor) -> None:
    """``nn.init.kaiming_uniform_(a=sqrt(5))``, drawn in float32 on the CPU as PEFT draws it (same values under the
    same seed whatever the tensor's device)."""
    values = torch.empty(tuple(tensor.shape))
    nn.init.kaiming_uniform_(values, a=math.sqrt(5))
    tensor.copy_(values)


def initialise(params: Mapping[str, torch.Tensor], weight: torch.Tensor, config: AdapterConfig, path: str) -> None:
    """PEFT's ``reset_delora_parameters``: ``A`` kaiming-uniform, ``B`` zeros (``init_weights`` true) or
    kaiming-uniform too (false, or null: PEFT tests ``is True``), ``delora_lambda`` filled with ``lambda_pattern``'s
    or ``delora_lambda``, ``delora_w_norm`` the column norms of the base ``weight`` now, in its dtype.

    (On a float16/bfloat16 base the layer then rounds them to that dtype, as PEFT's move to the base's dtype
    does: :meth:`~adapterspec_torch.layers.AdapterLayer._initialise`.)"""
    _kaiming(params["delora_A"])
    if config.get("init_weights", True) is True:
        nn.init.zeros_(params["delora_B"])
    else:
        _kaiming(params["delora_B"])
    params["delora_lambda"].fill_(lambda_for(config, path))
    params["delora_w_norm"].copy_(torch.norm(weight.detach(), dim=0))


def _scaling(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, r: int) -> torch.Tensor:
    """``(lambda / r) / (|A_i| |B^i|)`` per rank, the norms clamped to ``1e-4`` (PEFT's order of operations)."""
    an = torch.clamp(a.norm(dim=1), min=CLAMP)
    bn = torch.clamp(b.norm(dim=0), min=CLAMP)
    return (lam / r) / (an * bn)


def delta_weight(params: Mapping[str, torch.Tensor], r: int) -> torch.Tensor:
    """PEFT's ``_compute_delta``: ``B @ diag(lambda / r / (|A_i| |B^i|)) @ A``, times ``w_norm`` per input column,
    in the adapter's dtype."""
    a, b = params["delora_A"], params["delora_B"]
    an = torch.clamp(a.norm(dim=1), min=CLAMP)
    bn = torch.clamp(b.norm(dim=0), min=CLAMP)
    diag = torch.diag_embed(params["delora_lambda"] / r / (an * bn))
    delta = b @ diag @ a
    return delta * params["delora_w_norm"].unsqueeze(0)


def output(adapters: Sequence[tuple[Mapping[str, torch.Tensor], int, float]], x: torch.Tensor,
           result: torch.Tensor, training: bool) -> torch.Tensor:
    """``result`` (the base output) plus the terms of ``adapters`` (``(tensors, r, module_dropout)`` each), summed as
    PEFT sums them: into a zero tensor of the base output's dtype, one in-place add per adapter, then added once."""
    add_out = torch.zeros_like(result)
    for params, r, dropout in adapters:
        x_d = F.dropout(x, dropout, training=True) if dropout and training else x
        h = F.linear(x_d * params["delora_w_norm"], params["delora_A"])
        h = h * _scaling(params["delora_A"], params["delora_B"], params["delora_lambda"], r)
        add_out += F.linear(h, params["delora_B"])
    return result + add_out.to(result.dtype)
