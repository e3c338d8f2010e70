"""DeLoRA in float64 NumPy (SPEC.md 17.6): the effective weight ``W + delta``.

``delta = B @ diag(lambda / r / (|A_i| |B^i|)) @ A * w_norm`` (``w_norm`` scales the input columns, ``|A_i|`` the
norm of row ``i`` of ``A``, ``|B^i|`` of column ``i`` of ``B``, each clamped to at least ``1e-4``; ``r`` the module's
rank from ``rank_pattern`` or ``r``).

>>> import numpy as np
>>> t = {"delora_A": np.array([[3.0, 4.0]]), "delora_B": np.array([[2.0], [0.0]]), "delora_lambda": np.array([5.0]),
...      "delora_w_norm": np.array([1.0, 2.0])}
>>> delora_weight({"kind": "linear"}, np.zeros((2, 2)), {"peft_type": "DELORA", "r": 1}, "l", t).tolist()
[[3.0, 8.0], [0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._delora import CLAMP, rank_for

__all__ = ["delora_delta", "delora_weight"]

Array = np.ndarray


def delora_delta(tensors: Mapping[str, Any], r: int) -> Array:
    """``delta`` ``[out, in]`` of one module's four tensors."""
    a = np.asarray(tensors["delora_A"], dtype=np.float64)
    b = np.asarray(tensors["delora_B"], dtype=np.float64)
    lam = float(np.asarray(tensors["delora_lambda"], dtype=np.float64).reshape(-1)[0])
    w_norm = np.asarray(tensors["delora_w_norm"], dtype=np.float64)
    an = np.maximum(np.linalg.norm(a, axis=1), CLAMP)
    bn = np.maximum(np.linalg.norm(b, axis=0), CLAMP)
    delta: Array = (b * (lam / r / (an * bn))) @ a * w_norm[None, :]
    return delta


def delora_weight(module: Mapping[str, Any], weight: Any, config: Mapping[str, Any], path: str,
                  tensors: Mapping[str, Any]) -> Array:
    """The effective weight ``W + delta`` of a Linear (stored layout ``[out, in]``).

    :raises ValueError: not a Linear, or the tensors do not fit the weight.
    """
    if module["kind"] != "linear":
        raise ValueError(f"DeLoRA adapts Linear layers, not {module['kind']}")
    w = np.asarray(weight, dtype=np.float64)
    delta = delora_delta(tensors, rank_for(config, path))
    if delta.shape != w.shape:
        raise ValueError(f"DeLoRA's delta {list(delta.shape)} does not fit the weight {list(w.shape)}")
    result: Array = w + delta
    return result
