"""MiSS in float64 NumPy (SPEC.md 17.2): the weight a block/mini or bat adapter gives a Linear layer.

Block and mini add ``B[c % r, o]`` to ``W[o, c]`` (the unmerged chunk sum is the same product); bat turns every
``[r, r]`` tile into ``W[i, j] + W[i, j] @ B_i + B_i``.

>>> import numpy as np
>>> cfg = {"peft_type": "MISS", "r": 2, "target_modules": ["l"]}
>>> miss_weight({"kind": "linear"}, np.zeros((1, 3)), cfg, {"miss_block": np.array([[1.0], [2.0]])}).tolist()
[[1.0, 2.0, 1.0]]
>>> bat = cfg | {"init_weights": "bat"}
>>> miss_weight({"kind": "linear"}, np.eye(2), bat, {"miss_block": np.ones((1, 2, 2))}).tolist()
[[3.0, 2.0], [2.0, 3.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._miss import BAT, MINI, mini_r, mode

__all__ = ["miss_weight"]

Array = np.ndarray


def miss_weight(module: Mapping[str, Any], weight: Any, config: Mapping[str, Any], tensors: Mapping[str, Any]) -> Array:
    """The adapted ``[out, in]`` weight of a Linear layer.

    :raises ValueError: not a Linear layer, or a block that does not fit it.
    """
    weight = np.asarray(weight, dtype=np.float64)
    block = np.asarray(tensors["miss_block"], dtype=np.float64)
    out_f, in_f = weight.shape
    if module["kind"] != "linear":
        raise ValueError(f"MiSS adapts Linear layers only, not {module['kind']}")
    if mode(config) == BAT:
        r = block.shape[-1]
        if block.shape != (out_f // r, r, r) or in_f % r or out_f % r:
            raise ValueError(f"a bat miss_block {list(block.shape)} does not fit a {out_f}x{in_f} weight")
        tiles = weight.reshape(out_f // r, r, in_f // r, r).transpose(2, 0, 1, 3)  # [in/r, out/r, r, r]
        delta = (tiles @ block + block).transpose(1, 2, 0, 3).reshape(out_f, in_f)
        out: Array = weight + delta
        return out
    if mode(config) == MINI:
        if block.ndim != 2 or out_f % mini_r(config) or block.shape[1] != mini_r(config):
            raise ValueError(f"a mini miss_block {list(block.shape)} does not fit {out_f} outputs")
        block = np.tile(block, (1, out_f // mini_r(config)))
    r = block.shape[0]
    if block.shape != (r, out_f):
        raise ValueError(f"miss_block {list(block.shape)} does not fit {out_f} outputs")
    out = weight + np.tile(block.T, (1, -(-in_f // r)))[:, :in_f]
    return out
