"""The Keras base fingerprint (``adapterspec_keras.identity``): what it reads and what it costs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import keras  # noqa: E402

import adapterspec  # noqa: E402
from adapterspec_keras.identity import base_identity  # noqa: E402
from keras_helpers import keras_model  # noqa: E402

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's numpy() is the copy avoided")
def test_fingerprint_reads_kernels_without_copying_them(checkpoints: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorFlow's ``Variable.numpy()`` copies the whole kernel (146 ms per fingerprint of the 112-module
    benchmark Llama): the fingerprint reads each kernel through a ``tf.Variable`` read, which shares its buffer,
    and gives the same value."""
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA)
    expected = base_identity(model, "default")["fingerprint"]

    def copies(self: Any) -> Any:
        raise AssertionError("the fingerprint copied a whole kernel with numpy()")

    monkeypatch.setattr(type(model.trainable_variables[0]), "numpy", copies)
    assert base_identity(model, "default")["fingerprint"] == expected


def test_fingerprint_sees_a_kernel_assigned_after_a_read(checkpoints: Any) -> None:
    """A read shares the variable's buffer: an assignment afterwards must still change the next fingerprint."""
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA)
    before = base_identity(model, "default")["fingerprint"]
    kernel = model.backbone.transformer_layers[0]._self_attention_layer._query_dense.kernel
    kernel.assign(kernel + np.sin(np.arange(np.prod(kernel.shape))).reshape(kernel.shape).astype("float32"))
    after = base_identity(model, "default")["fingerprint"]
    assert after != before


def test_task_type_feature_extraction_only_for_backbones_that_read_token_ids() -> None:
    """keras-hub's text backbones record FEATURE_EXTRACTION; an image backbone none (PEFT's FEATURE_EXTRACTION wrapper
    passes ``input_ids=`` to the model, which an image model cannot take), as the torch backend."""
    keras_hub = pytest.importorskip("keras_hub")
    from adapterspec_keras.identity import task_type_of

    gpt2 = keras_hub.models.GPT2Backbone(vocabulary_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                                         intermediate_dim=16, max_sequence_length=8)
    vit = keras_hub.models.ViTBackbone(image_shape=(8, 8, 3), patch_size=4, num_layers=1, num_heads=2, hidden_dim=8,
                                       mlp_dim=16)
    assert task_type_of(gpt2) == "FEATURE_EXTRACTION"
    assert task_type_of(vit) is None
    assert task_type_of(keras.Sequential()) is None


def test_encoder_decoder_backbone_task_type_matches_the_torch_backend() -> None:
    """The same base saves the same ``task_type`` from either backend: keras-hub's ``T5Backbone`` is transformers'
    ``T5Model``, which the torch backend records as FEATURE_EXTRACTION."""
    keras_hub = pytest.importorskip("keras_hub")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from adapterspec_keras.identity import task_type_of
    from adapterspec_torch.identity import task_type_of as torch_task_type_of

    t5 = keras_hub.models.T5Backbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
                                     key_value_dim=4)
    hf = transformers.T5Model(transformers.T5Config(vocab_size=50, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                                    num_heads=2))
    assert torch_task_type_of(hf) == "FEATURE_EXTRACTION"
    assert task_type_of(t5) == torch_task_type_of(hf)


def test_dual_encoder_backbone_records_no_task_type_as_the_torch_backend() -> None:
    """keras-hub's CLIP and SigLIP backbones read token ids but record no task type, as transformers' CLIPModel /
    SiglipModel on the torch backend: PEFT's FEATURE_EXTRACTION wrapper passes ``inputs_embeds=``, which their
    forward cannot take (PEFT failed on every folder saved with FEATURE_EXTRACTION)."""
    keras_hub = pytest.importorskip("keras_hub")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from adapterspec_keras.identity import task_type_of
    from adapterspec_torch.identity import task_type_of as torch_task_type_of

    models = keras_hub.models
    tower = dict(hidden_dim=8, num_layers=1, num_heads=2, intermediate_dim=16)
    clip = models.CLIPBackbone(
        vision_encoder=models.CLIPVisionEncoder(patch_size=4, image_shape=(8, 8, 3), **tower),
        text_encoder=models.CLIPTextEncoder(vocabulary_size=16, embedding_dim=8, max_sequence_length=8, **tower),
        projection_dim=8)
    siglip = models.SigLIPBackbone(
        vision_encoder=models.SigLIPVisionEncoder(patch_size=4, image_shape=(8, 8, 3), **tower),
        text_encoder=models.SigLIPTextEncoder(vocabulary_size=16, embedding_dim=8, max_sequence_length=8, **tower))
    hf_tower = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    hf_clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hf_tower, vocab_size=16), vision_config=dict(hf_tower, image_size=8, patch_size=4)))
    hf_siglip = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(hf_tower, vocab_size=16), vision_config=dict(hf_tower, image_size=8, patch_size=4)))
    assert task_type_of(clip) is None and torch_task_type_of(hf_clip) is None
    assert task_type_of(siglip) is None and torch_task_type_of(hf_siglip) is None
