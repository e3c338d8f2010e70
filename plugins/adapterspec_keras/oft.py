"""OFT and BOFT (SPEC.md 15.6, 15.7) on Keras layers: block-diagonal orthogonal rotations of a module's input
features, PEFT 0.21's math (the mirror of :mod:`adapterspec_torch.oft`, function for function where Keras allows).

Each adapter's tensors (kept in the file's layout) become a block-diagonal orthogonal ``R`` over the module's
``F`` input features (``in_features``; a convolution's ``in * k * k`` in torch's ``(in, kh, kw)`` order). PEFT runs
the base layer on ``x @ R``; merged, the weight is ``W @ R.T`` (BOFT also scales output ``o`` by ``boft_s[o]``).
In Keras' flat kernel ``K = W.T`` (``[n_in, n_out]``, see :func:`adapterspec_keras._ops.flat_kernel`) that is
``K' = R_p @ K`` (``* boft_s`` per column), ``R_p`` being ``R`` with rows and columns in the piece's own order
(:func:`feature_index`): the layer's output is its own contraction with ``K'``, as PEFT's BOFT computes it and
what PEFT's OFT input rotation amounts to (within fp32 rounding).

This backend adapts Dense/EinsumDense pieces that see all of the module's input features, and ungrouped Conv2D
layers with a square kernel, one stride, no dilation (OFT: 1x1 kernels only, as the torch backend); training
with ``module_dropout`` (OFT) or ``boft_dropout`` (BOFT) is refused (at inference both are the identity).

>>> from adapterspec import AdapterConfig
>>> cfg = AdapterConfig.from_dict({"peft_type": "OFT", "target_modules": ["q"], "r": 0, "oft_block_size": 4})
>>> shapes_for(cfg, "q", 8, 3)
{'oft_R.weight': (2, 6)}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from keras import ops

from adapterspec import AdapterConfig
from adapterspec._oft import Rotation, block_sizes, param_shapes, rotation_of
from adapterspec.errors import UnsupportedError

from .sites import ModuleSite, Piece

__all__ = ["METHODS", "Rotation", "check", "check_site", "feature_index", "features", "inits", "merge_flat", "rotated_flat",
           "rotation", "settings", "shapes", "shapes_for", "unmerge_flat"]

#: The methods this module computes.
METHODS = ("OFT", "BOFT")


def features(site: ModuleSite) -> int:
    """The dimension rotated: ``in_features``, or ``in_channels * k * k`` for a convolution (PEFT's
    ``conv_filter_dim``)."""
    return int(site.in_features * int(np.prod(site.conv_spatial, dtype=np.int64))) if site.kind == "conv" \
        else int(site.in_features)



def check_site(site: ModuleSite, path: str, method: str, verb: str) -> None:
    """Refuse a module whose input-side transform (OFT's and BOFT's rotation, HRA's reflections: ``verb``) PEFT does
    not compute exactly as a Keras layer holds it. One check for the three methods, as their PEFT layers share it.

    :raises UnsupportedError: naming the module: a 1-D/3-D/grouped/dilated/unevenly strided or non-square
        convolution, or one split over several layers; a transformers ``Conv1D`` (GPT-2; PEFT refuses it too); a
        layer other than Dense/EinsumDense/Conv2D; a piece seeing only part of the module's inputs.
    """
    layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
    kinds = {piece.kind for piece in site.pieces}
    if site.kind == "conv":
        layer = site.pieces[0].layer
        kernel = site.conv_spatial
        odd = [f"{name}={value}" for name, value, ok in (
            ("rank", len(kernel), len(kernel) == 2), ("groups", getattr(layer, "groups", 1),
                                                       getattr(layer, "groups", 1) == 1),
            ("dilation_rate", tuple(layer.dilation_rate), set(layer.dilation_rate) == {1}),
            ("kernel_size", kernel, len(set(kernel)) == 1), ("strides", tuple(layer.strides),
                                                             len(set(layer.strides)) == 1)) if not ok]
        if len(site.pieces) != 1 or odd:
            raise UnsupportedError(f"{method} on a convolution with {', '.join(odd) or 'several layers'} ({layers}): "
                                   f"PEFT's {method} convolution uses one square 2-D kernel, one stride, no groups or "
                                   "dilation", key=path, hint="do not target this layer")
    elif site.hf_conv1d:
        raise UnsupportedError(f"{method} cannot adapt a transformers Conv1D module (GPT-2's, weight stored [in, out]; "
                               f"module on {layers}): PEFT's {method} adapts nn.Linear and nn.Conv2d only, so PEFT could "
                               "not load the adapter", key=path,
                               hint="remove the module from target_modules, or use LoRA/IA3 on this model")
    elif site.kind != "linear" or not kinds <= {"dense", "einsum"}:
        raise UnsupportedError(f"the keras backend adapts only Dense/EinsumDense and 2-D convolution layers with "
                               f"{method} (module on {layers})", key=path,
                               hint="remove the module from target_modules (or exclude it with exclude_modules)")
    else:
        for piece in site.pieces:
            if sorted(piece.in_index.ravel().tolist()) != list(range(site.in_features)):
                raise UnsupportedError(f"{method} {verb} all {site.in_features} input features of the module; "
                                       f"{type(piece.layer).__name__} {piece.layer.path!r} sees {piece.n_in} of them",
                                       key=path, hint="do not target this module, or use the torch backend")


def check(site: ModuleSite, path: str, config: AdapterConfig, *, trainable: bool = False) -> None:
    """Refuse a module the OFT/BOFT math of this backend does not cover exactly (the torch backend's ``check``).

    :raises UnsupportedError: an embedding, a logits projection, a transformers ``Conv1D`` (GPT-2; PEFT refuses it
        too), a 1-D/3-D/grouped/dilated/strided-unevenly
        convolution, an OFT convolution larger than 1x1, a piece seeing only part of the module's inputs (naming
        the module), a block layout PEFT refuses, or training with ``module_dropout``/``boft_dropout``.
    """
    method = config.peft_type
    check_site(site, path, method, "rotates")
    if method == "OFT" and site.kind == "conv" and site.conv_spatial != (1, 1):
        layers = ", ".join(f"{type(p.layer).__name__} {p.layer.path!r}" for p in site.pieces)
        raise UnsupportedError(
            f"OFT on a Conv2D with kernel {site.conv_spatial} ({layers}): PEFT 0.21's unmerged forward (unfold, rotate, "
            "fold with overlap-add) differs from its merged weight for kernels larger than 1x1, so no exact "
            "result exists", key=path, hint="target 1x1 convolutions and linear layers only")
    block_sizes(features(site), config, path)
    if trainable:
        field = "module_dropout" if method == "OFT" else "boft_dropout"
        if float(config.get(field) or 0.0) > 0.0:
            raise UnsupportedError(f"the keras backend does not train {method} with {field} > 0",
                                   pointer=f"/{field}", hint=f"set {field} to 0, or train with the torch backend")


def settings(site: ModuleSite, config: AdapterConfig, path: str) -> Rotation:
    """The :class:`Rotation` of ``config`` on this module."""
    return rotation_of(features(site), config, path)


def shapes_for(config: AdapterConfig, path: str, count: int, out_features: int,
               conv: bool = False) -> dict[str, tuple[int, ...]]:
    """The spec parameter names and shapes of ``config`` on a module rotating ``count`` features (PEFT's layout).

    >>> from adapterspec import AdapterConfig
    >>> shapes_for(AdapterConfig.from_dict({"peft_type": "BOFT", "target_modules": ["q"], "boft_block_size": 2}),
    ...            "q", 8, 3)
    {'boft_R': (1, 4, 2, 2), 'boft_s': (3, 1)}
    """
    return param_shapes(count, out_features, config, path, conv=conv)


def shapes(site: ModuleSite, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """:func:`shapes_for` of this module (the torch backend's ``shapes``)."""
    return shapes_for(config, path, features(site), site.out_features, site.kind == "conv")


def inits(config: AdapterConfig, params: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Any, ...]]:
    """Initialiser descriptions (:func:`~adapterspec_keras.bank.make_initializer`) as PEFT initialises: the
    identity rotation (zeros, ``boft_s`` ones), or with ``init_weights: false`` noise (std 0.1, ``boft_s`` around 1)."""
    noise = config.get("init_weights", True) is False
    return {param: (("normal", 0.1, 1.0 if param == "boft_s" else 0.0) if noise else
                    ("ones",) if param == "boft_s" else ("zeros",)) for param in params}


def _solve_cayley(skew: Any) -> Any:
    """``(I - Q)(I + Q)^-1`` of each ``[b, b]`` block."""
    size = int(skew.shape[-1])
    eye = ops.broadcast_to(ops.eye(size, dtype=skew.dtype), tuple(skew.shape))
    return ops.matmul(eye - skew, ops.inv(eye + skew))


def _oft_blocks(spec: Rotation, vector: Any) -> Any:
    """OFT's ``[r, b, b]`` rotation blocks from the ``[r, b(b-1)/2]`` upper triangles (PEFT's ``_cayley_batch``)."""
    b, size = int(vector.shape[0]), spec.block_size
    rows, cols = np.triu_indices(size, 1)
    scatter = np.zeros((size * (size - 1) // 2, size * size), dtype=np.float64)
    scatter[np.arange(rows.size), rows * size + cols] = 1.0  # exact 0/1 placement of the triangle entries
    upper = ops.reshape(ops.matmul(vector, ops.cast(scatter, vector.dtype)), (b, size, size))
    skew = upper - ops.transpose(upper, (0, 2, 1))
    if not spec.neumann:
        return _solve_cayley(skew)
    result = ops.broadcast_to(ops.eye(size, dtype=vector.dtype), (b, size, size))
    if spec.terms > 1:  # I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1), in PEFT's order of operations
        result = result + 2.0 * skew
        if spec.terms > 2:
            power = ops.matmul(skew, skew)
            result = result + 2.0 * power
            for _ in range(3, spec.terms - 1):
                power = ops.matmul(power, skew)
                result = result + 2.0 * power
            result = result + ops.matmul(power, skew)
    return result


def _boft_blocks(tensor: Any) -> Any:
    """BOFT's ``[blocks, b, b]`` rotation blocks (PEFT's ``cayley_batch`` of the one butterfly factor)."""
    n, d, h = int(tensor.shape[0]), int(tensor.shape[1]), int(tensor.shape[2])
    data = ops.reshape(tensor, (n * d, h, h))
    return _solve_cayley(0.5 * (data - ops.transpose(data, (0, 2, 1))))


def _block_diag(blocks: Any, count: int) -> Any:
    """The ``[n*b, n*b]`` block-diagonal matrix of ``[n, b, b]`` blocks (differentiable, no scatter)."""
    n, size = int(blocks.shape[0]), int(blocks.shape[-1])
    eye = ops.cast(np.eye(n), blocks.dtype)  # [n, n] selects the diagonal blocks
    full = ops.einsum("ij,ikl->ikjl", eye, blocks)  # [n, b, n, b]
    return ops.reshape(full, (count, count))


def rotation(spec: Rotation, get: Callable[[str], Any], dtype: Any) -> Any:
    """The full ``[F, F]`` block-diagonal orthogonal matrix ``R`` of one adapter, in ``dtype`` (PEFT: ``x @ R``).

    :param get: parameter name -> its value (the file's layout).

    >>> r = rotation(Rotation("OFT", blocks=2, block_size=2), lambda _: np.zeros((2, 1), "float32"), "float32")
    >>> ops.convert_to_numpy(r).tolist() == np.eye(4).tolist()
    True
    """
    count = spec.blocks * spec.block_size
    if spec.method == "OFT":
        blocks = _oft_blocks(spec, ops.cast(get("oft_R.weight"), dtype))
        if int(blocks.shape[0]) == 1 and spec.blocks > 1:
            blocks = ops.repeat(blocks, spec.blocks, axis=0)
    else:
        blocks = _boft_blocks(ops.cast(get("boft_R"), dtype))
    return _block_diag(blocks, count)


def feature_index(site: ModuleSite, piece: Piece) -> np.ndarray:
    """For each row of the piece's flat kernel, the rotated feature it is (``R``'s row): a linear piece's
    ``in_index``; a Keras convolution's ``(kh, kw, in)`` rows in torch's ``(in, kh, kw)`` order."""
    if site.kind != "conv":
        return np.asarray(piece.in_index).ravel()
    kernel = site.conv_spatial
    torch_order = np.arange(features(site)).reshape((site.in_features, *kernel))
    return np.transpose(torch_order, (*range(1, len(kernel) + 1), 0)).ravel()


def _scale(site: ModuleSite, piece: Piece, get: Callable[[str], Any], dtype: Any) -> Any:
    """BOFT's ``boft_s`` as the piece's ``[n_out]`` column scales."""
    value = ops.reshape(ops.cast(get("boft_s"), dtype), (site.out_features,))
    index = np.asarray(piece.out_index).ravel()
    if np.array_equal(index, np.arange(site.out_features)):
        return value
    return ops.take(value, index, axis=0)


def _piece_matrix(matrix: Any, index: np.ndarray) -> Any:
    """``matrix`` with rows and columns in the piece's order."""
    if np.array_equal(index, np.arange(index.size)):
        return matrix
    return ops.take(ops.take(matrix, index, axis=0), index, axis=1)


def rotated_flat(site: ModuleSite, piece: Piece, adapters: Sequence[tuple[Rotation, Callable[[str], Any]]],
                 flat: Any) -> Any:
    """The piece's ``[n_in, n_out]`` kernel with the running OFT or BOFT ``adapters`` applied, as the torch
    backend's ``forward`` combines them: OFT rotates the input by ``R_1`` then ``R_2``... (``K' = R_1 R_2 .. K``);
    BOFT multiplies ``R_n .. R_1`` and the scales (``K' = R_n .. R_1 K * s_1 .. s_n``)."""
    dtype = flat.dtype
    index = feature_index(site, piece)
    if adapters[0][0].method == "OFT":
        for spec, get in reversed(adapters):
            flat = ops.matmul(_piece_matrix(rotation(spec, get, dtype), index), flat)
        return flat
    total = None
    scale = None
    for spec, get in adapters:
        matrix = rotation(spec, get, dtype)
        total = matrix if total is None else ops.matmul(matrix, total)
        s = _scale(site, piece, get, dtype)
        scale = s if scale is None else s * scale
    assert total is not None and scale is not None
    return ops.matmul(_piece_matrix(total, index), flat) * scale[None, :]


def merge_flat(site: ModuleSite, piece: Piece, spec: Rotation, get: Callable[[str], Any], flat: Any) -> Any:
    """The piece's kernel after merging one adapter: ``R_p @ K`` (BOFT: columns times ``boft_s``)."""
    return rotated_flat(site, piece, [(spec, get)], flat)


def unmerge_flat(site: ModuleSite, piece: Piece, spec: Rotation, get: Callable[[str], Any], flat: Any) -> Any:
    """Undo :func:`merge_flat` as PEFT does: OFT multiplies by ``R``'s inverse, BOFT by ``R.T`` and ``1 / boft_s``."""
    dtype = flat.dtype
    matrix = _piece_matrix(rotation(spec, get, dtype), feature_index(site, piece))
    if spec.method == "OFT":
        return ops.matmul(ops.inv(matrix), flat)
    return ops.matmul(ops.transpose(matrix), flat) * (1.0 / _scale(site, piece, get, dtype))[None, :]
