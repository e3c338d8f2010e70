"""Schema errors say what to change, per keyword (not the field's long description), and every one is reported."""

from __future__ import annotations

import pytest

from adapterspec.config import config_errors, config_problems, validate_config
from adapterspec.errors import ConfigError

LORA = {"peft_type": "LORA", "target_modules": ["q"]}


@pytest.mark.parametrize("config, pointer, hint", [
    ({"peft_type": "LORAX"}, "/peft_type",
     'did you mean "LORA"? use one of the 45 values the schema lists ("LORA", "IA3", "PREFIX_TUNING", ...)'),
    ({**LORA, "bias": "some"}, "/bias", 'use one of: "none", "all", "lora_only"'),
    ({**LORA, "r": "4"}, "/r", "use an integer"),
    ({**LORA, "use_rslora": 1}, "/use_rslora", "use true or false"),
    ({**LORA, "target_modules": 5}, "/target_modules", "use null or a string or a list"),
    ({**LORA, "r": 0}, "/r", "use a value >= 1"),
    ({**LORA, "lora_dropout": 1.0}, "/lora_dropout", "use a value < 1"),
    ({"peft_type": "LOHA", "r": "x"}, "/r", "use an integer"),
    ({"target_modules": ["q"]}, "", "add the field 'peft_type'"),
    ({**LORA, "rank_pattern": {"": 3}}, "/rank_pattern/", "rename the key '': module names are not empty"),
    # rules that hold given another field's value say which
    ({**LORA, "use_dora": True, "lora_bias": True}, "/use_dora", "use false (because lora_bias is true)"),
    ({**LORA, "target_modules": []}, "", "add the field 'target_parameters' (because of target_modules)"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 8, "prompt_tuning_init": "TEXT",
      "tokenizer_name_or_path": "t"}, "", "add the field 'prompt_tuning_init_text' (because prompt_tuning_init is "
     '"TEXT")'),
])
def test_hint_says_what_to_change(config: dict, pointer: str, hint: str) -> None:
    with pytest.raises(ConfigError) as exc:
        validate_config(config)
    assert (exc.value.pointer, exc.value.hint) == (pointer, hint)
    assert str(exc.value).endswith(f"(fix: {hint})")


def test_no_hint_is_a_schema_description() -> None:
    broken = [{**LORA, "r": 0}, {**LORA, "lora_alpha": "8"}, {"peft_type": "X"}, {**LORA, "bias": 1},
              {**LORA, "lora_dropout": -1}]
    for config in broken:
        for error in config_errors(config):
            assert error.hint is not None and not error.hint.startswith("expected"), error
            assert len(error.hint) < 120, error


def test_config_problems_lists_every_schema_error_first_one_first() -> None:
    config = {**LORA, "r": 0, "lora_alpha": "16", "lora_dropout": 2}
    problems = config_problems(config, path="c.json")
    with pytest.raises(ConfigError) as first:
        validate_config(config)
    assert [p.pointer for p in problems][0] == first.value.pointer
    assert sorted(p.pointer for p in problems) == ["/lora_alpha", "/lora_dropout", "/r"]
    assert all(p.path == "c.json" for p in problems)


def test_config_problems_of_a_valid_config_and_of_a_rule() -> None:
    assert config_problems(LORA) == []
    # not a schema violation: the one error validate_config raises
    problems = config_problems({**LORA, "adapterspec_version": "9.0"})
    assert [type(p).__name__ for p in problems] == ["VersionError"]
    assert config_problems({**LORA, "typo_field": 1}, strict=True)[0].pointer == "/typo_field"
