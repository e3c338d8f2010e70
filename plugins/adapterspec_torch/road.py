"""RoAd (SPEC.md 17.1): 2-D rotations of pairs of a Linear layer's outputs, PEFT 0.21's math.

Each group of ``group_size`` outputs pairs element ``i`` with element ``i + group_size/2``; the pair
``(y_i, y_j)`` becomes ``(y_i * c_i - y_j * s_i, y_j * c_j + y_i * s_j)`` with ``c = alpha * cos(theta)`` and
``s = alpha * sin(theta)`` per element (:func:`columns`). Merged, ``W <- R @ W`` and ``b <- R @ b``, ``R`` the
``out x out`` matrix of that map (:func:`matrix`). The functions are pure:
:class:`~adapterspec_torch.layers.AdapterLayer` calls them with its base layer and the tensors of its RoAd adapters.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "ROAD", "target_modules": ["q"], "variant": "road_2", "group_size": 4})
>>> shapes(torch.nn.Linear(3, 8), cfg)
{'road_theta': (8,), 'road_alpha': (8,)}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
from torch import nn

from adapterspec import AdapterConfig
from adapterspec._road import group_size, out_features_problem, variant, vector_length
from adapterspec.errors import UnsupportedError

__all__ = ["KINDS", "METHODS", "Road", "apply", "check", "check_invertible", "columns", "initialise", "matrix", "merge",
           "settings", "shapes", "unmerge"]

#: The methods this module computes.
METHODS = ("ROAD",)
#: The layer kinds PEFT 0.21's RoAd adapts (its ``dispatch_default``: ``nn.Linear`` only).
KINDS = ("linear",)


class Road(NamedTuple):
    """The variant and group size of one RoAd adapter."""

    variant: str
    group_size: int


def settings(config: AdapterConfig) -> Road:
    """The :class:`Road` of ``config``."""
    return Road(variant(config), group_size(config))


def check(module: nn.Module, path: str, config: AdapterConfig) -> None:
    """Refuse a layer whose outputs ``group_size`` does not divide (PEFT's ``update_layer`` raises ValueError).

    :raises UnsupportedError: naming ``path`` and ``/group_size``.

    >>> from adapterspec import AdapterConfig
    >>> check(torch.nn.Linear(4, 6), "q", AdapterConfig.from_dict({"peft_type": "ROAD", "target_modules": ["q"],
    ...                                                            "group_size": 4}))
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: q: ...
    """
    problem = out_features_problem(config, int(cast(nn.Linear, module).out_features))
    if problem is not None:
        raise UnsupportedError(problem, key=path, pointer="/group_size",
                               hint="choose a group_size dividing the output size of every adapted layer, or leave "
                                    "this layer out of target_modules")


def shapes(module: nn.Module, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """``road_theta`` and ``road_alpha``: ``[out/2]``, ``[out]`` or ``[2*out]`` (road_1, road_2, road_4)."""
    size = vector_length(variant(config), int(cast(nn.Linear, module).out_features))
    return {"road_theta": (size,), "road_alpha": (size,)}


def initialise(params: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """PEFT's initialisation: ``theta`` zeros and ``alpha`` ones (the identity); with ``init_weights: false``,
    ``theta ~ N(0, 0.5)`` then ``alpha ~ N(1, 0.5)`` from torch's generator, in PEFT's order.

    >>> p = {"road_theta": torch.empty(2), "road_alpha": torch.empty(2)}
    >>> initialise(p, AdapterConfig.from_dict({"peft_type": "ROAD", "target_modules": ["q"]}))
    >>> p["road_alpha"].tolist(), p["road_theta"].tolist()
    ([1.0, 1.0], [0.0, 0.0])
    """
    if config.get("init_weights", True) is False:
        nn.init.normal_(params["road_theta"], mean=0.0, std=0.5)
        nn.init.normal_(params["road_alpha"], mean=1.0, std=0.5)
        return
    nn.init.zeros_(params["road_theta"])
    nn.init.ones_(params["road_alpha"])


def columns(spec: Road, theta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, s)``, each ``[out]``: the diagonal of ``R`` and the coefficients of the partner element (PEFT's
    ``_prepare_cols``)."""
    size = spec.group_size
    if spec.variant == "road_1":  # group_size/2 values per group, used by both halves
        theta = theta.reshape(-1, size // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, size // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if spec.variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, size), alpha.reshape(-1, 2, size)  # road_4: [cos half, sin half] per group
    return alpha[:, 0, :].flatten() * theta[:, 0, :].cos().flatten(), \
        alpha[:, 1, :].flatten() * theta[:, 1, :].sin().flatten()


def apply(spec: Road, theta: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``R @ y`` along the last axis, elementwise (PEFT's ``_apply_road``).

    >>> y = torch.arange(4.0)
    >>> apply(Road("road_2", 4), torch.zeros(4), torch.ones(4), y).equal(y)
    True
    """
    first, second = columns(spec, theta, alpha)
    grouped = y.reshape(-1, 2, spec.group_size // 2)
    rotated = torch.stack((-grouped[:, 1, :], grouped[:, 0, :]), dim=1).reshape(y.shape)
    return y * first + rotated * second


def matrix(spec: Road, theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The ``out x out`` matrix ``R`` (PEFT's ``_get_delta_weight``): ``R[i, i] = c_i``; in each group, for ``i`` in
    the first half and ``j = i + group_size/2``, ``R[i, j] = -s_i`` and ``R[j, i] = s_j``."""
    first, second = columns(spec, theta, alpha)
    half, size = spec.group_size // 2, second.shape[0]
    out = torch.diag(first)
    swapped = second.reshape(-1, 2, half)[:, [1, 0], :].flatten()
    off = torch.diag(swapped).reshape(-1, 2, half, size)[:, [1, 0], :, :]
    off[:, 0, :, :] *= -1
    return out + off.reshape(size, size)


def _inverse(spec: Road, theta: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``R^-1`` as PEFT's unmerge computes it (``torch.linalg.inv`` in float32, then ``dtype``), ``None`` when ``R``
    is singular (an ``alpha`` of zero, or ``cos`` of an angle difference of zero: PEFT's unmerge fails there)."""
    inverse, info = cast("tuple[torch.Tensor, torch.Tensor]", torch.linalg.inv_ex(matrix(spec, theta, alpha).float()))
    if int(info) != 0 or not bool(torch.isfinite(inverse).all()):
        return None
    return inverse.to(dtype)


def check_invertible(spec: Road, theta: torch.Tensor, alpha: torch.Tensor, name: str) -> None:
    """Refuse to unmerge an adapter whose ``R`` has no inverse (before any weight changes).

    :raises UnsupportedError: naming the adapter.
    """
    if _inverse(spec, theta.detach(), alpha.detach(), torch.float32) is None:
        raise UnsupportedError("the RoAd rotation-and-scale matrix of this adapter is singular (a zero road_alpha, or "
                               "two paired angles a quarter turn apart), so its merge cannot be undone (PEFT's unmerge "
                               "fails on it too)", key=name,
                               hint="reload the base model instead of unmerging, or unload(model, merge=True)")


def merge(weight: torch.Tensor, bias: torch.Tensor | None, spec: Road, theta: torch.Tensor,
          alpha: torch.Tensor) -> None:
    """``W <- R @ W`` and ``b <- R @ b`` in place, ``R`` in the weight's dtype (PEFT's ``merge``).

    >>> layer = torch.nn.Linear(3, 4)
    >>> before = layer.weight.detach().clone()
    >>> merge(layer.weight, layer.bias, Road("road_1", 4), torch.zeros(2), torch.ones(2))
    >>> layer.weight.equal(before)
    True
    """
    with torch.no_grad():
        r = matrix(spec, theta.detach(), alpha.detach()).to(weight.dtype)
        weight.data = torch.matmul(r, weight.data).contiguous().to(weight.dtype)
        if bias is not None:
            bias.data = torch.matmul(r.to(bias.dtype), bias.data).contiguous().to(bias.dtype)


def unmerge(weight: torch.Tensor, bias: torch.Tensor | None, spec: Road, theta: torch.Tensor,
            alpha: torch.Tensor) -> None:
    """Undo :func:`merge` as PEFT does: multiply by ``R^-1`` (computed in float32, then the weight's dtype). Not
    bit-exact: the product rounds, so the weight comes back within a few units in the last place.

    :raises UnsupportedError: ``R`` is singular (:func:`check_invertible`); nothing changed then.
    """
    with torch.no_grad():
        inverse = _inverse(spec, theta.detach(), alpha.detach(), weight.dtype)
        if inverse is None:
            check_invertible(spec, theta, alpha, "road")
            return
        weight.data = torch.matmul(inverse, weight.data).contiguous()
        if bias is not None:
            bias.data = torch.matmul(inverse.to(bias.dtype), bias.data).contiguous()


def forward(result: torch.Tensor, adapters: Sequence[tuple[Road, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The base layer's output ``result`` rotated by each active adapter in order (PEFT's ``forward``: cast to the
    adapter's dtype before each, back to the base output's dtype at the end).

    >>> y = torch.ones(2, 4)
    >>> forward(y, [(Road("road_1", 4), torch.zeros(2), torch.ones(2))]).equal(y)
    True
    """
    dtype = result.dtype
    for spec, theta, alpha in adapters:
        result = apply(spec, theta, alpha, result.to(theta.dtype))
    return result.to(dtype)
