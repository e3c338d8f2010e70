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
from keras_helpers import (  # noqa: E402
    assert_same_snapshot,
    fill_adapter_weights,
    paligemma_checkpoint,
    peft_adapted_modules,
    snapshot,
)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_adapter_on_the_truncated_vocabulary_is_refused_saying_why(tmp_path: Path) -> None:
    import keras_hub

    model = paligemma_checkpoint(tmp_path / "hf")
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
    plain = peft.get_peft_model(paligemma_checkpoint(tmp_path / "hf2"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    adapted = peft_adapted_modules(plain)
    modules = adapterspec.load_adapter(causal_lm, tmp_path / "plain")
    assert len(modules) == len(adapted) == 2  # the language model's and the SigLIP tower's q_proj
