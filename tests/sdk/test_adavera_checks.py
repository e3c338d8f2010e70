"""AdaLoRA and VeRA config rules, tensor checks, shared-tensor naming and refused variants (SPEC.md 15.4, 15.5),
without a framework."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterspec
from adapterspec._adalora import scale, stored_rank
from adapterspec._method_checks import METHOD_CHECKS
from adapterspec._rules import unsupported_features
from adapterspec.checks import TensorInfo, tensor_errors
from adapterspec.config import AdapterConfig
from adapterspec.errors import ConfigError, MissingTensorError, ShapeMismatchError, UnsupportedError
from adapterspec.naming import parse_key

ADALORA = {"peft_type": "ADALORA", "init_r": 4, "lora_alpha": 8, "total_step": 10, "target_modules": ["q"]}
VERA = {"peft_type": "VERA", "r": 3, "target_modules": ["q", "v"]}
Q, V = "base_model.model.l.q", "base_model.model.l.v"


def _check(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[Any]:
    cfg = AdapterConfig.from_dict(config)
    return METHOD_CHECKS[cfg.peft_type](cfg, "l.q", {k: TensorInfo(v, "F32") for k, v in shapes.items()})


def test_adalora_rank_and_scale_follow_the_rank_pattern() -> None:
    cfg = ADALORA | {"rank_pattern": {"l.q.lora_E": [True, False, True, True], "l.k.lora_E": [False] * 4}}
    assert [stored_rank(cfg, m) for m in ("l.q", "l.k", "l.v")] == [3, 0, 4]
    assert scale(cfg, "l.q") == pytest.approx(8 / (4 + 1e-5), rel=1e-12)  # ranknum stays init_r
    assert scale(cfg, "l.k") == 0.0
    assert scale(cfg | {"lora_alpha": 0}, "l.q") == pytest.approx(3 / (4 + 1e-5), rel=1e-12)  # PEFT: alpha <= 0 -> r


def test_adalora_good_shapes_pass() -> None:
    assert _check(ADALORA, {"lora_A": (4, 8), "lora_B": (5, 4), "lora_E": (4, 1)}) == []
    pruned = ADALORA | {"rank_pattern": {"l.q.lora_E": [False, True, False, False]}}
    assert _check(pruned, {"lora_A": (1, 8), "lora_B": (5, 1), "lora_E": (1, 1)}) == []
    none_left = ADALORA | {"rank_pattern": {"l.q.lora_E": [False] * 4}}
    assert _check(none_left, {"lora_A": (0, 8), "lora_B": (5, 0), "lora_E": (0, 1)}) == []


@pytest.mark.parametrize(("config", "shapes", "error", "words"), [
    (ADALORA, {"lora_A": (4, 8), "lora_B": (5, 4)}, MissingTensorError, "lora_E"),
    (ADALORA, {"lora_A": (3, 8), "lora_B": (5, 4), "lora_E": (4, 1)}, ShapeMismatchError, "init_r (4 ranks)"),
    (ADALORA | {"rank_pattern": {"l.q.lora_E": [True, True, False, False]}},
     {"lora_A": (4, 8), "lora_B": (5, 2), "lora_E": (2, 1)}, ShapeMismatchError, "rank_pattern (2 ranks)"),
    (ADALORA, {"lora_A": (4, 8), "lora_B": (5, 4), "lora_E": (4, 2)}, ShapeMismatchError, "[k, 1]"),
    (ADALORA, {"lora_A": (4, 8, 1), "lora_B": (5, 4), "lora_E": (4, 1)}, ShapeMismatchError, "2 axes"),
    (VERA, {"vera_lambda_b": (5,)}, MissingTensorError, "vera_lambda_d"),
    (VERA, {"vera_lambda_b": (5,), "vera_lambda_d": (4,)}, ShapeMismatchError, "r=3"),
    (VERA, {"vera_lambda_b": (5, 1), "vera_lambda_d": (3,)}, ShapeMismatchError, "1 axes"),
])
def test_bad_shapes_name_the_tensor(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], error: type,
                                    words: str) -> None:
    errors = _check(config, shapes)
    assert len(errors) == 1 and isinstance(errors[0], error), errors
    assert words in str(errors[0]) and "base_model.model.l.q." in str(errors[0])


@pytest.mark.parametrize(("config", "pointer"), [
    (ADALORA | {"bias": "lora_only"}, "/bias"),
    (ADALORA | {"use_dora": True}, "/use_dora"),
    (ADALORA | {"lora_bias": True}, "/lora_bias"),
    (ADALORA | {"trainable_token_indices": [1, 2]}, "/trainable_token_indices"),
    (VERA | {"save_projection": False}, "/save_projection"),
    (VERA | {"bias": "vera_only"}, "/bias"),
])
def test_unsupported_variants_are_listed(config: dict[str, Any], pointer: str) -> None:
    assert [p for p, _ in unsupported_features(config)] == [pointer]


@pytest.mark.parametrize(("pattern", "pointer"), [
    ({"l.q": 2}, "/rank_pattern/l.q"),  # LoRA's form
    ({"l.q.lora_E": [1, 0, 1, 1]}, "/rank_pattern/l.q.lora_E"),  # not booleans
    ({"l.q.lora_E": [True, False]}, "/rank_pattern/l.q.lora_E"),  # not init_r of them
])
def test_a_rank_pattern_not_in_adalora_form_is_a_config_error(pattern: dict[str, Any], pointer: str) -> None:
    with pytest.raises(ConfigError) as info:
        AdapterConfig.from_dict(ADALORA | {"rank_pattern": pattern})
    assert info.value.pointer == pointer


def test_shared_keys_have_their_own_role() -> None:
    name = parse_key("base_model.vera_A", "VERA")
    assert (name.module, name.param, name.role) == ("", "vera_A", "shared")
    assert parse_key(f"{Q}.vera_lambda_b", "VERA").role == "adapter"
    with pytest.raises(adapterspec.UnexpectedTensorError):  # another method has no shared tensor
        parse_key("base_model.vera_A", "LORA")
    with pytest.raises(adapterspec.UnexpectedTensorError):
        parse_key("base_model.vera_C", "VERA")


def _vera_infos(**changes: tuple[int, ...] | None) -> dict[str, TensorInfo]:
    shapes: dict[str, tuple[int, ...] | None] = {
        "base_model.vera_A": (3, 8), "base_model.vera_B": (6, 3), f"{Q}.vera_lambda_b": (6,),
        f"{Q}.vera_lambda_d": (3,), f"{V}.vera_lambda_b": (4,), f"{V}.vera_lambda_d": (3,)}
    shapes.update({f"base_model.{k}": v for k, v in changes.items()})
    return {k: TensorInfo(v, "F32") for k, v in shapes.items() if v is not None}


@pytest.mark.parametrize(("changes", "error", "key", "words"), [
    ({"vera_B": None}, MissingTensorError, "base_model.vera_B", "save_projection"),
    ({"vera_A": (4, 8)}, ShapeMismatchError, "base_model.vera_A", "r=3"),
    ({"vera_B": (6, 2)}, ShapeMismatchError, "base_model.vera_B", "r=3"),
    ({"vera_B": (7, 3)}, ShapeMismatchError, "base_model.vera_B", "longest vera_lambda_b"),
    ({"vera_A": (3, 8, 1)}, ShapeMismatchError, "base_model.vera_A", "2 axes"),
])
def test_shared_tensor_problems_name_the_key(changes: dict[str, Any], error: type, key: str, words: str) -> None:
    assert tensor_errors(AdapterConfig.from_dict(VERA), _vera_infos()) == []
    errors = tensor_errors(AdapterConfig.from_dict(VERA), _vera_infos(**changes))
    assert len(errors) == 1 and isinstance(errors[0], error), errors
    assert errors[0].key == key and words in str(errors[0])


def test_save_projection_false_folder_is_refused_at_read(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps(VERA | {"save_projection": False}))
    save_file({f"{Q}.vera_lambda_b": np.arange(6, dtype=np.float32),
               f"{Q}.vera_lambda_d": np.arange(3, dtype=np.float32)}, str(tmp_path / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(UnsupportedError) as info:
        adapterspec.read_adapter(tmp_path)
    assert info.value.pointer == "/save_projection" and "torch" in info.value.message
