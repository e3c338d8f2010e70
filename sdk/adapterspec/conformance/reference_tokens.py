"""The reference math of the ``TRAINABLE_TOKENS`` method (SPEC.md 15.2), float64 NumPy.

The layer's weight with rows ``token_indices[i]`` replaced by row ``i`` of ``trainable_tokens_delta`` (an
embedding's ``[num, dim]``, or a Linear's ``[out, in]`` whose rows are the output features).

>>> import numpy as np
>>> token_weight(np.zeros((3, 2)), {"token_indices": [2]}, {"trainable_tokens_delta": np.ones((1, 2))}).tolist()
[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["token_weight"]


def token_weight(weight: Any, config: Mapping[str, Any], tensors: Mapping[str, Any]) -> Any:
    """The weight the adapter's rows give the layer (stored layout, float64)."""
    out = np.array(weight, dtype=np.float64, copy=True)
    rows = np.asarray(tensors["trainable_tokens_delta"], dtype=np.float64)
    for i, index in enumerate(config["token_indices"]):
        out[int(index)] = rows[i]
    return out
