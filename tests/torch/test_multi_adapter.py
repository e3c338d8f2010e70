"""Several adapters in one model: switch, several active at once, disable, merge/unmerge, delete -- each
compared with PEFT doing the same operations on the same folders."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from tolerance import fp32_tolerance  # noqa: E402
from torch_helpers import assert_close, fill_adapter_weights, fresh, logits, peft_reference, unique_values  # noqa: E402


def _two_adapters(base: Any, tmp_path: Any) -> tuple[Any, Any]:
    from peft import LoraConfig

    peft_reference(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                   tmp_path / "a")
    peft_reference(base, LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "up_proj"]),
                   tmp_path / "b", fill=lambda m: fill_adapter_weights(m, salt=1000, scale=0.08))
    return tmp_path / "a", tmp_path / "b"


def _peft_model(base: Any, folders: dict[str, Any], *, mixed: bool = False) -> Any:
    """PEFT's model of ``base`` with ``folders`` loaded in order (``mixed``: a ``PeftMixedModel``)."""
    from peft import PeftMixedModel, PeftModel

    names = list(folders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = PeftMixedModel if mixed else PeftModel
        model = cls.from_pretrained(fresh(base), str(folders[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(folders[name]), adapter_name=name)
    return model.eval()


def test_switch_combine_disable_delete_like_peft(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    a, b = _two_adapters(llama, tmp_path)
    reference = _peft_model(llama, {"a": a, "b": b})
    model = fresh(llama)
    before_ids = [(name, id(module)) for name, module in model.named_modules()]
    adapterspec.load_adapter(model, a, "a")
    adapterspec.load_adapter(model, b, "b")
    assert adapterspec.adapter_names(model) == ["a", "b"]
    assert adapterspec.active_adapters(model) == ["b"]

    outputs = {}
    for active in (["a"], ["b"], ["a", "b"], ["b", "a"]):
        reference.base_model.set_adapter(active)
        adapterspec.set_active_adapters(model, active)
        assert adapterspec.active_adapters(model) == active
        outputs[tuple(active)] = logits(model, token_inputs)
        assert_close(outputs[tuple(active)], logits(reference, token_inputs))
    assert (outputs[("a",)] - outputs[("b",)]).abs().max() > 1e-3

    with reference.disable_adapter(), adapterspec.disabled_adapters(model):
        assert adapterspec.active_adapters(model) == []
        assert_close(logits(model, token_inputs), logits(reference, token_inputs))
        assert_close(logits(model, token_inputs), logits(llama, token_inputs), atol=0)
    assert adapterspec.active_adapters(model) == ["b", "a"]

    reference.delete_adapter("a")
    adapterspec.delete_adapter(model, "a")
    assert adapterspec.adapter_names(model) == ["b"]
    assert adapterspec.active_adapters(model) == reference.base_model.active_adapters == ["b"]
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))

    adapterspec.delete_adapter(model, "b")
    assert adapterspec.adapter_names(model) == []
    assert [(name, id(module)) for name, module in model.named_modules()] == before_ids
    expected_state = llama.state_dict()
    assert list(model.state_dict()) == list(expected_state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected_state[key]), key


def test_deleting_the_active_adapter_activates_the_first_remaining(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    a, b = _two_adapters(llama, tmp_path)
    reference = _peft_model(llama, {"a": a, "b": b})
    reference.set_adapter("a")
    model = fresh(llama)
    adapterspec.load_adapter(model, a, "a")
    adapterspec.load_adapter(model, b, "b", activate=False)
    assert adapterspec.active_adapters(model) == ["a"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.delete_adapter("a")
    adapterspec.delete_adapter(model, "a")
    assert adapterspec.active_adapters(model) == reference.base_model.active_adapters == ["b"]
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))


def test_merge_several_and_unmerge_like_peft(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    a, b = _two_adapters(llama, tmp_path)
    reference = _peft_model(llama, {"a": a, "b": b})
    model = fresh(llama)
    adapterspec.load_adapter(model, a, "a")
    adapterspec.load_adapter(model, b, "b")
    reference.base_model.set_adapter(["a", "b"])
    adapterspec.set_active_adapters(model, ["a", "b"])
    unmerged = logits(model, token_inputs)

    reference.merge_adapter(["a", "b"])
    adapterspec.merge_adapters(model, ["a", "b"])
    merged = logits(model, token_inputs)
    assert_close(merged, logits(reference, token_inputs))
    assert_close(merged, unmerged)

    reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    assert_close(logits(model, token_inputs), unmerged)
    restored = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "adapter_weights" not in k}
    for key, value in llama.state_dict().items():  # the base weights are back (to float rounding)
        assert_close(restored[key], value, atol=fp32_tolerance(value, 4))  # two adds and two subtractions

    # set_active unmerges first (the hook contract)
    adapterspec.set_active_adapters(model, ["a"])
    adapterspec.merge_adapters(model, ["a"])
    adapterspec.set_active_adapters(model, ["b"])
    reference.set_adapter("b")
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))


def _merge_cases() -> list[Any]:
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    return [
        pytest.param("gpt2", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                fan_in_fan_out=True, lora_bias=True), id="gpt2-lora-bias"),
        pytest.param("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                 use_dora=True), id="llama-dora"),
        pytest.param("llama", lambda: IA3Config(target_modules=["k_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]), id="llama-ia3"),
        pytest.param("llama", lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"]), id="llama-loha"),
        pytest.param("llama", lambda: LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"]), id="llama-lokr"),
        pytest.param("gpt2", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                fan_in_fan_out=True, use_dora=True), id="gpt2-dora"),
        pytest.param("gpt2", lambda: IA3Config(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                                               feedforward_modules=["mlp.c_proj"]), id="gpt2-ia3"),
        pytest.param("cnn", lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "conv3", "head"],
                                               use_dora=True), id="cnn-dora"),
        pytest.param("cnn", lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"]),
                     id="cnn-lora"),
        pytest.param("cnn", lambda: IA3Config(target_modules=["conv1", "conv2"], feedforward_modules=["conv2"]),
                     id="cnn-ia3"),
    ]


def _forward(model: Any, kind: str, request: pytest.FixtureRequest) -> Any:
    if kind == "cnn":
        with torch.no_grad():
            return model(request.getfixturevalue("image_inputs"))
    return logits(model, request.getfixturevalue("token_inputs"))


@pytest.mark.parametrize(("kind", "make_config"), _merge_cases())
def test_merge_unmerge_unload_like_peft(kind: str, make_config: Any, request: pytest.FixtureRequest,
                                       tmp_path: Any) -> None:
    base = request.getfixturevalue(kind)
    peft_reference(base, make_config(), tmp_path)
    reference = _peft_model(base, {"default": tmp_path})
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    unmerged = _forward(model, kind, request)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert_close(_forward(model, kind, request), _forward(reference, kind, request))
    assert_close(_forward(model, kind, request), unmerged)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    assert_close(_forward(model, kind, request), _forward(reference, kind, request))
    assert_close(_forward(model, kind, request), unmerged)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = reference.merge_and_unload()
    adapterspec.unload(model, merge=True)
    assert adapterspec.adapter_names(model) == []
    assert sorted(model.state_dict()) == sorted(plain.state_dict())
    assert_close(_forward(model, kind, request), _forward(plain, kind, request))


def _half_merge_cases() -> list[Any]:
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    return [
        pytest.param("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"]),
                     id="llama-lora"),
        pytest.param("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                                 init_lora_weights="mica"), id="llama-mica"),
        pytest.param("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
                                                 use_dora=True), id="llama-dora"),
        pytest.param("llama", lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]), id="llama-loha"),
        pytest.param("llama", lambda: LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]), id="llama-lokr"),
        pytest.param("gpt2", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                fan_in_fan_out=True, lora_bias=True), id="gpt2-lora-bias"),
        pytest.param("cnn", lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv3", "head"]),
                     id="cnn-lora"),
        pytest.param("cnn", lambda: LoHaConfig(r=2, alpha=4, target_modules=["conv1", "conv2"]), id="cnn-loha"),
    ]


def _base_weights(model: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("base_layer.weight", "base_layer.bias"))}


@pytest.mark.parametrize(("kind", "make_config"), _half_merge_cases())
def test_half_precision_merge_and_unmerge_round_as_peft(kind: str, make_config: Any, request: pytest.FixtureRequest,
                                                        tmp_path: Any) -> None:
    """A bfloat16 base with a float32 adapter (PEFT's autocast_adapter_dtype): PEFT's merge adds the float32 delta to
    the weight in place (one rounding) for LoRA on a Linear / Conv1D / conv, DoRA, LoHa and LoKr, and rounds the delta
    first for an Embedding, a MiCA adapter and LoRA's unmerge (SPEC.md 7.3). The merged weights, and the weights
    unmerged again, are PEFT's bit for bit (before: LoRA, LoHa and LoKr merges rounded twice -- 5,318 of 18,432
    merged LoRA elements one bf16 step off PEFT's, logits 0.022 off; LoHa/LoKr unmerges too)."""
    base = fresh(request.getfixturevalue(kind)).to(torch.bfloat16)
    peft_reference(base, make_config(), tmp_path)
    reference = _peft_model(base, {"default": tmp_path})
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    peft_base = reference.base_model.model
    theirs = _base_weights(peft_base)
    before = _base_weights(model)
    assert sorted(before) == sorted(theirs) and theirs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    merged, theirs = _base_weights(model), _base_weights(peft_base)
    assert all(not torch.equal(merged[k], before[k]) for k in merged if k.endswith("weight"))
    for key, value in theirs.items():
        assert merged[key].dtype == torch.bfloat16
        assert torch.equal(merged[key], value), (key, int((merged[key] != value).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    unmerged, theirs = _base_weights(model), _base_weights(peft_base)
    for key, value in theirs.items():
        assert torch.equal(unmerged[key], value), (key, int((unmerged[key] != value).sum()))


def test_prefix_and_prompt_tuning_cannot_merge(llama: Any, tmp_path: Any) -> None:
    from peft import PromptTuningConfig

    peft_reference(llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tmp_path)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    with pytest.raises(adapterspec.UnsupportedError, match="no weights to merge"):
        adapterspec.merge_adapters(model)


def test_unknown_adapter_names_are_refused(llama: Any, tmp_path: Any) -> None:
    a, _ = _two_adapters(llama, tmp_path)
    model = fresh(llama)
    adapterspec.load_adapter(model, a, "a")
    with pytest.raises(adapterspec.AdapterNotFoundError, match="'x'"):
        adapterspec.set_active_adapters(model, ["a", "x"])
    assert adapterspec.active_adapters(model) == ["a"]
    with pytest.raises(adapterspec.AdapterExistsError):
        adapterspec.load_adapter(model, a, "a")
    with pytest.raises(adapterspec.AdapterNotFoundError):
        adapterspec.delete_adapter(model, "x")


def test_modules_to_save_switch_with_their_adapter(bert: Any, token_inputs: Any, tmp_path: Any) -> None:
    """Each adapter brings its own copy of the classifier; switching adapters switches the copy."""
    from peft import LoraConfig

    def config() -> Any:
        return LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"], modules_to_save=["classifier"])

    peft_reference(bert, config(), tmp_path / "a")
    peft_reference(bert, config(), tmp_path / "b", fill=lambda m: fill_adapter_weights(m, salt=500))
    reference = _peft_model(bert, {"a": tmp_path / "a", "b": tmp_path / "b"})
    model = fresh(bert)
    adapterspec.load_adapter(model, tmp_path / "a", "a")
    adapterspec.load_adapter(model, tmp_path / "b", "b")
    results = {}
    for name in ("a", "b"):
        reference.set_adapter(name)
        adapterspec.set_active_adapters(model, name)
        results[name] = logits(model, token_inputs)
        assert_close(results[name], logits(reference, token_inputs))
    assert (results["a"] - results["b"]).abs().max() > 1e-3
    with reference.disable_adapter(), adapterspec.disabled_adapters(model):
        assert_close(logits(model, token_inputs), logits(bert, token_inputs), atol=0)
        assert_close(logits(model, token_inputs), logits(reference, token_inputs))
    adapterspec.unload(model)
    assert type(model.classifier) is type(bert.classifier)
    assert torch.equal(model.classifier.weight, bert.classifier.weight)


def test_a_second_model_sharing_the_adapted_modules_is_refused_and_both_stay(llama: Any, token_inputs: Any,
                                                                             tmp_path: Any) -> None:
    """Two models sharing one backbone (``m2.model = m1.model``): an adapter loaded through the second into modules
    the first model's adapter wraps is refused, typed (it raised a KeyError from the bookkeeping); both models keep
    computing the first adapter, and deleting it gives both the base back."""
    from transformers import LlamaForCausalLM

    first, second = _two_adapters(llama, tmp_path)
    m1 = fresh(llama)
    m2 = LlamaForCausalLM(llama.config).eval()
    m2.model, m2.lm_head = m1.model, m1.lm_head
    adapterspec.load_adapter(m1, first, adapter_name="a")
    adapted = logits(m1, token_inputs)
    with pytest.raises(adapterspec.UnsupportedError, match="another model that shares it"):
        adapterspec.load_adapter(m2, second, adapter_name="b")
    assert adapterspec.adapter_names(m1) == ["a"] and adapterspec.adapter_names(m2) == []
    assert torch.equal(logits(m1, token_inputs), adapted) and torch.equal(logits(m2, token_inputs), adapted)
    adapterspec.delete_adapter(m1, "a")
    assert torch.equal(logits(m2, token_inputs), logits(llama, token_inputs))


def test_merge_into_a_tied_weight_refuses_until_untied(token_inputs: Any) -> None:
    """LoRA on the embedding of a model whose output layer shares its weight (no ensure_weight_tying): the merged
    delta changed the logits projection too (21.9 off the adapted model; PEFT merges it and warns). Refused, nothing
    changed; once untied, the merge gives the adapted model's outputs."""
    from torch import nn
    from transformers import LlamaForCausalLM
    from torch_helpers import tiny_llama_config

    config = tiny_llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": False,
                                       "target_modules": ["q_proj", "embed_tokens"]})
    adapted = logits(model, token_inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (lambda: adapterspec.merge_adapters(model), lambda: adapterspec.unload(model, merge=True)):
        with pytest.raises(adapterspec.UnsupportedError, match="'model.embed_tokens' is also 'lm_head.weight'"):
            merge()
    assert sorted(before) == sorted(model.state_dict())
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
    assert adapterspec.active_adapters(model) == ["default"]
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # the hint: untie
    adapterspec.merge_adapters(model)
    assert_close(logits(model, token_inputs), adapted)


def test_pickled_model_with_compiled_patterns_loads(llama: Any, token_inputs: Any) -> None:
    """modules_to_save and a regex target_modules compile adapterspec's own patterns; a pickled model (torch.save of
    the whole model, a spawned worker) failed to load with a raw TypeError (re.compile(None))."""
    import pickle

    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "init_lora_weights": False,
                                       "target_modules": r".*\.(q|v)_proj", "modules_to_save": ["lm_head"]})
    copy = pickle.loads(pickle.dumps(model))
    assert torch.equal(logits(copy, token_inputs), logits(model, token_inputs))
    assert adapterspec.adapter_names(copy) == ["default"]
    adapterspec.delete_adapter(copy, "default")  # the copy's adapter is its own
    assert adapterspec.adapter_names(model) == ["default"]


def test_merging_some_of_the_active_adapters_of_a_layer_refuses(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """Two active adapters on one layer, one merged: a merged layer runs its base weight alone, as PEFT's, so the
    other stopped there while listed active (PEFT: 0.14 off the unmerged outputs). Refused, nothing changed;
    merging both, or one with the other inactive, works."""
    from torch_helpers import assert_same_snapshot, snapshot

    a, b = _two_adapters(llama, tmp_path)
    model = fresh(llama)
    adapterspec.load_adapter(model, a, "a")
    adapterspec.load_adapter(model, b, "b")
    adapterspec.set_active_adapters(model, ["a", "b"])
    both = logits(model, token_inputs)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match="would stop adapter 'b'") as info:
        adapterspec.merge_adapters(model, ["a"])
    assert info.value.key == "b" and "q_proj" in info.value.message
    assert_same_snapshot(model, before)
    adapterspec.merge_adapters(model, ["a", "b"])
    assert_close(logits(model, token_inputs), both)
    adapterspec.unmerge_adapters(model)
    adapterspec.set_active_adapters(model, ["a"])
    alone = logits(model, token_inputs)
    adapterspec.merge_adapters(model, ["a"])  # "b" inactive: nothing stops
    assert_close(logits(model, token_inputs), alone)


# -- which adapters may run together on one layer (SPEC.md 8.9) ------------------------------------------------

_ROW_INPUTS = {"input_ids": torch.tensor([[1, 5, 7, 2, 9, 11, 3, 40, 5], [11, 9, 2, 7, 5, 1, 60, 70, 80]]),
               "attention_mask": torch.ones(2, 9, dtype=torch.long)}  # hit the trainable rows 1, 2, 5, 7, 9, 11


def _fill_rows(model: Any, salt: int) -> None:
    """Element-unique adapter values, the trainable token rows too (PEFT starts them as the base rows)."""
    from torch_helpers import unique_values

    fill_adapter_weights(model, salt=salt, scale=0.08)
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "trainable_tokens_delta" in name:
                param.copy_(unique_values(tuple(param.shape), salt + index, scale=0.5))


def _saved(base: Any, tmp_path: Any, name: str, config: Any, salt: int) -> Any:
    peft_reference(base, config, tmp_path / name, fill=lambda m: _fill_rows(m, salt))
    return tmp_path / name


def _ours(base: Any, folders: dict[str, Any]) -> Any:
    model = fresh(base)
    for name, folder in folders.items():
        adapterspec.load_adapter(model, folder, name)
    return model


def _refused_at_activation_and_merge(model: Any, names: list[str], needle: str, module: str) -> None:
    """``set_active_adapters(names)`` and ``merge_adapters(names)`` (from another active set) are refused, typed,
    naming the adapters and the module, and change nothing."""
    from torch_helpers import assert_same_snapshot, snapshot

    adapterspec.set_active_adapters(model, [names[0]])
    before = snapshot(model)
    for call in (lambda: adapterspec.set_active_adapters(model, names),
                 lambda: adapterspec.merge_adapters(model, names)):
        with pytest.raises(adapterspec.UnsupportedError, match=needle) as info:
            call()
        assert all(repr(n) in info.value.message for n in names), info.value.message
        assert module in info.value.message and module in (info.value.key or "") and info.value.hint
        assert_same_snapshot(model, before)


@pytest.mark.parametrize("dora", [False, True])
def test_ia3_with_another_method_on_one_layer_is_refused_at_activation(dora: bool, llama: Any, tmp_path: Any) -> None:
    """PEFT refuses LoRA and IA3 together ('Cannot combine adapters with different peft types'; PeftMixedModel takes
    no IA3); adapterspec ran them, its merge 3.9e-2 off its unmerged output in one order. Refused now, both orders,
    when activated and when merged; on disjoint layers they still run together (each layer its own method): equal
    to PEFT's IA3 over the LoRA merged into the base."""
    from peft import IA3Config, LoraConfig, PeftModel

    lora = _saved(llama, tmp_path, "lora", LoraConfig(r=4, lora_alpha=8, use_dora=dora,
                                                      target_modules=["q_proj", "v_proj"]), 0)
    ia3 = _saved(llama, tmp_path, "ia3", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]), 3000)
    apart = _saved(llama, tmp_path, "apart", IA3Config(target_modules=["k_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"]), 4000)
    with pytest.raises(ValueError, match="different peft types"):
        _peft_model(llama, {"lora": lora, "ia3": ia3})
    model = _ours(llama, {"lora": lora, "ia3": ia3, "apart": apart})
    for names in (["lora", "ia3"], ["ia3", "lora"]):
        _refused_at_activation_and_merge(model, names, "IA3 adapter 'ia3' cannot run together", "v_proj")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(fresh(llama), str(lora)).merge_and_unload()
        reference = PeftModel.from_pretrained(merged, str(apart)).eval()
    expected = logits(reference, _ROW_INPUTS)
    for names in (["lora", "apart"], ["apart", "lora"]):
        adapterspec.set_active_adapters(model, names)
        assert_close(logits(model, _ROW_INPUTS), expected)


def test_two_copies_of_a_module_saved_whole_are_refused_at_activation(llama: Any, tmp_path: Any) -> None:
    """Two adapters saving lm_head whole: PEFT raises 'Only one adapter can be set at a time for
    ModulesToSaveWrapper'; adapterspec ran the first active one's copy (the two orders 9.87 apart). Refused now,
    each alone equal to PEFT."""
    from peft import LoraConfig

    a = _saved(llama, tmp_path, "a", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                modules_to_save=["lm_head"]), 100)
    c = _saved(llama, tmp_path, "c", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"],
                                                modules_to_save=["lm_head"]), 300)
    reference = _peft_model(llama, {"a": a, "c": c})
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        reference.base_model.set_adapter(["a", "c"])
    model = _ours(llama, {"a": a, "c": c})
    for names in (["a", "c"], ["c", "a"]):
        _refused_at_activation_and_merge(model, names, "runs one adapter at a time", "lm_head")
    for name in ("a", "c"):
        reference.base_model.set_adapter(name)
        adapterspec.set_active_adapters(model, [name])
        assert_close(logits(model, _ROW_INPUTS), logits(reference, _ROW_INPUTS))


@pytest.mark.parametrize("form", ["trainable-tokens", "lora-token-indices"])
def test_overlapping_token_rows_are_refused_disjoint_rows_compose_like_peft(form: str, llama: Any,
                                                                          tmp_path: Any) -> None:
    """Two adapters replacing row 5 of embed_tokens: PEFT refuses; adapterspec let the last active one win (the two
    orders 0.58 apart; LoRA's trainable_token_indices 0.71). Refused now; adapters with disjoint rows still run
    together, equal to PEFT's TRAINABLE_TOKENS composition in both orders."""
    from peft import LoraConfig, TrainableTokensConfig

    def config(rows: list[int], target: str) -> Any:
        if form == "trainable-tokens":
            return TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=rows)
        return LoraConfig(r=2, lora_alpha=4, target_modules=[target], trainable_token_indices=rows)

    a = _saved(llama, tmp_path, "a", config([1, 5, 7], "q_proj"), 10)
    b = _saved(llama, tmp_path, "b", config([2, 9], "v_proj"), 20)
    c = _saved(llama, tmp_path, "c", config([5, 11], "k_proj"), 30)
    model = _ours(llama, {"a": a, "b": b, "c": c})
    for names in (["a", "c"], ["c", "a"]):
        _refused_at_activation_and_merge(model, names, r"both replace rows \[5\]", "embed_tokens")
    if form == "trainable-tokens":  # PEFT composes disjoint TRAINABLE_TOKENS rows (its LoRA form refuses any two)
        reference = _peft_model(llama, {"a": a, "b": b})
        for names in (["a", "b"], ["b", "a"]):
            reference.base_model.set_adapter(names)
            adapterspec.set_active_adapters(model, names)
            assert_close(logits(model, _ROW_INPUTS), logits(reference, _ROW_INPUTS))


@pytest.mark.parametrize("other", ["loha", "lokr"])
def test_dora_with_another_method_on_one_layer_is_refused_lora_stays_like_peft_mixed(other: str, llama: Any,
                                                                                    tmp_path: Any) -> None:
    """PEFT's PeftMixedModel nests its layers in load order, so DoRA rescales a LoHa/LoKr loaded before it and not
    one loaded after it, whatever the active order; adapterspec applied the active order ([loha, dora] 3.40e-2 off
    PeftMixedModel). Refused now (both load orders, both active orders); plain LoRA with LoHa/LoKr adds up, equal
    to PeftMixedModel in every order, and so does DoRA with a LoHa/LoKr on other layers."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    make = LoHaConfig if other == "loha" else LoKrConfig
    names_of = {"loha": "LoHa", "lokr": "LoKr"}
    dora = _saved(llama, tmp_path, "dora", LoraConfig(r=3, lora_alpha=5, use_dora=True,
                                                      target_modules=["q_proj", "v_proj", "o_proj"]), 2000)
    lora = _saved(llama, tmp_path, "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 0)
    added = _saved(llama, tmp_path, other, make(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), 5000)
    apart = _saved(llama, tmp_path, "apart", make(r=2, alpha=4, target_modules=["k_proj", "up_proj"]), 6000)
    for load in ([other, "dora"], ["dora", other]):
        folders = {"dora": dora, other: added}
        model = _ours(llama, {n: folders[n] for n in load})
        for names in (load, load[::-1]):
            _refused_at_activation_and_merge(model, names, f"DoRA adapter 'dora' cannot run together with "
                                                           f"{names_of[other]} adapter '{other}'", "q_proj")
    for pair in ((other, "lora"), ("lora", other), ("dora", "apart"), ("apart", "dora")):
        folders = {"dora": dora, "lora": lora, other: added, "apart": apart}
        reference = _peft_model(llama, {n: folders[n] for n in pair}, mixed=True)
        model = _ours(llama, {n: folders[n] for n in pair})
        for names in (list(pair), list(pair[::-1])):
            reference.set_adapter(names)
            adapterspec.set_active_adapters(model, names)
            assert_close(logits(model, _ROW_INPUTS), logits(reference, _ROW_INPUTS))


def test_an_invalid_name_the_caller_passes_is_a_config_error(llama: Any, tmp_path: Any) -> None:
    """SPEC.md 3.3: a name the caller passed is refused with ConfigError (UnsafeFileError is for names read from a
    file); load_adapter and inject_adapter raised UnsafeFileError. Nothing changes."""
    from torch_helpers import assert_same_snapshot, snapshot

    a, _ = _two_adapters(llama, tmp_path)
    model = fresh(llama)
    before = snapshot(model)
    for name in ("a/b", "../x", "", ".", "x" * 129, "fr\n"):
        with pytest.raises(adapterspec.ConfigError, match="adapter_name") as info:
            adapterspec.load_adapter(model, a, adapter_name=name)
        assert not isinstance(info.value, adapterspec.UnsafeFileError) and repr(name)[:20] in info.value.message
        with pytest.raises(adapterspec.ConfigError, match="adapter_name"):
            adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}, name)
    assert_same_snapshot(model, before)


def test_a_name_given_twice_is_refused(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """``set_active_adapters(model, ['a', 'a'])``: PEFT's set_adapter applies LoRA 'a' twice (0.071 off 'a' alone
    here); adapterspec dropped the duplicate, silently. Refused (ConfigError naming it), as is merging a list naming
    one twice; nothing changes."""
    from torch_helpers import assert_same_snapshot, snapshot

    a, b = _two_adapters(llama, tmp_path)
    reference = _peft_model(llama, {"a": a})
    once = logits(reference, token_inputs)
    reference.base_model.set_adapter(["a", "a"])
    assert (logits(reference, token_inputs) - once).abs().max() > 0.05  # PEFT: twice (0.071)
    model = fresh(llama)
    adapterspec.load_adapter(model, a, "a")
    adapterspec.load_adapter(model, b, "b", activate=False)
    before = snapshot(model)
    for names in (["a", "a"], ["a", "b", "a"]):
        with pytest.raises(adapterspec.ConfigError, match="'a' twice") as info:
            adapterspec.set_active_adapters(model, names)
        assert info.value.key == "a"
        with pytest.raises(adapterspec.ConfigError, match="'a' twice"):
            adapterspec.merge_adapters(model, names)
    assert_same_snapshot(model, before)
    assert_close(logits(model, token_inputs), once)


def test_save_adapters_refuses_names_differing_only_in_case(llama: Any, tmp_path: Any) -> None:
    """SPEC.md 3.3: two adapters of one folder must not have names that differ only in letter case (on macOS and
    Windows one folder replaces the other). save_adapters wrote Fr/ and fr/, which read_adapters then refused;
    now it refuses before writing anything."""
    a, b = _two_adapters(llama, tmp_path)
    for first, second in (("Fr", "fr"), ("default", "DEFAULT")):
        model = fresh(llama)
        adapterspec.load_adapter(model, a, first)
        adapterspec.load_adapter(model, b, second)
        target = tmp_path / f"set-{second}"
        with pytest.raises(adapterspec.ConfigError, match=f"'{first}' and '{second}' differ only in letter case"):
            adapterspec.save_adapters(model, target)
        assert not target.exists()
        target.mkdir()
        with pytest.raises(adapterspec.ConfigError, match="differ only in letter case"):
            adapterspec.save_adapters(model, target, overwrite=True)
        assert list(target.iterdir()) == []
        adapterspec.save_adapters(model, target, [first])  # one of them alone: fine
        assert sorted(adapterspec.read_adapters(target)) == [first]


@pytest.mark.filterwarnings("ignore:Already unmerged")  # PEFT's unmerge of its layers without a merged adapter
def test_deleting_an_unmerged_adapter_keeps_the_merged_ones_merged(llama: Any, token_inputs: Any,
                                                                   tmp_path: Any) -> None:
    """PEFT keeps merged adapters merged when another adapter is deleted; delete_adapter unmerged every merged adapter
    first, also to delete an unrelated one (merged state lost silently, the base weights back only to rounding).
    Deleting an adapter that is not merged -- on layers of its own, or on a layer where merged ones are -- leaves the
    merged ones merged and every other weight bit for bit. Deleting a merged adapter (PEFT refuses) unmerges every
    merged adapter first, as documented."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from adapterspec_torch.layers import AdapterLayer

    a, b = _two_adapters(llama, tmp_path)  # a: q, v, down_proj; b: q, k, up_proj
    for name, target, salt in (("c", "o_proj", 2000), ("d", "q_proj", 3000)):
        peft_reference(llama, LoraConfig(r=2, lora_alpha=4, target_modules=[target]), tmp_path / name,
                       fill=lambda m, salt=salt: fill_adapter_weights(m, salt=salt, scale=0.08))
    folders = {"a": a, "b": b, "c": tmp_path / "c", "d": tmp_path / "d"}
    reference = _peft_model(llama, folders)
    reference.base_model.set_adapter(["a", "b"])
    reference.merge_adapter(["a", "b"])
    model = fresh(llama)
    for name, folder in folders.items():
        adapterspec.load_adapter(model, folder, name, activate=False)
    adapterspec.set_active_adapters(model, ["a", "b"])
    adapterspec.merge_adapters(model)

    def merged(m: Any, kind: type) -> list[str]:
        return sorted({n for layer in m.modules() if isinstance(layer, kind) for n in layer.merged_adapters})

    def base(m: Any) -> dict[str, Any]:
        return {k.replace(".base_layer", ""): v.clone() for k, v in m.state_dict().items() if "adapter_weights" not in k}

    weights, out = base(model), logits(model, token_inputs)
    for name in ("c", "d"):  # c: o_proj, a layer of its own; d: q_proj, where 'a' and 'b' are merged
        reference.delete_adapter(name)
        adapterspec.delete_adapter(model, name)
        assert merged(model, AdapterLayer) == merged(reference, BaseTunerLayer) == ["a", "b"]
        after = base(model)
        assert list(after) == list(weights)
        for key, value in weights.items():
            assert torch.equal(after[key], value), key
        assert torch.equal(logits(model, token_inputs), out)
        assert_close(out, logits(reference, token_inputs))
    assert adapterspec.active_adapters(model) == ["a", "b"]

    with pytest.raises(ValueError, match="Cannot delete adapter"):  # PEFT refuses a merged one
        reference.delete_adapter("a")
    reference.unmerge_adapter()
    reference.delete_adapter("a")
    adapterspec.delete_adapter(model, "a")  # every merged adapter is unmerged first
    assert merged(model, AdapterLayer) == [] and adapterspec.active_adapters(model) == ["b"]
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))
    adapterspec.delete_adapter(model, "b")
    for key, value in llama.state_dict().items():  # the base weights are back (to float rounding)
        assert_close(model.state_dict()[key], value, atol=fp32_tolerance(value, 4))


def _dotted_cases() -> list[Any]:
    from peft import LNTuningConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, VeraConfig

    return [
        pytest.param(lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                        modules_to_save=["lm_head"], trainable_token_indices=[1, 5, 7]),
                     id="lora-modules-to-save-tokens"),
        pytest.param(lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"], use_dora=True), id="dora"),
        pytest.param(lambda: LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.down_proj.weight"]),
                     id="lora-parameters"),
        pytest.param(lambda: VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), id="vera"),
        pytest.param(lambda: LNTuningConfig(target_modules=["input_layernorm"]), id="ln-tuning"),
        pytest.param(lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), id="prompt-tuning"),
        pytest.param(lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), id="prefix-tuning"),
    ]


@pytest.mark.parametrize("make_config", _dotted_cases())
def test_a_dotted_adapter_name_works_as_any_other(llama: Any, token_inputs: Any, tmp_path: Any,
                                                   make_config: Any) -> None:
    """SPEC.md 3.3 allows '.' in a name ('v1.2'); torch's module and parameter names split at dots. An adapter with
    modules_to_save under such a name failed to load (BackendError wrapping torch's KeyError "module name can't
    contain '.'"); a LoRA loaded, but model.load_state_dict(model.state_dict()) raised torch's raw RuntimeError
    (unexpected key ...adapter_weights.v1.2.lora_A_weight). Now it works as the same adapter under 'v12', bit for
    bit: outputs, switching, merging, the model's state dict (round trip into another model), the saved files,
    delete -- and the name is 'v1.2' wherever adapterspec gives it back."""
    from safetensors.torch import load_file
    from torch_helpers import snapshot

    def fill(model: Any) -> None:
        fill_adapter_weights(model, salt=5, scale=0.08)
        with torch.no_grad():
            for i, (name, param) in enumerate(sorted(model.named_parameters())):
                if "trainable_tokens_delta" in name or "ln_tuning_layers" in name or "prompt_encoder" in name:
                    param.copy_(unique_values(tuple(param.shape), 50 + i, around=float("ln" in name), scale=0.3))

    peft_reference(llama, make_config(), tmp_path / "peft", fill=fill)
    _, other = _two_adapters(llama, tmp_path)
    outputs, states = {}, {}
    for name in ("v12", "v1.2"):
        model = fresh(llama)
        adapterspec.load_adapter(model, tmp_path / "peft", name)
        adapterspec.load_adapter(model, other, f"{name}.b" if "." in name else f"{name}b", activate=False)
        assert adapterspec.adapter_names(model)[0] == name and adapterspec.active_adapters(model) == [name]
        held = {n for m in model.modules() if callable(getattr(type(m), "adapter_names", None)) for n in m.adapter_names()}
        assert held <= set(adapterspec.adapter_names(model)), held  # never the key torch stores it under
        outputs[name] = [logits(model, token_inputs)]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)  # strict: every key back where it came from
        states[name] = state
        adapterspec.save_adapter(model, tmp_path / name, name)
        adapterspec.set_active_adapters(model, [adapterspec.adapter_names(model)[1], name])
        outputs[name].append(logits(model, token_inputs))
        if not make_config().is_prompt_learning:
            adapterspec.set_active_adapters(model, [name])
            adapterspec.merge_adapters(model)
            outputs[name].append(logits(model, token_inputs))
            adapterspec.unmerge_adapters(model)
        twin = fresh(llama)  # the same adapters, other values: the state dict gives them the first model's
        adapterspec.inject_adapter(twin, json.loads((tmp_path / "peft" / "adapter_config.json").read_text()), name,
                                   trainable=False)
        adapterspec.load_adapter(twin, other, adapterspec.adapter_names(model)[1], activate=False)
        twin.load_state_dict(state)
        assert torch.equal(logits(twin, token_inputs), outputs[name][0])
        before = snapshot(fresh(llama))
        for each in list(adapterspec.adapter_names(model)):
            adapterspec.delete_adapter(model, each)
        assert [m for m, _ in snapshot(model)["modules"]] == [m for m, _ in before["modules"]]
        for key, value in model.state_dict().items():  # merged and unmerged: the base to float rounding
            assert_close(value, before["state"][key], atol=fp32_tolerance(value, 4))
    for dotted, plain in zip(outputs["v1.2"], outputs["v12"]):
        assert torch.equal(dotted, plain)
    assert len(states["v1.2"]) == len(states["v12"]) and not any("v1.2." in key for key in states["v1.2"])
    for (key, value), dotted_value in zip(states["v12"].items(), states["v1.2"].values()):
        assert torch.equal(value, dotted_value), key
    assert (tmp_path / "v12" / "adapter_config.json").read_text() == (tmp_path / "v1.2" / "adapter_config.json").read_text()
    plain, dotted = load_file(tmp_path / "v12" / "adapter_model.safetensors"), load_file(
        tmp_path / "v1.2" / "adapter_model.safetensors")
    assert list(plain) == list(dotted) and all(torch.equal(plain[k], dotted[k]) for k in plain)
