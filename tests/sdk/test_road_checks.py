"""RoAd's tensor rules without a model (SPEC.md 17.1): names, 1-D shapes, lengths the variant and group_size allow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import adapterspec
from adapterspec.errors import ConfigError

Q = "base_model.model.l.0.q_proj"


def _folder(tmp_path: Path, config: dict[str, object], tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ROAD", "target_modules": ["q_proj"],
                                                              **config}))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return tmp_path


def _vec(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32)


@pytest.mark.parametrize(("variant", "length", "ok"), [
    ("road_1", 16, True), ("road_1", 12, True), ("road_1", 10, False),  # multiples of group_size/2 = 4
    ("road_2", 16, True), ("road_2", 12, False),  # multiples of group_size = 8
    ("road_4", 32, True), ("road_4", 24, False),  # multiples of 2 * group_size = 16
])
def test_lengths_follow_variant_and_group_size(tmp_path: Path, variant: str, length: int, ok: bool) -> None:
    folder = _folder(tmp_path, {"variant": variant, "group_size": 8},
                     {f"{Q}.road_theta": _vec(length), f"{Q}.road_alpha": _vec(length)})
    errors = adapterspec.validate_adapter(folder)
    assert (errors == []) == ok, errors
    if not ok:
        assert {e.key for e in errors} == {f"{Q}.road_theta", f"{Q}.road_alpha"}
        assert all(type(e).__name__ == "ShapeMismatchError" and "group_size 8" in str(e) for e in errors)


def test_missing_unexpected_and_mismatched_tensors_name_the_key(tmp_path: Path) -> None:
    errors = adapterspec.validate_adapter(_folder(tmp_path / "a", {"group_size": 8}, {f"{Q}.road_theta": _vec(8)}))
    assert [(type(e).__name__, e.key) for e in errors] == [("MissingTensorError", f"{Q}.road_alpha")]
    errors = adapterspec.validate_adapter(_folder(tmp_path / "b", {"group_size": 8}, {
        f"{Q}.road_theta": _vec(8), f"{Q}.road_alpha": _vec(8), f"{Q}.road_R": _vec(8)}))
    assert [(type(e).__name__, e.key) for e in errors] == [("UnexpectedTensorError", f"{Q}.road_R")]
    errors = adapterspec.validate_adapter(_folder(tmp_path / "c", {"variant": "road_2", "group_size": 8}, {
        f"{Q}.road_theta": _vec(8), f"{Q}.road_alpha": _vec(16)}))
    assert [(type(e).__name__, e.key) for e in errors] == [("ShapeMismatchError", f"{Q}.road_alpha")]
    errors = adapterspec.validate_adapter(_folder(tmp_path / "d", {"group_size": 8}, {
        f"{Q}.road_theta": _vec(8).reshape(2, 4), f"{Q}.road_alpha": _vec(8)}))
    assert [(type(e).__name__, e.key) for e in errors] == [("ShapeMismatchError", f"{Q}.road_theta")]


@pytest.mark.parametrize("bad", [{"variant": "road_3"}, {"group_size": 5}, {"group_size": -2}])
def test_config_values_peft_refuses(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        adapterspec.AdapterConfig.from_dict({"peft_type": "ROAD", "target_modules": ["q"], **bad})
    assert info.value.pointer == "/" + next(iter(bad))


def test_null_init_weights_acts_as_true_and_is_written_back() -> None:
    """SPEC 4.1 (1.2): PEFT tests RoAd's init_weights with ``is False``, so null starts at the identity (as true);
    the schema accepts it and the config writes the null back."""
    cfg = adapterspec.AdapterConfig.from_dict({"peft_type": "ROAD", "target_modules": ["q"], "init_weights": None})
    assert cfg.get("init_weights") is True
    assert cfg.to_dict()["init_weights"] is None
