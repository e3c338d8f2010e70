"""``ensure_weight_tying: true`` (SPEC.md 15.2) exact against PEFT 0.21 in both directions, on tied-embedding models.

PEFT ties the adapter of the output layer to the input embedding's: LoRA on ``lm_head`` uses ``lora_A =
lora_embedding_B^T`` and ``lora_B = lora_embedding_A^T`` (one storage, both saved), a saved-whole embedding is
shared with ``lm_head``, trainable token rows are shared. Each case: PEFT's folder loads with PEFT's outputs (and
the base model's when disabled); our save has PEFT's keys and bytes; PEFT loads it with nothing missing or
unexpected and the same outputs.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_peft_loads_ours,
    assert_same_snapshot,
    assert_saved_as_peft_saved,
    fill_adapter_weights,
    fresh,
    logits,
    peft_reference,
    snapshot,
    unique_values,
)


def _fill(model: Any) -> None:
    """Element-unique adapter tensors, trainable token rows included (far from the rows they replace)."""
    fill_adapter_weights(model)
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "trainable_tokens_delta" in name:
                param.copy_(unique_values(tuple(param.shape), 50 + index, scale=0.5))


def _tied_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _tied_qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(12)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


_MODELS: dict[str, Any] = {}


def _model(kind: str) -> Any:
    if kind not in _MODELS:
        _MODELS[kind] = _tied_llama() if kind == "llama" else _tied_qwen2()
    return _MODELS[kind]


def _cases() -> list[Any]:
    from peft import LoraConfig

    cases = []
    for kind in ("llama", "qwen2"):
        cases += [
            pytest.param(kind, lambda: LoraConfig(r=2, lora_alpha=5, target_modules=["embed_tokens", "q_proj"],
                                                  ensure_weight_tying=True), id=f"{kind}-lora-embedding"),
            pytest.param(kind, lambda: LoraConfig(r=3, target_modules=["lm_head", "v_proj"], ensure_weight_tying=True),
                         id=f"{kind}-lora-lm-head"),
            pytest.param(kind, lambda: LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                  ensure_weight_tying=True), id=f"{kind}-modules-to-save"),
            pytest.param(kind, lambda: LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[5, 10, 31],
                                                  ensure_weight_tying=True), id=f"{kind}-trainable-tokens"),
        ]
    return cases


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    ids = (torch.arange(2 * 8).reshape(2, 8) * 5) % 96
    return {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}


@pytest.mark.parametrize(("kind", "make_config"), _cases())
def test_peft_folder_roundtrip(kind: str, make_config: Any, tmp_path: Any, inputs: Any,
                               caplog: pytest.LogCaptureFixture) -> None:
    base = _model(kind)
    reference = peft_reference(base, make_config(), tmp_path / "peft", fill=_fill)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["ensure_weight_tying"] is True
    expected = logits(reference, inputs)
    base_out = logits(base, inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, inputs), base_out, atol=0)

    adapterspec.save_adapter(model, tmp_path / "ours")
    saved = assert_saved_as_peft_saved(tmp_path / "peft", tmp_path / "ours")

    loaded = assert_peft_loads_ours(base, tmp_path / "peft", tmp_path / "ours", caplog, inputs, expected)


def test_tied_lora_shares_the_embedding_tensors(tmp_path: Any, inputs: Any) -> None:
    """The output layer's LoRA is the embedding's, transposed: training one trains the other, as in PEFT."""
    from peft import LoraConfig

    base = _model("llama")
    peft_reference(base, LoraConfig(r=2, target_modules=["embed_tokens"], ensure_weight_tying=True), tmp_path)
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    head = model.lm_head.adapter_params("default")
    embedding = model.model.embed_tokens.adapter_params("default")
    assert head["lora_A.weight"].data_ptr() == embedding["lora_embedding_B"].data_ptr()
    assert head["lora_B.weight"].data_ptr() == embedding["lora_embedding_A"].data_ptr()
    assert torch.equal(head["lora_A.weight"], embedding["lora_embedding_B"].t())


def test_tied_tensors_that_disagree_are_refused(tmp_path: Any) -> None:
    from peft import LoraConfig

    base = _model("llama")
    peft_reference(base, LoraConfig(r=2, target_modules=["embed_tokens"], ensure_weight_tying=True), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.lm_head.lora_A.weight"
    tensors[key] = tensors[key] + 0.25
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(adapterspec.errors.UnexpectedTensorError, match="lm_head.lora_A.weight"):
        adapterspec.load_adapter(model, tmp_path)
    assert_same_snapshot(model, before)


def test_merging_a_tied_lora_is_refused(tmp_path: Any, inputs: Any) -> None:
    """PEFT 0.21 merges the shared delta twice (its merged logits differ from its unmerged ones); we refuse."""
    from peft import LoraConfig

    base = _model("llama")
    reference = peft_reference(base, LoraConfig(r=2, target_modules=["embed_tokens"], ensure_weight_tying=True),
                               tmp_path)
    unmerged = logits(reference, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    assert (logits(reference, inputs) - unmerged).abs().max() > 1e-2  # PEFT's double merge, the reason to refuse
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    before = snapshot(model)
    with pytest.raises(adapterspec.errors.UnsupportedError, match="/ensure_weight_tying"):
        adapterspec.merge_adapters(model)
    assert_same_snapshot(model, before)
    assert_close(logits(model, inputs), unmerged)


def test_tied_modules_to_save_merge_like_peft(tmp_path: Any, inputs: Any) -> None:
    from peft import LoraConfig

    base = _model("qwen2")
    reference = peft_reference(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                ensure_weight_tying=True), tmp_path)
    expected = logits(reference, inputs)
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    adapterspec.merge_adapters(model)
    assert_close(logits(model, inputs), expected)
    plain = adapterspec.unload(model, merge=True)  # the trained copies stay, still tied (merge_and_unload)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert_close(logits(plain, inputs), expected)


def test_docstring_examples() -> None:
    import doctest

    from adapterspec_torch import tying

    result = doctest.testmod(tying, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0 and result.attempted > 0
