"""Prompt learning beyond causal LMs (SPEC.md 15.9), exact against PEFT 0.21.2 in both directions.

* ``task_type`` SEQ_CLS / TOKEN_CLS: PEFT also saves the classifier head (``modules_to_save``) under
  ``base_model.<module>.<param>``; prefix, prompt and P-tuning on Llama and GPT-2, prompt tuning on BERT
  (``token_type_ids`` kept, zeros prepended for the virtual tokens).
* encoder-decoder (``SEQ_2_SEQ_LM``, ``num_transformer_submodules`` 2) on T5 and BART: prefix tuning fills
  the decoder's self-attention cache (PEFT's doubled slots, cross-attention recomputed), prompt and P-tuning
  prepend the first half of the prompt to the encoder's input; ``generate()`` is refused typed.
* Gemma 2 / Gemma 3 prefix tuning: the prefix written into a cache built from the model config (sliding
  window layers), inputs longer than the window; Gemma 4 is refused typed.
* what PEFT loads and then fails on at the first forward is refused at load: a prompt wider than the input
  embedding, a prefix the model's own key/value cache cannot take (linear-attention and state-space layers,
  multi-query Falcon, DeepSeek's latent attention), a prompt on Gemma 4's per-layer inputs.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from prompt_helpers import round_trip  # noqa: E402
from torch_helpers import assert_same_snapshot, fresh, snapshot, tiny_llama_config  # noqa: E402

LABELS = 3


def _classifier(arch: str, task: str) -> Any:
    import transformers

    torch.manual_seed(5)
    if arch == "llama":
        config = tiny_llama_config()
        config.pad_token_id = 0
    elif arch == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                         pad_token_id=0)
    else:
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    config.num_labels = LABELS
    prefix = {"llama": "Llama", "gpt2": "GPT2", "bert": "Bert"}[arch]
    suffix = "ForSequenceClassification" if task == "SEQ_CLS" else "ForTokenClassification"
    return getattr(transformers, prefix + suffix)(config).eval()


def _config(method: str, task: str) -> Any:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if method == "prefix":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=4)
    if method == "prompt":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=3)
    return PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=16)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["prefix", "prompt", "p_tuning"])
@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_classification_round_trip(arch: str, task: str, method: str, token_inputs: Any, tmp_path: Any,
                                   caplog: pytest.LogCaptureFixture) -> None:
    base = _classifier(arch, task)
    diffs = round_trip(base, _config(method, task), token_inputs, tmp_path, caplog)
    print(arch, task, method, diffs)
    loaded = adapterspec.read_adapter(tmp_path / "peft")
    head = "classifier" if (arch, task) == ("gpt2", "TOKEN_CLS") else "score"
    assert {k for k in loaded.tensors if k != "prompt_embeddings"} == (
        {f"base_model.{head}.weight"} if task == "SEQ_CLS" else {f"base_model.{head}.weight", f"base_model.{head}.bias"})


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_bert_prompt_with_token_type_ids(method: str, token_inputs: Any, tmp_path: Any,
                                         caplog: pytest.LogCaptureFixture) -> None:
    base = _classifier("bert", "SEQ_CLS")
    inputs = dict(token_inputs, token_type_ids=(torch.arange(18).reshape(2, 9) >= 5).long())
    diffs = round_trip(base, _config(method, "SEQ_CLS"), inputs, tmp_path, caplog)
    print("bert", method, diffs)


def _encoder_classifier(arch: str, task: str) -> Any:
    import transformers

    torch.manual_seed(6)
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
                 max_position_embeddings=64, num_labels=2 if task == "QUESTION_ANS" else LABELS)
    config = transformers.BertConfig(**sizes) if arch == "bert" else transformers.RobertaConfig(**sizes, pad_token_id=1)
    suffix = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification",
              "QUESTION_ANS": "ForQuestionAnswering"}[task]
    return getattr(transformers, {"bert": "Bert", "roberta": "Roberta"}[arch] + suffix)(config).eval()


def _encoder_inputs(token_inputs: Any) -> dict[str, Any]:
    return dict(token_inputs, token_type_ids=(torch.arange(18).reshape(2, 9) >= 5).long())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("arch", "task"), [("bert", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("roberta", "SEQ_CLS"),
                                            ("roberta", "TOKEN_CLS")])
def test_prefix_on_a_model_without_cache_is_peft_s_backbone_and_head(arch: str, task: str, token_inputs: Any,
                                                                      tmp_path: Any,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """BERT's and RoBERTa's task models take no past_key_values: PEFT runs the encoder with the prefix cache and the
    head itself (P-tuning v2, PEFT's own RoBERTa example); ours gives its outputs, both directions (before: refused).
    The loss too, return_dict=False too; deleting the adapter gives the model its own forward back."""
    from torch_helpers import assert_close, peft_reference

    base = _classifier_of(arch, task)
    inputs = _encoder_inputs(token_inputs) if arch == "bert" else dict(token_inputs)
    diffs = round_trip(base, _config("prefix", task), inputs, tmp_path, caplog)
    print(arch, task, diffs)
    reference = peft_reference(base, _config("prefix", task), tmp_path / "again")
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    labels = torch.tensor([2, 0]) if task == "SEQ_CLS" else (torch.arange(18).reshape(2, 9) * 5) % LABELS
    with torch.no_grad():
        ours, theirs = model(**inputs, labels=labels), reference(**inputs, labels=labels)
        assert_close(ours.loss, theirs.loss)
        ours_tuple = model(**inputs, labels=labels, return_dict=False)
        assert isinstance(ours_tuple, tuple) and torch.equal(ours_tuple[1], ours.logits)
        with adapterspec.disabled_adapters(model):
            assert torch.equal(model(**inputs).logits, base(**inputs).logits)
    adapterspec.delete_adapter(model, "default")
    assert "forward" not in vars(model) and "_adapterspec_own_forward" not in vars(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)


def _classifier_of(arch: str, task: str) -> Any:
    return _classifier(arch, task) if arch in ("llama", "gpt2") and task != "QUESTION_ANS" else \
        _encoder_classifier(arch, task)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prefix_on_bert_trains_as_peft(token_inputs: Any, tmp_path: Any) -> None:
    """Loaded trainable, the BERT prefix and its head get PEFT's gradients (the cache carries the prefix's)."""
    from torch_helpers import assert_close, peft_reference

    base = _encoder_classifier("bert", "SEQ_CLS")
    reference = peft_reference(base, _config("prefix", "SEQ_CLS"), tmp_path / "peft")
    reference.train()
    model = fresh(base).train()
    adapterspec.load_adapter(model, tmp_path / "peft", trainable=True)
    for module in (*model.modules(), *reference.modules()):  # dropout off, gradients kept
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    inputs, labels = _encoder_inputs(token_inputs), torch.tensor([1, 2])
    model(**inputs, labels=labels).loss.backward()
    reference(**inputs, labels=labels).loss.backward()
    ours = dict(model.named_parameters())
    theirs = dict(reference.named_parameters())
    prompt = next(p for n, p in ours.items() if "_adapterspec_prompts" in n)
    assert prompt.grad is not None and prompt.grad.abs().max() > 0
    assert_close(prompt.grad, theirs["prompt_encoder.default.embedding.weight"].grad)
    head = [n for n, p in ours.items() if p.requires_grad and "classifier" in n and n.endswith("weight")]
    assert len(head) == 1
    assert_close(ours[head[0]].grad, theirs["base_model.classifier.modules_to_save.default.weight"].grad)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prefix_question_answering_on_bert_is_peft_s(token_inputs: Any, tmp_path: Any) -> None:
    """BertForQuestionAnswering: PEFT's start/end logits and loss (positions clamped as PEFT does); PEFT's QA forward
    drops token_type_ids and position_ids (it takes them by name and passes neither on): so does ours."""
    from torch_helpers import assert_close, peft_reference

    base = _encoder_classifier("bert", "QUESTION_ANS")
    config = _config("prefix", "QUESTION_ANS")
    reference = peft_reference(base, config, tmp_path / "peft")
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    inputs = dict(_encoder_inputs(token_inputs), position_ids=torch.arange(9).expand(2, 9) + 3)
    positions = {"start_positions": torch.tensor([1, 40]), "end_positions": torch.tensor([[3], [4]])}
    with torch.no_grad():
        ours, theirs, plain = model(**inputs, **positions), reference(**inputs, **positions), base(**inputs)
    assert (theirs.start_logits - plain.start_logits).abs().max() > 1e-3
    for field in ("start_logits", "end_logits", "loss"):
        assert_close(getattr(ours, field), getattr(theirs, field))


def test_prefix_on_a_model_without_cache_is_refused_where_peft_fails(tmp_path: Any) -> None:
    """Outside the classification tasks PEFT has no backbone-and-head forward (it fails on the model's forward):
    refused, naming the task type, the model unchanged."""
    from peft import get_peft_model

    base = _encoder_classifier("bert", "SEQ_CLS")
    get_peft_model(fresh(base), _config("prefix", "SEQ_CLS")).save_pretrained(tmp_path)
    import json

    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "task_type": "FEATURE_EXTRACTION"}))
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match="past_key_values") as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.pointer == "/task_type"
    assert_same_snapshot(model, before)
    assert "forward" not in vars(model)


def test_head_key_of_an_unlisted_module_is_unexpected(tmp_path: Any) -> None:
    """A ``base_model.`` key is only accepted for a module saved whole: listed in modules_to_save, or one of the
    task's heads, which PEFT's task class adds whatever the config lists (SPEC.md 4.3)."""
    import json

    from peft import get_peft_model

    base = _classifier("llama", "SEQ_CLS")
    get_peft_model(fresh(base), _config("prompt", "SEQ_CLS")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert "base_model.score.weight" in adapterspec.read_adapter(tmp_path).tensors  # SEQ_CLS: the head is the task's
    config["task_type"] = "FEATURE_EXTRACTION"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(adapterspec.UnexpectedTensorError, match="base_model.score.weight"):
        adapterspec.read_adapter(tmp_path)


def _seq2seq(arch: str) -> Any:
    import transformers

    torch.manual_seed(6)
    config: Any
    if arch == "t5":
        config = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
        config.pad_token_id = config.decoder_start_token_id = 0
        return transformers.T5ForConditionalGeneration(config).eval()  # type: ignore[no-untyped-call]
    config = transformers.BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=1,
                                     decoder_start_token_id=2, bos_token_id=0, eos_token_id=2)
    return transformers.BartForConditionalGeneration(config).eval()  # type: ignore[no-untyped-call]


def _seq2seq_inputs(token_inputs: dict[str, Any]) -> dict[str, Any]:
    decoder_ids = (torch.arange(2 * 5).reshape(2, 5) * 5 + 3) % 128
    decoder_mask = torch.ones(2, 5, dtype=torch.long)
    decoder_mask[0, -1] = 0
    return dict(token_inputs, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["prefix", "prompt", "p_tuning"])
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_round_trip(arch: str, method: str, token_inputs: Any, tmp_path: Any,
                                    caplog: pytest.LogCaptureFixture) -> None:
    base = _seq2seq(arch)
    diffs = round_trip(base, _config(method, "SEQ_2_SEQ_LM"), _seq2seq_inputs(token_inputs), tmp_path, caplog)
    print(arch, method, diffs)
    config = adapterspec.read_adapter(tmp_path / "peft").config
    assert config["num_transformer_submodules"] == 2


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_encoder_decoder_labels_loss(method: str, token_inputs: Any, tmp_path: Any) -> None:
    from torch_helpers import assert_close, peft_reference

    base = _seq2seq("t5")
    reference = peft_reference(base, _config(method, "SEQ_2_SEQ_LM"), tmp_path)
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    labels = (torch.arange(2 * 4).reshape(2, 4) * 3 + 1) % 128
    with torch.no_grad():
        ours = model(**token_inputs, labels=labels)
        theirs = reference(**token_inputs, labels=labels)
    assert_close(ours.logits, theirs.logits)
    assert_close(ours.loss, theirs.loss)


def test_encoder_decoder_generate_is_refused(token_inputs: Any, tmp_path: Any) -> None:
    from torch_helpers import peft_reference

    base = _seq2seq("t5")
    peft_reference(base, _config("prompt", "SEQ_2_SEQ_LM"), tmp_path)
    model: Any = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    with pytest.raises(adapterspec.UnsupportedError, match="encoder_outputs"):
        model.generate(**token_inputs, max_new_tokens=2)


def test_encoder_decoder_adapter_on_a_decoder_only_model_is_refused(llama: Any, tmp_path: Any) -> None:
    from torch_helpers import peft_reference

    peft_reference(_seq2seq("t5"), _config("prompt", "SEQ_2_SEQ_LM"), tmp_path)
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match="num_transformer_submodules 2") as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.pointer == "/num_transformer_submodules"
    assert_same_snapshot(model, before)


def _gemma(arch: str) -> Any:
    import transformers

    torch.manual_seed(7)
    sizes: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=64,
                                 sliding_window=6, pad_token_id=0)
    if arch == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**sizes)).eval()  # type: ignore[no-untyped-call]
    config = transformers.Gemma3TextConfig(**sizes, layer_types=["sliding_attention", "full_attention"])
    return transformers.Gemma3ForCausalLM(config).eval()  # type: ignore[no-untyped-call]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["prefix", "prompt", "p_tuning"])
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_round_trip(arch: str, method: str, token_inputs: Any, tmp_path: Any,
                          caplog: pytest.LogCaptureFixture) -> None:
    """9 tokens + the virtual ones, past the sliding window of 6: the sliding layers' cache must be PEFT's."""
    diffs = round_trip(_gemma(arch), _config(method, "CAUSAL_LM"), token_inputs, tmp_path, caplog)
    print(arch, method, diffs)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_prefix_greedy_generation_matches_peft(arch: str, token_inputs: Any, tmp_path: Any) -> None:
    import warnings

    from peft import PeftModel
    from torch_helpers import peft_reference

    base: Any = _gemma(arch)
    peft_reference(base, _config("prefix", "CAUSAL_LM"), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference: Any = PeftModel.from_pretrained(fresh(base), str(tmp_path)).eval()
    model: Any = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ours = model.generate(**token_inputs, **kwargs)
        theirs = reference.generate(**token_inputs, **kwargs)
        plain = base.generate(**token_inputs, **kwargs)
    assert ours.tolist() == theirs.tolist()
    assert ours.tolist() != plain.tolist()


def _gemma4(shared: int = 0) -> Any:
    import transformers

    torch.manual_seed(9)
    config = transformers.Gemma4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           sliding_window=6, pad_token_id=0, num_kv_shared_layers=shared,
                                           layer_types=["sliding_attention", "full_attention"] * 2)
    return transformers.Gemma4ForCausalLM(config).eval()  # type: ignore[no-untyped-call]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("shared", [0, 2])
def test_gemma4_prefix_round_trip(shared: int, token_inputs: Any, tmp_path: Any,
                                  caplog: pytest.LogCaptureFixture) -> None:
    """Gemma 4: the prefix is sized for the global layers' key/value shape (PEFT's token_dim), each sliding layer
    takes its leading heads and channels, layers sharing key/values (num_kv_shared_layers) take none."""
    base = _gemma4(shared)
    diffs = round_trip(base, _config("prefix", "CAUSAL_LM"), token_inputs, tmp_path, caplog)
    print("gemma4", shared, diffs)
    config = adapterspec.read_adapter(tmp_path / "peft").config
    assert config["token_dim"] // config["num_attention_heads"] > 16  # wider than a sliding layer's head


def test_gemma4_prefix_sizes_must_be_given(tmp_path: Any) -> None:
    model = _gemma4()
    before = snapshot(model)
    adapter = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2}
    with pytest.raises(adapterspec.UnsupportedError, match="widest layer") as info:
        adapterspec.inject_adapter(model, adapter)
    assert info.value.pointer == "/token_dim"
    assert_same_snapshot(model, before)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["prefix", "prompt", "p_tuning"])
def test_question_answering_round_trip(method: str, token_inputs: Any, tmp_path: Any,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """QUESTION_ANS: PEFT saves qa_outputs whole; start/end logits equal PEFT's, both directions."""
    import transformers
    from prompt_helpers import peft_loads
    from safetensors.torch import load_file
    from torch_helpers import assert_close, peft_reference

    torch.manual_seed(8)
    config = tiny_llama_config()
    config.pad_token_id = 0
    base = transformers.LlamaForQuestionAnswering(config).eval()  # type: ignore[no-untyped-call]
    made = _config(method, "CAUSAL_LM")
    made.task_type = "QUESTION_ANS"
    reference = peft_reference(base, made, tmp_path / "peft")
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    positions = {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])}

    def run(m: Any) -> Any:
        with torch.no_grad():
            return m(**token_inputs, **positions)

    ours, theirs, plain = run(model), run(reference), run(base)
    assert (theirs.start_logits[:, -9:] - plain.start_logits).abs().max() > 1e-3
    for field in ("start_logits", "end_logits", "loss"):
        assert_close(getattr(ours, field), getattr(theirs, field))
    adapterspec.save_adapter(model, tmp_path / "ours")
    original, saved = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(
        tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original) and "base_model.qa_outputs.weight" in saved
    assert all(torch.equal(saved[k], v) for k, v in original.items())
    loaded, said = peft_loads(base, tmp_path / "ours", caplog)
    assert said == peft_loads(base, tmp_path / "peft", caplog)[1]
    again = run(loaded)
    for field in ("start_logits", "end_logits"):
        assert_close(getattr(again, field), getattr(theirs, field))


def _projected_embedding(arch: str) -> Any:
    """A model whose input embedding (16 wide) is projected to its hidden size (64): ELECTRA's and ALBERT's
    ``embedding_size``, OPT-350m's ``word_embed_proj_dim``."""
    import transformers

    torch.manual_seed(11)
    sizes: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                 max_position_embeddings=64, pad_token_id=0)
    if arch == "opt":
        config: Any = transformers.OPTConfig(**sizes, ffn_dim=128, word_embed_proj_dim=16)
        return transformers.OPTForCausalLM(config).eval()
    kind = {"electra": (transformers.ElectraConfig, transformers.ElectraForSequenceClassification),
            "albert": (transformers.AlbertConfig, transformers.AlbertForSequenceClassification)}[arch]
    config = kind[0](**sizes, intermediate_size=128, embedding_size=16, num_labels=LABELS)
    return kind[1](config).eval()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
@pytest.mark.parametrize("arch", ["electra", "albert", "opt"])
def test_prompt_wider_than_the_input_embedding_is_refused(arch: str, method: str, token_inputs: Any,
                                                          tmp_path: Any) -> None:
    """PEFT sizes the prompt by the hidden size (64), the input embedding it is prepended to is 16 wide: PEFT fails
    at the first forward; the load is refused naming /token_dim and the prompt, the model unchanged (it loaded,
    then the forward raised a RuntimeError from torch.cat)."""
    from torch_helpers import peft_reference

    base = _projected_embedding(arch)
    task = "CAUSAL_LM" if arch == "opt" else "SEQ_CLS"
    reference = peft_reference(base, _config(method, task), tmp_path)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"), torch.no_grad():
        reference(**token_inputs)  # PEFT's own forward
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(adapterspec.ShapeMismatchError, match="width 16") as info:
        adapterspec.load_adapter(model, tmp_path)
    assert (info.value.pointer, info.value.key) == ("/token_dim", "prompt_embeddings")
    assert_same_snapshot(model, before)
    with pytest.raises(adapterspec.ShapeMismatchError, match="set token_dim to 16"):
        adapterspec.inject_adapter(model, {"peft_type": "PROMPT_TUNING", "task_type": task, "num_virtual_tokens": 2})
    assert_same_snapshot(model, before)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["electra", "opt"])
def test_prompt_sized_to_the_input_embedding_is_peft_s(arch: str, token_inputs: Any, tmp_path: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A prompt as wide as the input embedding (token_dim 16 given) runs, as PEFT, both directions."""
    from peft import PromptTuningConfig

    task = "CAUSAL_LM" if arch == "opt" else "SEQ_CLS"
    diffs = round_trip(_projected_embedding(arch), PromptTuningConfig(task_type=task, num_virtual_tokens=3,
                                                                      token_dim=16), token_inputs, tmp_path, caplog)
    print(arch, diffs)


#: Decoders whose key/value cache a prefix cannot extend (PEFT fails at their first forward): the extra config of
#: each, the error and the field it names.
_OTHER_CACHES: dict[str, tuple[dict[str, Any], type, str]] = {
    "falcon": (dict(new_decoder_architecture=False, multi_query=True),  # one key/value head for 4 prefix heads
               adapterspec.ShapeMismatchError, "/num_attention_heads"),
    "deepseek_v2": (dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                         first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, num_key_value_heads=4),
                    adapterspec.ShapeMismatchError, "/num_attention_heads"),  # latents, keys and values differ
    "deepseek_v3": (dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                         first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, num_key_value_heads=4),
                    adapterspec.ShapeMismatchError, "/num_attention_heads"),
    "qwen3_next": (dict(head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
                   adapterspec.UnsupportedError, "/peft_type"),
    "qwen3_5_text": (dict(head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                          linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
                     adapterspec.UnsupportedError, "/peft_type"),
    "jamba": (dict(num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                   expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2,
                   mamba_dt_rank=4, use_mamba_kernels=False), adapterspec.UnsupportedError, "/peft_type"),
    "lfm2": (dict(layer_types=["conv", "full_attention"]), adapterspec.UnsupportedError, "/peft_type"),
    "falcon_h1": (dict(mamba_d_state=4, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_conv=2,
                       mamba_expand=1, mamba_d_ssm=32, mamba_chunk_size=4, head_dim=8),
                  adapterspec.UnsupportedError, "/peft_type"),
}


def _decoder(model_type: str, **extra: Any) -> Any:
    import transformers

    sizes: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    sizes.update(extra)
    if model_type == "falcon":  # no num_key_value_heads: PEFT sizes the prefix by num_attention_heads
        sizes = {k: v for k, v in sizes.items() if k not in ("num_key_value_heads", "intermediate_size")}
    torch.manual_seed(12)
    config = transformers.AutoConfig.for_model(model_type, **sizes)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", list(_OTHER_CACHES))
def test_prefix_the_model_cache_cannot_take_is_refused_at_load(arch: str, token_inputs: Any, tmp_path: Any) -> None:
    """The model's own cache (of one token) against the prefix, layer by layer: a linear-attention, state-space or
    convolution layer, or keys/values of other heads or head sizes, are refused at load, naming the field and the
    prompt, the model unchanged (they loaded, then the first forward raised inside transformers); PEFT's own forward
    fails on each."""
    from torch_helpers import peft_reference

    extra, error, pointer = _OTHER_CACHES[arch]
    base = _decoder(arch, **extra)
    reference = peft_reference(base, _config("prefix", "CAUSAL_LM"), tmp_path)
    with pytest.raises((RuntimeError, ValueError)), torch.no_grad():
        reference(input_ids=token_inputs["input_ids"])
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(error) as info:
        adapterspec.load_adapter(model, tmp_path)
    assert type(info.value) is error
    assert (info.value.pointer, info.value.key) == (pointer, "prompt_embeddings")
    assert_same_snapshot(model, before)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_prompt_on_per_layer_inputs_read_back_from_the_embeddings_is_refused(method: str, token_inputs: Any,
                                                                            tmp_path: Any) -> None:
    """Gemma 4 reads its per-layer inputs back from inputs_embeds as rows of its embedding table, which virtual
    tokens are not: PEFT fails at the first forward; the load is refused, the model unchanged."""
    from torch_helpers import peft_reference

    base = _decoder("gemma4_text", head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                    global_head_dim=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=128)
    reference = peft_reference(base, _config(method, "CAUSAL_LM"), tmp_path)
    with pytest.raises(RuntimeError, match="inputs_embeds"), torch.no_grad():
        reference(**token_inputs)
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match="get_per_layer_inputs") as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.pointer == "/peft_type"
    assert_same_snapshot(model, before)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["gemma3n_text", "falcon"])
def test_prefix_the_model_cache_takes_is_peft_s(arch: str, token_inputs: Any, tmp_path: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Not refused where the cache takes the prefix: Gemma 3n's last layers read an earlier layer's keys and values
    (their cache layers keep nothing: not compared); Falcon's new decoder architecture caches its 2 key/value heads
    repeated to the 4 query heads, as PEFT's prefix (sized by num_attention_heads) has them."""
    if arch == "falcon":
        base = _decoder(arch, new_decoder_architecture=True, num_kv_heads=2)
    else:
        base = _decoder(arch, head_dim=8, sliding_window=4, vocab_size_per_layer_input=128, num_hidden_layers=4,
                        hidden_size_per_layer_input=8, num_kv_shared_layers=2, laurel_rank=4, altup_num_inputs=2,
                        intermediate_size=[64] * 4, activation_sparsity_pattern=[0.0] * 4,
                        layer_types=["sliding_attention", "full_attention"] * 2)
    print(arch, round_trip(base, _config("prefix", "CAUSAL_LM"), token_inputs, tmp_path, caplog))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prefix_check_leaves_the_model_as_it_was(token_inputs: Any, tmp_path: Any) -> None:
    """The check runs the model on one token: each module's training mode and what its forward keeps on the model
    (as Qwen2-VL's rope_deltas) are put back; the prefix then gives PEFT's outputs."""
    import transformers
    from torch_helpers import assert_close, peft_reference

    class Keeping(transformers.LlamaForCausalLM):  # type: ignore[misc]
        def forward(self, input_ids: Any = None, past_key_values: Any = None, **kwargs: Any) -> Any:
            self.last_length = input_ids.shape[1]
            return super().forward(input_ids, past_key_values=past_key_values, **kwargs)

    torch.manual_seed(13)
    base = Keeping(tiny_llama_config()).eval()
    reference = peft_reference(base, _config("prefix", "CAUSAL_LM"), tmp_path)
    model = fresh(base)
    model.train()
    model.model.layers[1].eval()
    modes = [m.training for m in model.modules()]
    adapterspec.load_adapter(model, tmp_path)
    assert "last_length" not in vars(model)
    assert [m.training for m in model.modules()][:len(modes)] == modes
    model.eval()
    with torch.no_grad():
        assert_close(model(**token_inputs).logits, reference(**token_inputs).logits)
