"""Prefix and prompt tuning through the model's own forward and generate, as PeftModelForCausalLM does it."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from torch_helpers import assert_close, fresh, logits, peft_reference  # noqa: E402


def _configs() -> list[Any]:
    from peft import PrefixTuningConfig, PromptTuningConfig

    return [pytest.param(lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), id="prefix"),
            pytest.param(lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), id="prompt")]


@pytest.mark.parametrize("make_config", _configs())
def test_greedy_generation_matches_peft(llama: Any, token_inputs: Any, tmp_path: Any, make_config: Any) -> None:
    from peft import PeftModel

    peft_reference(llama, make_config(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama), str(tmp_path)).eval()
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ours = model.generate(**token_inputs, **kwargs)
        theirs = reference.generate(**token_inputs, **kwargs)
        plain = llama.generate(**token_inputs, **kwargs)
    assert ours.tolist() == theirs.tolist()
    assert ours.tolist() != plain.tolist()
    with torch.no_grad():  # generate passes the cache the last step returned back in, with the whole sequence
        uncached = model.generate(**token_inputs, **kwargs, use_cache=False, output_scores=True,
                                  return_dict_in_generate=True)
        scores = reference.generate(**token_inputs, **kwargs, output_scores=True, return_dict_in_generate=True).scores
    assert uncached.sequences.tolist() == theirs.tolist()  # PEFT raises a RuntimeError with use_cache=False
    for mine, peft_step in zip(uncached.scores, scores, strict=True):
        assert_close(mine, peft_step)


@pytest.mark.parametrize("make_config", _configs())
def test_positional_inputs_labels_and_hook_removal(llama: Any, token_inputs: Any, tmp_path: Any,
                                                   make_config: Any) -> None:
    reference = peft_reference(llama, make_config(), tmp_path)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    ids, mask = token_inputs["input_ids"], token_inputs["attention_mask"]
    with torch.no_grad():
        positional = model(ids, mask).logits
        ours = model(input_ids=ids, attention_mask=mask, labels=ids)
        theirs = reference(input_ids=ids, attention_mask=mask, labels=ids)
    assert_close(positional, theirs.logits)
    assert_close(ours.loss, theirs.loss)
    assert len(model._forward_pre_hooks) == 1
    adapterspec.delete_adapter(model, "default")
    assert len(model._forward_pre_hooks) == 0
    assert_close(logits(model, token_inputs), logits(llama, token_inputs), atol=0)


def test_only_one_virtual_token_adapter_active(llama: Any, tmp_path: Any) -> None:
    from peft import PrefixTuningConfig, PromptTuningConfig

    peft_reference(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tmp_path / "a")
    peft_reference(llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tmp_path / "b")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "a", "a")
    adapterspec.load_adapter(model, tmp_path / "b", "b")
    with pytest.raises(adapterspec.UnsupportedError, match="one prefix/prompt-tuning adapter"):
        adapterspec.set_active_adapters(model, ["a", "b"])
    assert adapterspec.active_adapters(model) == ["b"]
