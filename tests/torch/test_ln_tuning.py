"""LN tuning (``LN_TUNING``, SPEC.md 15.3) exact against PEFT 0.21 in both directions.

Llama (RMSNorm: ``weight``; PEFT's per-architecture default targets), BERT for sequence classification (LayerNorm:
``weight`` and ``bias``; the classifier saved whole) and a Linear layer targeted directly: the active adapter's copy
of each targeted layer runs instead of it. Our save has PEFT's keys and bytes; PEFT loads it with nothing missing
or unexpected, no warning of its own and the same outputs; merging gives PEFT's merged outputs.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch_helpers import assert_close, assert_same_snapshot, fresh, logits, peft_reference, snapshot, unique_values  # noqa: E402


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


def _peft_load(base: Any, folder: Any, caplog: pytest.LogCaptureFixture) -> tuple[Any, list[str]]:
    from peft import PeftModel

    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(fresh(base), str(folder)).eval()
    said = sorted({str(w.message) for w in caught} |
                  {r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING})
    return loaded, [m for m in said if "deprecated" not in m]


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
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config

    from peft.utils import get_peft_model_state_dict

    _, said_peft = _peft_load(base, tmp_path / "peft", caplog)
    loaded, said_ours = _peft_load(base, tmp_path / "ours", caplog)
    assert said_ours == said_peft
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(saved)
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key]), key
    assert_close(logits(loaded, token_inputs), expected)

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
    adapterspec.set_active_adapters(model, ["a", "b"])
    with pytest.raises(adapterspec.errors.UnsupportedError, match="one adapter"):
        logits(model, token_inputs)


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
