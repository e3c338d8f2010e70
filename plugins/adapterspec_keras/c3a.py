"""C3A, circular convolution adaptation (SPEC.md 17.7), on Keras layers: PEFT 0.21.2's math (the mirror of
:mod:`adapterspec_torch.c3a`, function for function where Keras allows).

An adapter's ``c3a_kernel`` ``[out/b, in/b, b]`` (kept in the file's layout) is the block-circulant ``[out, in]``
update ``C`` with ``C[i*b + p, j*b + q] = kernel[i, j, (q - p) mod b]``. In Keras' flat kernel ``K = W.T``
(``[n_in, n_out]``, see :func:`adapterspec_keras._ops.flat_kernel``) that is ``D[j*b + q, i*b + p]``; each piece takes
its rows and columns of ``D``. Unmerged, the layer adds its own contraction of the float32 input with ``D / in`` in
float32 (PEFT's FFT product computes the same sums: equal within float32 rounding, not bit for bit), cast to the
output's dtype, with the gradients of PEFT's hand-written backward (its input gradient is not the forward's:
:func:`backward_flat`); merged, the kernel gets ``D`` rounded to its dtype, divided by ``in`` (PEFT's ``get_delta_weight``).

This backend adapts Dense/EinsumDense modules (PEFT's C3A adapts ``nn.Linear`` only). A fresh adapter draws PEFT's
distributions from Keras' random numbers, not torch's.

>>> from adapterspec import AdapterConfig
>>> shapes_for(AdapterConfig.from_dict({"peft_type": "C3A", "target_modules": ["q"], "block_size": 4}), "q", 8, 12)
{'c3a_kernel': (3, 2, 4)}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig
from adapterspec._c3a import PARAM, kernel_shape
from adapterspec.errors import UnsupportedError

from .quantized import quantization
from .sites import ModuleSite, Piece

__all__ = ["METHODS", "PARAM", "backward_flat", "check", "circulant_flat", "delta_flat", "inits", "shapes", "shapes_for", "term_flat"]

#: The methods this module computes.
METHODS = ("C3A",)


def check(site: ModuleSite, path: str, config: AdapterConfig) -> None:
    """Refuse a module PEFT's C3A refuses, or whose merge would add to quantized values (the torch backend's
    ``check``).

    :raises UnsupportedError: not a Linear module (an embedding, a convolution, transformers' ``Conv1D``: PEFT
        refuses them too), a block size not dividing its sizes (naming ``/block_size`` or ``/block_size_pattern``),
        a quantized kernel.
    """
    layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
    kinds = {piece.kind for piece in site.pieces}
    if site.hf_conv1d or site.kind != "linear" or not kinds <= {"dense", "einsum"}:
        raise UnsupportedError(f"C3A adapts Linear modules only (PEFT's C3A refuses other layers; module on {layers})",
                               key=path, hint="remove the module from target_modules (or exclude it with "
                                              "exclude_modules)")
    kernel_shape(site.in_features, site.out_features, config, path)
    for piece in site.pieces:
        if quantization(piece.layer):
            raise UnsupportedError(f"C3A adds its delta to the base weight's values, and {piece.layer.path!r} is "
                                   f"quantized ({quantization(piece.layer)})", key=path,
                                   hint="load the adapter onto the unquantized model")


def shapes_for(config: AdapterConfig, path: str, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """``{"c3a_kernel": (out/b, in/b, b)}`` of ``config`` on a module of ``in_features`` -> ``out_features``."""
    return {PARAM: kernel_shape(in_features, out_features, config, path)}


def shapes(site: ModuleSite, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """:func:`shapes_for` of this module (the torch backend's ``shapes``)."""
    return shapes_for(config, path, site.in_features, site.out_features)


def inits(config: AdapterConfig, params: Mapping[str, tuple[int, ...]], in_features: int,
          out_features: int) -> dict[str, tuple[Any, ...]]:
    """Initialiser descriptions (:func:`~adapterspec_keras.bank.make_initializer`) of PEFT's ``reset_c3a_parameters``
    (the torch backend's ``initialise``; Keras' random numbers): zeros for ``init_weights`` true, standard normals for
    ``"gaussian"``, uniform in ``+-sqrt(1 / in)`` for ``"kaiming_uniform"``, else in ``+-sqrt(3) * sqrt(2 / (in +
    out))``.

    >>> inits(AdapterConfig.from_dict({"peft_type": "C3A", "target_modules": ["q"], "block_size": 2,
    ...                                "init_weights": "kaiming_uniform"}), {"c3a_kernel": (1, 2, 2)}, 4, 2)
    {'c3a_kernel': ('uniform', 0.5)}
    """
    del params
    init = config.get("init_weights", "xavier_uniform")
    if init is True:
        return {PARAM: ("zeros",)}
    if init == "gaussian":
        return {PARAM: ("normal", 1.0)}
    if init == "kaiming_uniform":
        return {PARAM: ("uniform", 1.0 * math.sqrt(1.0 / float(in_features)))}
    return {PARAM: ("uniform", math.sqrt(3.0) * (1.0 * math.sqrt(2.0 / float(in_features + out_features))))}


def _gather(index: np.ndarray, value: Any, axis: int = 0) -> Any:
    """``value`` at ``index`` along ``axis``, without a gather when it is all of it in order."""
    if index.size == int(value.shape[axis]) and np.array_equal(index, np.arange(index.size)):
        return value
    return ops.take(value, index, axis=axis)


def circulant_flat(site: ModuleSite, piece: Piece, get: Callable[[str], Any], *, backward: bool = False) -> Any:
    """The piece's ``[n_in, n_out]`` rows and columns of ``D = C.T`` in float32 (PEFT's ``get_circulant_fast``,
    transposed, by a gather instead of FFTs): ``D[j*b + q, i*b + p] = kernel[i, j, (q - p) mod b]``.

    :param backward: instead, the matrix of PEFT's ``BlockCircularConvolution.backward`` for the input gradient,
        ``kernel[i, j, (p + q) mod b]`` (not ``D``'s transpose: PEFT's input gradient is not its forward's, SPEC.md
        17.7; the kernel's gradient is).
    """
    kernel = ops.cast(get(PARAM), "float32")
    m, n, b = (int(s) for s in kernel.shape)
    p = np.arange(b)
    index = (p[:, None] + p[None, :]) % b if backward else (p[None, :] - p[:, None]) % b  # [p, q] -> (q - p) mod b
    blocks = ops.take(kernel, index.ravel(), axis=2)  # [m, n, p*q]
    blocks = ops.reshape(blocks, (m, n, b, b))  # [i, j, p, q]
    full = ops.reshape(ops.transpose(blocks, (1, 3, 0, 2)), (n * b, m * b))  # [j*b + q, i*b + p]
    return _gather(piece.out_index.ravel(), _gather(piece.in_index.ravel(), full), axis=1)


def term_flat(site: ModuleSite, piece: Piece, get: Callable[[str], Any]) -> Any:
    """The float32 kernel of the unmerged term (PEFT's forward: ``conv(x) / in`` in float32): ``D / in``."""
    return circulant_flat(site, piece, get) / float(site.in_features)


def backward_flat(site: ModuleSite, piece: Piece, get: Callable[[str], Any]) -> Any:
    """The float32 ``[n_in, n_out]`` kernel whose contraction's input gradient is PEFT's (``g @ F / in``, ``F`` of
    :func:`circulant_flat` with ``backward``), with no gradient to ``c3a_kernel``: the torch backend's copy of PEFT's
    ``BlockCircularConvolution.backward``, for a layer computing ``op(sg(x), D / in) + t - sg(t)``, ``t = op(x, this)``
    (the value PEFT's forward gives, the gradients PEFT's backward gives)."""
    return ops.stop_gradient(circulant_flat(site, piece, get, backward=True) / float(site.in_features))


def delta_flat(site: ModuleSite, piece: Piece, get: Callable[[str], Any], dtype: Any) -> Any:
    """The merge's delta in ``dtype``: ``D`` rounded to the piece's kernel dtype, then divided by ``in`` in that
    dtype (PEFT's ``get_delta_weight``: ``get_circulant_fast(kernel.float()).to(weight.dtype) / in``)."""
    kernel_dtype = piece.kernel_variable.dtype
    rounded = ops.cast(circulant_flat(site, piece, get), kernel_dtype)
    return ops.cast(rounded / float(site.in_features), dtype)
