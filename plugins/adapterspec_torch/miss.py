"""MiSS (``MISS``, formerly Bone; SPEC.md 17.2): a block shared across the input's chunks, PEFT 0.21.2's math.

Three modes, picked by ``init_weights`` (:func:`adapterspec._miss.mode`):

* block (``[r, out]``) and mini (``[r, mini_r]``, repeated ``out / mini_r`` times along the outputs): the input,
  zero-padded to a multiple of ``r``, is cut into chunks of ``r`` features; their sum times the block is added to
  the base output. Merged: ``W[o, j*r + k] += block[k, o]`` for every chunk ``j`` (the last one cut to the weight).
* bat (``[out/r, r, r]``): the weight's ``[r, r]`` tiles ``W[i, j]`` become ``W[i, j] + W[i, j] @ B[i] + B[i]``
  and the layer runs ``F.linear`` on that weight; unmerged through ``(W' - B[i]) @ inv(I + B[i])``, the inverse
  in float32 as PEFT computes it.

The functions here are pure: :class:`~adapterspec_torch.layers.AdapterLayer` calls them with its base layer and
the tensors of its active MiSS adapters.

>>> import torch
>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "MISS", "target_modules": ["q"], "r": 4, "init_weights": "bat"})
>>> shapes(torch.nn.Linear(8, 12), "linear", cfg, "q")
{'miss_block': (3, 4, 4)}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from adapterspec import AdapterConfig
from adapterspec._miss import BAT, MINI, PARAM, Block, block_shape, mode, settings, starts_at_zero
from adapterspec.errors import UnsupportedError

from .computed import current
from .quantized import quantization

__all__ = ["KINDS", "METHODS", "Block", "check", "forward", "initialise", "merge", "settings", "shapes", "unmerge"]

#: The methods this module computes.
METHODS = ("MISS",)
#: The layer kinds PEFT's MiSS adapts (``nn.Linear`` only: PEFT raises TypeError on anything else).
KINDS = ("linear",)


def _in_out(module: nn.Module) -> tuple[int, int]:
    linear = cast(nn.Linear, module)
    return int(linear.in_features), int(linear.out_features)


def check(module: nn.Module, kind: str | None, path: str, config: AdapterConfig) -> None:
    """Refuse a layer PEFT's MiSS refuses, or whose bat weight this backend cannot read.

    :raises UnsupportedError: naming ``path`` and the field.

    >>> cfg = AdapterConfig.from_dict({"peft_type": "MISS", "target_modules": ["q"], "r": 3, "init_weights": "bat"})
    >>> check(torch.nn.Linear(8, 12), "linear", "q", cfg)
    Traceback (most recent call last):
    adapterspec.errors.UnsupportedError: q: ...
    """
    if kind not in KINDS:
        raise UnsupportedError(f"MiSS adapts Linear layers only, not a {type(module).__qualname__} (PEFT refuses it "
                               "too)", key=path, hint="remove the module from target_modules")
    block_shape(*_in_out(module), config, path)
    quantized = quantization(module)
    if mode(config) == BAT and quantized is not None:
        raise UnsupportedError(f"MiSS 'bat' computes with the base weight's values, and this layer's weight is "
                               f"quantized ({quantized})", key=path, pointer="/init_weights",
                               hint="load the adapter onto the unquantized model")


def shapes(module: nn.Module, kind: str, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """``{"miss_block": shape}`` of ``config`` on this layer (PEFT's layout).

    >>> shapes(torch.nn.Linear(10, 6), "linear", AdapterConfig.from_dict(
    ...     {"peft_type": "MISS", "target_modules": ["q"], "r": 4}), "q")
    {'miss_block': (4, 6)}
    """
    return {PARAM: block_shape(*_in_out(module), config, path)}


def initialise(params: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """PEFT's initialisation: zeros (the identity), or with a falsy ``init_weights`` kaiming-uniform noise
    (``a = sqrt(5)`` on the ``[r, out]`` block: torch's generator, the draws PEFT makes).

    >>> p = {"miss_block": torch.ones(2, 3)}
    >>> initialise(p, AdapterConfig.from_dict({"peft_type": "MISS", "target_modules": ["q"], "r": 2}))
    >>> float(p["miss_block"].abs().sum())
    0.0
    """
    block = params[PARAM]
    if starts_at_zero(config):
        nn.init.zeros_(block)
    else:
        nn.init.kaiming_uniform_(block, a=math.sqrt(5))


def _cast_to_fp32(block: torch.Tensor) -> bool:
    """PEFT computes a (b)float16 block on CPU in float32 when merging (and in the bat forward)."""
    return block.device.type == "cpu" and block.dtype in (torch.float16, torch.bfloat16)


def _bat(block: torch.Tensor, weight: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: forward, the delta ``W[i, j] @ B[i] + B[i]`` of every ``[r, r]`` tile (in the
    block's dtype); reverse, the weight ``(W'[i, j] - B[i]) @ inv(I + B[i])`` (the inverse in float32)."""
    dtype = block.dtype
    cast_back = _cast_to_fp32(block)
    b = block.float() if cast_back else block
    w = weight.to(b.dtype)
    r = b.size(-1)
    tiles = w.reshape(w.size(0) // r, r, w.size(1) // r, r).permute(2, 0, 1, 3)
    if reverse:
        eye = torch.eye(r, device=b.device, dtype=torch.float32)
        inverse = torch.inverse(eye + b.float()).to(b.dtype)
        result = (tiles - b) @ inverse
    else:
        result = tiles @ b + b
    out = result.permute(1, 2, 0, 3).reshape(*w.shape)
    return out.to(dtype) if cast_back else out


def _full(spec: Block, block: torch.Tensor, out_features: int) -> torch.Tensor:
    """The ``[r, out]`` block (mini: ``[r, mini_r]`` repeated along the outputs)."""
    return block.repeat(1, out_features // spec.mini_r) if spec.mode == MINI else block


def forward(base: nn.Module, adapters: Sequence[tuple[Block, dict[str, torch.Tensor]]], x: torch.Tensor,
            args: Any, kwargs: Any, *, training: bool, output: Callable[[Any], torch.Tensor] | None = None
            ) -> torch.Tensor:
    """The layer's output with the active MiSS ``adapters`` (all of one mode) applied in order (PEFT's ``forward``).

    :param output: applied to what the base layer returns (the caller's check that it is one tensor).

    >>> layer = torch.nn.Linear(4, 2)
    >>> x = torch.ones(1, 4)
    >>> forward(layer, [(Block("block", 3), {"miss_block": torch.zeros(3, 2)})], x, (), {}, training=False).equal(
    ...     layer(x))
    True
    """
    previous = x.dtype
    if adapters[0][0].mode == BAT:
        weight = current(base, "weight").detach().clone()  # PEFT reads get_base_weight(): the weight's data
        for _, params in adapters:
            weight = weight + _bat(params[PARAM], weight)
        bias = cast("torch.Tensor | None", base.bias)
        result = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        return result.to(previous)
    out: torch.Tensor = base(x, *args, **kwargs)
    result = out if output is None else output(out)
    out_features = _in_out(base)[1]
    for spec, params in adapters:
        block = _full(spec, params[PARAM], out_features)
        r = block.size(0)
        if x.size(-1) % r != 0:  # PEFT pads the input it keeps for the next adapter too
            x = F.pad(x, (0, (r - x.size(-1) % r) % r))
        x = x.to(block.dtype)
        dropped = F.dropout(x, p=spec.dropout, training=True) if spec.dropout > 0 and training else x
        result = result + torch.sum(dropped.reshape(*x.shape[:-1], x.size(-1) // r, r), dim=-2) @ block
    return result.to(previous)


def _block_weight(spec: Block, weight: torch.Tensor, block: torch.Tensor, sign: int) -> torch.Tensor:
    """PEFT's ``get_delta_weight_miss``: the whole weight with ``sign * block[k, o]`` added at ``W[o, j*r + k]``."""
    b = block.float() if _cast_to_fp32(block) else block
    full = _full(spec, b, weight.size(0))
    r, in_features = full.size(0), weight.size(-1)
    tiled = full.transpose(0, 1).repeat(1, -(-in_features // r))[:, :in_features]
    return weight + sign * tiled


def merge(weight: torch.Tensor, spec: Block, params: dict[str, torch.Tensor]) -> None:
    """Merge one adapter into the base weight ``weight`` in place (rounded once to its dtype, as PEFT's).

    >>> layer = torch.nn.Linear(4, 2)
    >>> before = layer.weight.detach().clone()
    >>> merge(layer.weight, Block("block", 3), {"miss_block": torch.ones(3, 2)})
    >>> torch.allclose(layer.weight - before, torch.ones(2, 4))
    True
    """
    with torch.no_grad():
        block = params[PARAM]
        if spec.mode == BAT:
            weight.data += _bat(block, weight.data)
        else:
            weight.data.copy_(_block_weight(spec, weight.data, block, 1))


def unmerge(weight: torch.Tensor, spec: Block, params: dict[str, torch.Tensor]) -> None:
    """Undo :func:`merge` as PEFT does: subtract the block, or (bat) multiply the tiles by ``inv(I + B)``.

    >>> layer = torch.nn.Linear(4, 2)
    >>> before = layer.weight.detach().clone()
    >>> params = {"miss_block": torch.full((1, 2, 2), 0.1)}
    >>> merge(layer.weight, Block("bat", 2), params)
    >>> unmerge(layer.weight, Block("bat", 2), params)
    >>> torch.allclose(layer.weight, before, atol=1e-6)
    True
    """
    with torch.no_grad():
        block = params[PARAM]
        if spec.mode == BAT:
            weight.data.copy_(_bat(block, weight.data, reverse=True))
        else:
            weight.data.copy_(_block_weight(spec, weight.data, block, -1))
