"""Prefix tuning on keras-hub causal LMs through the decoders' key/value cache: PEFT's logits (with padding),
training in Keras and loading the result in PEFT, and clear refusals where it cannot run exactly."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import keras  # noqa: E402

import adapterspec  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    assert_same_snapshot,
    hf_model,
    keras_inputs,
    keras_logits,
    keras_model,
    snapshot,
    torch_logits,
    unique_values,
)


def _peft_prefix(folder: Path, out: Path, salt: int, **extra: Any) -> Any:
    pm = peft.get_peft_model(hf_model(folder), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                        **extra))
    with torch.no_grad():
        weight = pm.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.from_numpy(unique_values(tuple(weight.shape), salt, scale=1.0)))
    pm.eval()
    pm.save_pretrained(out)
    return pm


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("projection", [False, True], ids=["", "prefix_projection"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_prefix_gives_peft_logits(arch: str, projection: bool, checkpoints: Any, token_ids: np.ndarray,
                                       tmp_path: Path) -> None:
    """``prefix_projection``: PEFT saves its projection MLP's output (SPEC.md 4.1.4), which runs like any prefix (it
    was refused, the message saying PEFT saved the MLP's input)."""
    extra = {"prefix_projection": True, "encoder_hidden_size": 16} if projection else {}
    pm = _peft_prefix(checkpoints[arch], tmp_path / "prefix", salt=3, **extra)
    padding = np.ones_like(token_ids)
    padding[1, :2] = 0  # left padding on the second row
    with torch.no_grad():
        expected = pm(input_ids=torch.from_numpy(token_ids), attention_mask=torch.from_numpy(padding)).logits.numpy()
    model = keras_model(arch, checkpoints[arch])
    before = snapshot(model)
    base = keras_logits(model, token_ids)

    assert adapterspec.load_adapter(model, tmp_path / "prefix") == []
    got = keras.ops.convert_to_numpy(model({"token_ids": token_ids, "padding_mask": padding}))
    valid = padding.astype(bool)
    assert_near(got, expected, mask=valid)
    assert_near(keras_logits(model, token_ids), torch_logits(pm, token_ids))
    assert np.abs(keras_logits(model, token_ids) - base).max() > 1e-2

    adapterspec.delete_adapter(model, "default")
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prefix_sizes_the_config_gives_are_recomputed_on_a_gqa_model(checkpoints: Any, token_ids: np.ndarray,
                                                                    tmp_path: Path) -> None:
    """PEFT's method_comparison prefixtuning/llama-3.2-3B-* configs give token_dim = the hidden size and
    num_attention_heads = the attention heads of a grouped-query model; PEFT recomputes both from its key/value
    heads (SPEC.md 14.3) and loads the folder. It was refused: check 12 on the config's sizes ("shape [3, 128]
    disagrees with the config ... [3, 256]"), then "token_dim 64 is not key/value heads x head_dim"."""
    import json

    from safetensors.numpy import load_file, save_file

    _peft_prefix(checkpoints["llama"], tmp_path / "prefix", salt=5)
    path = tmp_path / "prefix" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "token_dim": 64, "num_attention_heads": 4}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch_logits(peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]), tmp_path / "prefix")
                                .eval(), token_ids)
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)
    assert adapterspec.load_adapter(model, tmp_path / "prefix") == []
    assert_near(keras_logits(model, token_ids), expected)
    assert np.abs(expected - base).max() > 1e-2

    # laid out with the config's sizes, [3, 2 * 2 * 64]: not this model's prefix (PEFT refuses it too)
    tensor = load_file(tmp_path / "prefix" / "adapter_model.safetensors")["prompt_embeddings"]
    save_file({"prompt_embeddings": np.concatenate([tensor, tensor], axis=1)},
              tmp_path / "prefix" / "adapter_model.safetensors")
    other = keras_model("llama", checkpoints["llama"])
    before = snapshot(other)
    with pytest.raises(adapterspec.ShapeMismatchError) as info:
        adapterspec.load_adapter(other, tmp_path / "prefix")
    assert info.value.key == "prompt_embeddings" and "[3, 128]" in info.value.message
    assert_same_snapshot(before, snapshot(other))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_fresh_prefix_with_init_weights_zero_starts_at_zero_as_in_peft(checkpoints: Any, token_ids: np.ndarray,
                                                                       tmp_path: Path) -> None:
    """PEFT starts the prefix at zero for exactly init_weights "zero" (it started at random here)."""
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "init_weights": "zero"}
    reference = peft.get_peft_model(hf_model(checkpoints["llama"]), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero")).eval()
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, config)
    prompt = adapterspec.extract_adapter(model).load_tensors("numpy")["prompt_embeddings"]
    assert prompt.shape == (3, 2 * 2 * 32) and not prompt.any()
    assert_near(keras_logits(model, token_ids), torch_logits(reference, token_ids))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prefix_trained_with_fit_loads_in_peft(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    model = keras_model("llama", checkpoints["llama"])
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "num_layers": 2,
              "token_dim": 32, "num_attention_heads": 2}
    adapterspec.inject_adapter(model, config, trainable=True)
    assert [v.path.rsplit("/", 1)[-1] for v in model.trainable_variables] == ["prompt_embeddings_0"]
    start = keras.ops.convert_to_numpy(model.trainable_variables[0]).copy()
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    model.fit(keras_inputs(token_ids), np.roll(token_ids, -1, axis=1), epochs=2, batch_size=2, verbose=0)
    assert np.abs(keras.ops.convert_to_numpy(model.trainable_variables[0]) - start).max() > 0  # it trained

    saved = adapterspec.save_adapter(model, tmp_path / "keras-prefix")
    reloaded = peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]), saved).eval()
    assert_near(keras_logits(model, token_ids), torch_logits(reloaded, token_ids))


def test_prefix_tuning_is_refused_where_it_cannot_be_exact(checkpoints: Any) -> None:
    import keras_hub

    backbone = keras_hub.models.Phi3Backbone(vocabulary_size=32, num_layers=2, hidden_dim=16, intermediate_dim=32,
                                             num_query_heads=2, num_key_value_heads=2)
    model = keras_hub.models.Phi3CausalLM(backbone=backbone, preprocessor=None)  # attention_cache: no interface
    before = snapshot(model)
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2, "num_layers": 2,
              "token_dim": 16, "num_attention_heads": 2}
    with pytest.raises(adapterspec.UnsupportedError, match="Phi3Decoder"):
        adapterspec.inject_adapter(model, config)
    with pytest.raises(adapterspec.UnsupportedError, match="fresh PREFIX_TUNING adapter with prefix_projection"):
        adapterspec.inject_adapter(keras_model("llama", checkpoints["llama"]),
                                   dict(config, token_dim=32, prefix_projection=True))
    assert_same_snapshot(before, snapshot(model))
