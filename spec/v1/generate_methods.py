"""Write the parts of the spec that are PEFT's data, from the installed PEFT (run with PEFT 0.21.2):

* in ``adapter_config.schema.json``: the ``peft_type`` enum (every ``PeftType``), and ``$defs/<TYPE>``
  with its ``if``/``then`` in ``allOf`` for each method whose math the spec does not define yet
  ("recognised, not portable", SPEC.md 14) -- field types and defaults from the method's config dataclass;
* ``target_modules.json``: PEFT's per-architecture defaults for a null ``target_modules`` (and IA3's
  ``feedforward_modules``) of the methods the spec defines (SPEC.md 14.2).

The six methods written by hand (LORA, IA3, PREFIX_TUNING, PROMPT_TUNING, LOHA, LOKR) are left as they are.

    $ python spec/v1/generate_methods.py        # rewrites both files next to this script
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "adapter_config.schema.json"
TARGETS = HERE / "target_modules.json"

#: Methods whose fields and math the spec defines by hand (SPEC.md 4.1, 8).
PORTABLE = ("LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "LOHA", "LOKR",
            "OFT",  # SPEC.md 15.6
            "BOFT",  # SPEC.md 15.7
            "P_TUNING",  # SPEC.md 15.8
            "ADALORA",  # SPEC.md 15.4
            "VERA",  # SPEC.md 15.5
            "TRAINABLE_TOKENS",  # SPEC.md 15.2
            "LN_TUNING",  # SPEC.md 15.3
            "ROAD", "MISS", "HRA", "VBLORA",  # SPEC.md 17
            "GRALORA",  # SPEC.md 17.5
            "DELORA",  # SPEC.md 17.6
            "C3A",  # SPEC.md 17.7
            "BEFT")  # SPEC.md 17.8
#: Fields of every config: top-level properties of the schema, not repeated per method.
COMMON = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
          "auto_mapping", "modules_to_save"}
#: PEFT's per-architecture default mappings: (peft_type, field) -> name in peft.utils.constants.
DEFAULT_TABLES = {
    ("LORA", "target_modules"): "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    ("IA3", "target_modules"): "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
    ("IA3", "feedforward_modules"): "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
    ("LOHA", "target_modules"): "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING",
    ("LOKR", "target_modules"): "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING",
    ("ADALORA", "target_modules"): "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING",
    ("VERA", "target_modules"): "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING",
    ("LN_TUNING", "target_modules"): "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING",
    ("OFT", "target_modules"): "TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING",
    ("BOFT", "target_modules"): "TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING",
    ("ROAD", "target_modules"): "TRANSFORMERS_MODELS_TO_ROAD_TARGET_MODULES_MAPPING",
    ("MISS", "target_modules"): "TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING",
    ("HRA", "target_modules"): "TRANSFORMERS_MODELS_TO_HRA_TARGET_MODULES_MAPPING",
    ("VBLORA", "target_modules"): "TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING",
    ("GRALORA", "target_modules"): "TRANSFORMERS_MODELS_TO_GRALORA_TARGET_MODULES_MAPPING",
    ("C3A", "target_modules"): "TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING",
    ("DELORA", "target_modules"): "TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING",
    ("BEFT", "target_modules"): "TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING",
}


def json_type(hint: Any) -> dict[str, Any]:
    """The JSON Schema of a dataclass field's type; ``{}`` (anything) where the type says nothing JSON can check.

    Literal types become their base type only: PEFT does not enforce most of them, and the spec must
    never refuse a config PEFT loads (SPEC.md 14).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [json_type(a) for a in args]
        if any(p == {} for p in parts):
            return {}
        names: list[str] = []
        items = [p["items"] for p in parts if "items" in p]
        for p in parts:
            for name in p["type"] if isinstance(p["type"], list) else [p["type"]]:
                if name not in names:
                    names.append(name)
        out: dict[str, Any] = {"type": names if len(names) > 1 else names[0]}
        if len(items) == 1:
            out["items"] = items[0]
        return out
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return json_type(kinds.pop()) if len(kinds) == 1 else {}
    if hint is type(None):
        return {"type": "null"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is str or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return {"type": "string"}
    if origin in (list, tuple, set) or hint in (list, tuple, set):
        item = json_type(args[0]) if origin is list and args else {}
        return {"type": "array", **({"items": item} if item else {})}
    if origin is dict or hint is dict or (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
        return {"type": "object"}
    return {}


def _default(f: dataclasses.Field[Any]) -> tuple[bool, Any]:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return False, None
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False, None
    return True, value


def _description(f: dataclasses.Field[Any]) -> str:
    text = " ".join(str(f.metadata.get("help", "")).split())
    cut = text.find(". ")
    return (text[:cut + 1] if 0 < cut < 300 else text[:300]) or f"PEFT's {f.name}."


def method_def(peft_type: str, config_cls: type) -> dict[str, Any]:
    """``$defs/<peft_type>`` of a recognised, not portable method: its own fields, typed, with PEFT's defaults."""
    hints = typing.get_type_hints(config_cls)
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in COMMON or f.name.startswith("_"):
            continue
        prop = {"description": _description(f), **json_type(hints.get(f.name, Any))}
        has_default, value = _default(f)
        if has_default:
            prop["default"] = value
            kinds = prop.get("type")
            if value is None and kinds is not None and "null" not in kinds:  # `x: int = None` in PEFT
                prop["type"] = [*(kinds if isinstance(kinds, list) else [kinds]), "null"]
        properties[f.name] = prop
    return {
        "type": "object",
        "$comment": f"generated by spec/v1/generate_methods.py from peft {_peft_version()} {config_cls.__name__}",
        "description": f"Fields of a {peft_type} adapter ({config_cls.__name__} in PEFT). Recognised, not "
                       "portable: the spec does not define its tensors or math yet (SPEC.md 14), so readers "
                       "refuse to load it (UnsupportedError) and validators accept it with a note.",
        "properties": properties,
    }


def _peft_version() -> str:
    import peft

    return str(peft.__version__)


def _branch(peft_type: str) -> dict[str, Any]:
    return {"if": {"properties": {"peft_type": {"const": peft_type}}, "required": ["peft_type"]},
            "then": {"$ref": f"#/$defs/{peft_type}"}}


def generate() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import constants
    from peft.utils.peft_types import PeftType

    schema = json.loads(SCHEMA.read_text("utf-8"))
    all_types = [t.value for t in PeftType]
    others = [t for t in all_types if t not in PORTABLE]
    schema["properties"]["peft_type"]["enum"] = [*PORTABLE, *others]
    for t in others:
        schema["$defs"][t] = method_def(t, PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(t)])
    kept = {b["then"]["$ref"].split("/")[-1]: b for b in schema["allOf"]}
    schema["allOf"] = [kept[t] if t in kept else _branch(t) for t in [*PORTABLE, *others]]  # the enum's order
    SCHEMA.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", "utf-8")

    tables: dict[str, Any] = {
        "$comment": f"generated by spec/v1/generate_methods.py from peft {_peft_version()} "
                    "peft/utils/constants.py; SPEC.md 14.2",
    }
    for (peft_type, field), name in DEFAULT_TABLES.items():
        table = getattr(constants, name)
        tables.setdefault(field, {})[peft_type] = {k: v for k, v in sorted(table.items())}
    TARGETS.write_text(json.dumps(tables, indent=2) + "\n", "utf-8")


if __name__ == "__main__":
    generate()
    sys.exit(0)
