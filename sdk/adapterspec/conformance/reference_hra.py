"""HRA in float64 NumPy (SPEC.md 17.3): the effective weight ``W_flat @ H``.

``H`` is the product of the reflections ``I - 2 u_i u_i^T`` of ``hra_u``'s normalised columns, in column order,
or with ``apply_GS`` the one reflection ``I - 2 Q Q^T`` across the Gram-Schmidt basis ``Q`` of the columns.

>>> import numpy as np
>>> w = reflected_weight({"kind": "linear"}, np.eye(2), {"peft_type": "HRA", "r": 1}, {"hra_u": np.array([[2.0], [0.0]])})
>>> w.tolist()
[[-1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["householder", "reflected_weight"]

Array = np.ndarray


def householder(u: Any, apply_gs: bool = False) -> Array:
    """``H`` ``[F, F]`` of one module's ``hra_u`` ``[F, r]``.

    >>> householder(np.array([[1.0, 1.0], [0.0, 0.0]])).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    vectors = np.asarray(u, dtype=np.float64)
    if vectors.ndim != 2:
        raise ValueError(f"hra_u {list(vectors.shape)} is not [in_features, r]")
    rows, r = vectors.shape
    if apply_gs:
        basis: list[Array] = []
        for i in range(r):
            v = vectors[:, i].copy()
            for q in basis:
                v = v - (q @ v) * q
            basis.append(v / np.linalg.norm(v))
        q_mat = np.stack(basis, axis=1)
        out: Array = np.eye(rows) - 2 * q_mat @ q_mat.T
        return out
    unit = vectors / np.linalg.norm(vectors, axis=0)
    h = np.eye(rows)
    for i in range(r):
        h = h - 2 * np.outer(h @ unit[:, i], unit[:, i])
    return h


def reflected_weight(module: Mapping[str, Any], weight: Any, config: Mapping[str, Any],
                     tensors: Mapping[str, Any]) -> Array:
    """The effective weight (stored layout) ``W_flat @ H``, ``W_flat`` the weight flattened to ``[out, F]``.

    :raises ValueError: ``hra_u`` does not fit the weight (or the layer kind is not Linear/Conv2d).
    """
    if module["kind"] not in ("linear", "conv2d"):
        raise ValueError(f"HRA adapts Linear and Conv2d layers, not {module['kind']}")
    w = np.asarray(weight, dtype=np.float64)
    flat = w.reshape(w.shape[0], -1)
    u = np.asarray(tensors["hra_u"], dtype=np.float64)
    if u.ndim != 2 or u.shape[0] != flat.shape[1]:
        raise ValueError(f"hra_u {list(u.shape)} does not fit {flat.shape[1]} input features")
    result: Array = (flat @ householder(u, bool(config.get("apply_GS", False)))).reshape(w.shape)
    return result
