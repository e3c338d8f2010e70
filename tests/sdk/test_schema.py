"""The spec's JSON Schemas, their examples, and their agreement with PEFT.

Run with ``.venv/bin/python -m pytest tests/sdk/test_schema.py``. The PEFT checks (configs PEFT writes
validate; schema defaults equal PEFT's dataclass defaults) skip when peft is not installed.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import warnings
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

SPEC_DIR = Path(__file__).resolve().parents[2] / "spec" / "v1"
REPO = SPEC_DIR.parents[1]
CONFIG_SCHEMA_PATH = SPEC_DIR / "adapter_config.schema.json"
MANIFEST_SCHEMA_PATH = SPEC_DIR / "manifest.schema.json"
EXAMPLES = SPEC_DIR / "examples"

METHODS = ["LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "LOHA", "LOKR"]
ALL_METHODS = json.loads((SPEC_DIR / "adapter_config.schema.json").read_text("utf-8"))["properties"]["peft_type"]["enum"]
PEFT_CONFIG_CLASS = {
    "LORA": "LoraConfig",
    "IA3": "IA3Config",
    "PREFIX_TUNING": "PrefixTuningConfig",
    "PROMPT_TUNING": "PromptTuningConfig",
    "LOHA": "LoHaConfig",
    "LOKR": "LoKrConfig",
}


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def schema() -> dict:
    return _load(CONFIG_SCHEMA_PATH)


@pytest.fixture(scope="module")
def validator(schema) -> Draft202012Validator:
    return Draft202012Validator(schema)


@pytest.fixture(scope="module")
def manifest_validator() -> Draft202012Validator:
    return Draft202012Validator(_load(MANIFEST_SCHEMA_PATH))


def _pointer(error) -> str:
    return "/" + "/".join(str(p) for p in error.absolute_path) if error.absolute_path else ""


def _errors(validator, instance) -> list[str]:
    return [f"{_pointer(e)}: {e.message}" for e in validator.iter_errors(instance)]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


# --------------------------------------------------------------------------------------------- (a) metaschema


@pytest.mark.parametrize("path", [CONFIG_SCHEMA_PATH, MANIFEST_SCHEMA_PATH], ids=lambda p: p.name)
def test_schema_is_valid_draft_2020_12(path):
    doc = _load(path)
    Draft202012Validator.check_schema(doc)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["$id"] == f"https://adapterspec.dev/spec/v1/{path.name}"


def test_config_schema_structure(schema):
    """The layout the SDK relies on: common fields on top, one $defs entry per peft_type, an if/then each."""
    assert schema["type"] == "object"
    assert schema["required"] == ["peft_type"]
    assert set(schema["properties"]) == {
        "peft_type", "adapterspec_version", "task_type", "base_model_name_or_path", "revision",
        "inference_mode", "peft_version", "auto_mapping", "modules_to_save",
    }
    assert schema["properties"]["peft_type"]["enum"][:len(METHODS)] == METHODS
    assert len(schema["properties"]["peft_type"]["enum"]) == len(ALL_METHODS) == 45  # every PeftType of PEFT 0.21
    assert schema["properties"]["adapterspec_version"]["pattern"] == r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?![\s\S])"
    assert "additionalProperties" not in schema
    for method in ALL_METHODS:
        sub = schema["$defs"][method]
        assert sub["type"] == "object"
        assert isinstance(sub["properties"], dict) and (sub["properties"] or method not in METHODS)
        assert set(sub.get("required", [])) <= set(sub["properties"])
        assert "additionalProperties" not in sub
        assert not set(sub["properties"]) & set(schema["properties"]), f"{method} repeats a common field"
    # helper defs are lower case, method defs exactly the peft_type names
    assert {k for k in schema["$defs"] if not k.islower()} == set(ALL_METHODS)
    assert schema["allOf"] == [
        {"if": {"properties": {"peft_type": {"const": m}}, "required": ["peft_type"]}, "then": {"$ref": f"#/$defs/{m}"}}
        for m in ALL_METHODS
    ]


def test_every_property_has_a_description(schema):
    missing = [f"/properties/{k}" for k, v in schema["properties"].items() if not v.get("description")]
    for method in METHODS:
        missing += [
            f"/$defs/{method}/properties/{k}"
            for k, v in schema["$defs"][method]["properties"].items()
            if not v.get("description")
        ]
    assert not missing


def test_defaults_validate_against_their_own_property(schema):
    """A default must itself be a valid value (the SDK fills missing fields from them)."""
    bad = []
    for method in METHODS:
        props = {**schema["properties"], **schema["$defs"][method]["properties"]}
        for name, sub in props.items():
            if "default" not in sub:
                continue
            wrapped = {"$defs": schema["$defs"], **sub}
            if list(Draft202012Validator(wrapped).iter_errors(sub["default"])):
                bad.append(f"{method}.{name}={sub['default']!r}")
    assert not bad


def test_required_fields_have_no_default(schema):
    for method in METHODS:
        sub = schema["$defs"][method]
        for name in sub.get("required", []):
            assert "default" not in sub["properties"][name], f"{method}.{name} is required and has a default"


def test_filling_defaults_keeps_minimal_configs_valid(schema, validator):
    minimal = {
        "LORA": {"peft_type": "LORA", "target_modules": ["q_proj"]},
        "IA3": {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        "PREFIX_TUNING": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "token_dim": 8, "num_attention_heads": 2, "num_layers": 2},
        "PROMPT_TUNING": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": 8},
        "LOHA": {"peft_type": "LOHA", "target_modules": ["q_proj"]},
        "LOKR": {"peft_type": "LOKR", "target_modules": ["q_proj"]},
    }
    for method, config in minimal.items():
        assert not _errors(validator, config), method
        props = {**schema["properties"], **schema["$defs"][method]["properties"]}
        filled = {k: v["default"] for k, v in props.items() if "default" in v} | config
        assert not _errors(validator, filled), method


# --------------------------------------------------------------------------------------------- (b), (c) examples


VALID = _files(EXAMPLES / "valid")
INVALID = _files(EXAMPLES / "invalid")


def test_enough_examples():
    assert len(VALID) >= 12
    assert len(INVALID) >= 12
    assert {_load(p)["peft_type"] for p in VALID} >= set(METHODS)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_example(validator, path):
    config = _load(path)
    assert not _errors(validator, config)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_example(validator, path):
    example = _load(path)
    assert set(example) == {"description", "error_pointer", "config"}
    assert example["description"]
    errors = list(validator.iter_errors(example["config"]))
    assert errors, "expected the config to be invalid"
    assert _pointer(best_match(errors)) == example["error_pointer"]


@pytest.mark.parametrize("path", _files(EXAMPLES / "manifest" / "valid"), ids=lambda p: p.stem)
def test_valid_manifest_example(manifest_validator, path):
    assert not _errors(manifest_validator, _load(path))


@pytest.mark.parametrize("path", _files(EXAMPLES / "manifest" / "invalid"), ids=lambda p: p.stem)
def test_invalid_manifest_example(manifest_validator, path):
    example = _load(path)
    errors = list(manifest_validator.iter_errors(example["config"]))
    assert errors
    assert _pointer(best_match(errors)) == example["error_pointer"]


@pytest.mark.parametrize(
    "name, ok",
    [
        ("default", True), ("a", True), ("A0._-", True), ("x" * 128, True),
        (".", False), ("..", False), ("", False), ("-a", False), (".hidden", False), ("a/b", False),
        ("a\\b", False), ("a b", False), ("a\n", False), ("x" * 129, False), ("é", False),
    ],
)
def test_manifest_adapter_names(manifest_validator, name, ok):
    manifest = {"adapterspec_version": "1.0", "adapters": {name: {"path": "."}}, "default": name}
    assert (not _errors(manifest_validator, manifest)) is ok


@pytest.mark.parametrize(
    "path, ok",
    [
        (".", True), ("a", True), ("a/b", True), ("a/b.c/d-e", True),
        ("", False), ("..", False), ("../a", False), ("a/../b", False), ("a/./b", False), ("./a", False),
        ("/a", False), ("a/", False), ("a//b", False), ("a\\b", False), ("C:/a", False), ("a\n", False),
    ],
)
def test_manifest_paths(manifest_validator, path, ok):
    manifest = {"adapterspec_version": "1.0", "adapters": {"a": {"path": path}}}
    assert (not _errors(manifest_validator, manifest)) is ok


# --------------------------------------------------------------------------------------------- SPEC.md agreement


def test_spec_md_documents_every_field(schema):
    """SPEC.md section 4 has a row for every field of every method (the tables are generated from the schema)."""
    text = (SPEC_DIR / "SPEC.md").read_text(encoding="utf-8")
    missing = [f for f in schema["properties"] if f"| `{f}` |" not in text]
    for method in METHODS:
        missing += [f"{method}.{f}" for f in schema["$defs"][method]["properties"] if f"| `{f}` |" not in text]
    assert not missing


# --------------------------------------------------------------------------------------------- (f) package symlinks


@pytest.mark.parametrize(
    "link, target",
    [
        ("adapter_config.v1.schema.json", CONFIG_SCHEMA_PATH),
        ("manifest.v1.schema.json", MANIFEST_SCHEMA_PATH),
    ],
)
def test_package_schema_symlinks(link, target):
    path = REPO / "sdk" / "adapterspec" / "_schema" / link
    assert path.is_symlink(), f"{path} must be a symlink"
    raw = Path(path.readlink()) if hasattr(path, "readlink") else Path(__import__("os").readlink(path))
    assert not raw.is_absolute(), "the symlink must be relative"
    assert path.resolve() == target.resolve()
    assert path.read_bytes() == target.read_bytes()


# --------------------------------------------------------------------------------------------- (d), (e) PEFT


def _peft():
    return pytest.importorskip("peft")


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    return transformers.LlamaForCausalLM(config)


def _peft_configs():
    peft = _peft()
    return {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        "lora_arch_default_targets": peft.LoraConfig(task_type="CAUSAL_LM"),
        "lora_all_linear": peft.LoraConfig(r=4, target_modules="all-linear"),
        "lora_regex_patterns": peft.LoraConfig(
            r=4, target_modules=r".*\.(q|v)_proj", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.5}
        ),
        "lora_embedding_modules_to_save": peft.LoraConfig(
            r=4, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"],
            layers_to_transform=[1], layers_pattern="layers",
        ),
        "lora_trainable_tokens": peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
        "dora": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
        "rslora": peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
        "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "ia3_arch_defaults": peft.IA3Config(task_type="CAUSAL_LM"),
        "prefix_tuning": peft.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
        "prefix_tuning_projection": peft.PrefixTuningConfig(
            num_virtual_tokens=5, task_type="CAUSAL_LM", prefix_projection=True
        ),
        "prompt_tuning": peft.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
        "loha": peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        "lokr": peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        "lokr_decomposed": peft.LoKrConfig(r=1, alpha=2, target_modules=["q_proj", "down_proj"], decompose_both=True),
    }


@pytest.mark.parametrize(
    "case",
    [
        "lora", "lora_arch_default_targets", "lora_all_linear", "lora_regex_patterns",
        "lora_embedding_modules_to_save", "lora_trainable_tokens", "dora", "rslora", "ia3", "ia3_arch_defaults",
        "prefix_tuning", "prefix_tuning_projection", "prompt_tuning", "loha", "lokr", "lokr_decomposed",
    ],
)
def test_peft_save_pretrained_config_validates(validator, tmp_path, case):
    peft = _peft()
    config = _peft_configs()[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_tiny_llama(), config)
        model.save_pretrained(tmp_path)
    written = _load(tmp_path / "adapter_config.json")
    assert written["peft_type"] in METHODS
    assert not _errors(validator, written)


def _peft_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return dataclasses.MISSING
    if isinstance(value, enum.Enum):
        value = value.value
    return value


@pytest.mark.parametrize("method", METHODS)
def test_defaults_match_peft(schema, method):
    peft = _peft()
    cls = getattr(peft, PEFT_CONFIG_CLASS[method])
    peft_fields = {f.name: f for f in dataclasses.fields(cls)}
    sub = schema["$defs"][method]
    props = {**schema["properties"], **sub["properties"]}
    required = set(sub.get("required", [])) | set(schema["required"])
    wrong, missing = [], []
    for name, prop in props.items():
        field = peft_fields.get(name)
        if field is None:  # a field of ours PEFT does not have (adapterspec_version)
            continue
        expected = _peft_default(field)
        if expected is dataclasses.MISSING:
            continue
        if "default" in prop:
            same = prop["default"] == expected and type(prop["default"]) is type(expected)
            # JSON has one number type: 0.0 vs 0 would be the only allowed mismatch, and we spell floats as floats
            if not same:
                wrong.append(f"{name}: schema {prop['default']!r} != PEFT {expected!r}")
        elif name not in required and name != "peft_type":
            missing.append(name)
    assert not wrong
    assert not missing, f"properties with a PEFT default but no schema default: {missing}"


@pytest.mark.parametrize("method", METHODS)
def test_schema_knows_every_field_peft_writes(schema, method):
    """Strict mode must not flag PEFT 0.21.2's own fields as unknown."""
    peft = _peft()
    cls = getattr(peft, PEFT_CONFIG_CLASS[method])
    known = set(schema["properties"]) | set(schema["$defs"][method]["properties"])
    # runtime_config is removed by LoraConfig.to_dict() and never written
    written = {f.name for f in dataclasses.fields(cls)} - {"runtime_config"}
    assert not written - known


def test_pattern_matching_rule_is_peft_rule():
    """The rank/alpha-pattern rule stated in the schema descriptions is PEFT's get_pattern_key."""
    peft = _peft()
    from peft.utils.other import get_pattern_key

    keys = ["q_proj", r"layers\.0\.self_attn\.q_proj", "o_proj"]
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "o_proj", "xo_proj"]:
        ours = next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), name)
        assert get_pattern_key(keys, name) == ours
    assert peft.__version__


@pytest.mark.parametrize("path", [CONFIG_SCHEMA_PATH, MANIFEST_SCHEMA_PATH], ids=lambda p: p.name)
def test_a_version_writers_must_write_is_the_spec_version(path: Path) -> None:
    """A schema description that says what version writers MUST write says SPEC.md 2.2's (this spec's version)."""
    from adapterspec.spec import SPEC_VERSION

    descriptions: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            descriptions.extend(v for k, v in node.items() if k == "description" and isinstance(v, str))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(path.read_text("utf-8")))
    written = [re.findall(r'MUST write "(\d+\.\d+)"', d) for d in descriptions]
    assert [v for found in written for v in found if v != SPEC_VERSION] == []
    if path == MANIFEST_SCHEMA_PATH:
        assert [v for found in written for v in found] == [SPEC_VERSION]
