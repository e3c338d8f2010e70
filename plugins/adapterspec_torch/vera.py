"""VeRA (SPEC.md 15.5): frozen random projections shared by all modules, scaled per module, PEFT 0.21's math.

``delta = (lambda_b[:, None] * B[:out]) @ (lambda_d[:, None] * A[:, :in])``: ``A`` ``[r, max_in]`` and ``B``
``[max_out, r]`` are stored once per adapter (``base_model.vera_A``/``vera_B``) and held by one :class:`Shared`
module on the model (:data:`SHARED_ATTR`); every adapted layer slices them to its own size. The functions here are
pure: :class:`~adapterspec_torch.layers.AdapterLayer` calls them with its base layer, one adapter's tensors and
the shared pair.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "VERA", "target_modules": ["q"], "r": 2})
>>> shapes(torch.nn.Linear(8, 5), "linear", cfg)
{'vera_lambda_b': (5,), 'vera_lambda_d': (2,)}
>>> shared_shapes([(torch.nn.Linear(8, 5), "linear"), (torch.nn.Linear(3, 7), "linear")], cfg)
{'vera_A': (2, 8), 'vera_B': (7, 2)}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from adapterspec import AdapterConfig
from adapterspec._vera import SHARED, rank

from .quantized import weight_shape

__all__ = ["KINDS", "METHODS", "SHARED_ATTR", "Shared", "delta_weight", "initialise", "initialise_shared", "output",
           "shapes", "shared_shapes"]

#: The methods this module computes.
METHODS = ("VERA",)
#: The layer kinds PEFT's VeRA adapts (``nn.Linear`` and transformers ``Conv1D``).
KINDS = ("linear", "conv1d_hf")
#: The model attribute (an ``nn.ModuleDict``, adapter name -> :class:`Shared`) holding the shared matrices.
SHARED_ATTR = "adapterspec_shared"


class Shared(nn.Module):
    """``vera_A`` and ``vera_B`` of one adapter (frozen parameters) or, until a load fills them, their pending
    shapes in ``pending`` (the same protocol as a layer's adapter weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["pending"] = {}

    def fill(self, attr: str, value: torch.Tensor, *, device: torch.device | None = None) -> nn.Parameter:
        """Make pending parameter ``attr`` from ``value`` (no copy when its device and dtype are right)."""
        spec = self.__dict__["pending"].pop(attr)
        if value.dtype != spec.dtype or (device if device is not None else value.device) != spec.device:
            value = value.to(device=spec.device, dtype=spec.dtype)
        param = self._parameters[attr] = nn.Parameter(value, requires_grad=spec.requires_grad)
        return param

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"vera_A": ..., "vera_B": ...}`` (VB-LoRA: ``{"vblora_vector_bank": ...}``), loaded."""
        return {name: cast(torch.Tensor, value) for name, value in self._parameters.items()}


def _in_out(module: nn.Module, kind: str) -> tuple[int, int]:
    shape = weight_shape(module, kind)
    if kind == "conv1d_hf":
        return shape[0], shape[1]
    return shape[1], shape[0]


def shapes(module: nn.Module, kind: str, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """``vera_lambda_b`` ``[out]`` and ``vera_lambda_d`` ``[r]``."""
    return {"vera_lambda_b": (_in_out(module, kind)[1],), "vera_lambda_d": (rank(config),)}


def shared_shapes(modules: Sequence[tuple[nn.Module, str]], config: AdapterConfig) -> dict[str, tuple[int, int]]:
    """``vera_A`` ``[r, max_in]``, ``vera_B`` ``[max_out, r]`` over the adapted ``(module, kind)`` (PEFT's
    ``_find_dim``)."""
    sizes = [_in_out(module, kind) for module, kind in modules]
    r = rank(config)
    return {"vera_A": (r, max(i for i, _ in sizes)), "vera_B": (max(o for _, o in sizes), r)}


def initialise(params: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """PEFT's init: ``lambda_b`` zeros and ``lambda_d`` ``d_initial`` (``init_weights`` false: ones and
    standard normal)."""
    if config.get("init_weights", True) is False:
        nn.init.ones_(params["vera_lambda_b"])
        params["vera_lambda_d"].normal_()
        return
    nn.init.zeros_(params["vera_lambda_b"])
    params["vera_lambda_d"].fill_(float(config.get("d_initial", 0.1)))


def initialise_shared(params: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """PEFT's projections for a new adapter: Kaiming-uniform ``A`` then ``B`` from one CPU generator seeded with
    ``projection_prng_key`` (torch's generator: reproducible on torch only, SPEC.md 15.5)."""
    generator = torch.Generator(device="cpu").manual_seed(int(config.get("projection_prng_key", 0)))
    for name in SHARED:
        target = params[name]
        values = torch.empty(tuple(target.shape))
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(values.shape[1])  # gain sqrt(2), fan_in = axis 1
        values.uniform_(-bound, bound, generator=generator)
        target.copy_(values)


def _sliced(module: nn.Module, kind: str, shared: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    in_f, out_f = _in_out(module, kind)
    return shared["vera_A"][:, :in_f], shared["vera_B"][:out_f, :]


def delta_weight(base: nn.Module, kind: str, params: dict[str, torch.Tensor],
                 shared: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(lambda_b B[:out]) @ (lambda_d A[:, :in])`` in the base weight's layout (transposed for Conv1D)."""
    a, b = _sliced(base, kind, shared)
    delta = (params["vera_lambda_b"].unsqueeze(-1) * b) @ (params["vera_lambda_d"].unsqueeze(-1) * a)
    return delta.T if kind == "conv1d_hf" else delta


def output(base: nn.Module, kind: str, params: dict[str, torch.Tensor], shared: dict[str, torch.Tensor],
           x: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
    """The adapter's term added to ``base(x)``: ``lambda_b * (lambda_d * (dropout(x) @ A.T)) @ B.T`` (PEFT's order)."""
    a, b = _sliced(base, kind, shared)
    lambda_d, lambda_b = params["vera_lambda_d"], params["vera_lambda_b"]
    x = x.to(lambda_d.dtype)
    if dropout and training:
        x = F.dropout(x, dropout, training=True)
    return lambda_b * F.linear(lambda_d * F.linear(x, a.to(x.dtype)), b.to(x.dtype))
