"""HRA, Householder reflection adaptation (SPEC.md 17.3), on Keras layers: PEFT 0.21's math (the mirror of
:mod:`adapterspec_torch.hra`, function for function where Keras allows).

An adapter's ``hra_u`` ``[F, r]`` (kept in the file's layout) gives an orthogonal ``H`` ``[F, F]`` over the module's
``F`` input features (``in_features``; a convolution's ``in * k * k`` in torch's ``(in, kh, kw)`` order): the product
of the reflections ``I - 2 u_i u_i^T`` of its normalised columns, or with ``apply_GS`` one reflection across their
Gram-Schmidt basis. PEFT runs the layer with the weight ``W @ H``; in Keras' flat kernel ``K = W.T`` (``[n_in,
n_out]``, see :func:`adapterspec_keras._ops.flat_kernel`) that is ``K' = H_p^T @ K``, ``H_p`` being ``H`` with rows
and columns in the piece's own order (:func:`adapterspec_keras.oft.feature_index`). Several adapters: ``W @ H_1 @
H_2`` is ``K' = H_2^T H_1^T K``; unmerging multiplies by the reflections in reverse order (PEFT's ``reverse``).

This backend adapts Dense/EinsumDense pieces that see all of the module's input features, and ungrouped Conv2D
layers with a square kernel, one stride, no dilation. A fresh adapter starts as PEFT's does in law (each random
column repeated twice for an even ``r``: ``H = I``), not with torch's random numbers.

>>> from adapterspec import AdapterConfig
>>> shapes_for(AdapterConfig.from_dict({"peft_type": "HRA", "target_modules": ["q"], "r": 2}), 8)
{'hra_u': (8, 2)}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig
from adapterspec._hra import PARAM, Reflections, inject_refusal, layer_refusal, param_shapes, reflections_of
from adapterspec.errors import UnsupportedError

from .oft import check_site, feature_index, features
from .sites import ModuleSite, Piece

__all__ = ["METHODS", "PARAM", "Reflections", "check", "inits", "matrix", "merge_flat", "reflected_flat", "settings",
           "shapes", "shapes_for", "unmerge_flat"]

#: The methods this module computes.
METHODS = ("HRA",)


def check(site: ModuleSite, path: str, config: AdapterConfig, *, initialize: bool = False) -> None:
    """Refuse a module the HRA math of this backend does not cover exactly (the torch backend's ``check``).

    :param initialize: a fresh adapter (:func:`adapterspec._hra.inject_refusal` applies).
    :raises UnsupportedError: an embedding, a logits projection, a transformers ``Conv1D`` (GPT-2; PEFT refuses it
        too), a 1-D/3-D/grouped/dilated/unevenly strided or non-square convolution, a piece seeing only part of the
        module's inputs (naming the module), apply_GS with r above the input features (naming /r), or a fresh
        ``apply_GS`` adapter at PEFT's identity start.
    """
    check_site(site, path, "HRA", "reflects")
    refusal = layer_refusal(features(site), config)  # SPEC.md 17.3: apply_GS with r above F has no defined result
    if refusal is None and initialize:
        refusal = inject_refusal(config)
    if refusal is not None:
        pointer, reason, hint = refusal
        raise UnsupportedError(reason, key=path, pointer=pointer, hint=hint)


def settings(config: AdapterConfig) -> Reflections:
    """The :class:`Reflections` of ``config`` (the same on every module)."""
    return reflections_of(config)


def shapes_for(config: AdapterConfig, count: int) -> dict[str, tuple[int, ...]]:
    """The spec parameter name and shape of ``config`` on a module with ``count`` input features (``[F, r]``)."""
    return param_shapes(count, config)


def shapes(site: ModuleSite, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """:func:`shapes_for` of this module (the torch backend's ``shapes``)."""
    return shapes_for(config, features(site))


def inits(config: AdapterConfig, params: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Any, ...]]:
    """Initialiser descriptions (:func:`~adapterspec_keras.bank.make_initializer`) as PEFT initialises, in law:
    ``kaiming_uniform_(a=sqrt(5))`` bounds ``1/sqrt(fan_in)`` -- for ``init_weights`` true and an even ``r``, of
    ``r/2`` columns each repeated twice (``("uniform_pairs", 1/sqrt(r/2))``), else of all ``r``."""
    out: dict[str, tuple[Any, ...]] = {}
    for param, (_, r) in params.items():
        if config.get("init_weights", True) and r % 2 == 0:  # PEFT: a truth test (null: false, SPEC 4.1)
            out[param] = ("uniform_pairs", 1 / math.sqrt(r // 2))
        else:
            out[param] = ("uniform", 1 / math.sqrt(r))
    return out


def matrix(spec: Reflections, u: Any, *, reverse: bool = False) -> Any:
    """``H`` ``[F, F]`` of one adapter (PEFT's ``get_delta_weight``, in ``u``'s dtype); ``reverse``: the reflections
    in reverse order, ``H``'s inverse.

    >>> ops.convert_to_numpy(matrix(Reflections(1), np.array([[1.0], [0.0]], "float32"))).tolist()
    [[-1.0, 0.0], [0.0, 1.0]]
    """
    rows = int(u.shape[0])
    eye = ops.eye(rows, dtype=u.dtype)
    if spec.apply_gs:
        basis = [ops.reshape(u[:, 0] / ops.norm(u[:, 0]), (-1, 1))]
        for i in range(1, spec.r):
            ui = ops.reshape(u[:, i], (-1, 1))
            for q in basis:
                ui = ui - ops.matmul(ops.transpose(q), ui) * q
            basis.append(ui / ops.norm(ui))
        q_mat = ops.concatenate(basis, axis=1)
        return eye - 2 * ops.matmul(q_mat, ops.transpose(q_mat))
    unit = u / ops.norm(u, axis=0, keepdims=True)
    weight = eye
    for i in (range(spec.r - 1, -1, -1) if reverse else range(spec.r)):
        ui = ops.reshape(unit[:, i], (-1, 1))
        weight = weight - ops.matmul(ops.matmul(2 * weight, ui), ops.transpose(ui))
    return weight


def _piece_matrix(h: Any, index: np.ndarray) -> Any:
    """``h`` with rows and columns in the piece's order."""
    if np.array_equal(index, np.arange(index.size)):
        return h
    return ops.take(ops.take(h, index, axis=0), index, axis=1)


def reflected_flat(site: ModuleSite, piece: Piece, adapters: Sequence[tuple[Reflections, Callable[[str], Any]]],
                   flat: Any) -> Any:
    """The piece's ``[n_in, n_out]`` kernel with the running HRA ``adapters`` applied (PEFT's ``W @ H_1 @ H_2 ..``):
    ``K' = .. H_2^T H_1^T K``, in ``flat``'s dtype."""
    index = feature_index(site, piece)
    for spec, get in adapters:
        h = matrix(spec, ops.cast(get(PARAM), flat.dtype))
        flat = ops.matmul(ops.transpose(_piece_matrix(h, index)), flat)
    return flat


def merge_flat(site: ModuleSite, piece: Piece, spec: Reflections, get: Callable[[str], Any], flat: Any) -> Any:
    """The piece's kernel after merging one adapter: ``H_p^T @ K``."""
    return reflected_flat(site, piece, [(spec, get)], flat)


def unmerge_flat(site: ModuleSite, piece: Piece, spec: Reflections, get: Callable[[str], Any], flat: Any) -> Any:
    """Undo :func:`merge_flat` as PEFT does: the reflections in reverse order (``H^-1``)."""
    h = matrix(spec, ops.cast(get(PARAM), flat.dtype), reverse=True)
    return ops.matmul(ops.transpose(_piece_matrix(h, feature_index(site, piece))), flat)
