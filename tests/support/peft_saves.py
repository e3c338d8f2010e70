"""What PEFT itself records when it saves an adapter, for tests of both backends to compare with."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

__all__ = ["fan_in_fan_out_config", "peft_saved_config"]


def fan_in_fan_out_config(arch: str, method: str, given: bool | None) -> dict[str, Any]:
    """A new adapter's config on GPT-2's Conv1D layers or Llama's Linear ones (``fan_in_fan_out`` as ``given``)."""
    targets = {"gpt2": ["c_attn", "mlp.c_proj"], "llama": ["q_proj", "down_proj"]}[arch]
    config: dict[str, Any] = {"peft_type": method, "target_modules": targets}
    if method == "IA3":
        config["feedforward_modules"] = targets[1:]
    if given is not None:
        config["fan_in_fan_out"] = given
    return config


def peft_saved_config(model: Any, config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The adapter_config.json PEFT's ``get_peft_model`` + ``save_pretrained`` write for ``config`` on ``model``."""
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "Setting fan_in_fan_out to ..." is what is measured
        reference = get_peft_model(model, PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]](
            **{k: v for k, v in config.items() if k != "peft_type"}))
    reference.save_pretrained(folder)
    saved: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text())
    return saved
