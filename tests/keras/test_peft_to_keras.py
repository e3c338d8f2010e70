"""PEFT adapters trained in torch load into the keras-hub model converted from the same checkpoint and give
PEFT's logits (fp32, 1e-5): LoRA, rsLoRA, DoRA, lora_bias, IA3, embeddings, GPT-2's fused c_attn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from keras_helpers import (  # noqa: E402
    ARCHS,
    assert_near,
    hf_model,
    keras_logits,
    keras_model,
    make_peft_adapter,
    peft_adapted_modules,
    torch_logits,
)


def _lora(arch: str, **kw: Any) -> Any:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ARCHS[arch].linear_targets), **kw)


CASES = {
    "llama-lora": ("llama", lambda: _lora("llama")),
    "llama-dora": ("llama", lambda: _lora("llama", use_dora=True)),
    "llama-rslora-patterns-embeddings": ("llama", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\..*v_proj": 3},
        target_modules=[*ARCHS["llama"].linear_targets, "embed_tokens", "lm_head"])),
    "llama-lora-bias": ("llama", lambda: _lora("llama", lora_bias=True)),
    "llama-ia3": ("llama", lambda: peft.IA3Config(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"], init_ia3_weights=False)),
    "gemma-lora": ("gemma", lambda: _lora("gemma")),
    "gemma-dora-embeddings": ("gemma", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=[*ARCHS["gemma"].linear_targets, "embed_tokens"])),
    "gemma-lora-tied-lm-head": ("gemma", lambda: peft.LoraConfig(r=4, lora_alpha=8,
                                                                 target_modules=["embed_tokens", "lm_head"])),
    "gemma-ia3": ("gemma", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"], init_ia3_weights=False)),
    "gpt2-lora": ("gpt2", lambda: _lora("gpt2")),
    "gpt2-dora-wte": ("gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                      target_modules=["c_attn", "c_proj", "c_fc", "wte"])),
    "gpt2-ia3": ("gpt2", lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj", "c_fc"],
                                                feedforward_modules=["mlp.c_proj"], init_ia3_weights=False)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_gives_peft_logits_in_keras(case: str, checkpoints: Any, token_ids: np.ndarray,
                                                 tmp_path: Path) -> None:
    arch, make_config = CASES[case]
    peft_model, folder = make_peft_adapter(checkpoints[arch], tmp_path / "adapter", make_config())
    expected = torch_logits(peft_model, token_ids)
    model = keras_model(arch, checkpoints[arch])
    base = keras_logits(model, token_ids)

    modules = adapterspec.load_adapter(model, folder)

    assert set(modules) == peft_adapted_modules(peft_model)  # nothing missing, nothing extra
    got = keras_logits(model, token_ids)
    assert_near(got, expected)
    assert np.abs(expected - base).max() > 1e-2  # the adapter changes the output: the comparison means something
    with adapterspec.disabled_adapters(model):
        assert np.abs(keras_logits(model, token_ids) - base).max() == 0.0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_merged_adapter_gives_peft_logits(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    peft_model, folder = make_peft_adapter(checkpoints["gpt2"], tmp_path / "a", _lora("gpt2", use_dora=True))
    expected = torch_logits(peft_model, token_ids)
    model = keras_model("gpt2", checkpoints["gpt2"])
    adapterspec.load_adapter(model, folder)
    adapterspec.merge_adapters(model)
    assert_near(keras_logits(model, token_ids), expected)
    adapterspec.unmerge_adapters(model)
    assert_near(keras_logits(model, token_ids), expected)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_causal_lm_adapter_loads_into_a_bare_backbone(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Keys name ``model.layers.0...`` (LlamaForCausalLM); the backbone's own names are ``layers.0...``."""
    import keras_hub
    import torch
    from keras import ops

    peft_model, folder = make_peft_adapter(checkpoints["llama"], tmp_path / "a", _lora("llama"))
    with torch.no_grad():
        expected = peft_model.base_model.model.model(input_ids=torch.from_numpy(token_ids)).last_hidden_state.numpy()
    backbone = keras_hub.models.Backbone.from_preset(str(checkpoints["llama"]))
    modules = adapterspec.load_adapter(backbone, folder)
    assert sorted("model." + m for m in modules) == sorted(peft_adapted_modules(peft_model))
    saved = adapterspec.extract_adapter(backbone)  # the file's names are kept for saving
    assert set(saved.tensors) == set(adapterspec.read_adapter(folder).tensors)
    got = ops.convert_to_numpy(backbone({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}))
    assert_near(got, expected)


#: A config written for several model families, as training scripts in the wild share one list
SEVERAL_FAMILIES = ["q_proj", "v_proj", "query_key_value", "c_attn", "in_proj_qkv"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_target_entries_of_other_families_are_ignored_at_load_as_peft_does(
        checkpoints: Any, token_ids: np.ndarray, tmp_path: Path, caplog: Any) -> None:
    """PEFT adapts the entries that match and ignores the rest; so does a load (its file says which modules were
    adapted). 6 of 59 real configs from public repositories were refused here before (TargetNotFoundError). The
    saved folder loads in PEFT unchanged, without a warning; a fresh adapter (no file) still refuses an entry
    without a Keras counterpart, and a file with tensors of such a module is refused, the model unchanged."""
    import logging
    import warnings

    import torch
    from safetensors.numpy import load_file, save_file

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=SEVERAL_FAMILIES)
    peft_model, folder = make_peft_adapter(checkpoints["llama"], tmp_path / "a", config)
    expected = torch_logits(peft_model, token_ids)
    model = keras_model("llama", checkpoints["llama"])
    base = keras_logits(model, token_ids)

    modules = adapterspec.load_adapter(model, folder)

    assert set(modules) == peft_adapted_modules(peft_model) and len(modules) == 4  # q_proj, v_proj x 2 layers
    assert_near(keras_logits(model, token_ids), expected)
    adapterspec.save_adapter(model, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    original = load_file(folder / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original) and all(np.array_equal(saved[k], original[k]) for k in original)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        reloaded = peft.PeftModel.from_pretrained(hf_model(checkpoints["llama"]), str(tmp_path / "ours")).eval()
    assert not [str(w.message) for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert reloaded.peft_config["default"].target_modules == set(SEVERAL_FAMILIES)
    assert_near(torch_logits(reloaded, token_ids), expected)
    adapterspec.delete_adapter(model, "default")

    with pytest.raises(adapterspec.TargetNotFoundError, match=r"c_attn.*in_proj_qkv.*query_key_value"):
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "target_modules": SEVERAL_FAMILIES})
    tensors = dict(original)
    with torch.no_grad():  # a Falcon-style module this Llama lacks, named by an entry that matches no Keras layer
        for param, shape in (("lora_A.weight", (4, 64)), ("lora_B.weight", (192, 4))):
            tensors[f"base_model.model.model.layers.0.self_attn.query_key_value.{param}"] = np.ones(shape, np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(adapterspec.TargetNotFoundError, match=r"layers\.0\.self_attn\.query_key_value"):
        adapterspec.load_adapter(model, folder)
    assert adapterspec.adapter_names(model) == []
    assert np.array_equal(keras_logits(model, token_ids), base)


def test_hf_model_and_keras_model_agree_without_adapter(checkpoints: Any, token_ids: np.ndarray) -> None:
    """The premise of every comparison here: keras-hub's conversion itself is exact."""
    for arch in ("llama", "gemma", "gpt2"):
        expected = torch_logits(hf_model(checkpoints[arch]), token_ids)
        assert_near(keras_logits(keras_model(arch, checkpoints[arch]), token_ids), expected)
