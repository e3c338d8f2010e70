"""MiSS tensor checks, modes and refused variants (SPEC.md 17.2), without a framework."""

from __future__ import annotations

from typing import Any

import pytest

from adapterspec import _miss
from adapterspec._method_checks import METHOD_CHECKS
from adapterspec._mix import Running, mix_refusal
from adapterspec._rules import PORTABLE_METHODS, not_portable, unsupported_features
from adapterspec.checks import TensorInfo
from adapterspec.config import AdapterConfig
from adapterspec.errors import MissingTensorError, ShapeMismatchError, UnsupportedError

MISS = {"peft_type": "MISS", "r": 4, "target_modules": ["q"]}


def _check(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[Any]:
    cfg = AdapterConfig.from_dict(config)
    return METHOD_CHECKS["MISS"](cfg, "l.q", {k: TensorInfo(v, "F32") for k, v in shapes.items()})


def test_miss_is_portable() -> None:
    assert "MISS" in PORTABLE_METHODS and not_portable(MISS) == []


def test_good_shapes_pass() -> None:
    assert _check(MISS, {"miss_block": (4, 12)}) == []
    assert _check(MISS | {"init_weights": False}, {"miss_block": (4, 7)}) == []
    assert _check(MISS | {"init_weights": "mini", "mini_r": 3}, {"miss_block": (4, 3)}) == []
    assert _check(MISS | {"init_weights": "bat"}, {"miss_block": (3, 4, 4)}) == []
    assert _check({"peft_type": "MISS", "target_modules": ["q"]}, {"miss_block": (64, 8)}) == []  # PEFT's r=64


@pytest.mark.parametrize(("config", "shapes", "error", "words"), [
    (MISS, {}, MissingTensorError, "miss_block"),
    (MISS, {"miss_block": (12, 4)}, ShapeMismatchError, "[r, out] with r=4"),  # transposed
    (MISS, {"miss_block": (4, 3, 3)}, ShapeMismatchError, "[r, out]"),
    (MISS | {"init_weights": "mini", "mini_r": 3}, {"miss_block": (4, 12)}, ShapeMismatchError, "[4, 3]"),
    (MISS | {"init_weights": "mini"}, {"miss_block": (4, 3)}, ShapeMismatchError, "[4, 1]"),  # PEFT's mini_r=1
    (MISS | {"init_weights": "bat"}, {"miss_block": (4, 12)}, ShapeMismatchError, "[out/r, r, r]"),
    (MISS | {"init_weights": "bat"}, {"miss_block": (3, 4, 2)}, ShapeMismatchError, "[out/r, r, r]"),
])
def test_bad_shapes_are_named(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], error: type,
                              words: str) -> None:
    [found] = _check(config, shapes)
    assert isinstance(found, error) and words in str(found) and found.key == "base_model.model.l.q.miss_block"


@pytest.mark.parametrize(("value", "mode", "zero"), [
    (True, "block", True), (False, "block", False), (None, "block", False), ("bat", "bat", True),
    ("mini", "mini", True), ("Bat", "block", True), ("", "block", False),
])
def test_modes_as_peft_compares_init_weights(value: Any, mode: str, zero: bool) -> None:
    assert _miss.mode({"init_weights": value}) == mode and _miss.starts_at_zero({"init_weights": value}) == zero


@pytest.mark.parametrize(("config", "pointer"), [
    ({"r": 0}, "/r"), ({"r": 9}, "/r"), ({"r": 3, "init_weights": "bat"}, "/r"),
    ({"r": 4, "init_weights": "mini", "mini_r": 5}, "/mini_r"), ({"r": 4, "init_weights": "mini", "mini_r": 0}, "/mini_r"),
])
def test_layers_peft_refuses(config: dict[str, Any], pointer: str) -> None:
    with pytest.raises(UnsupportedError) as info:
        _miss.block_shape(8, 12, config, "l.q")
    assert info.value.pointer == pointer and info.value.key == "l.q"


@pytest.mark.parametrize("bias", ["all", "miss_only", "MiSS_only"])
def test_trained_biases_are_refused(bias: str) -> None:
    assert [p for p, _ in unsupported_features(MISS | {"bias": bias})] == ["/bias"]
    assert unsupported_features(MISS) == []


def test_miss_runs_with_miss_only() -> None:
    assert mix_refusal("q", [Running("a", "MISS"), Running("b", "MISS")]) is None
    for other in ("LORA", "LOHA", "VERA", "ADALORA", "IA3"):
        refusal = mix_refusal("q", [Running("a", "MISS"), Running("b", other)])
        assert refusal is not None and refusal.key == "q" and "cannot run together" in refusal.message


def test_null_init_weights_is_block_mode_in_the_schema_and_the_config() -> None:
    """SPEC 4.1, 17.2 (1.2): PEFT compares init_weights with 'bat' / 'mini' (null: block) and tests its truth for the
    start (null: PEFT's random start); the schema accepts null and the config writes it back."""
    cfg = AdapterConfig.from_dict(MISS | {"init_weights": None})
    assert _miss.mode(cfg) == _miss.BLOCK and not _miss.starts_at_zero(cfg)
    assert cfg.to_dict()["init_weights"] is None


@pytest.mark.parametrize(("field", "pointer"), [({"layers_to_transform": [0]}, "/layers_to_transform"),
                                                ({"layers_pattern": "layers"}, "/layers_pattern")])
def test_regex_target_modules_take_no_layer_fields(field: dict[str, Any], pointer: str) -> None:
    """PEFT's MissConfig raises on layers_to_transform / layers_pattern with a string target_modules (SPEC 4.2)."""
    from adapterspec.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        AdapterConfig.from_dict(MISS | {"target_modules": ".*q", **field})
    assert info.value.pointer == pointer
