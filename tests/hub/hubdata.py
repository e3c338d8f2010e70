"""Data the Hub tests share: the test server's token and tiny LoRA adapters with element-unique values."""

from __future__ import annotations

import numpy as np

__all__ = ["TOKEN", "lora_config", "lora_tensors"]

TOKEN = "hf_test_write_token"


def lora_tensors(offset: float = 0.0, r: int = 2) -> dict[str, np.ndarray]:
    """A tiny LoRA's tensors with element-unique values (``offset`` makes two adapters differ everywhere)."""
    a = np.arange(r * 8, dtype=np.float32).reshape(r, 8) / (r * 8) + offset
    b = np.sin(np.arange(6 * r, dtype=np.float32).reshape(6, r)) + offset
    return {"base_model.model.layers.0.q_proj.lora_A.weight": a, "base_model.model.layers.0.q_proj.lora_B.weight": b}


def lora_config(r: int = 2, **extra: object) -> dict[str, object]:
    """The config of :func:`lora_tensors`' adapter (alpha 2r on ``q_proj``), with ``extra`` fields."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"],
            "base_model_name_or_path": "tiny-org/tiny-llama", **extra}
