"""keras-hub's converters replay on every backbone they built, or the load fails naming the converter and the
cause (issue #16: a failed replay fell back to Keras layer names, so adapters ended in TargetNotFoundError)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from adapterspec_keras import converters  # noqa: E402
from keras_helpers import (  # noqa: E402
    assert_near,
    build_encoder_checkpoint,
    fill_adapter_weights,
    make_peft_adapter,
    peft_adapted_modules,
    save_for_keras_hub,
)

_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_converter_that_raises_is_a_typed_error_naming_it(checkpoints: Any, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    import keras_hub
    from keras_hub.src.utils.transformers import convert_llama3

    backbone = keras_hub.models.Backbone.from_preset(str(checkpoints["llama"]))
    _, adapter = make_peft_adapter(checkpoints["llama"], tmp_path / "a", peft.LoraConfig(target_modules=["q_proj"]))

    def broken(backbone: Any, loader: Any, config: Any) -> None:
        raise RuntimeError("the converter broke here")

    monkeypatch.setattr(convert_llama3, "convert_weights", broken)
    with pytest.raises(UnsupportedError) as caught:
        converters.converter_sites(backbone)
    assert "convert_llama3" in str(caught.value) and "RuntimeError: the converter broke here" in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(UnsupportedError, match="convert_llama3"):
        adapterspec.load_adapter(backbone, adapter)
    assert adapterspec.adapter_names(backbone) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("model_type", ["xlm-roberta", "esm"])
def test_peft_lora_on_every_linear_layer_loads_and_gives_the_merged_models_outputs(
        model_type: str, token_ids: np.ndarray, tmp_path: Path) -> None:
    """XLM-RoBERTa's converter adds a variable to a read tensor; ESM's reads ``position_embedding_type``, which
    the backbone holds under its own name: both replay, every linear layer takes PEFT's adapter, and the output is
    that of keras-hub's conversion of PEFT's merged model (keras-hub's own ESM conversion is not transformers'
    model, and its XLM-RoBERTa differs from it by 7e-5, so the merged model is the reference)."""
    import keras_hub
    from keras import ops
    from transformers import AutoModel

    folder = build_encoder_checkpoint(model_type, tmp_path / "hf")
    peft_model = peft.get_peft_model(AutoModel.from_pretrained(folder).eval(),
                                     peft.LoraConfig(r=4, lora_alpha=8, target_modules=_LINEAR))
    fill_adapter_weights(peft_model)
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    adapted = peft_adapted_modules(peft_model)
    save_for_keras_hub(peft_model.merge_and_unload(), tmp_path / "merged")
    backbone = keras_hub.models.Backbone.from_preset(str(folder))
    inputs = {k: v for k, v in {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}.items()
              if k in backbone.input}  # keras-hub's ESM takes token_ids alone (and gives zeros when also given a mask)
    expected = ops.convert_to_numpy(keras_hub.models.Backbone.from_preset(str(tmp_path / "merged"))(inputs))
    base = ops.convert_to_numpy(backbone(inputs))

    modules = adapterspec.load_adapter(backbone, tmp_path / "adapter")

    assert set(modules) == adapted and len(adapted) == 12
    assert_near(ops.convert_to_numpy(backbone(inputs)), expected)
    assert np.abs(expected - base).max() > 1e-2


def _blip2(folder: Path) -> Any:
    import transformers

    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=100),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=120, word_embed_proj_dim=32), num_query_tokens=4)
    import torch

    torch.manual_seed(7)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_blip2_replays_and_takes_peft_lora_on_its_linear_layers(tmp_path: Path) -> None:
    """BLIP-2's converter reads ``text_config["model_type"]`` (the config proxy lacked ``text_config``): the
    backbone's language model (``BLIP2CustomOPT``) says ``opt``. Names only (keras-hub's BLIP-2 forward is not
    compared here)."""
    import keras_hub
    import torch

    model = _blip2(tmp_path / "hf")
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "hf"))
    sites, model_type = converters.converter_sites(backbone)
    assert model_type == "blip-2" and "language_model.model.decoder.layers.0.self_attn.q_proj" in sites
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("language_model")
              and "lm_head" not in n}
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=sorted(linear)))
    fill_adapter_weights(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")

    modules = adapterspec.load_adapter(backbone, tmp_path / "adapter")

    assert len(modules) == len(linear) == 6, (modules, linear)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gpt_oss_is_refused_naming_its_converter_and_the_cause() -> None:
    """GPT-OSS's converter no longer fails on ``__rpow__``, but it dequantizes MXFP4 expert blocks, unpacking
    their shape (``num_experts, out_dim, num_blocks, block_size = blocks.shape``), which a loader that reads
    nothing cannot know: the replay is refused, typed, naming the converter and the cause (module_map is the way).
    keras-hub builds GPT-OSS only from MXFP4 checkpoints, so the backbone is built directly here."""
    import keras_hub

    backbone = keras_hub.models.GptOssBackbone(
        vocabulary_size=64, num_layers=1, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
        intermediate_dim=32, num_experts=2, top_k=1, head_dim=8)
    with pytest.raises(UnsupportedError, match=r"convert_gpt_oss.*not enough values to unpack"):
        converters.converter_sites(backbone)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_swin_fused_qkv_loads_under_the_checkpoint_key_and_q_proj_alike(tmp_path: Path) -> None:
    """keras-hub's Swin converter fuses query/key/value itself (get_tensor + concatenate + assign), which the
    recording loader sees as reads and an assignment; a second replay with probe tensors maps each onto its columns
    of the fused kernel (tests/keras/test_fused_kernels.py checks the math against PEFT). The same adapter named
    as transformers 4 does (the checkpoint keys ``attention.self.query``) or as transformers 5 does
    (``attention.q_proj``) gives the same outputs."""
    import json
    import shutil

    import keras_hub
    import torch
    import transformers
    from keras import ops
    from safetensors.numpy import load_file, save_file

    torch.manual_seed(5)
    config = transformers.AutoConfig.for_model("swin", embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32,
                                               patch_size=4, window_size=4)
    task = transformers.SwinForImageClassification(config).eval()
    task.save_pretrained(tmp_path / "hf", safe_serialization=True)
    images = (np.sin(np.arange(2 * 32 * 32 * 3) * 0.37) * 0.8).reshape(2, 32, 32, 3).astype("float32")
    peft_model = peft.get_peft_model(task.swin, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    fill_adapter_weights(peft_model, scale=0.3)
    peft_model.save_pretrained(tmp_path / "q_proj")
    shutil.copytree(tmp_path / "q_proj", tmp_path / "query")
    file = tmp_path / "query" / "adapter_model.safetensors"
    save_file({k.replace("attention.q_proj", "attention.self.query"): v for k, v in load_file(file).items()},
              file, metadata={"format": "pt"})
    config_file = tmp_path / "query" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "target_modules": ["query"]}))

    outputs = {}
    for target in ("query", "q_proj"):
        backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "hf"))
        base = ops.convert_to_numpy(backbone(images))
        assert len(adapterspec.load_adapter(backbone, tmp_path / target)) == 2
        outputs[target] = ops.convert_to_numpy(backbone(images))
        assert np.abs(outputs[target] - base).max() > 1e-3
    assert np.array_equal(outputs["query"], outputs["q_proj"])
    fc = peft.get_peft_model(transformers.SwinForImageClassification(config).swin,
                             peft.LoraConfig(r=2, target_modules=["fc1", "fc2", "o_proj"]))
    fc.save_pretrained(tmp_path / "other")
    assert len(adapterspec.load_adapter(backbone, tmp_path / "other", "other")) == 6
