"""Deliberately broken implementations of the spec, for the tests (the runner must catch each one)."""

from __future__ import annotations

__all__ = ["AcceptsTruncatedFiles", "AllUnsupported", "IgnoresAlpha", "TransposesLoraB"]

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapterspec.conformance import FolderCase
from adapterspec.conformance.reference_impl import ReferenceImplementation


class TransposesLoraB(ReferenceImplementation):
    """Reads lora_B as if it were stored [r, out] (a layout mix-up; the shape still fits)."""

    name = "transposes-lora-b"

    def tensors(self, adapter: Any) -> dict[str, np.ndarray]:
        arrays = super().tensors(adapter)
        for key, value in arrays.items():
            if key.endswith(("lora_B.weight", "lora_embedding_B")):
                flat = value.reshape(value.shape[0], -1)
                arrays[key] = flat.reshape(flat.shape[1], flat.shape[0]).T.reshape(value.shape)
        return arrays


class IgnoresAlpha(ReferenceImplementation):
    """Scales every update by 1: lora_alpha / alpha (and their patterns, and rsLoRA) are ignored."""

    name = "ignores-alpha"

    def config(self, adapter: Any) -> Mapping[str, Any]:
        config = dict(adapter.config)
        config["alpha_pattern"] = dict(config.get("rank_pattern") or {})
        if config["peft_type"] == "ADALORA":  # scale 1: lora_alpha = ranknum = init_r (SPEC.md 15.4)
            config["lora_alpha"] = config.get("init_r", 12)
        elif config["peft_type"] != "VERA":  # VeRA has no alpha
            config["lora_alpha" if config["peft_type"] == "LORA" else "alpha"] = config.get("r", 8)
        config["use_rslora"] = False
        return config


class AcceptsTruncatedFiles(ReferenceImplementation):
    """Reads the safetensors header without checking that the data is all there."""

    name = "accepts-truncated"

    def load_folder(self, case: FolderCase, path: Path) -> None:
        from adapterspec import AdapterConfig

        weights = path / "adapter_model.safetensors"
        if weights.exists() and not case.multi:
            blob = weights.read_bytes()
            n = int.from_bytes(blob[:8], "little")
            try:
                header = json.loads(blob[8 : 8 + n])
            except ValueError:  # a truncated header: the full reader refuses it properly
                return super().load_folder(case, path)
            data = len(blob) - 8 - n
            if any(e["data_offsets"][1] > data for k, e in header.items() if k != "__metadata__"):
                AdapterConfig.from_file(path / "adapter_config.json")
                return  # "good enough": the names and shapes are there
        super().load_folder(case, path)




class AllUnsupported:
    """Claims nothing: every case UNSUPPORTED (an implementation that would pass by doing nothing)."""

    name = "all-unsupported"

    def supports(self, case: Any) -> bool | str:
        return "not implemented"
