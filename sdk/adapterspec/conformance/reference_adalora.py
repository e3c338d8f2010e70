"""AdaLoRA in float64 NumPy (SPEC.md 15.4): the effective weight ``W + B @ (A * E) * scaling / (init_r + 1e-5)``.

>>> import numpy as np
>>> cfg = {"peft_type": "ADALORA", "init_r": 2, "lora_alpha": 2, "target_modules": ["l"],
...        "rank_pattern": {"l.lora_E": [True, False]}}
>>> w = adalora_weight({"kind": "linear"}, np.zeros((1, 2)), cfg, "l",
...                    {"lora_A": np.array([[1.0, 2.0]]), "lora_B": np.array([[1.0]]), "lora_E": np.array([[2.0]])})
>>> np.round(w, 4).tolist()
[[2.0, 4.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._adalora import scale, stored_rank

__all__ = ["adalora_weight"]

Array = np.ndarray


def adalora_weight(module: Mapping[str, Any], weight: Any, config: Mapping[str, Any], path: str,
                   tensors: Mapping[str, Any]) -> Array:
    """The adapted weight in the stored layout (``[in, out]`` for a GPT-2 Conv1D, reshaped for a Conv2d).

    :raises ValueError: the tensors' rank is not the module's stored rank, or they do not make the weight's size.
    """
    weight = np.asarray(weight, dtype=np.float64)
    a, b, e = (np.asarray(tensors[n], dtype=np.float64) for n in ("lora_A", "lora_B", "lora_E"))
    k = stored_rank(config, path)
    if a.ndim != 2 or b.ndim != 2 or e.shape != (k, 1) or a.shape[0] != k or b.shape[1] != k:
        raise ValueError(f"lora_A {list(a.shape)}, lora_B {list(b.shape)}, lora_E {list(e.shape)} do not have the "
                         f"module's {k} ranks")
    delta = (b @ (a * e)) * scale(config, path)
    if module["kind"] == "gpt2_conv1d":
        delta = delta.T
    if delta.size != weight.size:
        raise ValueError(f"the update [{b.shape[0]}, {a.shape[1]}] does not make a {list(weight.shape)} weight")
    out: Array = weight + delta.reshape(weight.shape)
    return out
