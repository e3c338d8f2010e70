"""The reference math of LN tuning (``LN_TUNING``, SPEC.md 15.3), float64 NumPy: the layer runs with the stored
copy's weight and bias (``ln_tuning_layers.weight`` / ``.bias``) instead of its own.

>>> import numpy as np
>>> w, b = ln_tuning_weights(np.ones(2), np.zeros(2), {"ln_tuning_layers.weight": np.array([2.0, 3.0])})
>>> w.tolist(), b.tolist()
([2.0, 3.0], [0.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["ln_tuning_weights"]


def ln_tuning_weights(weight: Any, bias: Any, tensors: Mapping[str, Any]) -> tuple[Any, Any]:
    """(weight, bias) of the trained copy; a tensor the copy does not store keeps the layer's.

    :raises ValueError: a stored tensor's shape is not the layer's.
    """
    new_weight = np.asarray(tensors.get("ln_tuning_layers.weight", weight), dtype=np.float64)
    new_bias = tensors.get("ln_tuning_layers.bias", bias)
    new_bias = None if new_bias is None else np.asarray(new_bias, dtype=np.float64)
    if new_weight.shape != np.shape(weight) or (bias is not None and new_bias is not None
                                               and new_bias.shape != np.shape(bias)):
        raise ValueError(f"the copy's tensors do not have the layer's shapes {list(np.shape(weight))}")
    return new_weight, new_bias
