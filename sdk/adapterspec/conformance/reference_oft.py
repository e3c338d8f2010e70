"""OFT and BOFT in float64 NumPy (SPEC.md 15.6, 15.7): the effective weight ``W @ R.T`` (BOFT: times ``boft_s``).

``R`` is block-diagonal; each block is the Cayley transform of a skew-symmetric matrix (OFT may use the truncated
Cayley-Neumann series instead). Unmerged, the layer runs on ``x @ R``; that equals the layer with this weight.

>>> import numpy as np
>>> cfg = {"peft_type": "OFT", "r": 0, "oft_block_size": 2, "target_modules": ["l"], "use_cayley_neumann": False}
>>> w = rotated_weight({"kind": "linear"}, np.eye(2), cfg, {"oft_R.weight": np.array([[1.0]])})
>>> np.round(w, 6).tolist()
[[0.0, 1.0], [-1.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["cayley", "rotated_weight", "rotation"]

Array = np.ndarray


def cayley(skew: Array, neumann_terms: int | None = None) -> Array:
    """``(I - Q)(I + Q)^-1`` of each ``[b, b]`` skew-symmetric ``skew[i]``, or its Cayley-Neumann series
    with ``n = neumann_terms``: ``I`` for 1, ``I + 2Q`` for 2, else ``I + 2(Q + ... + Q^m) + Q^(m+1)`` with
    ``m = max(2, n - 2)`` (PEFT 0.21's sum).

    >>> cayley(np.zeros((1, 2, 2)), 5).tolist()
    [[[1.0, 0.0], [0.0, 1.0]]]
    """
    eye = np.broadcast_to(np.eye(skew.shape[-1]), skew.shape)
    if neumann_terms is None:
        out: Array = (eye - skew) @ np.linalg.inv(eye + skew)
        return out
    result = eye.copy()
    if neumann_terms == 2:
        result = result + 2 * skew
    elif neumann_terms > 2:  # PEFT 0.21 sums 2Q and 2Q^2 whatever n is: n = 3 and n = 4 give the same series
        power = eye
        for _ in range(1, max(3, neumann_terms - 1)):
            power = power @ skew
            result = result + 2 * power
        result = result + power @ skew
    return result


def _blocks(config: Mapping[str, Any], t: Mapping[str, Any]) -> Array:
    """The ``[blocks, b, b]`` rotation blocks of one module (a shared OFT block not repeated yet)."""
    if config["peft_type"] == "OFT":
        vectors = np.asarray(t["oft_R.weight"], dtype=np.float64)
        n = vectors.shape[1]
        size = int(round((1 + np.sqrt(1 + 8 * n)) / 2))
        if vectors.ndim != 2 or size * (size - 1) // 2 != n:
            raise ValueError(f"oft_R.weight {list(vectors.shape)} is not [blocks, b(b-1)/2]")
        rows, cols = np.triu_indices(size, 1)
        skew = np.zeros((vectors.shape[0], size, size))
        skew[:, rows, cols] = vectors
        skew = skew - skew.transpose(0, 2, 1)
        terms = int(config.get("num_cayley_neumann_terms", 5)) if config.get("use_cayley_neumann", True) else None
        return cayley(skew, terms)
    factors = np.asarray(t["boft_R"], dtype=np.float64)
    if factors.ndim != 4 or factors.shape[0] != 1 or factors.shape[2] != factors.shape[3]:
        raise ValueError(f"boft_R {list(factors.shape)} is not [1, blocks, b, b]")
    data = factors[0]
    return cayley(0.5 * (data - data.transpose(0, 2, 1)))


def rotation(config: Mapping[str, Any], tensors: Mapping[str, Any], features: int) -> Array:
    """The ``[features, features]`` block-diagonal ``R`` of one module.

    :raises ValueError: the blocks do not tile ``features``.

    >>> cfg = {"peft_type": "BOFT", "boft_block_size": 2, "target_modules": ["l"]}
    >>> rotation(cfg, {"boft_R": np.zeros((1, 2, 2, 2))}, 4).tolist() == np.eye(4).tolist()
    True
    """
    blocks = _blocks(config, tensors)
    size = blocks.shape[-1]
    if features % size:
        raise ValueError(f"blocks of {size} do not tile {features} input features")
    if blocks.shape[0] == 1 and config["peft_type"] == "OFT" and config.get("block_share"):
        blocks = np.repeat(blocks, features // size, axis=0)
    if blocks.shape[0] * size != features:
        raise ValueError(f"{blocks.shape[0]} blocks of {size} do not make {features} input features")
    full = np.zeros((features, features))
    for i, block in enumerate(blocks):
        full[i * size:(i + 1) * size, i * size:(i + 1) * size] = block
    return full


def rotated_weight(module: Mapping[str, Any], weight: Any, config: Mapping[str, Any],
                   tensors: Mapping[str, Any]) -> Array:
    """The effective weight (stored layout): ``W_flat @ R.T``, BOFT's rows scaled by ``boft_s``.

    :raises ValueError: the tensors do not fit the weight (or the layer kind is not Linear/Conv2d).
    """
    if module["kind"] not in ("linear", "conv2d"):
        raise ValueError(f"{config['peft_type']} adapts Linear and Conv2d layers, not {module['kind']}")
    w = np.asarray(weight, dtype=np.float64)
    flat = w.reshape(w.shape[0], -1)
    out = flat @ rotation(config, tensors, flat.shape[1]).T
    if config["peft_type"] == "BOFT":
        scale = np.asarray(tensors["boft_s"], dtype=np.float64).reshape(-1)
        if scale.size != flat.shape[0]:
            raise ValueError(f"boft_s has {scale.size} scales for {flat.shape[0]} outputs")
        out = out * scale[:, None]
    result: Array = out.reshape(w.shape)
    return result
