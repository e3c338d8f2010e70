"""LN tuning (``LN_TUNING``, SPEC.md 15.3) exact against PEFT 0.21 in both directions.

Llama (RMSNorm: ``weight``; PEFT's per-architecture default targets), BERT for sequence classification (LayerNorm:
``weight`` and ``bias``; the classifier saved whole) and a Linear layer targeted directly: the active adapter's copy
of each targeted layer runs instead of it. Our save has PEFT's keys and bytes; PEFT loads it with nothing missing
or unexpected, no warning of its own and the same outputs; merging gives PEFT's merged outputs.
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
from safetensors.torch import load_file  # noqa: E402
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


def _fill(model: Any) -> None:
    """Element-unique norm weights around 1 and biases around 0; the classifier too."""
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "ln_tuning_layers" in name and name.endswith("weight") and param.dim() == 1:
                param.copy_(unique_values(tuple(param.shape), 80 + index, around=1.0, scale=0.3))
            elif "ln_tuning_layers" in name or "modules_to_save" in name:
                param.copy_(unique_values(tuple(param.shape), 80 + index, scale=0.3))


def _cases() -> list[Any]:
    from peft import LNTuningConfig

    return [
        pytest.param("llama", lambda: LNTuningConfig(task_type="CAUSAL_LM"), id="llama-default-targets"),
        pytest.param("llama", lambda: LNTuningConfig(target_modules=["input_layernorm", "norm"],
                                                     exclude_modules=["layers.1.input_layernorm"]),
                     id="llama-listed-and-excluded"),
        pytest.param("llama", lambda: LNTuningConfig(target_modules=r".*\.0\.self_attn\.o_proj"), id="llama-linear"),
        pytest.param("bert", lambda: LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"]),
                     id="bert-layernorm-classifier"),
    ]


@pytest.mark.parametrize(("kind", "make_config"), _cases())
def test_peft_folder_roundtrip(kind: str, make_config: Any, request: pytest.FixtureRequest, tmp_path: Any,
                               token_inputs: Any, caplog: pytest.LogCaptureFixture) -> None:
    base = request.getfixturevalue(kind)
    reference = peft_reference(base, make_config(), tmp_path / "peft", fill=_fill)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    expected = logits(reference, token_inputs)
    base_out = logits(base, token_inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, token_inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, token_inputs), base_out, atol=0)

    adapterspec.save_adapter(model, tmp_path / "ours")
    saved = assert_saved_as_peft_saved(tmp_path / "peft", tmp_path / "ours")

    loaded = assert_peft_loads_ours(base, tmp_path / "peft", tmp_path / "ours", caplog, token_inputs, expected)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = logits(reference, token_inputs)
    adapterspec.merge_adapters(model)
    assert_close(logits(model, token_inputs), merged_expected)
    adapterspec.unmerge_adapters(model)
    assert_close(logits(model, token_inputs), expected)


def test_null_target_modules_take_peft_default(llama: Any, tmp_path: Any, token_inputs: Any) -> None:
    """PEFT writes the resolved list; a null one (PEFT loads it too) resolves to the same table entry."""
    from peft import LNTuningConfig

    reference = peft_reference(llama, LNTuningConfig(task_type="CAUSAL_LM"), tmp_path, fill=_fill)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": None}))
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))


def test_two_active_ln_adapters_are_refused(llama: Any, tmp_path: Any, token_inputs: Any) -> None:
    """PEFT runs one LN tuning adapter at a time (it raises for more); so do we, with a typed error."""
    from peft import LNTuningConfig

    peft_reference(llama, LNTuningConfig(target_modules=["norm"]), tmp_path, fill=_fill)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path, "a")
    adapterspec.load_adapter(model, tmp_path, "b")
    before = snapshot(model)
    with pytest.raises(adapterspec.errors.UnsupportedError, match="one adapter at a time") as info:
        adapterspec.set_active_adapters(model, ["a", "b"])  # when activated (it raised at the forward)
    assert info.value.key == "model.norm"
    assert_same_snapshot(model, before)
    assert logits(model, token_inputs).shape == (2, 9, 128)


def test_a_wrong_shape_is_refused(llama: Any, tmp_path: Any) -> None:
    from peft import LNTuningConfig
    from safetensors.torch import save_file

    peft_reference(llama, LNTuningConfig(target_modules=["norm"]), tmp_path, fill=_fill)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.norm.ln_tuning_layers.weight"
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(adapterspec.errors.ShapeMismatchError, match="ln_tuning_layers.weight"):
        adapterspec.load_adapter(model, tmp_path)
    assert_same_snapshot(model, before)


def test_docstring_examples() -> None:
    import doctest

    from adapterspec_torch import ln_tuning

    result = doctest.testmod(ln_tuning, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0 and result.attempted > 0
