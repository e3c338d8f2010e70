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
    """The weight the adapter's rows give the layer (stored layout, float64).

    :raises ValueError: the tensor is not ``[len(token_indices), dim]`` or an index is outside the weight's rows.
    """
    out = np.array(weight, dtype=np.float64, copy=True)
    rows = np.asarray(tensors["trainable_tokens_delta"], dtype=np.float64)
    indices = [int(i) for i in config["token_indices"]]
    if rows.shape != (len(indices), *out.shape[1:]) or any(not 0 <= i < out.shape[0] for i in indices):
        raise ValueError(f"trainable_tokens_delta {list(rows.shape)} does not fit rows {indices} of {list(out.shape)}")
    for i, index in enumerate(indices):
        out[index] = rows[i]
    return out
