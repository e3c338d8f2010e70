"""A load or injection that fails leaves the model exactly as it was (variables, layers, calls, adapters), and
the error names the module or key. Targets without a Keras counterpart are errors, never skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterspec
from keras_helpers import assert_same_snapshot, keras_logits, keras_model, snapshot

pytest.importorskip("torch")
pytest.importorskip("transformers")

LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "init_lora_weights": False,
        "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture()
def llama_with_adapter(checkpoints: Any) -> Any:
    """The tiny Llama in keras-hub with an active LoRA "fr" already loaded."""
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA, "fr")
    return model


def _valid_tensors(checkpoints: Any) -> dict[str, np.ndarray]:
    donor = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(donor, LORA, "x")
    return dict(adapterspec.extract_adapter(donor, "x").load_tensors("numpy"))


def _fails(model: Any, error: type[Exception], match: str, call: Any, token_ids: np.ndarray) -> None:
    before = snapshot(model)
    logits = keras_logits(model, token_ids)
    with pytest.raises(error, match=match):
        call()
    assert_same_snapshot(before, snapshot(model))
    assert np.array_equal(keras_logits(model, token_ids), logits)


def test_shape_mismatch_rolls_back(llama_with_adapter: Any, checkpoints: Any, token_ids: np.ndarray,
                                   tmp_path: Path) -> None:
    tensors = _valid_tensors(checkpoints)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    tensors[key] = np.zeros((2, 129), np.float32)  # down_proj takes 128 inputs
    folder = adapterspec.write_adapter(tmp_path / "bad", LORA, tensors)
    _fails(llama_with_adapter, adapterspec.ShapeMismatchError, "down_proj",
           lambda: adapterspec.load_adapter(llama_with_adapter, folder, "de"), token_ids)


def _merged_flags(model: Any) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The model's merged adapters, and each adapted module's."""
    from adapterspec_keras.switch import get_state

    state = get_state(model)
    assert state is not None
    return list(state.merged), sorted((layer.site.path, layer.merged) for layer in state.adapter_layers.values())


@pytest.mark.parametrize("activate", [True, False], ids=["activate", "inactive"])
def test_shape_mismatch_keeps_a_merged_adapter_merged(llama_with_adapter: Any, checkpoints: Any, token_ids: np.ndarray,
                                                      tmp_path: Path, activate: bool) -> None:
    """The rollback restored the active set with set_active, which unmerges first: "fr" came out unmerged (its delta
    taken out of the kernels), silently. Now every variable is the same to the bit, "fr" merged, the logits equal."""
    model = llama_with_adapter
    adapterspec.merge_adapters(model)
    tensors = _valid_tensors(checkpoints)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    tensors[key] = np.zeros((2, 129), np.float32)  # down_proj takes 128 inputs
    folder = adapterspec.write_adapter(tmp_path / "bad", LORA, tensors)
    flags = _merged_flags(model)
    assert flags[0] == ["fr"] and all(merged == ["fr"] for _, merged in flags[1])
    _fails(model, adapterspec.ShapeMismatchError, "down_proj",
           lambda: adapterspec.load_adapter(model, folder, "de", activate=activate), token_ids)
    assert _merged_flags(model) == flags


def test_module_missing_from_the_keras_model_rolls_back(llama_with_adapter: Any, checkpoints: Any,
                                                        token_ids: np.ndarray, tmp_path: Path) -> None:
    tensors = _valid_tensors(checkpoints)
    for param, shape in (("lora_A.weight", (2, 64)), ("lora_B.weight", (64, 2))):
        tensors[f"base_model.model.model.layers.7.self_attn.q_proj.{param}"] = np.ones(shape, np.float32)
    folder = adapterspec.write_adapter(tmp_path / "layer7", LORA, tensors)
    _fails(llama_with_adapter, adapterspec.TargetNotFoundError, r"layers\.7\.self_attn\.q_proj",
           lambda: adapterspec.load_adapter(llama_with_adapter, folder, "de", trainable=True), token_ids)


def test_unmapped_target_is_an_error_naming_it(llama_with_adapter: Any, token_ids: np.ndarray) -> None:
    config = dict(LORA, target_modules=["q_proj", "rotary_emb"])
    _fails(llama_with_adapter, adapterspec.TargetNotFoundError, "rotary_emb",
           lambda: adapterspec.inject_adapter(llama_with_adapter, config, "de"), token_ids)
    _fails(llama_with_adapter, adapterspec.TargetNotFoundError,  # named by its field (it was "<the regex>: ...")
           r"^/target_modules: no module of this Llama3CausalLM matches target_modules='\.\*nothing'",
           lambda: adapterspec.inject_adapter(llama_with_adapter, dict(LORA, target_modules=".*nothing"), "de"),
           token_ids)


@pytest.mark.parametrize("config, error, match", [
    ({"peft_type": "IA3", "target_modules": ["embed_tokens"], "feedforward_modules": []},
     adapterspec.UnsupportedError, "embed_tokens"),
    ({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
     adapterspec.UnsupportedError, "modules_to_save"),
    ({"peft_type": "LOHA", "r": 2, "alpha": 2, "target_modules": ["embed_tokens"]}, adapterspec.UnsupportedError, "LOHA"),
    ({"peft_type": "OFT", "r": 0, "oft_block_size": 8, "target_modules": ["q_proj", "embed_tokens"]},
     adapterspec.UnsupportedError, "only Dense/EinsumDense and 2-D convolution layers with OFT"),
    ({"peft_type": "BOFT", "boft_block_size": 7, "target_modules": ["q_proj"]}, adapterspec.UnsupportedError,
     "boft_block_size=7 does not divide the 64 input features"),
    ({"peft_type": "ADALORA", "init_r": 2, "total_step": 10, "target_modules": ["embed_tokens"]},
     adapterspec.UnsupportedError, "Dense/EinsumDense and ungrouped 2-D convolution layers with ADALORA"),
    ({"peft_type": "ADALORA", "init_r": 2, "total_step": 10, "target_modules": ["q_proj"], "bias": "all"},
     adapterspec.UnsupportedError, "/bias"),
    ({"peft_type": "VERA", "r": 2, "target_modules": ["embed_tokens"]},
     adapterspec.UnsupportedError, "Dense/EinsumDense layers with VERA"),
    ({"peft_type": "VERA", "r": 2, "target_modules": ["q_proj"], "save_projection": False},
     adapterspec.UnsupportedError, "/save_projection"),
    ({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "layer_replication": [[0, 2]]},
     adapterspec.UnsupportedError, "layer_replication"),
    ({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "target_parameters": ["o_proj.weight"]},
     adapterspec.UnsupportedError, "/target_parameters: .*on a llama model: the Keras backend maps LoRA on parameters only"),
    ({"peft_type": "TRAINABLE_TOKENS", "token_indices": [3, 500]},
     adapterspec.ShapeMismatchError, "trainable_tokens_delta: token_indices \\[500\\] are outside"),
    ({"peft_type": "TRAINABLE_TOKENS", "token_indices": [3, 3]}, adapterspec.UnsupportedError, "/token_indices"),
    ({"peft_type": "ROAD", "variant": "road_2", "group_size": 8, "target_modules": ["q_proj", "embed_tokens"]},
     adapterspec.UnsupportedError, "Dense/EinsumDense layers of a linear module with RoAd"),
    ({"peft_type": "LN_TUNING", "target_modules": ["input_layernorm"]},
     adapterspec.UnsupportedError, "/peft_type: the keras backend cannot train LN tuning copies"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "num_layers": 2, "token_dim": 32,
      "num_attention_heads": 4, "task_type": "CAUSAL_LM"}, adapterspec.UnsupportedError, "hidden size 64"),
    # (a prefix giving the hidden size and the query heads of this grouped-query Llama is not refused: PEFT
    # recomputes both from the key/value heads, SPEC 14.3; tests/keras/test_prefix_tuning.py checks it against PEFT)
])
def test_unsupported_adapters_are_refused_before_any_change(llama_with_adapter: Any, token_ids: np.ndarray,
                                                            config: dict[str, Any], error: type[Exception],
                                                            match: str) -> None:
    _fails(llama_with_adapter, error, match, lambda: adapterspec.inject_adapter(llama_with_adapter, config, "de"),
           token_ids)


def test_module_map_to_a_missing_layer_is_an_error(llama_with_adapter: Any, token_ids: np.ndarray) -> None:
    _fails(llama_with_adapter, adapterspec.TargetNotFoundError, "no_such_layer",
           lambda: adapterspec.inject_adapter(llama_with_adapter, dict(LORA, target_modules=["extra"]), "de",
                                              module_map={"extra": "no_such_layer"}), token_ids)
