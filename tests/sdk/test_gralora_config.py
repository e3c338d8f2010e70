"""GraLoRA's config as PEFT 0.21.2's ``GraloraConfig`` and layer read it (SPEC.md 4.1, 4.3, 17.5): null booleans
are truth-tested, ``alpha`` may be a float, a negative ``gralora_dropout`` means none (PEFT's ``> 0.0`` test), above
1 is refused (``nn.Dropout``), and ``exclude_modules`` is a field GraLoRA does not know (read as absent)."""

from __future__ import annotations

import pytest

from adapterspec import _gralora
from adapterspec.config import AdapterConfig, validate_config
from adapterspec.errors import ConfigError

BASE = {"peft_type": "GRALORA", "r": 4, "gralora_k": 2, "target_modules": ["q_proj"]}


def test_null_booleans_read_as_false_and_are_written_back_as_null() -> None:
    config = AdapterConfig.from_dict(BASE | {"init_weights": None, "fan_in_fan_out": None})
    assert config["init_weights"] is False and config["fan_in_fan_out"] is False
    written = config.to_dict()
    assert written["init_weights"] is None and written["fan_in_fan_out"] is None


def test_a_float_alpha_scales_as_peft_divides_it() -> None:
    config = AdapterConfig.from_dict(BASE | {"alpha": 6.5, "hybrid_r": 1})
    assert _gralora.settings(config).scaling == 6.5 / 5  # PEFT: alpha / (r + hybrid_r) -> 1.3
    assert AdapterConfig.from_dict(BASE | {"alpha": 8.0}).to_dict()["alpha"] == 8.0


def test_negative_dropout_is_none_and_above_one_is_refused() -> None:
    assert _gralora.settings(AdapterConfig.from_dict(BASE | {"gralora_dropout": -0.5})).dropout == 0.0
    assert _gralora.settings(AdapterConfig.from_dict(BASE | {"gralora_dropout": 0.25})).dropout == 0.25
    with pytest.raises(ConfigError) as err:
        validate_config(BASE | {"gralora_dropout": 1.5})
    assert err.value.pointer == "/gralora_dropout"


@pytest.mark.parametrize("field,value", [("init_weights", 0), ("alpha", True), ("alpha", "8")])
def test_other_types_are_still_refused(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(BASE | {field: value})
    assert err.value.pointer == f"/{field}"


def test_exclude_modules_is_unknown_to_gralora() -> None:
    with pytest.warns(Warning, match="exclude_modules"):
        config = AdapterConfig.from_dict(BASE | {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]})
    assert config.unknown_fields == ("exclude_modules",) and config.get("exclude_modules") is None
    assert config.to_dict()["exclude_modules"] == ["v_proj"]  # kept as written
