"""DeLoRA (SPEC.md 17.6) on Keras layers: a low-rank term with a bounded, decoupled norm, PEFT 0.21's math.

Each adapted module holds ``delora_A`` ``[r, in]``, ``delora_B`` ``[out, r]`` (both kept in the file's layout and
read transposed, as LoRA's), ``delora_lambda`` ``[1]`` and ``delora_w_norm`` ``[in]`` (the base kernel's column norms
when the adapter was made; stored, never trained). :func:`views` gives ``(first, second)`` (``[in, r]``, ``[r, out]``)
with ``x @ first @ second`` = PEFT's ``((x * w_norm) @ A.T * (lambda / r) / (|A_i| |B^i|)) @ B.T``, so the term runs
through the layer's VeRA/VB-LoRA paths (unmerged forward, merge, the pieces of a split kernel). The torch backend's
module of the same name computes the same on ``nn.Linear`` layers.

This backend adapts Dense and EinsumDense layers (an ``nn.Linear``); embeddings, convolutions, transformers
``Conv1D`` modules (GPT-2) and quantized layers are refused, as PEFT refuses them. A new adapter draws PEFT's
distributions from Keras' generator (kaiming-uniform ``A``, zero or kaiming-uniform ``B``), not torch's stream
(SPEC.md 17.6: reproducible on torch only).

>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "DELORA", "target_modules": ["q"], "r": 2})
>>> shapes(cfg, "q", 8, 4)
{'delora_A': (2, 8), 'delora_B': (4, 2), 'delora_lambda': (1,), 'delora_w_norm': (8,)}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig
from adapterspec._delora import CLAMP, FROZEN, lambda_for, param_shapes, rank_for
from adapterspec.errors import UnsupportedError

from . import _ops
from .quantized import refuse_quantized
from .sites import ModuleSite

__all__ = ["FROZEN", "METHODS", "check", "inits", "rank", "shapes", "views", "w_norm"]

#: The methods this module computes.
METHODS = ("DELORA",)


def check(site: ModuleSite, path: str, config: AdapterConfig) -> None:
    """Refuse what PEFT's DeLoRA does not adapt (the torch backend's ``check`` and ``KINDS``).

    :raises UnsupportedError: naming the module: a quantized layer (PEFT 0.21 has no quantized DeLoRA layer), a
        transformers ``Conv1D`` (GPT-2), an embedding, a convolution or another layer kind (PEFT adapts
        ``nn.Linear`` only), a piece seeing only part of the module's inputs (``w_norm`` scales all of them), a
        ``lambda_pattern`` key this module reaches that does not compile (naming ``/lambda_pattern/<key>``).
    """
    layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
    refuse_quantized([p.layer for p in site.pieces], path, "DeLoRA")
    lambda_for(config, path)  # PEFT matches lambda_pattern at every load: a key this module reaches must compile
    if site.hf_conv1d:
        raise UnsupportedError(f"DeLoRA cannot adapt a transformers Conv1D module (GPT-2's, weight stored [in, out]; "
                               f"module on {layers}): PEFT's DeLoRA adapts nn.Linear only, so PEFT could not load the "
                               "adapter", key=path, hint="remove the module from target_modules")
    if site.kind != "linear" or any(piece.kind not in ("dense", "einsum") for piece in site.pieces):
        raise UnsupportedError(f"the keras backend adapts only Dense/EinsumDense layers with DELORA (module on "
                               f"{layers}; PEFT's DeLoRA adapts nn.Linear only)", key=path,
                               hint="remove the module from target_modules (or exclude it with exclude_modules)")
    for piece in site.pieces:
        if sorted(piece.in_index.ravel().tolist()) != list(range(site.in_features)):
            raise UnsupportedError(f"DeLoRA scales all {site.in_features} input features of the module; "
                                   f"{type(piece.layer).__name__} {piece.layer.path!r} sees {piece.n_in} of them",
                                   key=path, hint="do not target this module, or use the torch backend")


def rank(config: AdapterConfig, path: str) -> int:
    """The module's rank: ``rank_pattern``'s or ``r`` (the ``r`` of PEFT's ``lambda / r``)."""
    return rank_for(config, path)


def shapes(config: AdapterConfig, path: str, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """``delora_A`` ``[r, in]``, ``delora_B`` ``[out, r]``, ``delora_lambda`` ``[1]``, ``delora_w_norm`` ``[in]``."""
    return param_shapes(in_features, out_features, rank(config, path))


def inits(config: AdapterConfig, path: str, in_features: int) -> dict[str, tuple[Any, ...]]:
    """PEFT's ``reset_delora_parameters`` as Keras initialisers: ``A`` kaiming-uniform (bound ``1/sqrt(in)``),
    ``B`` zeros (``init_weights`` true) or kaiming-uniform (bound ``1/sqrt(r)``; false or null: PEFT tests
    ``is True``), ``delora_lambda`` ``lambda_pattern``'s or ``delora_lambda``; ``delora_w_norm`` is set from the
    kernel once it exists (:func:`w_norm`)."""
    r = rank(config, path)
    b = ("zeros",) if config.get("init_weights", True) is True else ("uniform", 1.0 / math.sqrt(r))
    return {"delora_A": ("uniform", 1.0 / math.sqrt(in_features)), "delora_B": b,
            "delora_lambda": ("constant", lambda_for(config, path)), "delora_w_norm": ("ones",)}


def w_norm(site: ModuleSite) -> np.ndarray:
    """The module's base kernel column norms ``[in]`` (PEFT's ``torch.norm(W, dim=0)``), over all its pieces."""
    squares = np.zeros(site.in_features, dtype=np.float64)
    for piece in site.pieces:
        flat = np.asarray(ops.convert_to_numpy(ops.cast(_ops.flat_kernel(piece), "float32")), dtype=np.float64)
        np.add.at(squares, piece.in_index.ravel(), np.sum(np.square(flat), axis=1))
    return np.sqrt(squares)


def views(get: Callable[[str], Any], r: int, dtype: Any) -> tuple[Any, Any]:
    """``(w_norm[:, None] * A.T * s[None, :], B.T)`` in ``dtype``: ``[in, r]`` and ``[r, out]``, with
    ``s = (lambda / r) / (|A_i| |B^i|)`` (PEFT's scaling, the norms clamped to ``1e-4``), computed in the adapter's
    dtype. ``get`` reads ``delora_A``/``delora_B`` transposed (``[in, r]``, ``[r, out]``)."""
    a_t, b_t = get("delora_A"), get("delora_B")
    an = ops.maximum(ops.sqrt(ops.sum(ops.square(a_t), axis=0)), CLAMP)
    bn = ops.maximum(ops.sqrt(ops.sum(ops.square(b_t), axis=1)), CLAMP)
    scaling = (get("delora_lambda") / r) / (an * bn)
    first = ops.expand_dims(get("delora_w_norm"), 1) * a_t * ops.expand_dims(scaling, 0)
    return ops.cast(first, dtype), ops.cast(b_t, dtype)
