"""Adapters injected into a keras-hub model and trained with ``fit`` save as folders PEFT loads, and PEFT then
gives Keras' logits (fp32, 1e-5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import keras  # noqa: E402

import adapterspec  # noqa: E402
from keras_helpers import assert_near, hf_model, keras_inputs, keras_logits, keras_model, torch_logits  # noqa: E402


def _peft_logits(folder: Path, adapter: Path, ids: np.ndarray) -> np.ndarray:
    return torch_logits(peft.PeftModel.from_pretrained(hf_model(folder), adapter).eval(), ids)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_trains_only_the_adapter_and_peft_loads_the_result(checkpoints: Any, token_ids: np.ndarray,
                                                              tmp_path: Path) -> None:
    model = keras_model("llama", checkpoints["llama"])
    base_values = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.variables}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    modules = adapterspec.inject_adapter(model, config)
    assert len(modules) == 14

    adapter_vars = [v for v in model.variables if v.path not in base_values and "lora_" in v.path]
    # 28 tensors (A and B of 14 modules), packed by shape: 5 variables [count, ...]
    assert sum(int(np.prod(v.shape[:1])) for v in adapter_vars) == 28
    per_layer = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 128), "up": (64, 128),
                 "down": (128, 64)}  # (in, out): A is [r, in], B [out, r]
    assert sum(int(np.prod(v.shape)) for v in adapter_vars) == 2 * sum(4 * (i + o) for i, o in per_layer.values())
    assert {id(v) for v in model.trainable_variables} == {id(v) for v in adapter_vars}  # only the adapter trains

    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    history = model.fit(keras_inputs(token_ids), np.roll(token_ids, -1, axis=1), epochs=3, batch_size=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for v in model.variables:
        if v.path in base_values:
            assert np.array_equal(keras.ops.convert_to_numpy(v), base_values[v.path]), v.path
    b = [v for v in model.trainable_variables if "lora_B" in v.path]
    assert all(np.abs(keras.ops.convert_to_numpy(v)).max() > 0 for v in b)  # B left its zero init

    saved = adapterspec.save_adapter(model, tmp_path / "keras-lora")
    got = keras_logits(model, token_ids)
    expected = _peft_logits(checkpoints["llama"], saved, token_ids)
    assert_near(got, expected)
    with adapterspec.disabled_adapters(model):
        assert np.abs(got - keras_logits(model, token_ids)).max() > 1e-3

    adapterspec.delete_adapter(model, "default")  # the base model's trainability comes back
    assert {id(v) for v in model.trainable_variables} == {id(v) for v in model.variables if v.trainable}
    assert len(model.trainable_variables) == len(base_values)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ["gpt2-lora", "gemma-dora", "llama-ia3"])
def test_adapter_made_in_keras_gives_keras_logits_in_peft(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                         tmp_path: Path) -> None:
    """Random (non-zero) initialisation stands in for training; GPT-2's three q/k/v layers save as one c_attn."""
    arch = case.split("-")[0]
    config = {
        "gpt2-lora": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": False,
                      "target_modules": ["c_attn", "c_proj", "c_fc", "lm_head"]},
        "gemma-dora": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": False, "use_dora": True,
                       "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]},
        "llama-ia3": {"peft_type": "IA3", "init_ia3_weights": False, "target_modules": ["k_proj", "v_proj", "down_proj"],
                      "feedforward_modules": ["down_proj"]},
    }[case]
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    adapterspec.inject_adapter(model, config)
    got = keras_logits(model, token_ids)
    assert np.abs(got - base).max() > 1e-3
    saved = adapterspec.save_adapter(model, tmp_path / case)
    assert_near(got, _peft_logits(checkpoints[arch], saved, token_ids))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("arch", "method", "given"), [("gpt2", "LORA", None), ("gpt2", "IA3", None),
                                                       ("llama", "LORA", True)])
def test_new_adapter_records_peft_s_fan_in_fan_out(arch: str, method: str, given: Any, checkpoints: Any,
                                                   tmp_path: Path) -> None:
    """As on torch: a new adapter records the fan_in_fan_out PEFT's get_peft_model saves for these layers (true on
    GPT-2's Conv1D, false on a Linear), so PEFT loads the folder without "Setting fan_in_fan_out to True"."""
    import json
    import warnings

    import peft
    from peft_saves import fan_in_fan_out_config, peft_saved_config

    config = fan_in_fan_out_config(arch, method, given)
    theirs = peft_saved_config(hf_model(checkpoints[arch]), config, tmp_path / "peft")["fan_in_fan_out"]
    model = keras_model(arch, checkpoints[arch])
    adapterspec.inject_adapter(model, config, trainable=False)
    saved = adapterspec.save_adapter(model, tmp_path / "keras")
    assert json.loads((saved / "adapter_config.json").read_text())["fan_in_fan_out"] == theirs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(hf_model(checkpoints[arch]), str(saved))
    assert [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)] == []
