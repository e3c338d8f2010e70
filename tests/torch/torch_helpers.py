"""Helpers of the torch backend tests: element-unique values, PEFT references, snapshots, comparisons."""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tolerance import fp32_tolerance
from torch import nn

#: The reduction length of the tiny models' layers (hidden size 64; the conv nets sum fewer terms per output).
LENGTH = 64

_ADAPTER_MARKERS = ("lora_", "ia3_", "hada_", "lokr_", "prompt_encoder", "modules_to_save")


def unique_values(shape: tuple[int, ...], salt: int, *, around: float = 0.0, scale: float = 0.05) -> Any:
    """Deterministic values, different for every element and every ``salt`` (so a transpose or a swapped
    key cannot go unnoticed): ``around + scale * sin(1 + salt * 0.37 + arange * 0.731)``."""
    n = math.prod(shape)
    values = torch.sin(1.0 + salt * 0.37 + torch.arange(n, dtype=torch.float64) * 0.731)
    return (around + scale * values).reshape(shape).to(torch.float32)


def fill_adapter_weights(peft_model: nn.Module, *, salt: int = 0, scale: float = 0.05) -> None:
    """Give every adapter tensor of a PEFT model element-unique, deterministic values.

    IA3 vectors and DoRA magnitudes stay near their natural values (1, and the weight norm) so the
    model's outputs stay in a sane range.
    """
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(peft_model.named_parameters())):
            salt_i = salt + index
            if not any(m in name for m in _ADAPTER_MARKERS):
                continue
            if "ia3_l" in name:
                param.copy_(unique_values(tuple(param.shape), salt_i, around=1.0, scale=0.3))
            elif "lora_magnitude_vector" in name:
                param.copy_(param * unique_values(tuple(param.shape), salt_i, around=1.0, scale=0.2))
            elif "hada_" in name or "lokr_" in name:
                param.copy_(unique_values(tuple(param.shape), salt_i, scale=0.4))
            elif "modules_to_save" in name or "prompt_encoder" in name:
                param.copy_(unique_values(tuple(param.shape), salt_i, scale=0.5))
            else:
                param.copy_(unique_values(tuple(param.shape), salt_i, scale=scale))


def fresh(base: nn.Module) -> nn.Module:
    """An independent copy of a base model (same state dict, new objects)."""
    return copy.deepcopy(base)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed operation must leave untouched: state dict values, module objects, adapters."""
    import adapterspec

    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(name, id(module)) for name, module in model.named_modules()],
        "adapters": adapterspec.adapter_names(model),
        "active": adapterspec.active_adapters(model),
    }


def assert_same_snapshot(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def assert_close(actual: Any, expected: Any, atol: float | None = None, *, length: int = LENGTH) -> None:
    """``actual`` equals ``expected`` up to rounding: ``atol`` if given (a lower precision than fp32), else
    the fp32 bound for sums of ``length`` terms at ``expected``'s magnitude (:func:`tolerance.fp32_tolerance`)."""
    assert actual.shape == expected.shape
    if atol is None:
        atol = fp32_tolerance(expected, length)
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs difference {diff} > {atol}"


def logits(model: nn.Module, inputs: dict[str, Any]) -> Any:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else (out.last_hidden_state if hasattr(out, "last_hidden_state")
                                                       else out)


def peft_reference(base: nn.Module, config: Any, folder: Path, *, fill: Callable[[nn.Module], None] | None = None,
                   adapter_name: str = "default") -> nn.Module:
    """A PEFT model over a copy of ``base`` with element-unique adapter weights, saved to ``folder``."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh(base), config, adapter_name=adapter_name)
    (fill or fill_adapter_weights)(model)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(folder))
    return model


#: PEFT/transformers messages unrelated to the adapter (deprecations, optional CUDA kernels, BOFT's speed note)
NOISE = ("deprecated", "is_gradient_checkpointing", "CUDA extension", "boft_n_butterfly_factor to 1")


def peft_load(base: nn.Module, folder: Path, caplog: Any, *, noise: tuple[str, ...] = NOISE) -> tuple[Any, list[str]]:
    """``PeftModel.from_pretrained`` of ``folder`` over a copy of ``base`` (eval mode), and every warning or
    WARNING log line it gave (sorted, without ``noise``): what a user would see."""
    from peft import PeftModel

    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(fresh(base), str(folder)).eval()
    said = sorted({str(w.message) for w in caught} |
                  {r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING})
    return loaded, [m for m in said if not any(n in m for n in noise)]


def assert_saved_as_peft_saved(peft_folder: Path, ours: Path) -> dict[str, Any]:
    """Our folder holds PEFT's tensors, byte for byte under the same keys, and PEFT's config fields with PEFT's
    values; returns our tensors."""
    from safetensors.torch import load_file

    original = load_file(peft_folder / "adapter_model.safetensors")
    saved = load_file(ours / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    peft_config = json.loads((peft_folder / "adapter_config.json").read_text())
    ours_config = json.loads((ours / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config
    return saved


def assert_peft_loads_ours(base: nn.Module, peft_folder: Path, ours: Path, caplog: Any, inputs: dict[str, Any],
                           expected: Any, *, noise: tuple[str, ...] = NOISE) -> Any:
    """PEFT loads our folder as it loads its own (the same warnings), with our tensors exactly (nothing missing or
    unexpected) and ``expected`` outputs; returns the loaded PEFT model."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    _, said_peft = peft_load(base, peft_folder, caplog, noise=noise)
    loaded, said_ours = peft_load(base, ours, caplog, noise=noise)
    assert said_ours == said_peft
    saved = load_file(ours / "adapter_model.safetensors")
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(saved)
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key]), key
    assert_close(logits(loaded, inputs), expected)
    return loaded


def tiny_llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
