"""Spec 1.1: every PEFT 0.21 method is recognised; the config forms PEFT accepts are valid (SPEC.md 14)."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterspec
from adapterspec.cli import main, validate_targets
from adapterspec.config import AdapterConfig, default_targets, validate_config
from adapterspec.errors import AdapterSpecWarning, ConfigError, UnsupportedError

SPEC_DIR = Path(__file__).resolve().parents[2] / "spec" / "v1"
PORTABLE = {"LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "LOHA", "LOKR", "OFT", "BOFT",
            "P_TUNING",
            "ADALORA",
            "VERA",
            "TRAINABLE_TOKENS",
            "LN_TUNING",
            "ROAD", "MISS", "HRA", "VBLORA",
            "GRALORA",  # SPEC.md 17.5
            "DELORA",  # SPEC.md 17.6
            "C3A",
            "BEFT"}  # SPEC.md 17.8  # SPEC.md 17.7
#: The few PEFT configs that need arguments: their __post_init__ refuses the defaults, or (prefix and prompt
#: tuning, spec-required) PEFT cannot build the adapter without num_virtual_tokens (the tensor's shape).
REQUIRED_ARGS: dict[str, dict[str, Any]] = {"ADALORA": {"total_step": 100}, "CPT": {"task_type": "CAUSAL_LM"},
                                            "PREFIX_TUNING": {"num_virtual_tokens": 4},
                                            "PROMPT_TUNING": {"num_virtual_tokens": 4},
                                            "P_TUNING": {"num_virtual_tokens": 4}}


def _peft_config_dicts() -> dict[str, dict[str, Any]]:
    """``to_dict()`` of each PeftType's config class, made with the fewest arguments PEFT accepts."""
    pytest.importorskip("peft")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils.peft_types import PeftType

    out = {}
    for peft_type in PeftType:
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                data = cls(**REQUIRED_ARGS.get(peft_type.value, {})).to_dict()
            except ImportError:  # AdaMSS's __post_init__ needs scikit-learn: its dataclass defaults, as to_dict writes them
                data = {f.name: _plain(f.default if f.default is not dataclasses.MISSING else f.default_factory())
                        for f in dataclasses.fields(cls) if f.name != "runtime_config"}
                data["peft_type"] = peft_type.value
        out[peft_type.value] = json.loads(json.dumps(data, default=_plain))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def test_every_peft_type_is_recognised_and_validates() -> None:
    configs = _peft_config_dicts()
    assert len(configs) == 45
    for peft_type, data in configs.items():
        validate_config(data)  # raises ConfigError if the schema refused it
        unknown = validate_config(data)
        assert unknown == [] or peft_type == "LORA" and set(unknown) <= {"runtime_config"}, (peft_type, unknown)


def test_every_peft_type_validates_with_the_cli(tmp_path: Path) -> None:
    """``adapterspec validate`` of each config as PEFT's ``save_pretrained`` writes it: ok; the 39 methods the
    spec does not define carry the not-portable note, and fail with --strict."""
    pytest.importorskip("peft")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils.peft_types import PeftType

    notes = 0
    for peft_type, data in _peft_config_dicts().items():
        folder = tmp_path / peft_type
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cls(**REQUIRED_ARGS.get(peft_type, {})).save_pretrained(str(folder))
            except ImportError:
                folder.mkdir()
                (folder / "adapter_config.json").write_text(json.dumps(data))
        [result] = validate_targets([str(folder / "adapter_config.json")])
        assert result.ok, (peft_type, result.errors)
        assert result.summary == f"{peft_type} config"
        not_portable = [w for w in result.warnings if "not portable:" in w["message"]]
        assert bool(not_portable) == (peft_type not in PORTABLE), (peft_type, result.warnings)
        notes += bool(not_portable)
        if peft_type not in PORTABLE:
            [strict] = validate_targets([str(folder / "adapter_config.json")], strict=True)
            assert [e["type"] for e in strict.errors] == ["UnsupportedError"] and strict.errors[0]["pointer"] == "/peft_type"
    assert notes == len(PeftType) - len(PORTABLE)


def test_unknown_peft_type_is_still_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"peft_type": "FUTURE_METHOD", "target_modules": ["q"]})
    assert info.value.pointer == "/peft_type"


def _folder(tmp_path: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return tmp_path


FOURIERFT = {"peft_type": "FOURIERFT", "n_frequency": 4, "target_modules": ["q_proj"]}  # stays recognised, not portable
FOURIERFT_TENSORS = {"base_model.model.l.0.q_proj.fourierft_spectrum": np.arange(4, dtype=np.float32)}


def test_not_portable_folder_validates_with_a_note_and_fails_strict(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "fourierft", FOURIERFT, FOURIERFT_TENSORS)
    with pytest.warns(AdapterSpecWarning, match="not portable: .*FOURIERFT is recognised but not portable"):
        assert adapterspec.validate_adapter(folder) == []
    [error] = adapterspec.validate_adapter(folder, strict=True)
    assert isinstance(error, UnsupportedError) and error.pointer == "/peft_type"


def test_not_portable_folder_with_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One not-portable folder among others: ok with the note (the others are still validated); --strict fails it."""
    folder = _folder(tmp_path / "fourierft", FOURIERFT, FOURIERFT_TENSORS)
    lora = _folder(tmp_path / "lora", {"peft_type": "LORA", "r": 2, "target_modules": ["q"]},
                   {"base_model.model.l.q.lora_A.weight": np.ones((2, 4), np.float32),
                    "base_model.model.l.q.lora_B.weight": np.ones((4, 2), np.float32)})
    assert main(["validate", str(folder), str(lora)]) == 0
    out = capsys.readouterr().out
    assert f"{folder}: ok (FOURIERFT, not portable)" in out and f"{lora}: ok (LORA, 2 tensors" in out
    assert "warning: " in out and "FOURIERFT is recognised but not portable" in out and "2 valid, 0 invalid" in out
    assert main(["validate", "--strict", str(folder)]) == 1
    assert "error: " in capsys.readouterr().out


def test_not_portable_method_is_refused_at_read_with_unsupported_error(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "fourierft", FOURIERFT, FOURIERFT_TENSORS)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.read_adapter(folder)
    assert not isinstance(info.value, ConfigError)
    assert info.value.pointer == "/peft_type"
    assert "FOURIERFT" in info.value.message and "PEFT loads it" in info.value.message
    assert "PeftModel.from_pretrained" in (info.value.hint or "")


def test_not_portable_tensors_are_refused_typed_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="FOURIERFT is recognised but not portable"):
        adapterspec.Adapter.from_tensors(FOURIERFT, FOURIERFT_TENSORS)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.write_adapter(tmp_path / "out", FOURIERFT, FOURIERFT_TENSORS)
    assert info.value.pointer == "/peft_type"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("model_type", "peft_type", "field", "expected"), [
    ("llama", "LORA", "target_modules", ["q_proj", "v_proj"]),
    ("gpt2", "LORA", "target_modules", ["c_attn"]),
    ("gemma4", "LORA", "target_modules", r".*language_model\..*\.(q_proj|v_proj)"),
    ("llama", "IA3", "target_modules", ["k_proj", "v_proj", "down_proj"]),
    ("llama", "IA3", "feedforward_modules", ["down_proj"]),
    ("bert", "LOHA", "target_modules", ["query", "value"]),
])
def test_default_targets_are_peft_tables(model_type: str, peft_type: str, field: str, expected: Any) -> None:
    assert default_targets(peft_type, model_type, field) == expected
    peft_constants = pytest.importorskip("peft.utils.constants")
    name = "FEEDFORWARD_MODULES" if field == "feedforward_modules" else "TARGET_MODULES"
    table = getattr(peft_constants, f"TRANSFORMERS_MODELS_TO_{peft_type}_{name}_MAPPING")
    assert table[model_type] == expected


def test_spec_table_is_all_of_peft_tables() -> None:
    """Every portable method whose PEFT tuner fills a null ``target_modules`` from a per-architecture table
    (``target_module_mapping``; IA3 reads its two constants directly) has that table in the spec: OFT and
    BOFT had none, so a null ``target_modules`` (PEFT's own boft/llama-3.2-3B-default) matched no module."""
    peft_constants = pytest.importorskip("peft.utils.constants")
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tables = {"IA3": peft_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING}
    for peft_type in PORTABLE - {"IA3"}:
        table = getattr(PEFT_TYPE_TO_TUNER_MAPPING[peft_type], "target_module_mapping", None)
        if table is not None:
            tables[peft_type] = table
    assert {"OFT", "BOFT", "LORA", "ADALORA", "VERA", "LN_TUNING"} <= set(tables)
    for peft_type, table in tables.items():
        assert table and {m: default_targets(peft_type, m) for m in table} == table, peft_type
        needs = {"total_step": 10} if peft_type == "ADALORA" else {}  # PEFT refuses an AdaLoRA without it
        assert AdapterConfig.from_dict({"peft_type": peft_type, **needs}).for_model("llama")["target_modules"] == \
            table["llama"], peft_type


def test_null_target_modules_resolved_for_the_model_type() -> None:
    cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": None, "r": 2})
    assert not cfg.matches("model.layers.0.self_attn.q_proj")  # unresolved: selects nothing by itself
    resolved = cfg.for_model("llama")
    assert resolved["target_modules"] == ["q_proj", "v_proj"] and resolved["r"] == 2
    assert resolved.matches("model.layers.0.self_attn.q_proj") and not resolved.matches("model.layers.0.mlp.up_proj")
    assert cfg.for_model("llama") is not cfg and cfg["target_modules"] is None
    explicit = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["k_proj"]})
    assert explicit.for_model("llama") is explicit
    with pytest.raises(UnsupportedError) as info:
        cfg.for_model("not_a_model")
    assert info.value.pointer == "/target_modules" and "'not_a_model'" in info.value.message
    with pytest.raises(UnsupportedError) as info:  # gemma4's default is a regex: no layers_to_transform with it
        AdapterConfig.from_dict({"peft_type": "LORA", "layers_to_transform": [0]}).for_model("gemma4")
    assert info.value.pointer == "/layers_to_transform"
    assert AdapterConfig.from_dict({"peft_type": "LORA"}).for_model("gemma4")["target_modules"] == \
        r".*language_model\..*\.(q_proj|v_proj)"
    ia3 = AdapterConfig.from_dict({"peft_type": "IA3", "target_modules": ["q_proj", "down_proj"]}).for_model("llama")
    assert ia3["target_modules"] == ["q_proj", "down_proj"] and ia3["feedforward_modules"] == ["down_proj"]


def test_null_target_modules_folder_passes_the_tensor_checks(tmp_path: Path) -> None:
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}  # target_modules absent: PEFT's default at load
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 8), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((8, 2), np.float32)}
    folder = _folder(tmp_path / "a", config, tensors)
    assert adapterspec.validate_adapter(folder) == []
    bad = _folder(tmp_path / "b", config, {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
                                            np.ones((8, 3), np.float32)})
    assert [type(e).__name__ for e in adapterspec.validate_adapter(bad)] == ["ShapeMismatchError"]


def test_ia3_null_feedforward_accepts_either_orientation(tmp_path: Path) -> None:
    config = {"peft_type": "IA3", "target_modules": ["q_proj", "down_proj"], "feedforward_modules": None}
    tensors = {"base_model.model.l.0.q_proj.ia3_l": np.ones((8, 1), np.float32),
               "base_model.model.l.0.down_proj.ia3_l": np.ones((1, 16), np.float32)}
    assert adapterspec.validate_adapter(_folder(tmp_path / "a", config, tensors)) == []
    bad = {**tensors, "base_model.model.l.0.down_proj.ia3_l": np.ones((2, 16), np.float32)}
    assert [type(e).__name__ for e in adapterspec.validate_adapter(_folder(tmp_path / "b", config, bad))] == \
        ["ShapeMismatchError"]


@pytest.mark.parametrize(("config", "good", "bad"), [
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3}, (3, 64), (4, 64)),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "num_layers": 2}, (3, 64), (3, 64, 1)),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}, (3, 16), (2, 16)),
])
def test_prompt_sizes_left_to_the_model(tmp_path: Path, config: dict[str, Any], good: tuple[int, ...],
                                        bad: tuple[int, ...]) -> None:
    ok = _folder(tmp_path / "ok", config, {"prompt_embeddings": np.ones(good, np.float32)})
    assert adapterspec.validate_adapter(ok) == []
    wrong = _folder(tmp_path / "wrong", config, {"prompt_embeddings": np.ones(bad, np.float32)})
    assert [type(e).__name__ for e in adapterspec.validate_adapter(wrong)] == ["ShapeMismatchError"]


def test_duplicate_target_modules_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = {"peft_type": "LORA", "target_modules": ["to_q", "to_k", "to_q"]}
    with pytest.warns(AdapterSpecWarning, match=r"/target_modules/2: 'to_q' is listed twice"):
        cfg = AdapterConfig.from_dict(data)
    assert cfg.matches("blocks.0.to_q") and cfg["target_modules"] == ["to_q", "to_k", "to_q"]
    path = tmp_path / "flux.json"
    path.write_text(json.dumps(data))
    assert main(["validate", str(path)]) == 0
    assert f"warning: {path}: /target_modules/2: 'to_q' is listed twice" in capsys.readouterr().out


def test_lone_adapter_config_is_validated_as_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q"], "r": 4}))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok (LORA config)" in out and "no adapter_model.safetensors" not in out
    path.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q"], "r": 0}))
    assert main(["validate", str(path)]) == 1
    assert "/r" in capsys.readouterr().out


@pytest.mark.parametrize("field, value", [("use_bdlora", {"target_modules_bd_a": ["q"]}), ("kasa_config", {}),
                                          ("use_qalora", True)])
def test_config_only_validate_refuses_unsupported_features(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           field: str, value: Any) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q"], field: value}))
    [result] = validate_targets([str(path)])
    assert [(e["type"], e["pointer"]) for e in result.errors] == [("UnsupportedError", f"/{field}")]


def test_unknown_fields_have_one_wording(tmp_path: Path) -> None:
    data = {"peft_type": "LORA", "target_modules": ["q"], "use_doar": True}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    [result] = validate_targets([str(path)])
    with pytest.warns(AdapterSpecWarning) as caught:
        AdapterConfig.from_dict(data)
    expected = f"fields unknown to adapterspec {adapterspec.SPEC_VERSION} are kept but not acted on: use_doar"
    assert result.warnings == [{"message": f"{path}: {expected}", "file": str(path)}]
    assert [str(w.message) for w in caught] == [expected]


def test_generated_parts_of_the_spec_are_up_to_date(tmp_path: Path) -> None:
    """spec/v1/generate_methods.py, run on the committed schema with the installed PEFT, changes nothing."""
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("generate_methods", SPEC_DIR / "generate_methods.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SCHEMA, module.TARGETS = tmp_path / "schema.json", tmp_path / "targets.json"
    shutil.copy(SPEC_DIR / "adapter_config.schema.json", module.SCHEMA)
    module.generate()
    assert module.SCHEMA.read_text("utf-8") == (SPEC_DIR / "adapter_config.schema.json").read_text("utf-8")
    assert module.TARGETS.read_text("utf-8") == (SPEC_DIR / "target_modules.json").read_text("utf-8")
