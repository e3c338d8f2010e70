"""Keras' own LoRA (``enable_lora``, keras-hub's fine-tuning path) read as a spec adapter that PEFT loads.

``adapterspec_keras.keras_lora_adapter`` reads what ``backbone.enable_lora(rank)`` trained; the adapter, written,
loads in PEFT on the transformers checkpoint the keras-hub model came from, with PEFT's outputs equal to the Keras
model's (every Keras LoRA variable element-unique, so a transpose, a swapped head or a lost scaling shows). Keras'
LoRA on an ``EinsumDense`` with a heads axis is per head: the adapter's rank is ``heads * rank`` (asserted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import keras  # noqa: E402

import adapterspec  # noqa: E402
from adapterspec.errors import AdapterNotFoundError, TargetNotFoundError, UnsupportedError  # noqa: E402
from adapterspec_keras import keras_lora_adapter  # noqa: E402
from keras_helpers import (  # noqa: E402
    ARCHS,
    assert_near,
    assert_peft_close,
    assert_refused_unchanged,
    assert_same_snapshot,
    hf_model,
    keras_logits,
    keras_model,
    snapshot,
    torch_logits,
    unique_values,
)


def _fill_lora(model: Any, *, scale: float = 0.5) -> int:
    """Element-unique values in every Keras LoRA variable of ``model``; how many layers have one."""
    count = 0
    for salt, layer in enumerate(model._flatten_layers(include_self=False, recursive=True)):
        if getattr(layer, "lora_enabled", False):
            name = "embeddings" if hasattr(layer, "lora_embeddings_a") else "kernel"
            for i, variable in enumerate((getattr(layer, f"lora_{name}_a"), getattr(layer, f"lora_{name}_b"))):
                variable.assign(unique_values(tuple(variable.shape), 2 * salt + i, scale=scale))
            count += 1
    return count


def _peft_outputs(checkpoint: Path, folder: Path, ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """PEFT's logits with the adapter at ``folder``, after checking that PEFT holds exactly the file's adapter
    tensors; and the warnings PEFT gave."""
    import warnings

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_model(checkpoint), folder).eval()
    stored = load_file(folder / "adapter_model.safetensors")
    state = {k: v for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    assert sorted(state) == sorted(stored)
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor), key
    said = sorted({str(w.message) for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))})
    return torch_logits(model, ids), said


def _exported(model: Any, tmp_path: Path, **kwargs: Any) -> tuple[adapterspec.Adapter, Path]:
    adapter = keras_lora_adapter(model, **kwargs)
    return adapter, adapterspec.write_adapter(tmp_path / "exported", adapter.config, adapter.arrays)


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2", "gemma3_text"])
def test_backbone_enable_lora_loads_in_peft(arch: str, checkpoints: dict[str, Path], token_ids: np.ndarray,
                                            tmp_path: Path) -> None:
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    model.backbone.enable_lora(4)
    assert _fill_lora(model) == 2 * ARCHS[arch].config.get("num_hidden_layers", ARCHS[arch].config.get("n_layer"))
    expected = keras_logits(model, token_ids)
    assert float(np.abs(expected - base).max()) > 0.1  # the LoRA changes the output
    before = snapshot(model)
    adapter, folder = _exported(model, tmp_path)
    assert_same_snapshot(before, snapshot(model))  # reading it changes nothing
    config = adapter.config
    if arch == "gpt2":  # query and value are two column ranges of c_attn: 4 heads x 4 each, one module
        assert (config["target_modules"], config["r"], config["fan_in_fan_out"]) == (["c_attn"], 32, True)
    else:  # per head: 4 query heads x 4, 2 key-value heads x 4
        assert (config["target_modules"], config["r"], config["lora_alpha"]) == (["q_proj", "v_proj"], 16, 16)
        assert (dict(config["rank_pattern"]), dict(config["alpha_pattern"])) == ({"v_proj": 8}, {"v_proj": 8})
    got, said = _peft_outputs(checkpoints[arch], folder, token_ids)
    assert said == []
    assert_peft_close(got, expected, base, torch_logits(hf_model(checkpoints[arch]), token_ids))


@pytest.mark.parametrize(("arch", "names"), [
    ("llama", ["token_embedding", "feedforward_gate_dense", "feedforward_output_dense", "attention_output", "key"]),
    ("gemma", ["token_embedding", "query", "ffw_linear"]),  # tied embeddings: the logits take the LoRA too
])
def test_every_layer_kind(arch: str, names: list[str], checkpoints: dict[str, Path], token_ids: np.ndarray,
                          tmp_path: Path) -> None:
    """Dense, EinsumDense with and without heads, an untied and a tied embedding; ranks that differ by module."""
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)
    model.backbone.enable_lora(4, target_layer_names=names)
    _fill_lora(model, scale=0.2)
    expected = keras_logits(model, token_ids)
    adapter, folder = _exported(model, tmp_path)
    tied = bool(ARCHS[arch].config.get("tie_word_embeddings", True))
    assert adapter.config.get("ensure_weight_tying", False) is tied
    assert any(k.endswith("embed_tokens.lora_embedding_A") for k in adapter.tensors)
    assert any(k.endswith("lm_head.lora_A.weight") for k in adapter.tensors) is tied
    got, _ = _peft_outputs(checkpoints[arch], folder, token_ids)
    assert_peft_close(got, expected, base, torch_logits(hf_model(checkpoints[arch]), token_ids))


def _einsum_model(seed: int) -> keras.Model:
    """A model with EinsumDense kernels whose last axis is an *input* axis, one with a group of input axes."""
    inputs = keras.Input((3, 6))
    x = keras.layers.EinsumDense("btd,ed->bte", output_shape=(None, 5), name="last_in")(inputs)  # kernel (e, d)
    x = keras.layers.Reshape((3, 1, 5))(x)
    x = keras.layers.Concatenate(axis=2)([x, x])  # (b, t, n=2, h=5)
    y = keras.layers.EinsumDense("btnh,dnh->btd", output_shape=(None, 4), name="grouped")(x)  # kernel (d, n, h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(y))
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.standard_normal(tuple(variable.shape)).astype("float32") * 0.3)
    return model


def test_last_axis_an_input_axis_round_trips(tmp_path: Path) -> None:
    """Kernels whose last axis is contracted with the input: ``a`` is the B factor, ``b`` the A factor (block-diagonal
    over the leading input axes). The adapter, loaded into the same model without Keras' LoRA, gives its outputs."""
    module_map = {"last_in": "last_in", "grouped": "grouped", "head": "head"}
    native, plain = _einsum_model(0), _einsum_model(0)
    native.get_layer("last_in").enable_lora(2, lora_alpha=3)
    native.get_layer("grouped").enable_lora(2, lora_alpha=3)
    native.get_layer("head").enable_lora(1, lora_alpha=3)
    _fill_lora(native)
    x = unique_values((2, 3, 6), 99, scale=1.0)
    expected = keras.ops.convert_to_numpy(native(x))
    adapter = keras_lora_adapter(native, module_map=module_map)
    ranks = {k.split(".")[-3]: v.shape for k, v in adapter.tensors.items() if k.endswith("lora_A.weight")}
    assert ranks == {"last_in": (2, 6), "grouped": (4, 10), "head": (1, 4)}  # grouped: n=2 groups x rank 2
    assert float(adapter.config["lora_alpha"]) / adapter.config["r"] == 1.5  # Keras' scaling everywhere
    adapterspec.load_adapter(plain, adapter, module_map=module_map)
    assert_near(keras.ops.convert_to_numpy(plain(x)), expected, length=10)
    adapterspec.delete_adapter(plain, "default")
    assert float(np.abs(keras.ops.convert_to_numpy(plain(x)) - expected).max()) > 0.1


def test_lora_h5_file_reads_through_load_lora_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """keras-hub's own LoRA file (``save_lora_weights``) is read by loading it into a model first."""
    trained = keras_model("llama", checkpoints["llama"])
    trained.backbone.enable_lora(2)
    _fill_lora(trained)
    trained.backbone.save_lora_weights(str(tmp_path / "model.lora.h5"))
    fresh = keras_model("llama", checkpoints["llama"])
    fresh.backbone.load_lora_weights(str(tmp_path / "model.lora.h5"))
    one, two = keras_lora_adapter(trained), keras_lora_adapter(fresh)
    assert one.config.to_dict() == two.config.to_dict()
    assert sorted(one.arrays or {}) == sorted(two.arrays or {})
    for key, value in (one.arrays or {}).items():
        assert np.array_equal(value, (two.arrays or {})[key]), key


def test_refusals(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = keras_model("llama", checkpoints["llama"])
    with pytest.raises(TargetNotFoundError, match="enable_lora"):
        keras_lora_adapter(model)
    model.backbone.enable_lora(2)
    # an adapter on a layer with Keras' LoRA would sit on base + that delta: refused, nothing changed
    assert_refused_unchanged(model, lambda: adapterspec.inject_adapter(
        model, {"peft_type": "LORA", "target_modules": ["q_proj"], "r": 2}), UnsupportedError, "Keras' own LoRA")
    # other layers take adapters as usual
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "target_modules": ["k_proj"], "r": 2}, "other")
    adapterspec.delete_adapter(model, "other")
    with pytest.raises(AdapterNotFoundError, match="keras_lora_adapter"):
        adapterspec.save_adapter(model, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_plain_keras_model_by_layer_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model keras-hub has no converter for is named by its own layers, as adapters load into it; a Keras LoRA
    layer that no module of the mapping holds is refused (it would be lost)."""
    def model() -> keras.Model:
        inputs = keras.Input((4,))
        out = keras.Model(inputs, keras.layers.Dense(3, name="fc")(keras.layers.Dense(5, name="hidden")(inputs)))
        for i, variable in enumerate(out.weights):
            variable.assign(unique_values(tuple(variable.shape), 50 + i, scale=0.4))
        return out

    native, plain = model(), model()
    native.get_layer("fc").enable_lora(2)
    _fill_lora(native)
    x = unique_values((3, 4), 7, scale=1.0)
    adapter = keras_lora_adapter(native)
    assert (adapter.config["target_modules"], sorted(adapter.tensors)) == (
        ["fc"], ["base_model.model.fc.lora_A.weight", "base_model.model.fc.lora_B.weight"])
    adapterspec.load_adapter(plain, adapter)
    assert_near(keras.ops.convert_to_numpy(plain(x)), keras.ops.convert_to_numpy(native(x)), length=5)

    import adapterspec_keras.keras_lora as keras_lora

    monkeypatch.setattr(keras_lora, "spec_sites", lambda model, options=None: {})
    with pytest.raises(UnsupportedError, match="'fc'.*module_map"):
        keras_lora_adapter(native)


def test_mixed_scalings_in_one_module_refused(checkpoints: dict[str, Path]) -> None:
    gpt2 = keras_model("gpt2", checkpoints["gpt2"])  # query and value are one module, c_attn
    layers = {layer.name: layer for layer in gpt2.backbone._flatten_layers() if layer.name in ("query", "value")}
    assert len(layers) == 2
    gpt2.backbone.enable_lora(4)
    layers["query"].lora_alpha = 8  # scaling 2 on query, 1 on value: one module cannot hold both
    with pytest.raises(UnsupportedError, match="c_attn.*different lora_alpha"):
        keras_lora_adapter(gpt2)


def test_int4_packed_layers_are_found_by_the_converters_map(checkpoints: dict[str, Path]) -> None:
    """On an int4-quantized model (int4 packs the kernels two values a byte) the converter's map finds the LoRA
    layers all the same: the adapter equals the one read from the unquantized model with the same LoRA values,
    and the one read with an explicit module_map."""
    plain, packed = keras_model("llama", checkpoints["llama"]), keras_model("llama", checkpoints["llama"])
    packed.quantize("int4")
    for model in (plain, packed):
        model.backbone.enable_lora(4)
        _fill_lora(model)
    module_map = {f"model.layers.{i}.self_attn.{m}_proj": f"transformer_layer_{i}/self_attention/{k}"
                  for i in (0, 1) for m, k in (("q", "query"), ("v", "value"))}
    expected = keras_lora_adapter(plain)
    expected_arrays = expected.load_tensors()
    assert len(expected_arrays) == 8
    for got in (keras_lora_adapter(packed), keras_lora_adapter(packed, module_map=module_map)):
        assert dict(got.config) == dict(expected.config)
        got_arrays = got.load_tensors()
        assert sorted(got_arrays) == sorted(expected_arrays)
        assert all(np.array_equal(got_arrays[k], expected_arrays[k]) for k in expected_arrays)
