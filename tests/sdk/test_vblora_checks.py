"""VB-LoRA config rules, tensor checks of both saved forms, the shared bank's naming and refused variants
(SPEC.md 17.4), without a framework."""

from __future__ import annotations

from typing import Any

import pytest

from adapterspec._rules import PORTABLE_METHODS, training_refusals, unsupported_features
from adapterspec._vblora import index_dtype
from adapterspec.checks import TensorInfo, tensor_errors
from adapterspec.config import AdapterConfig
from adapterspec.errors import DTypeMismatchError, MissingTensorError, ShapeMismatchError, UnexpectedTensorError
from adapterspec.naming import parse_key

VB = {"peft_type": "VBLORA", "r": 2, "num_vectors": 5, "vector_length": 4, "topk": 2, "target_modules": ["q"]}
Q = "base_model.model.l.q"
BANK = "base_model.vblora_vector_bank"
FULL = {f"{Q}.vblora_logits_A": TensorInfo((2, 3, 5), "F32"), f"{Q}.vblora_logits_B": TensorInfo((2, 2, 5), "F32"),
        BANK: TensorInfo((5, 4), "F32")}
TOPK = {f"{Q}.vblora_logits_A_topk_indices": TensorInfo((2, 3, 2), "U8"),
        f"{Q}.vblora_logits_A_topk_weights": TensorInfo((2, 3, 1), "F32"),
        f"{Q}.vblora_logits_B_topk_indices": TensorInfo((2, 2, 2), "U8"),
        f"{Q}.vblora_logits_B_topk_weights": TensorInfo((2, 2, 1), "F32"), BANK: TensorInfo((5, 4), "F32")}


def _errors(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> list[Any]:
    return tensor_errors(AdapterConfig.from_dict(config), tensors)


def test_both_forms_pass_and_the_bank_is_shared() -> None:
    assert "VBLORA" in PORTABLE_METHODS
    assert _errors(VB, FULL) == []
    assert _errors(VB | {"save_only_topk_weights": True}, TOPK) == []
    name = parse_key(BANK, "VBLORA")
    assert (name.module, name.param, name.role) == ("", "vblora_vector_bank", "shared")
    assert parse_key(f"{Q}.vblora_logits_A_topk_indices", "VBLORA").param == "vblora_logits_A_topk_indices"


def test_index_dtype_is_peft_choice() -> None:
    assert [index_dtype(n) for n in (1, 255, 256, 2**15 - 1, 2**15, 2**31)] == ["U8", "U8", "I16", "I16", "I32", "I64"]


@pytest.mark.parametrize(("change", "error", "key"), [
    ({f"{Q}.vblora_logits_A": TensorInfo((3, 2, 5), "F32")}, ShapeMismatchError, f"{Q}.vblora_logits_A"),  # rank axis
    ({f"{Q}.vblora_logits_B": TensorInfo((2, 2, 6), "F32")}, ShapeMismatchError, f"{Q}.vblora_logits_B"),  # N
    ({f"{Q}.vblora_logits_B": TensorInfo((2, 5), "F32")}, ShapeMismatchError, f"{Q}.vblora_logits_B"),  # axes
    ({BANK: TensorInfo((4, 5), "F32")}, ShapeMismatchError, BANK),  # transposed bank
    ({f"{Q}.vblora_logits_A": TensorInfo((2, 3, 5), "I32")}, Exception, f"{Q}.vblora_logits_A"),  # float only
])
def test_full_form_problems_name_the_tensor(change: dict[str, TensorInfo], error: type, key: str) -> None:
    errors = _errors(VB, FULL | change)
    assert any(isinstance(e, error) and e.key == key for e in errors), errors


def test_missing_and_other_form_tensors() -> None:
    errors = _errors(VB, {k: v for k, v in FULL.items() if k != BANK})
    assert any(isinstance(e, MissingTensorError) and e.key == BANK for e in errors)
    errors = _errors(VB, {k: v for k, v in FULL.items() if not k.endswith("_B")})
    assert any(isinstance(e, MissingTensorError) and e.key == f"{Q}.vblora_logits_B" for e in errors)
    errors = _errors(VB, FULL | TOPK)  # top-k tensors with save_only_topk_weights false
    assert any(isinstance(e, UnexpectedTensorError) and "save_only_topk_weights" in str(e) for e in errors)
    errors = _errors(VB | {"save_only_topk_weights": True}, FULL)
    assert {e.key for e in errors if isinstance(e, UnexpectedTensorError)} == {f"{Q}.vblora_logits_A",
                                                                                f"{Q}.vblora_logits_B"}


@pytest.mark.parametrize(("change", "error"), [
    ({f"{Q}.vblora_logits_A_topk_indices": TensorInfo((2, 3, 2), "I64")}, DTypeMismatchError),  # not PEFT's U8
    ({f"{Q}.vblora_logits_A_topk_indices": TensorInfo((2, 3, 2), "F32")}, DTypeMismatchError),
    ({f"{Q}.vblora_logits_A_topk_weights": TensorInfo((2, 3, 1), "BF16")}, DTypeMismatchError),  # PEFT: F32 only
    ({f"{Q}.vblora_logits_A_topk_indices": TensorInfo((2, 3, 3), "U8")}, ShapeMismatchError),  # topk
    ({f"{Q}.vblora_logits_A_topk_weights": TensorInfo((2, 3, 2), "F32")}, ShapeMismatchError),  # topk - 1
    ({f"{Q}.vblora_logits_B_topk_indices": TensorInfo((2, 3, 2), "U8")}, ShapeMismatchError),  # rank axis 1
])
def test_topk_form_problems_name_the_tensor(change: dict[str, TensorInfo], error: type) -> None:
    errors = _errors(VB | {"save_only_topk_weights": True}, TOPK | change)
    assert any(isinstance(e, error) and e.key in change for e in errors), errors


@pytest.mark.parametrize(("field", "value"), [("bias", "all"), ("r", 0), ("topk", 6), ("vector_length", -1)])
def test_refused_variants_name_the_field(field: str, value: Any) -> None:
    assert any(p == f"/{field}" for p, _ in unsupported_features(VB | {field: value}))


def test_training_refused_for_the_topk_form_only() -> None:
    assert training_refusals(VB) == []
    assert [p for p, _, _ in training_refusals(VB | {"save_only_topk_weights": True})] == ["/save_only_topk_weights"]


def test_topk_weights_negative_or_summing_above_one_are_refused_naming_the_key(tmp_path: Any) -> None:
    """PEFT's loader takes log(w) and log(1 - sum(w)) in float32: NaN for either. A sum of exactly 1 stays valid."""
    import numpy as np
    from safetensors.numpy import save_file

    import adapterspec
    from adapterspec._vblora import topk_weight_errors
    from adapterspec.errors import TensorError

    config = {"save_only_topk_weights": True}
    key = "m.vblora_logits_A_topk_weights"
    assert topk_weight_errors(config, {key: np.array([[[0.25, 0.75]]], np.float32)}) == []  # sum exactly 1
    assert topk_weight_errors({}, {key: np.array([[[0.7, 0.4]]], np.float32)}) == []  # the logits form: not read
    for bad, needle in (([[[0.7, 0.4]]], "above 1"), ([[[-0.1, 0.4]]], "negative")):
        errors = topk_weight_errors(config, {key: np.array(bad, np.float32), "m.other": np.ones(2)})
        assert [(type(e), e.key) for e in errors] == [(TensorError, key)] and needle in str(errors[0])
    # through validate_adapter, on a folder PEFT could have written but for the weights
    prefix = "base_model.model.q."
    config = {"peft_type": "VBLORA", "r": 1, "num_vectors": 4, "vector_length": 2, "topk": 3,
              "save_only_topk_weights": True, "target_modules": ["q"]}
    tensors = {"base_model.vblora_vector_bank": np.arange(8, dtype=np.float32).reshape(4, 2),
               prefix + "vblora_logits_A_topk_indices": np.array([[[0, 1, 2]]], np.uint8),
               prefix + "vblora_logits_A_topk_weights": np.array([[[0.5, 0.25]]], np.float32),
               prefix + "vblora_logits_B_topk_indices": np.array([[[3, 1, 2]]], np.uint8),
               prefix + "vblora_logits_B_topk_weights": np.array([[[0.5, 0.5]]], np.float32)}
    (tmp_path / "adapter_config.json").write_text(__import__("json").dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert adapterspec.validate_adapter(tmp_path) == []
    tensors[prefix + "vblora_logits_B_topk_weights"] = np.array([[[0.5, 0.5625]]], np.float32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    errors = adapterspec.validate_adapter(tmp_path)
    assert [(type(e), e.key) for e in errors] == [(TensorError, prefix + "vblora_logits_B_topk_weights")]


def test_zero_dimensional_topk_tensors_are_shape_errors_not_crashes(tmp_path: Any) -> None:
    """validate_adapter reads the top-k values after the shape checks: a 0-d indices or weights tensor is reported
    as the ShapeMismatchError it is (it raised a bare IndexError from the value check)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    import adapterspec

    prefix = "base_model.model.q."
    config = {"peft_type": "VBLORA", "r": 1, "num_vectors": 4, "vector_length": 2, "topk": 3,
              "save_only_topk_weights": True, "target_modules": ["q"]}
    tensors = {"base_model.vblora_vector_bank": np.arange(8, dtype=np.float32).reshape(4, 2),
               prefix + "vblora_logits_A_topk_indices": np.array(1, np.uint8),
               prefix + "vblora_logits_A_topk_weights": np.array(0.5, np.float32),
               prefix + "vblora_logits_B_topk_indices": np.array([[[3, 1, 2]]], np.uint8),
               prefix + "vblora_logits_B_topk_weights": np.array([[[0.5, 0.25]]], np.float32)}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    errors = adapterspec.validate_adapter(tmp_path)
    assert errors and all(isinstance(e, ShapeMismatchError) for e in errors)
    assert {e.key for e in errors} <= {prefix + "vblora_logits_A_topk_indices", prefix + "vblora_logits_A_topk_weights"}


def test_topk_index_values_out_of_range_or_repeated_are_tensor_errors() -> None:
    """PEFT's topk gives distinct indices of the bank; any other value is refused naming the tensor (SPEC.md 17.4)."""
    import numpy as np

    from adapterspec._vblora import index_errors
    from adapterspec.errors import TensorError

    config = VB | {"save_only_topk_weights": True}
    a, b = f"{Q}.vblora_logits_A_topk_indices", f"{Q}.vblora_logits_B_topk_indices"
    good = np.array([[[0, 4], [3, 1], [2, 0]]] * 2, np.uint8)
    assert index_errors(config, {a: good, b: good[:, :2]}) == []
    assert index_errors(VB, {a: good + 9}) == []  # the logits form stores no indices
    for values, needle in ((good + 1, "index 5, outside [0, num_vectors=5)"),
                           (good.astype(np.int16) - 1, "index -1, outside"),
                           (np.array([[[1, 1, 3]]], np.uint8), "repeats a top-k index beside another")):
        errors = index_errors(config, {a: values, b: good, f"{Q}.vblora_logits_A_topk_weights": good}, path="f")
        assert [(type(e), e.key) for e in errors] == [(TensorError, a)]
        assert needle in errors[0].message and "fix:" in str(errors[0])
    # one index repeated across a whole row: PEFT's mix is that vector, as the stored weights' (they sum to 1)
    assert index_errors(config, {a: np.array([[[1, 1], [2, 0]]], np.uint8)}) == []
