"""VB-LoRA in float64 NumPy (SPEC.md 17.4): ``W + B @ A``, A and B mixed from the shared bank by top-k logits.

A module's tensors here include the adapter's shared ``vblora_vector_bank`` (``[N, L]``). The logits are stored, or
rebuilt from ``_topk_indices`` / ``_topk_weights`` as PEFT's loader does.

>>> import numpy as np
>>> t = {"vblora_vector_bank": np.array([[1.0], [2.0], [4.0]]),
...      "vblora_logits_A": np.log(np.array([[[0.5, 0.5, 0.0]]])), "vblora_logits_B": np.array([[[0.0, 0.0, 9.0]]])}
>>> vblora_weight({"kind": "linear"}, np.zeros((1, 1)), {"r": 1, "topk": 2}, t).round(3).tolist()
[[5.999]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["vblora_weight"]

Array = np.ndarray


def _logits(tensors: Mapping[str, Any], name: str, num_vectors: int) -> Array:
    if name in tensors:
        return np.asarray(tensors[name], dtype=np.float64)
    weights = np.asarray(tensors[name + "_topk_weights"], dtype=np.float32)  # PEFT: float32 (SPEC.md 17.4)
    indices = np.asarray(tensors[name + "_topk_indices"]).astype(np.int64)
    if indices.min(initial=0) < 0 or indices.max(initial=0) >= num_vectors:
        raise ValueError(f"{name}_topk_indices: an index is outside the bank's {num_vectors} vectors")
    weights = np.concatenate([weights, np.float32(1) - weights.sum(-1, keepdims=True, dtype=np.float32)], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logits = np.log(weights).astype(np.float64)
    dense = np.full((*logits.shape[:-1], num_vectors), -np.inf)
    np.put_along_axis(dense, indices, logits, axis=-1)
    return dense


def _mix(logits: Array, bank: Array, topk: int) -> Array:
    """Softmax of the ``topk`` largest logits mixing their vectors: ``[..., N]`` -> ``[..., L]``."""
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :topk]
    top = np.take_along_axis(logits, order, axis=-1)
    weights = np.exp(top - top.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    out: Array = (weights[..., None] * bank[order]).sum(-2)
    return out


def vblora_weight(module: Mapping[str, Any], weight: Any, config: Mapping[str, Any], tensors: Mapping[str, Any]) -> Array:
    """The adapted weight in the stored layout (``[in, out]`` for a GPT-2 Conv1D).

    :raises ValueError: the tensors do not make a ``[out, in]`` update, or an index is outside the bank.
    """
    weight = np.asarray(weight, dtype=np.float64)
    out_f, in_f = weight.shape[::-1] if module["kind"] == "gpt2_conv1d" else weight.shape
    bank = np.asarray(tensors["vblora_vector_bank"], dtype=np.float64)
    topk = int(config.get("topk") or 2)
    logits_a = _logits(tensors, "vblora_logits_A", bank.shape[0])
    logits_b = _logits(tensors, "vblora_logits_B", bank.shape[0])
    a = _mix(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    b = _mix(logits_b, bank, topk).transpose(0, 2, 1).reshape(-1, logits_b.shape[1])
    if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
        raise ValueError(f"A {list(a.shape)} and B {list(b.shape)} do not fit a layer of {in_f} inputs and {out_f} "
                         "outputs")
    delta = b @ a
    out: Array = weight + (delta.T if module["kind"] == "gpt2_conv1d" else delta)
    return out
