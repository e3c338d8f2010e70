"""torch -> Keras -> torch: a PEFT folder loaded into Keras and saved again holds identical tensors and config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from keras_helpers import ARCHS, assert_near, hf_model, keras_model, make_peft_adapter, torch_logits  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

CASES = {
    "llama-lora-dora-embeddings": ("llama", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, rank_pattern={"o_proj": 2},
        target_modules=[*ARCHS["llama"].linear_targets, "embed_tokens", "lm_head"])),
    "llama-ia3": ("llama", lambda: peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"])),
    "gpt2-lora-fused-qkv": ("gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_bias=True,
                                                            target_modules=["c_attn", "c_proj", "c_fc"])),
    "gemma-lora-tied-head": ("gemma", lambda: peft.LoraConfig(r=4, lora_alpha=8,
                                                              target_modules=["q_proj", "v_proj", "lm_head"])),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_torch_keras_torch_round_trip_is_exact(case: str, checkpoints: Any, token_ids: np.ndarray,
                                               tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    peft_model, folder = make_peft_adapter(checkpoints[arch], tmp_path / "in", make_config(), salt=7)
    model = keras_model(arch, checkpoints[arch])
    adapterspec.load_adapter(model, folder)
    out = adapterspec.save_adapter(model, tmp_path / "out")

    original = load_file(str(folder / "adapter_model.safetensors"))
    again = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(again) == sorted(original)
    for key, value in original.items():
        assert again[key].dtype == value.dtype, key
        assert np.array_equal(again[key], value), key

    before = adapterspec.read_adapter(folder).config.to_dict()
    after = adapterspec.read_adapter(out).config.to_dict()
    assert after == before

    reloaded = peft.PeftModel.from_pretrained(hf_model(checkpoints[arch]), out).eval()
    assert_near(torch_logits(reloaded, token_ids), torch_logits(peft_model, token_ids))
