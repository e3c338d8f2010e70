"""keras-hub's PaliGemma converter keeps the vocabulary below ``image_token_index`` (issue #16 item 6): an adapter
on ``lm_head`` (or the embedding) has rows for tokens the Keras model dropped and is refused, typed, saying why,
the model untouched; the same adapter without them loads (SPEC.md 12)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import ShapeMismatchError  # noqa: E402
from keras_helpers import assert_same_snapshot, fill_adapter_weights, peft_adapted_modules, snapshot  # noqa: E402


def _paligemma(folder: Path) -> Any:
    """A tiny ``PaliGemmaForConditionalGeneration`` (vocabulary 128, image token 120) saved for keras-hub, whose
    converter reads the SigLIP tower under ``vision_tower.vision_model.``."""
    from safetensors.numpy import load_file, save_file

    config = transformers.PaliGemmaConfig(
        text_config=dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=128),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=64),
        image_token_index=120, projection_dim=64)
    torch.manual_seed(11)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    file = folder / "model.safetensors"
    tensors = load_file(file)
    save_file({("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in tensors.items()}, file, metadata={"format": "pt"})
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_adapter_on_the_truncated_vocabulary_is_refused_saying_why(tmp_path: Path) -> None:
    import keras_hub

    model = _paligemma(tmp_path / "hf")
    causal_lm = keras_hub.models.PaliGemmaCausalLM.from_preset(str(tmp_path / "hf"), preprocessor=None)
    with_head = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    fill_adapter_weights(with_head)
    with_head.save_pretrained(tmp_path / "head")
    before = snapshot(causal_lm)

    with pytest.raises(ShapeMismatchError, match=r"128 vocabulary rows .* keeps 120: keras-hub's converter "
                                                 r"truncated the vocabulary") as caught:
        adapterspec.load_adapter(causal_lm, tmp_path / "head")

    assert caught.value.key == "base_model.model.lm_head.lora_B.weight"
    assert_same_snapshot(before, snapshot(causal_lm))
    plain = peft.get_peft_model(_paligemma(tmp_path / "hf2"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    adapted = peft_adapted_modules(plain)
    modules = adapterspec.load_adapter(causal_lm, tmp_path / "plain")
    assert len(modules) == len(adapted) == 2  # the language model's and the SigLIP tower's q_proj
