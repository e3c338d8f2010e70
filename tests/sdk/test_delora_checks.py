"""DeLoRA (SPEC.md 17.6) in the SDK: the schema, the refusals naming the field, the per-module tensor checks (the
float64 reference against PEFT's own layer: tests/torch/test_delora.py)."""

from __future__ import annotations

from typing import Any

import pytest

from adapterspec import AdapterConfig
from adapterspec._delora import lambda_for, module_errors, rank_for, unsupported
from adapterspec._rules import unsupported_features
from adapterspec.checks import TensorInfo
from adapterspec.errors import ConfigError, MissingTensorError, ShapeMismatchError, UnsupportedError

BASE = {"peft_type": "DELORA", "r": 2, "target_modules": ["q_proj"]}


def _info(**shapes: tuple[int, ...]) -> dict[str, TensorInfo]:
    full = {"delora_A": (2, 8), "delora_B": (4, 2), "delora_lambda": (1,), "delora_w_norm": (8,), **shapes}
    return {name: TensorInfo(shape, "F32") for name, shape in full.items() if shape}


@pytest.mark.parametrize(("fields", "pointer"), [
    ({"rank_pattern": None}, "/rank_pattern"), ({"lambda_pattern": None}, "/lambda_pattern"),
    ({"module_dropout": 1.5}, "/module_dropout"), ({"delora_lambda": None}, "/delora_lambda"),
    ({"rank_pattern": {"q": "2"}}, "/rank_pattern/q"),
])
def test_schema_refuses_what_peft_cannot_load(fields: dict[str, Any], pointer: str) -> None:
    with pytest.raises(ConfigError) as info:
        AdapterConfig.from_dict({**BASE, **fields})
    assert info.value.pointer == pointer


def test_config_forms_peft_loads() -> None:
    config = AdapterConfig.from_dict({**BASE, "init_weights": None, "delora_lambda": 2.5, "module_dropout": -0.5,
                                      "rank_pattern": {"v_proj": 3}, "lambda_pattern": {"v_proj": 4}})
    assert config["init_weights"] is False  # PEFT tests 'is True': null acts as false
    assert rank_for(config, "model.layers.0.self_attn.v_proj") == 3 and rank_for(config, "q_proj") == 2
    assert lambda_for(config, "model.layers.0.self_attn.v_proj") == 4.0 and lambda_for(config, "q_proj") == 2.5
    assert unsupported_features(dict(config)) == []


@pytest.mark.parametrize(("fields", "pointer"), [
    ({"r": 0}, "/r"), ({"bias": "all"}, "/bias"),
    ({"bias": "delora_only"}, "/bias"), ({"bias": "lora_only"}, "/bias"),  # PEFT loads any string: not a ConfigError
])
def test_refusals_name_the_field(fields: dict[str, Any], pointer: str) -> None:
    assert [p for p, _ in unsupported({**BASE, **fields})] == [pointer]
    assert pointer in [p for p, _ in unsupported_features({**BASE, **fields})]


@pytest.mark.parametrize(("shapes", "error", "param"), [
    ({}, None, None),
    ({"delora_w_norm": ()}, MissingTensorError, "delora_w_norm"),
    ({"delora_A": (3, 8)}, ShapeMismatchError, "delora_A"),
    ({"delora_B": (2, 4)}, ShapeMismatchError, "delora_B"),
    ({"delora_lambda": (2,)}, ShapeMismatchError, "delora_lambda"),
    ({"delora_w_norm": (4,)}, ShapeMismatchError, "delora_w_norm"),
    ({"delora_A": (2, 8, 1)}, ShapeMismatchError, "delora_A"),
])
def test_module_checks(shapes: dict[str, tuple[int, ...]], error: type[Exception] | None, param: str | None) -> None:
    config = AdapterConfig.from_dict(BASE)
    errors = module_errors(config, "model.layers.0.self_attn.q_proj", _info(**shapes))
    if error is None:
        assert errors == []
        return
    assert errors and isinstance(errors[0], error)
    assert errors[0].key == f"base_model.model.model.layers.0.self_attn.q_proj.{param}"


def test_rank_and_lambda_patterns_refused_only_where_a_module_reaches_them() -> None:
    """PEFT 0.21.2 (probed): rank_pattern {"nothing": 0} loads (update_layer refuses only a rank some layer takes);
    lambda_pattern keys are matched by get_pattern_key alone, lazily in file order: {"q_proj|v_proj": 1, "(": 3}
    loads, {"v_proj": 1, "(": 3} fails on q_proj with re.error. rank_pattern keys must all compile (PEFT's warning
    loop compiles each against every targeted module)."""
    config = AdapterConfig.from_dict({**BASE, "rank_pattern": {"nothing": 0, "v_proj": -1},
                                      "lambda_pattern": {"v_proj": 2, "q_proj|v_proj": 1, "(": 3}})
    assert unsupported_features(dict(config)) == []
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert rank_for(config, q) == 2 and lambda_for(config, q) == 1.0 and lambda_for(config, v) == 2.0
    assert module_errors(config, q, _info()) == []
    for path, param, pointer in ((v, "rank_pattern", "/rank_pattern/v_proj"),):
        errors = module_errors(config, path, _info())
        assert [(type(e), e.key, e.pointer) for e in errors] == [(UnsupportedError, path, pointer)], param
    late = AdapterConfig.from_dict({**BASE, "lambda_pattern": {"v_proj": 1, "(": 3}})
    with pytest.raises(UnsupportedError) as info:
        lambda_for(late, q)
    assert (info.value.key, info.value.pointer) == (q, "/lambda_pattern/(")
    assert [(e.key, e.pointer) for e in module_errors(late, q, _info())] == [(q, "/lambda_pattern/(")]
    assert module_errors(late, v, _info()) == []
    with pytest.raises(ConfigError) as bad_rank:  # rank_pattern: PEFT compiles every key (its warning loop)
        AdapterConfig.from_dict({**BASE, "rank_pattern": {"q_proj": 2, "(": 3}})
    assert bad_rank.value.pointer == "/rank_pattern/("


@pytest.mark.parametrize("layers_pattern", [None, [], ""])
def test_string_target_modules_with_an_empty_layers_pattern_is_valid(layers_pattern: Any) -> None:
    """PEFT's DeloraConfig refuses layers_to_transform with a string target_modules, and a non-empty layers_pattern
    without layers_to_transform; it loads {"target_modules": ".*q_proj", "layers_pattern": []} (or "")."""
    AdapterConfig.from_dict({**BASE, "target_modules": ".*q_proj", "layers_pattern": layers_pattern})
    for bad in ({"layers_pattern": ["layers"]}, {"layers_to_transform": [0]}):
        with pytest.raises(ConfigError):
            AdapterConfig.from_dict({**BASE, "target_modules": ".*q_proj", **bad})
