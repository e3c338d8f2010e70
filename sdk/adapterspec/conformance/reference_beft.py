"""BEFT (SPEC.md 17.8) in float64 NumPy: the layer's bias plus ``beft_bias`` (a zero bias where the layer has none).

>>> import numpy as np
>>> beft_bias(None, {"beft_bias": np.array([[1.0, 2.0]])}).tolist()
[1.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["beft_bias"]


def beft_bias(bias: Any, tensors: Mapping[str, Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """The effective bias ``b + beft_bias.flatten()`` (``b`` zero when ``bias`` is ``None``)."""
    added = np.asarray(tensors["beft_bias"], dtype=np.float64).reshape(-1)
    if bias is None:
        return added
    return np.asarray(bias, dtype=np.float64) + added
