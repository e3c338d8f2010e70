"""How far apart two correct float computations of the same values may be: the tests' tolerances.

Two implementations (adapterspec and PEFT, torch and Keras, merged and unmerged weights) compute the same
sums in different orders, and a CPU's SIMD width decides the order inside one matmul, so their results
differ by rounding. For a sum of ``length`` products the worst case is about ``length * eps`` relative to
the magnitude of the values (Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1): that bound,
not what one machine happened to produce, is the tolerance. Checks that must be exact (saved tensors,
restored weights) use ``torch.equal`` / ``np.array_equal`` instead.

>>> fp32_tolerance([[3.0, -20.0]], length=64) == 20.0 * 64 * FP32_EPS
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FP32_EPS", "fp32_tolerance"]

FP32_EPS = float(np.finfo(np.float32).eps)


def fp32_tolerance(expected: Any, length: int, *, eps: float = FP32_EPS) -> float:
    """The largest difference rounding explains between two fp32 computations of ``expected``.

    :param expected: the reference values (array, tensor on the CPU, nested lists).
    :param length: the number of terms each value sums (the reduction length: a layer's input size).
    :param eps: the machine epsilon of the dtype computed in.
    :returns: ``eps * length * max(|expected|, 1)`` -- at least the bound for values of magnitude 1, since
        intermediate values (normalised hidden states) are of that order even where outputs are small.
    """
    if hasattr(expected, "detach"):  # a torch tensor, without importing torch here
        expected = expected.detach().float().cpu().numpy()
    magnitude = float(np.abs(np.asarray(expected, dtype=np.float64)).max(initial=0.0))
    return eps * length * max(magnitude, 1.0)
