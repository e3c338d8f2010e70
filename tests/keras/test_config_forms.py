"""Spec 1.1 config forms on the Keras backend: a null ``target_modules`` takes PEFT's default for the
checkpoint's HF model type (the one keras-hub's converter reads), prompt sizes left out come from the
backbone -- both give PEFT's logits (SPEC.md 14)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from keras_helpers import (  # noqa: E402
    ATOL,
    hf_model,
    keras_logits,
    keras_model,
    make_peft_adapter,
    torch_logits,
    unique_values,
)


def _edit(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _peft_logits(folder: Path, adapter: Path, ids: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf_model(folder), str(adapter)).eval()
    return torch_logits(pm, ids)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("make", "changes"), [
    (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), {"target_modules": None}),
    (lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                            init_ia3_weights=False), {"target_modules": None, "feedforward_modules": ...}),
], ids=["lora", "ia3"])
def test_null_targets_give_peft_logits(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path, make: Any,
                                       changes: dict[str, Any]) -> None:
    _, folder = make_peft_adapter(checkpoints["llama"], tmp_path / "a", make())
    _edit(folder, **changes)
    expected = _peft_logits(checkpoints["llama"], folder, token_ids)
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    modules = adapterspec.load_adapter(model, folder)
    assert len(modules) == 2 * len(make().target_modules)
    assert np.abs(keras_logits(model, token_ids) - expected).max() <= ATOL
    assert np.abs(expected - base).max() > 1e-2


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_sizes_from_the_backbone_give_peft_logits(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path,
                                                         method: str) -> None:
    cls = peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig
    pm = peft.get_peft_model(hf_model(checkpoints["llama"]), cls(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        weight = pm.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.from_numpy(unique_values(tuple(weight.shape), 5, scale=1.0)))
    pm.eval()
    pm.save_pretrained(tmp_path / method)
    _edit(tmp_path / method, token_dim=..., num_layers=..., num_attention_heads=...)
    skip = 3 if method == "prompt" else 0
    expected = _peft_logits(checkpoints["llama"], tmp_path / method, token_ids)[:, skip:]
    model = keras_model("llama", checkpoints["llama"])
    assert adapterspec.load_adapter(model, tmp_path / method) == []
    assert np.abs(keras_logits(model, token_ids) - expected).max() <= ATOL
    assert np.abs(keras_logits(model, token_ids) - torch_logits(hf_model(checkpoints["llama"]), token_ids)).max() > 1e-2
