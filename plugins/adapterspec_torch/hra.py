"""HRA, Householder reflection adaptation (SPEC.md 17.3): PEFT 0.21's math on ``nn.Linear`` and ``nn.Conv2d``.

An adapter's ``hra_u`` ``[F, r]`` gives an orthogonal ``H`` ``[F, F]``: the product of the ``r`` reflections
``I - 2 u_i u_i^T`` of its normalised columns, or with ``apply_GS`` the one reflection ``I - 2 Q Q^T`` across the
Gram-Schmidt basis ``Q`` of the columns. The layer runs with the weight ``W @ H`` (``W`` flattened to ``[out, F]``);
merged, the weight becomes ``W @ H``, and unmerging multiplies by ``H``'s inverse, the reflections in reverse order.
The functions here are pure: :class:`~adapterspec_torch.layers.AdapterLayer` calls them with its base layer and the
tensors of its active HRA adapters.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "HRA", "target_modules": ["q"], "r": 2})
>>> shapes(torch.nn.Conv2d(3, 4, 2), "conv2d", cfg)
{'hra_u': (12, 2)}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from adapterspec import AdapterConfig
from adapterspec._hra import PARAM, Reflections, inject_refusal, layer_refusal, param_shapes, reflections_of
from adapterspec.errors import UnsupportedError

from .computed import current
from .oft import check_conv, features
from .quantized import quantization

__all__ = ["KINDS", "METHODS", "PARAM", "Reflections", "check", "check_inject", "features", "forward", "initialise",
           "matrix", "merge", "settings", "shapes", "unmerge"]

#: The methods this module computes.
METHODS = ("HRA",)
#: The layer kinds it adapts (PEFT 0.21 adapts ``nn.Linear`` and ``nn.Conv2d`` only).
KINDS = ("linear", "conv2d")


def check(module: nn.Module, kind: str | None, path: str, config: AdapterConfig) -> None:
    """Refuse a layer PEFT's HRA does not compute exactly (its merged and unmerged results would differ, or PEFT
    fails on it).

    :raises UnsupportedError: naming ``path`` and the reason.

    >>> cfg = AdapterConfig.from_dict({"peft_type": "HRA", "target_modules": ["c"], "r": 2})
    >>> check(torch.nn.Conv2d(4, 4, 3, groups=2), "conv2d", "c", cfg)
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: c: ...
    """
    if kind not in KINDS:
        raise UnsupportedError(f"HRA cannot adapt a {type(module).__qualname__} layer (PEFT 0.21 adapts nn.Linear and "
                               "nn.Conv2d only)", key=path,
                               hint="remove the module from target_modules (or exclude it with exclude_modules)")
    quantized = quantization(module)
    if quantized is not None:
        raise UnsupportedError(f"HRA multiplies the base weight by its reflections, and this layer's weight is "
                               f"quantized ({quantized})", key=path, hint="load the adapter onto the unquantized model")
    if kind == "conv2d":
        check_conv(cast(nn.Conv2d, module), path, "HRA")
    refusal = layer_refusal(features(module, kind), config)
    if refusal is not None:  # SPEC.md 17.3: apply_GS with r above F has no defined result
        pointer, reason, hint = refusal
        raise UnsupportedError(reason, key=path, pointer=pointer, hint=hint)


def check_inject(config: AdapterConfig, path: str) -> None:
    """Refuse a fresh adapter whose PEFT initialisation has no defined output (:func:`adapterspec._hra.inject_refusal`).

    :raises UnsupportedError: naming the field.
    """
    refusal = inject_refusal(config)
    if refusal is not None:
        pointer, reason, hint = refusal
        raise UnsupportedError(reason, key=path, pointer=pointer, hint=hint)


def settings(config: AdapterConfig) -> Reflections:
    """The :class:`Reflections` of ``config`` (the same on every layer)."""
    return reflections_of(config)


def shapes(module: nn.Module, kind: str, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The spec parameter name and shape of ``config`` on this layer (PEFT's layout ``[F, r]``)."""
    return param_shapes(features(module, kind), config)


def initialise(params: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """PEFT's initialisation, with torch's random generator as PEFT draws it (on the CPU, float32): with
    ``init_weights`` true and an even ``r``, ``kaiming_uniform_(a=sqrt(5))`` of an ``[F, r/2]`` tensor whose columns
    are then each repeated twice (the reflections cancel: ``H = I``); otherwise ``kaiming_uniform_`` of ``[F, r]``.

    >>> p = {"hra_u": torch.empty(4, 2)}
    >>> initialise(p, AdapterConfig.from_dict({"peft_type": "HRA", "target_modules": ["q"], "r": 2}))
    >>> bool(p["hra_u"][:, 0].equal(p["hra_u"][:, 1]))
    True
    """
    tensor = params[PARAM]
    rows, r = tensor.shape
    if config.get("init_weights", True) and r % 2 == 0:  # PEFT: a truth test (null: false, SPEC 4.1)
        half = torch.zeros(rows, r // 2)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        value = torch.repeat_interleave(half, 2, dim=1)
    else:
        value = torch.empty(rows, r)
        nn.init.kaiming_uniform_(value, a=math.sqrt(5))
    tensor.copy_(value)


def matrix(spec: Reflections, u: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """``H`` ``[F, F]`` of one adapter, computed as PEFT's ``get_delta_weight`` does (same order of operations);
    ``reverse``: the reflections in reverse order, ``H``'s inverse (with ``apply_GS`` ``H`` is its own inverse).

    >>> u = torch.tensor([[1.0], [0.0]])
    >>> matrix(Reflections(1), u).tolist()
    [[-1.0, 0.0], [0.0, 1.0]]
    """
    rows = u.shape[0]
    if spec.apply_gs:
        basis = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
        for i in range(1, spec.r):
            ui = u[:, i].view(-1, 1)
            for j in range(i):
                ui = ui - (basis[j].t() @ ui) * basis[j]
            basis.append((ui / ui.norm()).view(-1, 1))
        q = torch.cat(basis, dim=1)
        return torch.eye(rows, device=u.device, dtype=u.dtype) - 2 * q @ q.t()
    unit = u / u.norm(dim=0)
    weight = torch.eye(rows, device=u.device, dtype=u.dtype)
    for i in (range(spec.r - 1, -1, -1) if reverse else range(spec.r)):
        ui = unit[:, i].view(-1, 1)
        weight = weight - 2 * weight @ ui @ ui.t()
    return weight


def forward(base: nn.Module, kind: str, adapters: Sequence[tuple[Reflections, torch.Tensor]], x: torch.Tensor,
            args: Any, kwargs: Any, *, output: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The layer's output with the active HRA ``adapters`` (``(spec, hra_u)``, in the active order) applied: PEFT's
    ``forward`` -- the weight ``W @ H_1 @ H_2 ..`` in the adapters' dtype, the input cast to it, the result cast
    back to the input's dtype. ``args``/``kwargs``/``output``: unused by PEFT's HRA (its own convolution and linear
    call), taken for the caller's one signature.

    >>> layer = torch.nn.Linear(2, 2)
    >>> x = torch.ones(1, 2)
    >>> forward(layer, "linear", [(Reflections(2), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))], x, (), {}).equal(layer(x))
    True
    """
    del args, kwargs, output
    previous = x.dtype
    count = features(base, kind)
    total = torch.eye(count, device=x.device)
    for spec, u in adapters:
        delta = matrix(spec, u)
        total = torch.mm(total.to(delta.dtype), delta)
    weight = current(base, "weight").detach()  # PEFT reads weight.data: the base weight gets no gradient
    out_features = int(weight.shape[0])
    flat = weight.reshape(out_features, count).to(total.dtype)
    new_weight = torch.mm(flat, total)
    bias = cast("torch.Tensor | None", base.bias)
    if bias is not None:
        bias = bias.to(total.dtype)
    x = x.to(total.dtype)
    if kind == "linear":
        result = F.linear(x, new_weight, bias)
    else:
        conv = cast(nn.Conv2d, base)
        result = F.conv2d(x, new_weight.view(weight.shape), bias, padding=conv.padding[0], stride=conv.stride[0])
    return result.to(previous)


def merge(weight: torch.Tensor, spec: Reflections, u: torch.Tensor) -> None:
    """``W <- W @ H`` in place (``W`` flattened to ``[out, F]``), computed in ``hra_u``'s dtype and rounded back to
    the weight's, as PEFT does.

    >>> layer = torch.nn.Linear(2, 2)
    >>> before = layer.weight.detach().clone()
    >>> merge(layer.weight, Reflections(2), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    >>> layer.weight.equal(before)
    True
    """
    _multiply(weight, matrix(spec, u))


def unmerge(weight: torch.Tensor, spec: Reflections, u: torch.Tensor) -> None:
    """Undo :func:`merge`: ``W <- W @ H^-1``, the reflections in reverse order (PEFT's ``reverse=True``).

    >>> layer = torch.nn.Linear(3, 2)
    >>> before = layer.weight.detach().clone()
    >>> u = torch.tensor([[1.0, 0.5], [0.2, -1.0], [0.3, 0.4]])
    >>> merge(layer.weight, Reflections(2), u); unmerge(layer.weight, Reflections(2), u)
    >>> torch.allclose(layer.weight, before, atol=1e-6)
    True
    """
    _multiply(weight, matrix(spec, u, reverse=True))


def _multiply(weight: torch.Tensor, h: torch.Tensor) -> None:
    with torch.no_grad():
        flat = weight.data.view(weight.shape[0], -1)
        flat.copy_(torch.mm(flat.to(h.dtype), h).to(weight.dtype))
