"""VeRA in float64 NumPy (SPEC.md 15.5): ``W + (lambda_b B[:out]) @ (lambda_d A[:, :in])``.

A module's tensors here include the adapter's shared ``vera_A`` and ``vera_B`` (whole: each module slices them).

>>> import numpy as np
>>> t = {"vera_lambda_b": np.array([2.0]), "vera_lambda_d": np.array([3.0]), "vera_A": np.array([[1.0, 2.0, 9.0]]),
...      "vera_B": np.array([[1.0], [7.0]])}
>>> vera_weight({"kind": "linear"}, np.zeros((1, 2)), t).tolist()
[[6.0, 12.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["vera_weight"]

Array = np.ndarray


def vera_weight(module: Mapping[str, Any], weight: Any, tensors: Mapping[str, Any]) -> Array:
    """The adapted weight in the stored layout (``[in, out]`` for a GPT-2 Conv1D).

    :raises ValueError: the shared projections are smaller than the layer, or the ranks disagree.
    """
    weight = np.asarray(weight, dtype=np.float64)
    out_f, in_f = weight.shape[::-1] if module["kind"] == "gpt2_conv1d" else weight.shape
    a, b = (np.asarray(tensors[n], dtype=np.float64) for n in ("vera_A", "vera_B"))
    lambda_b, lambda_d = (np.asarray(tensors[n], dtype=np.float64) for n in ("vera_lambda_b", "vera_lambda_d"))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] < in_f or b.shape[0] < out_f or lambda_b.shape != (out_f,) \
            or not a.shape[0] == b.shape[1] == lambda_d.shape[0]:
        raise ValueError(f"vera_A {list(a.shape)}, vera_B {list(b.shape)}, lambdas {list(lambda_b.shape)} / "
                         f"{list(lambda_d.shape)} do not fit a layer of {in_f} inputs and {out_f} outputs")
    delta = (lambda_b[:, None] * b[:out_f]) @ (lambda_d[:, None] * a[:, :in_f])
    out: Array = weight + (delta.T if module["kind"] == "gpt2_conv1d" else delta)
    return out
