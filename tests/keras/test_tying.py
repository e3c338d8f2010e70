"""``ensure_weight_tying`` on Keras (SPEC.md 15.2), compared with PEFT 0.21 itself.

keras-hub's tied models (Gemma; a Llama with ``tie_word_embeddings``) hold one ``ReversibleEmbedding`` for
``embed_tokens`` and ``lm_head``. PEFT folders with ``ensure_weight_tying`` (LoRA on ``embed_tokens`` + ``lm_head``,
and on ``lm_head`` only, element-unique values) load with PEFT's logits and save PEFT's tensors bit for bit (PEFT
loads them with no missing/unexpected key and no warning); a fresh inject saves PEFT's keys, tied tensors the
embedding's transposed; a file whose tied tensors differ, merging and training a tied adapter are refused and change
nothing; on an untied model the flag changes nothing, as in PEFT.
"""

from __future__ import annotations

import warnings
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
    assert_peft_close,
    assert_refused_unchanged,
    hf_model,
    keras_logits,
    keras_model,
    make_peft_adapter,
    peft_load_exactly,
    snapshot,
    assert_same_snapshot,
    torch_logits,
)

_HEAD_A = "base_model.model.lm_head.lora_A.weight"
_HEAD_B = "base_model.model.lm_head.lora_B.weight"
_EMB_A = "base_model.model.model.embed_tokens.lora_embedding_A"
_EMB_B = "base_model.model.model.embed_tokens.lora_embedding_B"


@pytest.fixture(scope="module")
def tied(checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    """name -> (keras arch, checkpoint): Gemma (tied by design), a Llama with ``tie_word_embeddings``, an untied
    Llama."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("llama-tied")
    torch.manual_seed(5)
    config = AutoConfig.for_model("llama", **dict(ARCHS["llama"].config, tie_word_embeddings=True))
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder, safe_serialization=True)
    return {"gemma": ("gemma", checkpoints["gemma"]), "llama-tied": ("llama", folder),
            "llama-untied": ("llama", checkpoints["llama"])}


def _config(targets: list[str], **fields: Any) -> Any:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, ensure_weight_tying=True, **fields)


def _file(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / "adapter_model.safetensors")


CASES = {
    "gemma-embed-and-head": ("gemma", ["embed_tokens", "lm_head", "q_proj"]),
    "gemma-head-only": ("gemma", ["lm_head", "q_proj"]),
    "llama-tied-embed-and-head": ("llama-tied", ["embed_tokens", "lm_head", "q_proj"]),
    "llama-tied-head-only": ("llama-tied", ["lm_head", "q_proj"]),
    # PEFT warns ("no tied modules were found") and ignores the flag: two independent LoRAs
    "llama-untied-embed-and-head": ("llama-untied", ["embed_tokens", "lm_head", "q_proj"]),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_folder_gives_peft_logits_and_saves_peft_tensors(case: str, tied: Any, token_ids: np.ndarray,
                                                              tmp_path: Path) -> None:
    name, targets = CASES[case]
    arch, checkpoint = tied[name]
    peft_model, folder = make_peft_adapter(checkpoint, tmp_path / "peft", _config(targets))
    stored = _file(folder)
    if name != "llama-untied":  # the tied layer's LoRA is the embedding's, transposed, in PEFT's file
        assert np.array_equal(stored[_HEAD_A], stored[_EMB_B].T) and np.array_equal(stored[_HEAD_B], stored[_EMB_A].T)
        assert len(np.unique(stored[_HEAD_B])) == stored[_HEAD_B].size  # element-unique
    model = keras_model(arch, checkpoint)
    assert model.backbone.token_embedding.tie_weights == (name != "llama-untied")
    base = keras_logits(model, token_ids)
    adapterspec.load_adapter(model, folder)
    from adapterspec_keras.switch import get_state

    state = get_state(model)
    assert state is not None and state.tied.get("default", {}) == \
        ({} if name == "llama-untied" else {"lm_head": ("model.embed_tokens", "targets")})
    assert_peft_close(keras_logits(model, token_ids), torch_logits(peft_model, token_ids), base,
                      torch_logits(hf_model(checkpoint), token_ids))
    adapterspec.save_adapter(model, tmp_path / "keras")
    ours = _file(tmp_path / "keras")
    assert sorted(ours) == sorted(stored)
    for key, tensor in stored.items():
        assert ours[key].dtype == tensor.dtype and np.array_equal(ours[key], tensor), key
    _, said = peft_load_exactly(checkpoint, tmp_path / "keras")
    assert said == [] or name == "llama-untied"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("targets", [["embed_tokens", "lm_head", "q_proj"], ["lm_head", "q_proj"]])
def test_a_fresh_inject_saves_peft_keys_and_tied_tensors(targets: list[str], tied: Any, token_ids: np.ndarray,
                                                         tmp_path: Path) -> None:
    """A fresh (frozen) inject saves the LoRA keys PEFT's save of the same fresh config writes, the tied layer's tensors
    the embedding's transposed; PEFT loads it with no missing/unexpected key and no warning, with Keras' logits."""
    arch, checkpoint = tied["gemma"]
    reference = peft.get_peft_model(hf_model(checkpoint), _config(targets))
    reference.save_pretrained(tmp_path / "peft")
    model = keras_model(arch, checkpoint)
    base = keras_logits(model, token_ids)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets, "ensure_weight_tying": True}
    adapterspec.inject_adapter(model, config, trainable=False)
    adapterspec.save_adapter(model, tmp_path / "keras")
    ours, expected = _file(tmp_path / "keras"), _file(tmp_path / "peft")
    # PEFT's save_embedding_layers="auto" also writes the unchanged base matrix of an adapted embedding; neither
    # backend writes it for a fresh inject (it is the base's)
    assert sorted(ours) == sorted(k for k in expected if not k.endswith(".base_layer.weight"))
    assert np.array_equal(ours[_HEAD_A], ours[_EMB_B].T) and np.array_equal(ours[_HEAD_B], ours[_EMB_A].T)
    assert len(np.unique(ours[_HEAD_A])) == ours[_HEAD_A].size
    loaded, said = _peft_load_lora_only(checkpoint, tmp_path / "keras")
    assert said == []
    assert_peft_close(keras_logits(model, token_ids), torch_logits(loaded, token_ids), base,
                      torch_logits(hf_model(checkpoint), token_ids))


def _peft_load_lora_only(checkpoint: Path, folder: Path) -> tuple[Any, list[str]]:
    """PEFT loads ``folder``: its state dict without the base matrices (``save_embedding_layers=False``) is the
    file's, key for key and tensor for tensor; the model and PEFT's warnings (deprecation notices aside)."""
    import torch
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_model(checkpoint), folder).eval()
    state, stored = get_peft_model_state_dict(model, save_embedding_layers=False), _file(folder)
    assert sorted(state) == sorted(stored)
    for key, tensor in stored.items():
        assert torch.equal(state[key], torch.from_numpy(tensor)), key
    return model, sorted({str(w.message) for w in caught
                          if not issubclass(w.category, (FutureWarning, DeprecationWarning))})


def _edit(folder: Path, key: str) -> Path:
    from safetensors.numpy import save_file

    tensors = _file(folder)
    tensors[key] = tensors[key] * np.float32(1.5)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("key", [_HEAD_A, _HEAD_B, _EMB_A])
def test_tied_tensors_that_differ_are_refused_and_change_nothing(key: str, tied: Any, tmp_path: Path) -> None:
    arch, checkpoint = tied["gemma"]
    _, folder = make_peft_adapter(checkpoint, tmp_path / "peft", _config(["lm_head", "q_proj"]))
    _edit(folder, key)
    model = keras_model(arch, checkpoint)
    assert_refused_unchanged(model, lambda: adapterspec.load_adapter(model, folder), adapterspec.UnexpectedTensorError,
                             "lm_head.lora_")
    assert adapterspec.adapter_names(model) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_merge_and_training_of_a_tied_lora_are_refused(tied: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """Merging would add the shared delta twice (PEFT 0.21 does, as on torch); training would move the two copies
    apart. Both refused naming the field, the model unchanged."""
    arch, checkpoint = tied["gemma"]
    _, folder = make_peft_adapter(checkpoint, tmp_path / "peft", _config(["lm_head", "q_proj"]))
    model = keras_model(arch, checkpoint)
    adapterspec.load_adapter(model, folder)
    logits = keras_logits(model, token_ids)
    assert_refused_unchanged(model, lambda: adapterspec.merge_adapters(model), adapterspec.UnsupportedError,
                             "/ensure_weight_tying")
    assert np.array_equal(keras_logits(model, token_ids), logits)
    fresh = keras_model(arch, checkpoint)
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["lm_head"], "ensure_weight_tying": True}
    assert_refused_unchanged(fresh, lambda: adapterspec.inject_adapter(fresh, config), adapterspec.UnsupportedError,
                             "/ensure_weight_tying")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_delete_gives_the_model_back(tied: Any, tmp_path: Path) -> None:
    arch, checkpoint = tied["gemma"]
    _, folder = make_peft_adapter(checkpoint, tmp_path / "peft", _config(["embed_tokens", "lm_head"]))
    model = keras_model(arch, checkpoint)
    before = snapshot(model)
    adapterspec.load_adapter(model, folder)
    adapterspec.delete_adapter(model, "default")
    assert_same_snapshot(before, snapshot(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapterspec.load_adapter(model, folder)  # the bookkeeping of the first load is gone
