"""Training with the torch backend: a frozen base, PEFT's dtype policy, base identity, adapter-only checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch_helpers import fresh

import adapterspec

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _trainable(model: torch.nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def _peft_trainable(base: torch.nn.Module, config: dict[str, Any]) -> int:
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    fields = {k: v for k, v in config.items() if k != "peft_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(fresh(base), PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]](**fields))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return int(trainable)


@pytest.mark.parametrize("config", [
    pytest.param(LORA, id="lora"),
    pytest.param({**LORA, "modules_to_save": ["lm_head"]}, id="modules_to_save"),
    pytest.param({**LORA, "trainable_token_indices": [3, 7, 1]}, id="trainable_tokens"),
    pytest.param({**LORA, "use_dora": True, "bias": "lora_only"}, id="dora_bias"),
    pytest.param({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
                 id="ia3"),
    pytest.param({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "task_type": "CAUSAL_LM",
                  "token_dim": 64, "num_layers": 2, "num_attention_heads": 4}, id="prompt"),
])
def test_inject_trains_exactly_what_get_peft_model_trains(llama: Any, config: dict[str, Any]) -> None:
    model = fresh(llama)
    total = sum(p.numel() for p in model.parameters())
    assert sum(_trainable(model).values()) == total  # a fresh transformers model trains everything
    adapterspec.inject_adapter(model, config)
    trainable = _trainable(model)
    assert sum(trainable.values()) == _peft_trainable(llama, config)
    assert 0 < sum(trainable.values()) < total // 4
    assert not [name for name in trainable if "base_layer" in name or "original_module" in name]
    adapterspec.delete_adapter(model, "default")
    assert sum(_trainable(model).values()) == total  # the base's flags come back with the last adapter


def test_freeze_base_false_keeps_the_base_trainable(llama: Any) -> None:
    model = fresh(llama)
    model.model.embed_tokens.weight.requires_grad_(False)  # a user's own choice, kept
    adapterspec.inject_adapter(model, LORA, freeze_base=False)
    trainable = _trainable(model)
    assert "model.embed_tokens.weight" not in trainable
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in trainable
    assert sum(1 for n in trainable if ".lora_" in n or "adapter_weights" in n) == 8


def test_frozen_flags_restored_only_after_the_last_trainable_adapter(llama: Any) -> None:
    model = fresh(llama)
    model.model.norm.weight.requires_grad_(False)
    adapterspec.inject_adapter(model, LORA, "a")
    adapterspec.inject_adapter(model, {**LORA, "target_modules": ["k_proj"]}, "b")
    trainable = _trainable(model)
    assert {n.split(".adapter_weights.")[1].split(".")[0] for n in trainable} == {"a", "b"}  # a stays trainable
    adapterspec.delete_adapter(model, "a")
    assert not [n for n in _trainable(model) if "adapter_weights" not in n]
    adapterspec.delete_adapter(model, "b")
    trainable = _trainable(model)
    assert "model.norm.weight" not in trainable and len(trainable) == len(list(model.parameters())) - 1


def test_load_trainable_freezes_the_base(llama: Any, tmp_path: Path) -> None:
    model = fresh(llama)
    adapterspec.inject_adapter(model, LORA)
    adapterspec.save_adapter(model, tmp_path / "a")
    other = fresh(llama)
    adapterspec.load_adapter(other, tmp_path / "a", trainable=True)
    assert sorted(_trainable(other)) == sorted(_trainable(model))
    assert len(_trainable(other)) == 8 and all("adapter_weights" in n for n in _trainable(other))
    plain = fresh(llama)
    adapterspec.load_adapter(plain, tmp_path / "a")
    assert all(".lora_" not in n and "adapter_weights" not in n for n in _trainable(plain))
