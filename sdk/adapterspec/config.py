"""Adapter configs: parse, validate against the spec's JSON Schema, normalise, serialise.

Validation is the schema (``spec/v1/adapter_config.schema.json``) run by :mod:`jsonschema`; this
module only turns its findings into :class:`~adapterspec.errors.ConfigError` with a JSON pointer and
a fix, fills PEFT's defaults from the schema's ``default`` keywords, and answers per-module questions
(rank, alpha, scaling, targeting) by the rules in :mod:`adapterspec.targets`.

>>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4, "lora_alpha": 8})
>>> cfg.peft_type, cfg["lora_dropout"], cfg.scaling_for("model.layers.0.self_attn.q_proj")
('LORA', 0.0, 2.0)
>>> AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 0})
Traceback (most recent call last):
adapterspec.errors.ConfigError: /r: 0 is less than the minimum of 1 (fix: ...)
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import math
import os
import stat
import threading
import warnings
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, cast

import jsonschema
from jsonschema.exceptions import ValidationError, best_match, relevance

from ._rules import (
    NO_MODULES_TO_SAVE,
    OFT_PEFT_VERSION,
    TASK_MODULES_TO_SAVE,
    duplicate_entries,
    merge_refusal,
    peft_fan_in_fan_out,
    rule_problems,
    training_refusals,
    transformer_submodules,
    unsupported_features,
    velora_state_size,
)
from ._foreign import config_error
from ._lfs import lfs_pointer_error
from ._merge import rounds_delta_first
from ._mix import Running, mix_refusal
from .errors import ECHO_LIMIT, AdapterSpecWarning, ConfigError, FileFormatError, UnsupportedError, shorten
from .naming import PROMPT_METHODS
from .spec import SPEC_VERSION, check_version
from .targets import PatternTable, Targeting, is_feedforward, regex_problems

__all__ = [
    "AdapterConfig",
    "Running",
    "config_errors",
    "config_problems",
    "default_targets",
    "load_schema",
    "peft_fan_in_fan_out",
    "read_json_file",
    "schema_hint",
    "merge_refusal",
    "mix_refusal",
    "rounds_delta_first",
    "training_refusals",
    "transformer_submodules",
    "unknown_fields_note",
    "unsupported_features",
    "validate_config",
    "velora_state_size",
]


@functools.cache
def load_schema(name: str = "adapter_config") -> dict[str, Any]:
    """The spec's JSON Schema (``"adapter_config"`` or ``"manifest"``), as shipped with the package.

    >>> load_schema()["$schema"]
    'https://json-schema.org/draft/2020-12/schema'
    """
    text = resources.files("adapterspec").joinpath(f"_schema/{name}.v1.schema.json").read_text("utf-8")
    return cast("dict[str, Any]", json.loads(text))


@functools.cache
def _target_tables() -> dict[str, Any]:
    text = resources.files("adapterspec").joinpath("_schema/target_modules.v1.json").read_text("utf-8")
    tables: dict[str, Any] = json.loads(text)
    return tables


def default_targets(peft_type: str, model_type: str | None, field: str = "target_modules") -> list[str] | str | None:
    """PEFT's default for a null ``target_modules`` (or IA3 ``feedforward_modules``) on architecture
    ``model_type`` (SPEC.md 14.2, ``spec/v1/target_modules.json``); ``None`` when PEFT has none.

    >>> default_targets("LORA", "llama")
    ['q_proj', 'v_proj']
    >>> default_targets("IA3", "llama", "feedforward_modules")
    ['down_proj']
    """
    value: list[str] | str | None = _target_tables().get(field, {}).get(peft_type, {}).get(model_type or "")
    return copy.deepcopy(value)


def unknown_fields_note(unknown: list[str] | tuple[str, ...]) -> str:
    """The one wording of the note about fields the schema does not know (SPEC.md 2.5).

    >>> unknown_fields_note(["use_doar"])
    'fields unknown to adapterspec 1.2 are kept but not acted on: use_doar'
    """
    return f"fields unknown to adapterspec {SPEC_VERSION} are kept but not acted on: {shorten(', '.join(unknown), 300, plain=True)}"


@functools.cache
def _validator(name: str = "adapter_config") -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _pointer(error: ValidationError) -> str:
    path = list(error.absolute_path)
    if "propertyNames" in error.schema_path and isinstance(error.instance, str):
        path.append(error.instance)  # a bad key (of rank_pattern...): the error's path stops at its object
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _to_config_error(error: ValidationError, path: str | None) -> ConfigError:
    return ConfigError(_short_message(error), pointer=_pointer(error), path=path, hint=schema_hint(error))


_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "array": "a list", "object": "an object", "null": "null"}


def _listed(values: Any, limit: int = 12) -> str:
    shown = [json.dumps(v) for v in list(values)[:limit]]
    return ", ".join(shown) + (", ..." if len(values) > limit else "")


def _enum_hint(values: list[Any], instance: Any) -> str:
    """``use one of: ...`` for a short list; for a long one (``peft_type``), the closest value and a few."""
    if len(values) <= 8:
        return f"use one of: {_listed(values)}"
    close = difflib.get_close_matches(str(instance), [str(v) for v in values], n=1)
    guess = f"did you mean {json.dumps(close[0])}? " if close else ""
    return f"{guess}use one of the {len(values)} values the schema lists ({_listed(values, 3)})"


def schema_hint(error: ValidationError) -> str:
    """What to change to satisfy the schema keyword ``error`` failed: short and actionable, per keyword.

    >>> [schema_hint(e) for e in _validator().iter_errors({"peft_type": "LORA", "target_modules": 5})]
    ['use null or a string or a list']
    >>> [schema_hint(e) for e in _validator().iter_errors({"peft_type": "LORAX"})][0][:27]
    'did you mean "LORA"? use on'
    """
    hint = _keyword_hint(error)
    condition = _condition(error)
    return f"{hint} ({condition})" if condition else hint


def _condition(error: ValidationError) -> str | None:
    """``because lora_bias is true`` when ``error`` failed in the ``then`` of an ``if`` (other than the
    dispatch on ``peft_type``): the rule holds only given another field's value."""
    path = list(error.schema_path)
    if "then" not in path:
        return None
    cut = len(path) - 1 - path[::-1].index("then")
    node: Any = load_schema()
    try:
        for part in path[:cut]:
            while isinstance(node, dict) and part not in node and "$ref" in node:  # jsonschema follows refs silently
                node = load_schema()["$defs"][node["$ref"].rsplit("/", 1)[-1]]
            node = node[part]
        while isinstance(node, dict) and "if" not in node and "$ref" in node:
            node = load_schema()["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        given = node["if"].get("properties", {})
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if not given or set(given) == {"peft_type"}:
        return None
    return "because " + " and ".join(
        f"{name} is {json.dumps(rule['const'])}" if isinstance(rule, dict) and "const" in rule else f"of {name}"
        for name, rule in given.items())


def _keyword_hint(error: ValidationError) -> str:
    kind, value = error.validator, error.validator_value
    if "propertyNames" in error.schema_path:  # the failing instance is a member name, not a value
        return f"rename the key {shorten(error.instance, 80)}: " + {
            "minLength": "module names are not empty", "pattern": f"it must match {value!r}",
        }.get(str(kind), "see spec/v1/SPEC.md")
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else "?"
        return f"add the field {missing!r}"
    if kind == "enum":
        values = list(value)
        if any(v is False for v in values) and None in values:  # null reads as false (SPEC 4.1)
            values = [v for v in values if v is not None]
        return f"use {json.dumps(values[0])}" if len(values) == 1 else _enum_hint(values, error.instance)
    if kind == "const":
        return f"use {json.dumps(value)}"
    if kind == "type":
        types = [value] if isinstance(value, str) else list(value)
        if "boolean" in types:  # a null boolean reads as false (SPEC 4.1): writers write true or false
            types = [t for t in types if t != "null"]
        return "use " + " or ".join(_TYPE_NAMES.get(t, t) for t in types)
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    if kind in bounds:
        return f"use a value {bounds[str(kind)]} {value}"
    return {
        "minItems": f"give at least {value} item{'s' if value != 1 else ''}",
        "maxItems": f"give at most {value} item{'s' if value != 1 else ''}",
        "uniqueItems": "remove the repeated items",
        "minLength": f"use a string of at least {value} character{'s' if value != 1 else ''}",
        "maxLength": f"use a string of at most {value} characters",
        "pattern": f"use a string matching {value!r}",
        "minProperties": f"give at least {value} member{'s' if value != 1 else ''}",
        "maxProperties": f"give at most {value} members",
        "additionalProperties": "remove the members the schema does not define",
        "not": "this value is not allowed here; see spec/v1/SPEC.md",
        "anyOf": "use one of the forms the schema allows (adapterspec schema prints them)",
        "oneOf": "use exactly one of the forms the schema allows (adapterspec schema prints them)",
    }.get(str(kind), "see spec/v1/SPEC.md")


def _short_message(error: ValidationError) -> str:
    """jsonschema's message with the value it starts with cut short (``'<20 MB>' is too long``)."""
    message: str = error.message
    if isinstance(error.instance, (str, list, dict)) and len(error.instance) > 16:
        echoed = repr(error.instance)
        if message.startswith(echoed) and len(echoed) > ECHO_LIMIT:
            return shorten(error.instance) + message[len(echoed):]
    return message


def config_errors(data: Any, *, path: str | None = None) -> list[ConfigError]:
    """Every schema violation in ``data``, the most relevant first (jsonschema's ``best_match`` order).

    >>> [e.pointer for e in config_errors({"peft_type": "LORA", "target_modules": 5})]
    ['/target_modules']
    """
    errors = sorted(_validator().iter_errors(data), key=relevance, reverse=True)
    if errors:
        # best_match may descend into an error's context (the failing branch of an if/then)
        first = best_match(errors)
        errors = [first, *(e for e in errors if e is not first)]
    return [_to_config_error(e, path) for e in errors]


def _properties(peft_type: str) -> dict[str, Any]:
    """The schema of every field a ``peft_type`` config has: the common fields and the method's."""
    schema = load_schema()
    return {**schema["properties"], **schema["$defs"].get(peft_type, {}).get("properties", {})}


def _known_fields(peft_type: str) -> set[str]:
    return set(_properties(peft_type))


def validate_config(data: Any, *, strict: bool = False, path: str | None = None) -> list[str]:
    """Validate a config; raise the first problem, return the fields the schema does not know.

    :param strict: also refuse fields the schema does not know (a typo'd ``use_doar`` silently
        changes nothing in PEFT; strict mode catches it).
    :returns: the unknown fields (allowed when not strict: newer PEFT releases add fields).
    :raises ConfigError: with the JSON pointer of the first violation.
    :raises VersionError: ``adapterspec_version`` is of a newer major version.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"must be a JSON object, got {type(data).__name__}", pointer="", path=path,
                          hint='write {"peft_type": "LORA", ...}')
    _check_json_value(data, path)
    key = (json.dumps(data, sort_keys=True), strict)  # JSON values only, as just checked
    cached = _VALID.get(key)
    if cached is not None:
        return list(cached)
    unknown = _validate(data, strict=strict, path=path)
    with _VALID_LOCK:  # loads may run on several threads
        while len(_VALID) >= _VALID_SIZE:
            del _VALID[next(iter(_VALID))]
        _VALID[key] = tuple(unknown)
    return unknown


def config_problems(data: Any, *, strict: bool = False, path: str | None = None) -> list[ConfigError]:
    """Every problem :func:`validate_config` would raise, not only the first, for reports.

    All schema violations are listed (the one :func:`validate_config` raises first); the checks that
    need a schema-valid config (regular expressions, SPEC 4.2 rules, strict fields) add theirs only
    when there is no schema violation.

    >>> [e.pointer for e in config_problems({"peft_type": "LORA", "target_modules": ["q"], "r": 0, "lora_alpha": "8"})]
    ['/r', '/lora_alpha']
    """
    try:
        validate_config(data, strict=strict, path=path)
    except ConfigError as exc:
        first = exc
    else:
        return []
    try:
        _check_json_value(data, path)  # what is walked below is plain JSON, bounded in depth
    except ConfigError:
        return [first]
    schema_errors = config_errors(data, path=path)
    if not schema_errors or (schema_errors[0].pointer, schema_errors[0].message) != (first.pointer, first.message):
        return [first]  # not a schema violation (JSON values, version, rules): the one problem
    return schema_errors


#: Configs found valid (canonical JSON, strict) -> their unknown fields: validation is a pure function of
#: the config, and JSON Schema validation is most of the time a load takes after reading the tensors --
#: an adapter loaded again, or the next of many adapters trained with the same settings, skips it.
_VALID: dict[tuple[str, bool], tuple[str, ...]] = {}
_VALID_SIZE = 256
_VALID_LOCK = threading.Lock()


def _validate(data: Mapping[str, Any], *, strict: bool, path: str | None) -> list[str]:
    check_version(data.get("adapterspec_version"), path=path)
    foreign = config_error(data, path=path)  # mlx-lm's config: "add the field 'peft_type'" would load nothing
    if foreign is not None:
        raise foreign
    errors = config_errors(data, path=path)
    if errors:
        raise errors[0]
    for pointer, problem in regex_problems(data):
        raise ConfigError(problem, pointer=pointer, path=path,
                          hint="write a simpler regular expression, or list the module names instead")
    for pointer, problem, hint in rule_problems(data):  # SPEC 4.2 "rules the schema cannot express"
        raise ConfigError(problem, pointer=pointer, path=path, hint=hint)
    unknown = sorted(set(data) - _known_fields(data["peft_type"]))
    if unknown and strict:
        raise ConfigError(
            f"unknown field {unknown[0]!r} (strict mode)" + (f"; also {unknown[1:]}" if unknown[1:] else ""),
            pointer="/" + unknown[0], path=path,
            hint="remove it, fix its spelling, or validate without --strict",
        )
    return unknown


#: Limits on a config's JSON: deeper or bigger is refused before anything walks it recursively.
MAX_DEPTH = 64
MAX_VALUES = 1_000_000
MAX_CONFIG_BYTES = 16 * 2**20  # SPEC 11.2: refuse configs and manifests over 16 MiB
_INT_LIMIT = 2**64


def _check_json_value(data: Any, path: str | None) -> None:
    """Refuse what JSON cannot hold, and what would exhaust a reader: nesting deeper than
    :data:`MAX_DEPTH` (no ``RecursionError`` later), more than :data:`MAX_VALUES` values, NaN and
    infinities (``1e999`` parses as ``inf``), integers beyond 64 bits, non-string keys, non-JSON types."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    count = 0
    while stack:
        value, pointer, depth = stack.pop()
        count += 1
        problem = None
        if depth > MAX_DEPTH or count > MAX_VALUES:
            problem = f"nested deeper than {MAX_DEPTH} levels" if depth > MAX_DEPTH else f"more than {MAX_VALUES} values"
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    problem = f"key {key!r} is not a string"
                    break
                stack.append((item, pointer + "/" + key.replace("~", "~0").replace("/", "~1"), depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{pointer}/{i}", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            problem = f"{value} is not a finite number (JSON has no NaN or Infinity)"
        elif isinstance(value, int) and not isinstance(value, bool) and not -_INT_LIMIT < value < _INT_LIMIT:
            problem = "integer out of the 64-bit range"
        elif not (value is None or isinstance(value, (str, int, float))):
            problem = f"a {type(value).__name__} is not a JSON value"
        if problem:
            raise ConfigError(problem, pointer=pointer, path=path, hint="use plain JSON values (see spec/v1/SPEC.md)")


#: Config fields whose members' order means something: the first matching key wins (SPEC.md 4.4, 17.7).
ORDERED_FIELDS = frozenset({"rank_pattern", "alpha_pattern", "lambda_pattern", "block_size_pattern"})  # DeLoRA, C3A


def _sorted_keys(value: Any, *, keep: bool = False) -> Any:
    """``value`` with the keys of every object sorted (PEFT's ``sort_keys=True``) except those of
    :data:`ORDERED_FIELDS`' objects, which keep their document order."""
    if isinstance(value, dict):
        items = value.items() if keep else sorted(value.items())
        return {k: _sorted_keys(v, keep=k in ORDERED_FIELDS and isinstance(v, dict)) for k, v in items}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def _integers_as_int(data: dict[str, Any]) -> None:
    """Turn each integral float (``8.0``) where the schema types an integer into an ``int``, in place: JSON Schema
    counts ``8.0`` as an integer, and SPEC.md 4.1 asks readers to convert it (writers then write ``8``, which
    PEFT needs: it makes tensors of that size). A field typed ``number`` (``lora_alpha: 16.0``) keeps its float.

    Only the fields holding an integral float are walked, beside their schema (its properties, ``items``,
    ``additionalProperties`` and local ``$ref``); nearly every config has just ``lora_dropout: 0.0``.
    """
    peft_type = data.get("peft_type")
    fields = _properties(peft_type) if isinstance(peft_type, str) else {}
    for name in [k for k, v in data.items() if k in fields and _has_integral_float(v)]:
        data[name] = _as_schema_ints(fields[name], data[name])


def _as_schema_ints(node: Any, value: Any) -> Any:
    """``value`` with its integral floats made ``int`` where ``node`` (a schema) types an integer, not a number."""
    while isinstance(node, dict) and "$ref" in node and str(node["$ref"]).startswith("#/$defs/"):
        node = load_schema()["$defs"].get(str(node["$ref"]).removeprefix("#/$defs/"), {})
    if not isinstance(node, dict):
        return value
    types = node.get("type")
    types = [types] if isinstance(types, str) else types or []
    if isinstance(value, float):
        return int(value) if value.is_integer() and "integer" in types and "number" not in types else value
    if isinstance(value, list) and "items" in node:
        return [_as_schema_ints(node["items"], v) for v in value]
    if isinstance(value, dict):
        named, rest = node.get("properties", {}), node.get("additionalProperties")
        return {k: _as_schema_ints(named.get(k, rest), v) for k, v in value.items()}
    return value


def _has_integral_float(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(_has_integral_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_integral_float(v) for v in value)
    return False


def _defaults(peft_type: str) -> dict[str, Any]:
    props = _properties(peft_type)
    return {k: v["default"] for k, v in props.items() if isinstance(v, dict) and "default" in v and k != "adapterspec_version"}


@functools.cache
def _null_reads_false(peft_type: str) -> frozenset[str]:
    """The boolean fields of ``peft_type`` that may be null, which PEFT reads with a truth test (SPEC 4.1.1).

    >>> sorted(_null_reads_false("IA3"))
    ['fan_in_fan_out', 'inference_mode', 'init_ia3_weights']
    """
    schema = load_schema()
    props = {**schema["properties"], **schema["$defs"].get(peft_type, {}).get("properties", {})}
    return frozenset(k for k, v in props.items() if isinstance(v, dict) and v.get("type") == ["boolean", "null"]
                     and k not in _NULL_READS_TRUE.get(peft_type, ()))


#: Nullable boolean fields PEFT reads with ``is False`` rather than a truth test: null acts as true (SPEC 4.1.1).
#: RoAd's ``init_weights`` (``reset_parameters``: ``if init_weights is False``: a null one starts at the identity).
_NULL_READS_TRUE: Mapping[str, frozenset[str]] = {"ROAD": frozenset({"init_weights"})}


#: The fields :func:`~adapterspec.targets.module_matches` reads: configs equal in these target the same modules.
_TARGETING = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")
_SHARED_MATCHES: dict[str, dict[str, bool]] = {}
_MAX_SHARED = 64


def _shared_matches(data: Mapping[str, Any]) -> dict[str, bool]:
    """The memo of ``module_matches`` answers (module path -> bool) for configs targeting as ``data`` does.

    Adapters trained for one model tend to share their targeting (every LoRA of a family with
    ``target_modules: [q_proj, v_proj]``), so loading one after another matches each module path once,
    not once per adapter. The answers depend on the :data:`_TARGETING` fields alone; at most
    :data:`_MAX_SHARED` targetings are kept (the oldest is dropped).
    """
    try:
        key = json.dumps([data.get(name) for name in _TARGETING], sort_keys=True)
    except (TypeError, ValueError):  # not JSON (a config made by hand): a memo of its own
        return {}
    memo = _SHARED_MATCHES.get(key)
    if memo is None:
        if len(_SHARED_MATCHES) >= _MAX_SHARED:
            _SHARED_MATCHES.pop(next(iter(_SHARED_MATCHES)), None)
        memo = _SHARED_MATCHES.setdefault(key, {})
    return memo


class AdapterConfig(Mapping[str, Any]):
    """A validated adapter config: a read-only mapping of its fields, PEFT's defaults filled in.

    Build it with :meth:`from_dict` or :meth:`from_file`; serialise with :meth:`to_dict`/:meth:`to_json`.
    Fields the method's schema does not know are kept and written back by :meth:`to_dict`, listed in
    :attr:`unknown_fields`, but are not part of the mapping: nothing reads them, so they cannot change the
    computation (SPEC.md 2.5; PEFT drops them too).

    >>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": "q_proj", "r": 16,
    ...                                "lora_alpha": 32, "use_rslora": True})
    >>> cfg.rank_for("q_proj"), cfg.scaling_for("q_proj")
    (16, 8.0)
    """

    __slots__ = ("_acting", "_data", "_matches", "_tables", "_targeting", "unknown_fields")

    def __init__(self, data: Mapping[str, Any], *, unknown_fields: tuple[str, ...] = ()) -> None:
        self._data = dict(data)  # every field, as written back
        # the fields that act: the mapping and every answer below read these only
        self._acting = {k: v for k, v in self._data.items() if k not in unknown_fields} if unknown_fields \
            else self._data
        method = self._data.get("peft_type")
        nulls = [k for k in _null_reads_false(method) if k in self._acting and self._acting[k] is None] \
            if isinstance(method, str) else []
        if nulls:  # SPEC 4.1.1: a null boolean reads as false (PEFT's truth test); written back as null
            self._acting = {**self._acting, **dict.fromkeys(nulls, False)}
        trues = [k for k in _NULL_READS_TRUE.get(method, ()) if k in self._acting and self._acting[k] is None] \
            if isinstance(method, str) else []
        if trues:  # SPEC 4.1.1: PEFT tests these with ``is False``, so null acts as true; written back as null
            self._acting = {**self._acting, **dict.fromkeys(trues, True)}
        saved = self._acting.get("modules_to_save")
        task = self._acting.get("task_type")
        heads = [n for n in TASK_MODULES_TO_SAVE.get(task if isinstance(task, str) else "", ()) if n not in (saved or ())] \
            if method not in NO_MODULES_TO_SAVE and (saved is None or isinstance(saved, list)) else []
        if heads:  # SPEC 4.3: PEFT's task class adds its heads at every load; written back as they were
            self._acting = {**self._acting, "modules_to_save": [*(saved or ()), *heads]}
        self._matches: dict[str, bool] | None = None  # module path -> matches(), shared (see _shared_matches)
        self._targeting: Targeting | None = None  # the targeting fields prepared (sets, compiled patterns)
        self._tables: dict[str, PatternTable] = {}  # rank_pattern / alpha_pattern prepared
        self.unknown_fields = unknown_fields

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = False, path: str | Path | None = None,
                  _owned: bool = False) -> AdapterConfig:
        """Validate ``data`` and fill PEFT's defaults.

        :param strict: refuse fields the schema does not know.
        :param path: the file it came from, for error messages.
        :param _owned: ``data`` is the caller's to give away (just parsed): it is not copied.
        :raises ConfigError: naming the JSON pointer of the problem.
        """
        where = str(path) if path is not None else None
        unknown = validate_config(data, strict=strict, path=where)
        if unknown:
            warnings.warn(f"{where + ': ' if where else ''}{unknown_fields_note(unknown)}", AdapterSpecWarning,
                          stacklevel=2)
        for pointer, note in duplicate_entries(data):
            warnings.warn(f"{where + ': ' if where else ''}{pointer}: {note}", AdapterSpecWarning, stacklevel=2)
        merged = {**_defaults(data["peft_type"]), **(data if _owned else copy.deepcopy(dict(data)))}
        _integers_as_int(merged)
        return cls(merged, unknown_fields=tuple(unknown))

    @classmethod
    def from_file(cls, path: str | Path, *, strict: bool = False) -> AdapterConfig:
        """Read and validate an ``adapter_config.json``.

        :raises FileFormatError: not readable, or not JSON.
        :raises ConfigError: the JSON is not a valid config.
        """
        return cls.from_dict(read_json_file(path), strict=strict, path=path, _owned=True)

    # -- mapping ----------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._acting[key]

    def get(self, key: str, default: Any = None) -> Any:  # Mapping's, without its KeyError round trip
        return self._acting.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._acting)

    def __len__(self) -> int:
        return len(self._acting)

    def __repr__(self) -> str:
        targets = self._data.get("target_modules")
        return f"AdapterConfig(peft_type={self.peft_type!r}, r={self._data.get('r')!r}, target_modules={targets!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AdapterConfig):
            return self._data == other._data
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # unhashable, like the dict it compares equal to

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as written to ``adapter_config.json``: PEFT loads it without a warning.

        ``inference_mode`` is written ``true``, as PEFT does on save. ``adapterspec_version`` is left out
        (spec 1.1: it is recorded in the safetensors metadata; PEFT warns about fields it does not know).
        """
        out = copy.deepcopy(self._data)
        out.pop("adapterspec_version", None)
        out["inference_mode"] = True
        if out.get("peft_type") == "OFT" and out.get("use_cayley_neumann", True) and not out.get("peft_version"):
            out["peft_version"] = OFT_PEFT_VERSION  # SPEC.md 15.6: PEFT reads the series' version from it
        if out.get("peft_type") in NO_MODULES_TO_SAVE and out.get("modules_to_save") is None:
            out.pop("modules_to_save", None)  # PEFT's config class has no such field: it would warn
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as PEFT formats it: ``indent=2``, sorted keys, trailing newline -- except the keys of
        :data:`ORDERED_FIELDS` (``rank_pattern``, ``alpha_pattern``, DeLoRA's ``lambda_pattern``, C3A's
        ``block_size_pattern``), which keep their order: the first matching key wins (SPEC.md 4.4, 17.6, 17.7), so
        sorting them can change a module's rank, alpha, lambda or block size.

        >>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q", "v"],
        ...                                "alpha_pattern": {"v": 40, ".*": 5}})
        >>> json.loads(cfg.to_json())["alpha_pattern"]
        {'v': 40, '.*': 5}
        """
        return json.dumps(_sorted_keys(self.to_dict()), indent=2) + "\n"

    def replace(self, **changes: Any) -> AdapterConfig:
        """A validated copy with some fields changed.

        >>> AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"]}).replace(r=2)["r"]
        2
        """
        return AdapterConfig.from_dict({**self._data, **changes})

    def for_model(self, model_type: str | None) -> AdapterConfig:
        """This config with a null ``target_modules`` (and IA3's null ``feedforward_modules``) replaced by
        PEFT's default for the architecture ``model_type`` (transformers' ``config.model_type``), as PEFT
        does when it loads the adapter (SPEC.md 14.2). Other configs are returned as they are.

        :raises UnsupportedError: PEFT has no default for ``model_type`` (names the field and the model type).

        >>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": None})
        >>> cfg.for_model("llama")["target_modules"]
        ['q_proj', 'v_proj']
        """
        if self.is_prompt_learning or self.peft_type not in _target_tables()["target_modules"]:
            return self  # PEFT has no per-architecture table for it (TRAINABLE_TOKENS: the backend's embedding)
        changes: dict[str, Any] = {}
        fields = ("target_modules", "feedforward_modules") if self.peft_type == "IA3" else ("target_modules",)
        for name in fields:
            if self._acting.get(name) is not None or (name == "target_modules" and self._acting.get("target_parameters")
                                                    and default_targets(self.peft_type, model_type) is None):
                continue
            value = default_targets(self.peft_type, model_type, name)
            if value is None:
                raise UnsupportedError(
                    f"{name} is null and PEFT has no default {name} for {self.peft_type} on model type "
                    f"{model_type!r}", pointer=f"/{name}",
                    hint=f"list the modules in {name} in adapter_config.json (spec/v1/target_modules.json has "
                         "PEFT's defaults per model type)")
            if isinstance(value, str) and self._acting.get("layers_to_transform") not in (None, []):
                # the schema forbids a regex with layers_to_transform (PEFT ignores the layers for a regex)
                raise UnsupportedError(
                    f"PEFT's default {name} for model type {model_type!r} is a regular expression, which cannot "
                    "be combined with layers_to_transform", pointer="/layers_to_transform",
                    hint=f"list the modules in {name} in adapter_config.json")
            changes[name] = value
        return self.replace(**changes) if changes else self

    # -- per-module answers -----------------------------------------------------------
    @property
    def peft_type(self) -> str:
        """The method: ``"LORA"``, ``"IA3"``, ``"PREFIX_TUNING"``, ``"PROMPT_TUNING"``, ``"P_TUNING"``, ``"LOHA"``, ...."""
        return cast(str, self._acting["peft_type"])  # validated

    @property
    def is_prompt_learning(self) -> bool:
        """Whether the method adds virtual tokens rather than adapting layers."""
        return self.peft_type in PROMPT_METHODS

    def matches(self, module: str) -> bool:
        """Whether the module at path ``module`` gets an adapter (SPEC.md 4, :func:`~adapterspec.targets.module_matches`)."""
        memo = self._matches
        if memo is None:
            memo = self._matches = _shared_matches(self._acting)
        found = memo.get(module)
        if found is None:
            targeting = self._targeting
            if targeting is None:
                targeting = self._targeting = Targeting(self._acting)
            found = memo[module] = targeting.matches(module)
        return found

    def rank_for(self, module: str) -> int:
        """The rank of ``module``'s adapter: ``rank_pattern``'s first matching key, else ``r``."""
        return int(self._table("rank_pattern").value(module, default=self._acting["r"]))

    def alpha_for(self, module: str) -> float:
        """``alpha_pattern``'s first matching key, else ``lora_alpha`` (``alpha`` for LoHa/LoKr)."""
        default = self._acting["lora_alpha"] if self.peft_type == "LORA" else self._acting.get("alpha", self._acting["r"])
        return float(self._table("alpha_pattern").value(module, default=default))

    def _table(self, field: str) -> PatternTable:
        table = self._tables.get(field)
        if table is None:
            table = self._tables[field] = PatternTable(self._acting.get(field))
        return table

    def scaling_for(self, module: str) -> float:
        """The factor applied to the low-rank update: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

        >>> cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "r": 4, "lora_alpha": 8,
        ...                                "rank_pattern": {"q": 16}})
        >>> cfg.scaling_for("layers.0.q")
        0.5
        """
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self._acting.get("use_rslora") else alpha / r

    def is_feedforward(self, module: str) -> bool:
        """IA3: whether ``module`` scales its input (feed-forward) rather than its output."""
        return is_feedforward(self._acting, module)


def read_json_file(path: str | Path, *, what: str = "config", limit: int = MAX_CONFIG_BYTES,
                   file: BinaryIO | None = None) -> Any:
    """The JSON value in ``path``: a regular UTF-8 file of at most ``limit`` bytes, without NaN/Infinity.

    Never blocks (a FIFO is refused, not read) and never reads more than ``limit`` bytes.

    :param file: the file already open (what ``path`` named then; left open), to read instead of ``path``.
    :raises FileFormatError: naming the file: unreadable, not a regular file, too big, not JSON.
    """
    try:
        with contextlib.nullcontext(file) if file is not None else \
                os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise FileFormatError(f"the {what} is not a regular file", path=path,
                                      hint="replace it with the JSON file itself")
            raw = fh.read(limit + 1)
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(f"cannot read the {what}: {exc}", path=path,
                              hint="check the file exists and is UTF-8 JSON") from None
    if len(raw) > limit:
        raise FileFormatError(f"the {what} is larger than {limit} bytes", path=path,
                              hint="this is not an adapterspec file; check what was downloaded")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_unique_members)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        pointer = lfs_pointer_error(raw, path, what)  # a clone without git-lfs: not a JSON typo
        if pointer is not None:
            raise pointer from None
        raise FileFormatError(f"not valid JSON: {str(exc)[:300]}", path=path, hint="fix the JSON syntax") from None


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # SPEC 3.1: objects with duplicate member names are refused (Python's json keeps the last silently).
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate member name {key!r} in an object")
        seen[key] = value
    return seen


def _refuse_constant(name: str) -> float:
    # JSON has no NaN/Infinity; Python's json accepts them unless told otherwise.
    raise ValueError(f"{name} is not valid JSON")
