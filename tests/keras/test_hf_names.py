"""transformers 5 names vision modules otherwise than the checkpoint keys keras-hub's converters read (issue #16
item 3): an adapter naming either form loads, on the same Keras layers, with PEFT's outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec_keras.hf_names import transformers_names  # noqa: E402
from keras_helpers import assert_near, fill_adapter_weights, peft_adapted_modules  # noqa: E402

_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
               patch_size=4)
#: model_type -> (transformers task class saved for keras-hub, its base model attribute)
_MODELS = {"vit": ("ViTForImageClassification", "vit"), "deit": ("DeiTForImageClassification", "deit"),
           "dinov2": ("Dinov2ForImageClassification", "dinov2")}


def _images() -> np.ndarray:
    return (np.sin(np.arange(2 * 16 * 16 * 3, dtype=np.float64) * 0.37) * 0.8).reshape(2, 16, 16, 3).astype("float32")


def _build(model_type: str, folder: Path) -> Any:
    cls_name, base = _MODELS[model_type]
    torch.manual_seed(sum(map(ord, model_type)))
    config = transformers.AutoConfig.for_model(model_type, **_VISION)
    model = getattr(transformers, cls_name)(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def test_the_names_come_from_transformers_conversion_mapping() -> None:
    assert transformers_names("vit", ["vit.encoder.layer.0.attention.attention.query"]) == {
        "vit.encoder.layer.0.attention.attention.query": ["vit.layers.0.attention.q_proj",
                                                          "vit.encoder.layer.0.attention.attention.query"]}
    assert transformers_names("swin", ["swin.encoder.layers.0.blocks.0.intermediate.dense"]) == {
        "swin.encoder.layers.0.blocks.0.intermediate.dense": ["swin.encoder.layers.0.blocks.0.mlp.fc1",
                                                              "swin.encoder.layers.0.blocks.0.intermediate.dense"]}
    assert transformers_names("paligemma", ["language_model.model.layers.0.self_attn.q_proj"]) == {
        "language_model.model.layers.0.self_attn.q_proj": ["model.language_model.layers.0.self_attn.q_proj",
                                                           "language_model.model.layers.0.self_attn.q_proj"]}
    # a module path goes back to its checkpoint key: both forms are known whichever the converter records
    assert transformers_names("gemma3", ["model.language_model.layers.0.self_attn.q_proj"]) == {
        "model.language_model.layers.0.self_attn.q_proj": ["model.language_model.layers.0.self_attn.q_proj",
                                                           "language_model.model.layers.0.self_attn.q_proj"]}
    assert transformers_names("t5gemma2", ["encoder.layers.0.self_attn.q_proj"]) == {
        "encoder.layers.0.self_attn.q_proj": ["encoder.text_model.layers.0.self_attn.q_proj",
                                              "encoder.layers.0.self_attn.q_proj"]}
    assert transformers_names("llama", ["model.layers.0.self_attn.q_proj"]) == {}
    assert transformers_names(None, ["a.b"]) == {}


def test_a_text_part_is_named_as_auto_model_for_causal_lm_names_it() -> None:
    """A Keras model without the checkpoint's vision encoder is the class AutoModelForCausalLM gives: for Qwen3.5
    the text model alone (``model.layers.*``, the module path first), for Gemma 3 the multimodal class all the same."""
    up = "model.language_model.layers.0.mlp.up_proj"
    assert transformers_names("qwen3_5", [up], text_part=True) == {up: ["model.layers.0.mlp.up_proj", up]}
    assert transformers_names("qwen3_5_moe", [up], text_part=True) == {up: ["model.layers.0.mlp.up_proj", up]}
    assert transformers_names("qwen3_5", [up])[up][0] == up  # with its vision tower: the multimodal class
    assert transformers_names("gemma3", [up], text_part=True) == transformers_names("gemma3", [up])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("model_type", sorted(_MODELS))
@pytest.mark.parametrize("form", ["transformers5", "checkpoint"])
def test_peft_lora_on_every_linear_layer_loads_under_either_name(model_type: str, form: str, tmp_path: Path) -> None:
    import keras_hub
    from keras import ops
    from safetensors.numpy import load_file, save_file

    task_model = _build(model_type, tmp_path / "hf")
    torch_model = getattr(task_model, _MODELS[model_type][1])
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in torch_model.named_modules() if isinstance(m, torch.nn.Linear)
                     and "pooler" not in n})
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=linear))
    fill_adapter_weights(peft_model)
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    adapted = peft_adapted_modules(peft_model)
    assert any("q_proj" in m for m in adapted)  # transformers 5's name, not the checkpoint's "query"
    if form == "checkpoint":  # the same adapter as transformers 4 names it: the checkpoint keys
        file = tmp_path / "adapter" / "adapter_model.safetensors"
        base = _MODELS[model_type][1]
        back = {new.split(".", 1)[1]: old.split(".", 1)[1] for new, old in
                transformers_names(model_type, [f"{base}.{m}" for m in adapted]).values()}
        tensors = load_file(file)
        renamed = {}
        for key, value in tensors.items():
            module = next((m for m in sorted(adapted, key=len, reverse=True) if f".{m}." in key), None)
            renamed[key.replace(f".{module}.", f".{back.get(module, module)}.") if module else key] = value
        assert renamed.keys() != tensors.keys()
        save_file(renamed, file, metadata={"format": "pt"})
        adapted = {back.get(m, m) for m in adapted}
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        config["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in adapted})
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    images = _images()
    with torch.no_grad():
        expected = peft_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
        base_torch = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_expected = base_torch(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "hf"))
    base = ops.convert_to_numpy(backbone(images))
    conversion_error = float(np.abs(base - base_expected).max())

    modules = adapterspec.load_adapter(backbone, tmp_path / "adapter")

    assert set(modules) == adapted, sorted(set(modules) ^ adapted)
    actual = ops.convert_to_numpy(backbone(images))
    assert np.abs(expected - base_expected).max() > 1e-2
    # PEFT's output, up to keras-hub's own conversion error (ViT: 2.3e-3, its GELU; DeiT 2e-6; DINOv2 6e-7) ...
    assert float(np.abs(actual - expected).max()) <= 3 * conversion_error + 1e-5, (
        float(np.abs(actual - expected).max()), conversion_error)
    # ... and exactly keras-hub's conversion of PEFT's merged model
    peft_model.merge_and_unload()
    task_model.save_pretrained(tmp_path / "merged", safe_serialization=True)
    merged = ops.convert_to_numpy(keras_hub.models.Backbone.from_preset(str(tmp_path / "merged"))(images))
    assert_near(actual, merged, length=64)


def _gemma3_multimodal(folder: Path) -> Any:
    """A tiny ``Gemma3ForConditionalGeneration`` saved for keras-hub (whose converter reads the SigLIP tower under
    ``vision_tower.vision_model.``, where transformers 5 saves ``vision_tower.``)."""
    from safetensors.numpy import load_file, save_file

    config = transformers.Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=300, query_pre_attn_scalar=16,
                         sliding_window=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(3)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    file = folder / "model.safetensors"
    tensors = load_file(file)
    save_file({("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
               for k, v in tensors.items()}, file, metadata={"format": "pt"})
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_multimodal_gemma3_backbone_takes_the_multimodal_names(tmp_path: Path) -> None:
    """gemma3 and gemma3_text record as many weights (the vision encoder's too): the multimodal backbone takes the
    multimodal model type, and PEFT's adapter on the language model and the vision tower loads whole (issue #16
    item 4). Names only: keras-hub's multimodal forward is not compared here; the SigLIP pooling head, which Gemma 3
    does not use and keras-hub does not build, is left out."""
    import keras_hub
    from adapterspec_keras import converters

    model = _gemma3_multimodal(tmp_path / "hf")
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "hf"))
    sites, model_type = converters.converter_sites(backbone)
    assert model_type == "gemma3"
    assert "model.language_model.layers.0.self_attn.q_proj" in sites
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "layers.0.mlp.fc1"]))
    fill_adapter_weights(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapted = peft_adapted_modules(peft_model)
    assert {"model.language_model.layers.0.self_attn.q_proj", "model.vision_tower.encoder.layers.0.mlp.fc1"} <= adapted

    modules = adapterspec.load_adapter(backbone, tmp_path / "adapter")

    # on the backbone, the language model's modules are named without transformers' "model." root
    assert len(modules) == len(adapted) == 5
    assert all(any(m == a or a.endswith("." + m) for m in modules) for a in adapted), (sorted(modules), adapted)
