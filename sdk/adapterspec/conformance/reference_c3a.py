"""C3A in float64 NumPy (SPEC.md 17.7): the weight a C3A adapter gives a Linear layer.

Block ``(i, j)`` of the ``[out, in]`` update is the circulant matrix of ``kernel[i, j]``, divided by the layer's input
features: ``W[i*b + p, j*b + q] += kernel[i, j, (q - p) mod b] / in``.

>>> import numpy as np
>>> c3a_weight({"kind": "linear"}, np.zeros((2, 2)), {"c3a_kernel": np.array([[[1.0, 2.0]]])}).tolist()
[[0.5, 1.0], [1.0, 0.5]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["c3a_delta", "c3a_weight"]

Array = np.ndarray


def c3a_delta(kernel: Any) -> Array:
    """The ``[out, in]`` block-circulant matrix of ``kernel`` ``[out/b, in/b, b]`` (not yet divided by ``in``).

    >>> c3a_delta(np.array([[[1.0, 2.0, 3.0]]])).tolist()
    [[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [2.0, 3.0, 1.0]]
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    m, n, b = kernel.shape
    p = np.arange(b)
    index = (p[None, :] - p[:, None]) % b  # [p, q] -> (q - p) mod b
    blocks = kernel[:, :, index]  # [m, n, b (p), b (q)]
    out: Array = blocks.transpose(0, 2, 1, 3).reshape(m * b, n * b)
    return out


def c3a_weight(module: Mapping[str, Any], weight: Any, tensors: Mapping[str, Any]) -> Array:
    """The adapted ``[out, in]`` weight of a Linear layer.

    :raises ValueError: not a Linear layer, or a kernel that does not fit it.
    """
    weight = np.asarray(weight, dtype=np.float64)
    if module["kind"] != "linear":
        raise ValueError(f"C3A adapts Linear layers only, not {module['kind']}")
    delta = c3a_delta(tensors["c3a_kernel"])
    if delta.shape != weight.shape:
        raise ValueError(f"a c3a_kernel of {list(np.shape(tensors['c3a_kernel']))} does not fit a "
                         f"{weight.shape[0]}x{weight.shape[1]} weight")
    out: Array = weight + delta / weight.shape[1]
    return out
