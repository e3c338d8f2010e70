"""The reference math of LoRA on a 3-D parameter (``target_parameters``, SPEC.md 15.1), float64 NumPy.

A stack of ``E`` expert weights ``[E, out, in]`` takes ``lora_A`` ``[r * E, in]`` (experts major) and ``lora_B``
``[out, r * E]`` (experts minor); expert ``e``'s delta is ``s * B[:, e::E] @ A[e*r:(e+1)*r]``.

>>> import numpy as np
>>> a = np.arange(4.0).reshape(2, 2)   # r = 1, E = 2, in = 2
>>> b = np.array([[1.0, 10.0]])        # out = 1
>>> expert_deltas(a, b, 2, 1.0).tolist()
[[[0.0, 1.0]], [[20.0, 30.0]]]
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["expert_deltas"]


def expert_deltas(a: Any, b: Any, experts: int, scaling: float) -> Any:
    """``[E, out, in]``: each expert's ``s * B_e @ A_e``.

    :raises ValueError: the factors' rank axis is not a multiple of ``experts``, or they disagree.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] % experts:
        raise ValueError(f"lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit {experts} experts")
    a3 = a.reshape(experts, -1, a.shape[1])  # [E, r, in]
    b3 = b.reshape(b.shape[0], -1, experts)  # [out, r, E]
    return np.einsum("ore,eri->eoi", b3, a3) * scaling
