"""MiSS (``MISS``, formerly Bone; SPEC.md 17.2) on Keras layers, PEFT 0.21.2's math (the mirror of
:mod:`adapterspec_torch.miss`, function for function where Keras allows).

In Keras' flat kernel ``K = W.T`` (``[n_in, n_out]``, see :func:`adapterspec_keras._ops.flat_kernel``):

* block and mini modes add ``D[c, o] = block[c % r, o]`` (mini: ``block[c % r, o % mini_r]``): the unmerged layer
  adds its own contraction of the input with the piece's rows and columns of ``D`` -- PEFT's sum of the input's
  ``r``-chunks times the block, the same terms (within fp32 rounding);
* bat turns each output row ``o`` of ``W`` (its chunks ``W[o, j*r:(j+1)*r]``) into ``chunk @ (I + B[o // r]) +
  B[o // r][o % r]``, and back through ``inv(I + B)`` (in float32, as PEFT).

This backend adapts Dense/EinsumDense modules (a bat module's pieces each see all of its input features);
``miss_dropout`` draws Keras' random numbers, not torch's.

>>> from adapterspec import AdapterConfig
>>> shapes_for(AdapterConfig.from_dict({"peft_type": "MISS", "target_modules": ["q"], "r": 4, "init_weights": "bat"}),
...            "q", 8, 12)
{'miss_block': (3, 4, 4)}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig
from adapterspec._miss import BAT, MINI, PARAM, Block, block_shape, mode, settings, starts_at_zero
from adapterspec.errors import UnsupportedError

from .quantized import quantization
from .sites import ModuleSite, Piece

__all__ = ["BAT", "METHODS", "Block", "bat_flat", "block_flat", "check", "inits", "settings", "shapes", "shapes_for"]

#: The methods this module computes.
METHODS = ("MISS",)


def check(site: ModuleSite, path: str, config: AdapterConfig) -> None:
    """Refuse a module PEFT's MiSS refuses, or that this backend's MiSS math does not cover exactly (the torch
    backend's ``check``).

    :raises UnsupportedError: not a Linear module (an embedding, a convolution, transformers' ``Conv1D``: PEFT
        refuses them too), sizes PEFT refuses, or a bat module whose weight cannot be read whole (a piece seeing
        part of the inputs; a quantized kernel).
    """
    layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
    kinds = {piece.kind for piece in site.pieces}
    if site.hf_conv1d or site.kind != "linear" or not kinds <= {"dense", "einsum"}:
        raise UnsupportedError(f"MISS adapts Linear modules only (PEFT's MiSS refuses other layers; module on "
                               f"{layers})", key=path,
                               hint="remove the module from target_modules (or exclude it with exclude_modules)")
    block_shape(site.in_features, site.out_features, config, path)
    if mode(config) != BAT:
        return
    for piece in site.pieces:
        if sorted(piece.in_index.ravel().tolist()) != list(range(site.in_features)):
            raise UnsupportedError(f"MiSS 'bat' transforms whole rows of the weight: {type(piece.layer).__name__} "
                                   f"{piece.layer.path!r} sees {piece.n_in} of the {site.in_features} input features",
                                   key=path, hint="do not target this module, or use the torch backend")
        if quantization(piece.layer):
            raise UnsupportedError(f"MiSS 'bat' computes with the base weight's values, and {piece.layer.path!r} is "
                                   f"quantized ({quantization(piece.layer)})", key=path, pointer="/init_weights",
                                   hint="load the adapter onto the unquantized model")


def shapes_for(config: AdapterConfig, path: str, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """``{"miss_block": shape}`` of ``config`` on a module of ``in_features`` -> ``out_features`` (PEFT's layout)."""
    return {PARAM: block_shape(in_features, out_features, config, path)}


def shapes(site: ModuleSite, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """:func:`shapes_for` of this module (the torch backend's ``shapes``)."""
    return shapes_for(config, path, site.in_features, site.out_features)


def inits(config: AdapterConfig, params: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Any, ...]]:
    """Initialiser descriptions (:func:`~adapterspec_keras.bank.make_initializer`) as PEFT initialises: zeros, or
    with a falsy ``init_weights`` kaiming-uniform's bound ``1 / sqrt(out)`` (Keras' random numbers, not torch's).

    >>> inits(AdapterConfig.from_dict({"peft_type": "MISS", "target_modules": ["q"], "r": 2, "init_weights": False}),
    ...       {"miss_block": (2, 16)})
    {'miss_block': ('uniform', 0.25)}
    """
    shape = params[PARAM]
    return {PARAM: ("zeros",) if starts_at_zero(config) else ("uniform", 1.0 / math.sqrt(shape[1]))}


def _gather(index: np.ndarray, value: Any, axis: int = 0) -> Any:
    """``value`` at ``index`` along ``axis``, without a gather when it is all of it in order."""
    if index.size == int(value.shape[axis]) and np.array_equal(index, np.arange(index.size)):
        return value
    return ops.take(value, index, axis=axis)


def block_flat(site: ModuleSite, piece: Piece, spec: Block, get: Callable[[str], Any], dtype: Any) -> Any:
    """The piece's ``[n_in, n_out]`` rows and columns of a block/mini adapter's ``D[c, o] = block[c % r, o]``
    (PEFT's ``get_delta_weight_miss``, transposed)."""
    block = ops.cast(get(PARAM), dtype)
    if spec.mode == MINI:
        block = ops.tile(block, (1, site.out_features // spec.mini_r))
    full = ops.tile(block, (-(-site.in_features // spec.r), 1))[:site.in_features]
    return _gather(piece.out_index.ravel(), _gather(piece.in_index.ravel(), full), axis=1)


def _rows_of(site: ModuleSite, piece: Piece, flat: Any) -> Any:
    """The piece's output rows of ``W`` in the module's input order: ``[n_out, in]``."""
    order = np.argsort(piece.in_index.ravel())
    return ops.transpose(_gather(order, flat))


def bat_flat(site: ModuleSite, piece: Piece, get: Callable[[str], Any], flat: Any, *, reverse: bool = False) -> Any:
    """Bat on the piece's kernel ``flat`` (``[n_in, n_out]``, ``flat``'s dtype): the delta ``chunk @ B[i] + B[i][o %
    r]`` of every output row ``o`` (``i = o // r``), or (``reverse``) the kernel ``(chunk' - B[i][o % r]) @ inv(I +
    B[i])`` -- PEFT's ``get_delta_weight``, the inverse in float32."""
    dtype = flat.dtype
    block = ops.cast(get(PARAM), dtype)
    tiles, r = int(block.shape[0]), int(block.shape[-1])
    outs = piece.out_index.ravel()
    rows = _rows_of(site, piece, flat)
    chunks = ops.reshape(rows, (len(outs), site.in_features // r, r))
    own = ops.take(ops.reshape(block, (tiles * r, r)), outs, axis=0)[:, None, :]  # B[o // r][o % r]
    if reverse:
        eye = ops.eye(r, dtype="float32")
        inverse = ops.cast(ops.inv(eye[None] + ops.cast(block, "float32")), dtype)
        result = ops.einsum("pjm,pmc->pjc", chunks - own, ops.take(inverse, outs // r, axis=0))
    else:
        result = ops.einsum("pjm,pmc->pjc", chunks, ops.take(block, outs // r, axis=0)) + own
    back = ops.transpose(ops.reshape(result, (len(outs), site.in_features)))  # [in, n_out], module input order
    return _gather(piece.in_index.ravel(), back)
