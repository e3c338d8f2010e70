"""SPEC 4.1: a boolean field may be null and reads as false (PEFT reads these flags with a truth test)."""

from __future__ import annotations

import pytest

from adapterspec.config import AdapterConfig, validate_config
from adapterspec.errors import ConfigError

NULLS = {"fan_in_fan_out": None, "use_rslora": None, "use_dora": None, "lora_bias": None, "inference_mode": None}


def test_a_null_boolean_reads_as_false_and_is_written_back_as_null() -> None:
    config = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], **NULLS})
    assert {k: config[k] for k in NULLS} == dict.fromkeys(NULLS, False)
    assert all(config[k] is False for k in NULLS)  # False itself, not a falsy stand-in
    written = config.to_dict()
    assert {k: written[k] for k in NULLS if k != "inference_mode"} == dict.fromkeys(set(NULLS) - {"inference_mode"})
    assert written["inference_mode"] is True  # as PEFT writes it


def test_null_use_dora_goes_with_lora_bias_as_false_does() -> None:
    validate_config({"peft_type": "LORA", "target_modules": ["q"], "use_dora": None, "lora_bias": True})
    with pytest.raises(ConfigError) as err:
        validate_config({"peft_type": "LORA", "target_modules": ["q"], "use_dora": True, "lora_bias": True})
    assert err.value.pointer == "/use_dora" and err.value.hint == "use false (because lora_bias is true)"


@pytest.mark.parametrize("method", ["OFT", "BOFT"])
def test_oft_and_boft_init_weights_may_not_be_null_as_in_peft(method: str) -> None:
    sizes = {"r": 0, "oft_block_size": 4} if method == "OFT" else {"boft_block_size": 4}
    with pytest.raises(ConfigError) as err:
        validate_config({"peft_type": method, "target_modules": ["q"], "init_weights": None, **sizes})
    assert err.value.pointer == "/init_weights" and err.value.hint == "use true or false"


def test_a_non_boolean_is_still_refused() -> None:
    with pytest.raises(ConfigError) as err:
        validate_config({"peft_type": "LORA", "target_modules": ["q"], "use_rslora": 0})
    assert err.value.pointer == "/use_rslora" and err.value.hint == "use true or false"
