"""Tensor operations on one :class:`~adapterspec_keras.mapping.Piece`, in ``keras.ops`` (any backend).

The adapter layer hands these functions a whole spec module's tensors in Keras layout (``lora_A`` as
``[in_features, r]``, ``lora_B`` as ``[r, out_features]``, vectors as ``[features]``; variables of 2-D
factors hold the file's layout and are transposed on the way, see ``layers.Layout.spec_stored``). A piece sees its share of them:
rows of ``lora_A`` by ``piece.in_index``, columns of ``lora_B`` by ``piece.out_index``, reshaped
to the piece's kernel axes. The kernel itself is read as a 2-D ``[n_in, n_out]`` matrix.

>>> from adapterspec_keras import _ops                                   # doctest: +SKIP
>>> _ops.flat_kernel(piece).shape                                       # doctest: +SKIP
(64, 64)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import backend, ops

from .sites import Piece

__all__ = [
    "HALF",
    "add_out",
    "assign_bias",
    "assign_kernel",
    "bias_of",
    "contract_in",
    "dtype_name",
    "expand_out",
    "flat_kernel",
    "gather_in",
    "gather_out",
    "kernel_from_flat",
    "lora_delta_flat",
    "scale_in",
    "scale_out",
]

#: Kernel dtypes whose float32 adapters compute in float32 and round once (SPEC.md 7.5).
HALF = ("float16", "bfloat16")

_R = "Z"  # the rank letter in einsum equations (keras-hub equations use lowercase letters)


def _rank_letter(piece: Piece) -> str:
    used = set(piece.input_spec + piece.kernel_spec + piece.output_spec)
    for letter in _R + "YXWVUTSRQPONMLKJIHGFEDCBA":
        if letter not in used:
            return letter
    raise AssertionError("no free einsum letter")  # 52 letters; cannot happen


def _is_identity(index: np.ndarray, total: int) -> bool:
    return index.size == total and bool(np.array_equal(index.ravel(), np.arange(total)))


def _contiguous(index: np.ndarray) -> int | None:
    flat = index.ravel()
    start = int(flat[0])
    return start if np.array_equal(flat, np.arange(start, start + flat.size)) else None


def gather_in(piece: Piece, value: Any, total: int) -> Any:
    """The piece's rows (axis 0) of a ``[in_features, ...]`` tensor, flattened: ``[n_in, ...]``."""
    if _is_identity(piece.in_index, total):
        return value
    start = _contiguous(piece.in_index)
    if start is not None:
        return value[start:start + piece.n_in]
    return ops.take(value, piece.in_index.ravel(), axis=0)


def gather_out(piece: Piece, value: Any, total: int) -> Any:
    """The piece's entries (last axis) of a ``[..., out_features]`` tensor, flattened: ``[..., n_out]``."""
    if _is_identity(piece.out_index, total):
        return value
    start = _contiguous(piece.out_index)
    if start is not None:
        return value[..., start:start + piece.n_out]
    return ops.take(value, piece.out_index.ravel(), axis=-1)


def _einsum_perm(piece: Piece) -> list[int]:
    return [piece.kernel_spec.index(c) for c in piece.kin + piece.kout]


def flat_kernel(piece: Piece, value: Any = None) -> Any:
    """The base kernel as ``[n_in, n_out]`` (conv: ``[spatial * in, out]``), in the kernel's dtype; ``value``: a
    tensor in the kernel variable's layout, flattened instead of the variable."""
    if piece.kind == "reverse":
        return ops.transpose(piece.layer.embeddings) if piece.tied else piece.layer.reverse_embeddings
    variable = piece.kernel_variable if value is None else value
    if piece.kind == "einsum":
        return ops.reshape(ops.transpose(variable, _einsum_perm(piece)), (piece.n_in, piece.n_out))
    if piece.kind == "conv":
        return ops.reshape(variable, (-1, piece.n_out))
    if piece.out_slice is not None:
        return variable[:, piece.out_slice[0]:piece.out_slice[1]]
    return variable


def assign_kernel(piece: Piece, flat: Any) -> None:
    """Make the piece's kernel ``flat`` (``[n_in, n_out]``, as :func:`flat_kernel`): the whole variable, or only
    the piece's columns of a fused kernel (the other modules' columns stay as they are)."""
    variable = piece.kernel_variable
    if piece.out_slice is not None:
        variable.assign(ops.slice_update(variable.value, (0, piece.out_slice[0]), ops.cast(flat, variable.dtype)))
        return
    variable.assign(ops.cast(kernel_from_flat(piece, flat), variable.dtype))


def bias_of(piece: Piece) -> Any:
    """The piece's bias (``[n_out]`` shaped like the layer's bias; a fused kernel's: its slice), or ``None``."""
    bias = piece.bias_variable
    if bias is None or piece.out_slice is None:
        return bias
    return bias[piece.out_slice[0]:piece.out_slice[1]]


def assign_bias(piece: Piece, value: Any) -> None:
    """Make the piece's bias (see :func:`bias_of`) ``value``."""
    bias = piece.bias_variable
    if piece.out_slice is not None:
        bias.assign(ops.slice_update(bias.value, (piece.out_slice[0],), ops.cast(value, bias.dtype)))
        return
    bias.assign(ops.cast(value, bias.dtype))


def kernel_from_flat(piece: Piece, flat: Any) -> Any:
    """Inverse of :func:`flat_kernel`: a ``[n_in, n_out]`` matrix in the kernel variable's own layout (a slice
    of a fused kernel: that slice's columns, ``[n_in, n_out]``; :func:`assign_kernel` writes them in place)."""
    if piece.kind == "reverse" and piece.tied:
        return ops.transpose(flat)
    if piece.kind == "einsum":
        perm = _einsum_perm(piece)
        inverse = [perm.index(i) for i in range(len(perm))]
        return ops.transpose(ops.reshape(flat, piece.in_shape + piece.out_shape), inverse)
    if piece.kind == "conv":
        return ops.reshape(flat, tuple(piece.kernel_variable.shape))
    return flat


def lora_delta_flat(piece: Piece, a: Any, b: Any) -> Any:
    """``A @ B`` over the piece, ``[n_in, n_out]`` like :func:`flat_kernel` (a: piece rows of lora_A, b: columns of lora_B)."""
    if piece.kind == "conv":
        rank = a.shape[-1]
        return ops.matmul(ops.reshape(a, (-1, rank)), ops.reshape(b, (rank, -1)))
    return ops.matmul(a, b)


def contract_in(piece: Piece, x: Any, a: Any) -> Any:
    """``x`` through the piece's share of lora_A (``a``: ``[n_in, r]``, conv: ``[*k, in, r]``): ``[..., r]``."""
    layer = piece.layer
    if piece.kind == "embedding":
        ids = x if "int" in str(x.dtype) else ops.cast(x, "int32")
        return ops.take(a, ids, axis=0)
    if piece.kind == "einsum":
        letter = _rank_letter(piece)
        rest = "".join(c for c in piece.input_spec if c not in piece.kin)
        a = ops.reshape(a, piece.in_shape + (a.shape[-1],))
        return ops.einsum(f"{piece.input_spec},{piece.kin}{letter}->{rest}{letter}", x, a)
    if piece.kind == "conv":
        return ops.conv(x, a, strides=layer.strides, padding=layer.padding, data_format=layer.data_format,
                        dilation_rate=layer.dilation_rate)
    return ops.matmul(x, a)


def expand_out(piece: Piece, u: Any, b: Any) -> Any:
    """``u`` (``[..., r]``) through the piece's share of lora_B (``[r, n_out]``; conv ``[*1, r, out]``), shaped
    like the layer's output."""
    if piece.kind == "einsum":
        letter = _rank_letter(piece)
        rest = "".join(c for c in piece.input_spec if c not in piece.kin)
        b = ops.reshape(b, (b.shape[0],) + piece.out_shape)
        return ops.einsum(f"{rest}{letter},{letter}{piece.kout}->{piece.output_spec}", u, b)
    if piece.kind == "conv":  # b is lora_B's Keras layout, a 1x1 kernel [*1, r, out]
        kernel = ops.reshape(b, (1,) * len(piece.layer.kernel_size) + (b.shape[-2], piece.n_out))
        return ops.conv(u, kernel, strides=1, padding="valid", data_format=piece.layer.data_format)
    return ops.matmul(u, b)


def _broadcast_shape(spec: str, letters: str, dims: dict[str, int], ndim: int) -> tuple[list[int], list[int]]:
    """(permutation of the vector's axes, broadcast shape) to line up ``letters`` with their place in ``spec``."""
    named = spec.replace("...", "")
    order = [c for c in named if c in letters]
    perm = [letters.index(c) for c in order]
    shape = [dims[c] if c in letters else 1 for c in named]
    return perm, [1] * (ndim - len(shape)) + shape if spec.startswith("...") else shape


def _along(piece: Piece, vector: Any, ndim: int, side: str) -> Any:
    """A flat per-feature vector of the piece (``[n_in]`` or ``[n_out]``) shaped to broadcast against its input or output."""
    if piece.kind == "einsum":
        letters = piece.kin if side == "in" else piece.kout
        shape = piece.in_shape if side == "in" else piece.out_shape
        spec = piece.input_spec if side == "in" else piece.output_spec
        dims = dict(zip(letters, shape))
        perm, bshape = _broadcast_shape(spec, letters, dims, ndim)
        return ops.reshape(ops.transpose(ops.reshape(vector, shape), perm), bshape)
    if piece.kind == "conv" and piece.layer.data_format == "channels_first":
        return ops.reshape(vector, (-1,) + (1,) * (ndim - 2))
    return vector


def dtype_name(x: Any) -> str:
    """A tensor's or variable's dtype by its Keras name (TensorFlow's ``str(dtype)`` is ``"<dtype: 'bfloat16'>"``).

    >>> dtype_name(ops.ones(2, dtype="bfloat16"))
    'bfloat16'
    """
    return str(backend.standardize_dtype(x.dtype))


def _scaled(x: Any, vector: Any) -> Any:
    """``x * vector``; a float32 vector on a half-precision ``x`` multiplies in float32, rounded once to ``x``'s
    dtype (PEFT's IA3: ``(x.float() * ia3_l).to(x.dtype)``, SPEC.md 7.5), not after rounding the vector."""
    if dtype_name(vector) == "float32" and dtype_name(x) in HALF:
        return ops.cast(ops.cast(x, "float32") * vector, x.dtype)
    return x * ops.cast(vector, x.dtype)


def scale_in(piece: Piece, x: Any, vector: Any) -> Any:
    """``x`` times a per-input-feature vector of the piece (IA3 on a feed-forward module)."""
    return _scaled(x, _along(piece, vector, len(x.shape), "in"))


def scale_out(piece: Piece, y: Any, vector: Any) -> Any:
    """``y`` times a per-output-feature vector of the piece."""
    return _scaled(y, _along(piece, vector, len(y.shape), "out"))


def add_out(piece: Piece, y: Any, vector: Any) -> Any:
    """``y`` plus a per-output-feature vector of the piece (a bias)."""
    return y + ops.cast(_along(piece, vector, len(y.shape), "out"), y.dtype)

