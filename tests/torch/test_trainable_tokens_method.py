"""The ``TRAINABLE_TOKENS`` method (SPEC.md 15.2) exact against PEFT 0.21 in both directions.

Untied and tied Llama, tied Qwen2 and GPT-2: the selected embedding's rows ``token_indices`` are replaced by
``trainable_tokens_delta``; with ``tie_word_embeddings`` the output layer follows the embedding and PEFT saves the
same tensor under its name too. Our save has PEFT's keys and bytes; PEFT loads it with nothing missing or
unexpected, no warning of its own and the same outputs; merging gives PEFT's merged outputs.
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
    fresh,
    logits,
    peft_reference,
    snapshot,
    unique_values,
)

VOCAB = 96


def _fill(model: Any) -> None:
    """Element-unique rows, far from the ones they replace."""
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "trainable_tokens_delta" in name:
                param.copy_(unique_values(tuple(param.shape), 70 + index, scale=0.5))


def _model(kind: str) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(21)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**small, tie_word_embeddings=False)).eval()
    if kind == "llama-tied":
        return LlamaForCausalLM(LlamaConfig(**small, tie_word_embeddings=True)).eval()
    if kind == "qwen2-tied":
        return Qwen2ForCausalLM(Qwen2Config(**small, tie_word_embeddings=True)).eval()
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)).eval()


_MODELS: dict[str, Any] = {}


def _base(kind: str) -> Any:
    if kind not in _MODELS:
        _MODELS[kind] = _model(kind)
    return _MODELS[kind]


def _cases() -> list[Any]:
    from peft import TrainableTokensConfig

    return [
        pytest.param("llama", lambda: TrainableTokensConfig(token_indices=[5, 10, 31]), id="llama-default-target"),
        pytest.param("llama", lambda: TrainableTokensConfig(token_indices=[10, 5],
                                                            target_modules=["embed_tokens", "lm_head"]),
                     id="llama-embedding-and-head"),
        pytest.param("llama-tied", lambda: TrainableTokensConfig(token_indices=[5, 10, 31]), id="llama-tied"),
        pytest.param("qwen2-tied", lambda: TrainableTokensConfig(token_indices=[31, 5], target_modules=["embed_tokens"]),
                     id="qwen2-tied"),
        pytest.param("gpt2", lambda: TrainableTokensConfig(token_indices=[5, 15]), id="gpt2-tied"),
    ]


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    ids = (torch.arange(2 * 8).reshape(2, 8) * 5) % VOCAB
    return {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}


@pytest.mark.parametrize(("kind", "make_config"), _cases())
def test_peft_folder_roundtrip(kind: str, make_config: Any, tmp_path: Any, inputs: Any,
                               caplog: pytest.LogCaptureFixture) -> None:
    base = _base(kind)
    reference = peft_reference(base, make_config(), tmp_path / "peft", fill=_fill)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "TRAINABLE_TOKENS"
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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = logits(reference, inputs)
    adapterspec.merge_adapters(model)
    assert_close(logits(model, inputs), merged_expected)
    adapterspec.unmerge_adapters(model)
    assert_close(logits(model, inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, inputs), base_out, atol=0)


def test_tied_layer_shares_the_rows(tmp_path: Any) -> None:
    from peft import TrainableTokensConfig

    base = _base("llama-tied")
    peft_reference(base, TrainableTokensConfig(token_indices=[5, 10]), tmp_path, fill=_fill)
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    head = model.lm_head.adapter_params("default")["trainable_tokens_delta"]
    assert head is model.model.embed_tokens.adapter_params("default")["trainable_tokens_delta"]


def test_tied_rows_that_disagree_are_refused(tmp_path: Any) -> None:
    from peft import TrainableTokensConfig

    base = _base("llama-tied")
    peft_reference(base, TrainableTokensConfig(token_indices=[5, 10]), tmp_path, fill=_fill)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.lm_head.trainable_tokens_delta"
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(adapterspec.errors.UnexpectedTensorError, match="lm_head.trainable_tokens_delta"):
        adapterspec.load_adapter(model, tmp_path)
    assert_same_snapshot(model, before)


def test_selecting_a_tied_layer_is_refused(tmp_path: Any) -> None:
    """PEFT 0.21 wraps a tied layer it also selects twice (``lm_head.base_layer.trainable_tokens_delta``)."""
    from peft import TrainableTokensConfig

    base = _base("llama-tied")
    peft_reference(base, TrainableTokensConfig(token_indices=[5], target_modules=["embed_tokens", "lm_head"]),
                   tmp_path, fill=_fill)
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(adapterspec.errors.UnsupportedError, match="lm_head"):
        adapterspec.load_adapter(model, tmp_path)
    assert_same_snapshot(model, before)


def test_rows_outside_the_vocabulary_are_a_shape_error(tmp_path: Any) -> None:
    from peft import TrainableTokensConfig

    base = _base("llama")
    peft_reference(base, TrainableTokensConfig(token_indices=[5]), tmp_path, fill=_fill)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "token_indices": [VOCAB + 3]}))
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(adapterspec.errors.ShapeMismatchError, match="trainable_tokens_delta"):
        adapterspec.load_adapter(model, tmp_path)
    assert_same_snapshot(model, before)


def test_docstring_examples() -> None:
    import doctest

    from adapterspec_torch import tokens

    result = doctest.testmod(tokens, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0


def test_a_linear_layer_with_bias_is_refused(tmp_path: Any) -> None:
    """PEFT 0.21's TrainableTokensLayer drops a Linear's bias while active: refused rather than copied."""
    from peft import TrainableTokensConfig

    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(3)
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                     intermediate_size=64, vocab_size=VOCAB, num_labels=3)).eval()
    peft_reference(bert, TrainableTokensConfig(token_indices=[1], target_modules=["classifier"]), tmp_path, fill=_fill)
    model = fresh(bert)
    before = snapshot(model)
    with pytest.raises(adapterspec.errors.UnsupportedError, match="bias"):
        adapterspec.load_adapter(model, tmp_path)
    assert_same_snapshot(model, before)


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("method", ["TRAINABLE_TOKENS", "LORA"])
def test_token_rows_of_an_embedding_shared_by_encoder_and_decoder_merge_like_peft(arch: str, method: str,
                                                                                tmp_path: Any) -> None:
    """T5 and BART read one embedding weight in ``shared``, the encoder, the decoder and the tied ``lm_head``: PEFT
    replaces the same rows in each and merges them into that weight; the merge was refused (the encoder's and the
    decoder's embeddings, tied through ``shared``, were taken for an untied reader)."""
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    torch.manual_seed(0)
    if arch == "t5":
        base = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0)).eval()
        embedding, query = "shared", "q"
    else:
        base = transformers.BartForConditionalGeneration(transformers.BartConfig(
            vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)).eval()
        embedding, query = "shared", "q_proj"
    config: Any = TrainableTokensConfig(task_type="SEQ_2_SEQ_LM", target_modules=[embedding], token_indices=[3, 17]) \
        if method == "TRAINABLE_TOKENS" else \
        LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=[query], trainable_token_indices=[3, 59])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(base), config)
    _fill(reference)
    reference.save_pretrained(str(tmp_path))
    inputs = {"input_ids": torch.arange(18).reshape(2, 9) * 7 % 128 + 1,
              "decoder_input_ids": torch.arange(10).reshape(2, 5) * 5 % 128 + 1}
    with torch.no_grad():
        unmerged = reference(**inputs).logits
        reference.merge_adapter()
        merged = reference(**inputs).logits
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, unmerged)
        adapterspec.merge_adapters(model)
        assert torch.equal(model(**inputs).logits, merged)
        adapterspec.unmerge_adapters(model)
        assert torch.equal(model(**inputs).logits, unmerged)
    adapterspec.delete_adapter(model, "default")
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert torch.allclose(after[key], value, rtol=0, atol=1e-6), key
