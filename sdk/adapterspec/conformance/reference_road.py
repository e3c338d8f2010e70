"""RoAd's reference math (SPEC.md 17.1) in float64 numpy: the matrix ``R`` that rotates and scales pairs of a
Linear layer's outputs, and the weight and bias it gives the layer (``R W``, ``R b``).

>>> cfg = {"peft_type": "ROAD", "variant": "road_2", "group_size": 2, "target_modules": ["l"]}
>>> road_matrix(cfg, np.zeros(2), np.ones(2)).tolist()
[[1.0, -0.0], [0.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .._road import group_size, variant, vector_length

__all__ = ["road_matrix", "road_weights"]

Array = npt.NDArray[np.float64]


def road_matrix(config: Mapping[str, Any], theta: Any, alpha: Any) -> Array:
    """``R`` (``out x out``): diagonal ``c``; in each group of ``group_size`` and pair ``(i, j = i + g/2)``,
    ``R[i, j] = -s_i`` and ``R[j, i] = s_j`` (``c``, ``s`` of the variant, SPEC.md 17.1)."""
    theta, alpha = np.asarray(theta, dtype=np.float64), np.asarray(alpha, dtype=np.float64)
    name, g = variant(config), group_size(config)
    if name == "road_1":
        theta = np.repeat(theta.reshape(-1, g // 2), 2, axis=0).reshape(-1)
        alpha = np.repeat(alpha.reshape(-1, g // 2), 2, axis=0).reshape(-1)
        c, s = alpha * np.cos(theta), alpha * np.sin(theta)
    elif name == "road_2":
        c, s = alpha * np.cos(theta), alpha * np.sin(theta)
    else:
        t, a = theta.reshape(-1, 2, g), alpha.reshape(-1, 2, g)
        c, s = (a[:, 0, :] * np.cos(t[:, 0, :])).reshape(-1), (a[:, 1, :] * np.sin(t[:, 1, :])).reshape(-1)
    out = c.shape[0]
    r = np.diag(c)
    for start in range(0, out, g):
        for k in range(g // 2):
            i, j = start + k, start + k + g // 2
            r[i, j] = -s[i]
            r[j, i] = s[j]
    return r


def road_weights(weight: Any, bias: Any, config: Mapping[str, Any],
                 tensors: Mapping[str, Any]) -> tuple[Array, Array | None]:
    """``(R W, R b)`` of a Linear layer's ``[out, in]`` weight and ``[out]`` bias.

    :raises ValueError: the tensors do not fit the layer's outputs and the config's variant and group size.
    """
    weight = np.asarray(weight, dtype=np.float64)
    out = weight.shape[0]
    g = group_size(config)
    length = vector_length(variant(config), out)
    theta, alpha = (np.asarray(tensors[n], dtype=np.float64) for n in ("road_theta", "road_alpha"))
    if out % g or theta.shape != (length,) or alpha.shape != (length,):
        raise ValueError(f"road_theta {list(theta.shape)} / road_alpha {list(alpha.shape)} do not fit a layer of "
                         f"{out} outputs (variant {variant(config)}, group_size {g}: [{length}])")
    r = road_matrix(config, theta, alpha)
    return r @ weight, (None if bias is None else r @ np.asarray(bias, dtype=np.float64))
