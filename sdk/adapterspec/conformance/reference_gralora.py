"""GraLoRA in float64 NumPy (SPEC.md 17.5): ``W + alpha / (r + hybrid_r) * (D + B_general @ A_general)``.

``D`` is the block matrix whose block ``(j, n)`` (output block ``j``, input block ``n``) is
``(A[n][:, j*s:(j+1)*s] @ B[j][n*s:(n+1)*s, :]).T`` with ``s = r / k``: input block ``n`` reaches output block ``j``
through the ``j``-th rank slice of ``A[n]`` and the ``n``-th rank slice of ``B[j]``.

>>> import numpy as np
>>> t = {"gralora_A": np.ones((2, 1, 2)), "gralora_B": np.array([[[1.0], [2.0]], [[3.0], [4.0]]])}
>>> gralora_weight({"kind": "linear"}, np.zeros((2, 2)), {"r": 2, "gralora_k": 2, "alpha": 2}, t).tolist()
[[1.0, 2.0], [3.0, 4.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._gralora import settings

__all__ = ["block_delta", "gralora_weight"]

Array = np.ndarray


def block_delta(a: Any, b: Any) -> Array:
    """``D`` ``[out, in]`` of the blocks ``A`` ``[k, in/k, r]`` and ``B`` ``[k, r, out/k]``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    k, block_in, r = a.shape
    block_out = b.shape[2]
    if b.shape[:2] != (k, r) or r % k:
        raise ValueError(f"gralora_A {list(a.shape)} and gralora_B {list(b.shape)} do not pair")
    s = r // k
    delta = np.zeros((k * block_out, k * block_in))
    for j in range(k):
        for n in range(k):
            part = a[n][:, j * s:(j + 1) * s] @ b[j][n * s:(n + 1) * s, :]  # [in/k, out/k]
            delta[j * block_out:(j + 1) * block_out, n * block_in:(n + 1) * block_in] = part.T
    return delta


def gralora_weight(module: Mapping[str, Any], weight: Any, config: Mapping[str, Any],
                   tensors: Mapping[str, Any]) -> Array:
    """The adapted weight in the stored layout (``[in, out]`` for a GPT-2 Conv1D).

    :raises ValueError: the tensors do not make a ``[out, in]`` update of this layer.
    """
    weight = np.asarray(weight, dtype=np.float64)
    conv1d = module["kind"] == "gpt2_conv1d"
    out_f, in_f = weight.shape[::-1] if conv1d else weight.shape
    g = settings(config)
    delta = block_delta(tensors["gralora_A"], tensors["gralora_B"])
    if g.hybrid_r > 0:
        delta = delta + (np.asarray(tensors["gralora_B_general.weight"], dtype=np.float64)
                         @ np.asarray(tensors["gralora_A_general.weight"], dtype=np.float64))
    if delta.shape != (out_f, in_f):
        raise ValueError(f"the GraLoRA update {list(delta.shape)} does not fit a layer of {in_f} inputs and {out_f} "
                         "outputs")
    delta = g.scaling * delta
    out: Array = weight + (delta.T if conv1d else delta)
    return out
