"""The corpus' own invariants (``adapterspec conformance check``), as JSON-Schema-Test-Suite checks its tests.

* every case file is valid against ``case.schema.json``;
* case ids are unique in the whole corpus;
* every case names its profiles, all declared in ``corpus.json``, ``full`` among them; a round trip is in
  its source's profiles; every declared profile has cases;
* every file a case names exists, and ``corpus.json`` lists every file with its sha256 (no more, no less);
* schema cases agree with the spec's schema (:func:`adapterspec.validate_config`);
* ``errors.json`` is adapterspec's error hierarchy, and every error a case expects is in it;
* numeric cases: the base weights fit the modules, inputs and expected outputs have one entry per
  module (or the prompt-learning output), and the tolerances are set;
* valid folder cases read cleanly with :func:`adapterspec.read_adapter`;
* the corpus stays small (< 2 MiB).

>>> check_corpus()                                                  # doctest: +SKIP
[]
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema

from .. import errors as errors_module
from ..errors import AdapterSpecError
from . import _io
from .cases import (
    FULL_PROFILE,
    Case,
    Corpus,
    FolderCase,
    NumericCase,
    RoundtripCase,
    SchemaCase,
    default_corpus_dir,
    load_corpus,
)

__all__ = ["MAX_CORPUS_BYTES", "check_corpus"]

MAX_CORPUS_BYTES = 2 * 1024 * 1024
_FILES = {"folders.json": "foldersFile", "numeric.json": "numericFile", "roundtrip.json": "roundtripFile",
          "errors.json": "errorsFile", "corpus.json": "corpusFile"}


def _schema_problems(root: Path) -> list[str]:
    meta = json.loads((root / "case.schema.json").read_text("utf-8"))
    cls = jsonschema.validators.validator_for(meta)
    cls.check_schema(meta)
    problems = []
    targets = [(p, "schemaFile") for p in sorted((root / "schema").glob("*.json"))]
    targets += [(root / name, ref) for name, ref in _FILES.items() if (root / name).exists()]
    for path, ref in targets:
        validator = cls({"$ref": f"#/$defs/{ref}", "$defs": meta["$defs"]})
        data = json.loads(path.read_text("utf-8"))
        for error in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))[:5]:
            where = "/" + "/".join(map(str, error.absolute_path))
            problems.append(f"{path.relative_to(root)}{where}: {error.message[:200]}")
    return problems


def _file_problems(root: Path, meta: dict[str, Any]) -> list[str]:
    listed = meta.get("files", {})
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "corpus.json"}
    problems = [f"corpus.json lists {name}, which is missing" for name in sorted(set(listed) - present)]
    problems += [f"{name} is not listed in corpus.json (regenerate the corpus)" for name in sorted(present - set(listed))]
    for name in sorted(set(listed) & present):
        digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
        if digest != listed[name]:
            problems.append(f"{name}: sha256 {digest[:12]}... differs from corpus.json's {listed[name][:12]}...")
    size = sum((root / name).stat().st_size for name in present)
    if size > MAX_CORPUS_BYTES:
        problems.append(f"the corpus holds {size} bytes, more than {MAX_CORPUS_BYTES}")
    return problems


def _error_problems(root: Path, cases: list[Case]) -> list[str]:
    hierarchy = json.loads((root / "errors.json").read_text("utf-8"))["errors"]
    problems = []
    for name, entry in hierarchy.items():
        cls = getattr(errors_module, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, AdapterSpecError)):
            problems.append(f"errors.json: {name} is not an adapterspec error class")
            continue
        parent = next((b.__name__ for b in cls.__mro__[1:] if issubclass(b, AdapterSpecError)), None)
        if parent != entry.get("parent"):
            problems.append(f"errors.json: {name}'s parent is {parent}, not {entry.get('parent')}")
    for case in cases:
        error = case.data.get("error")
        if error is not None and error not in hierarchy:
            problems.append(f"{case.name}: expects {error}, which errors.json does not define")
    return problems


def _profile_problems(corpus: Corpus) -> list[str]:
    declared = corpus.profiles
    problems = [] if FULL_PROFILE in declared else [f"corpus.json declares no {FULL_PROFILE!r} profile"]
    used: set[str] = set()
    for case in corpus.cases:
        used.update(case.profiles)
        unknown = sorted(set(case.profiles) - set(declared))
        if unknown:
            problems.append(f"{case.name}: profile(s) {unknown} are not declared in corpus.json")
        if FULL_PROFILE not in case.profiles:
            problems.append(f"{case.name}: not in the {FULL_PROFILE!r} profile, which holds every case")
        if isinstance(case, RoundtripCase) and case.source is not None and set(case.profiles) != set(case.source.profiles):
            problems.append(f"{case.name}: profiles {list(case.profiles)} differ from its source's "
                            f"{list(case.source.profiles)}")
    problems += [f"corpus.json: profile {name!r} has no case" for name in sorted(set(declared) - used)]
    return problems


def _schema_case_problems(case: SchemaCase) -> list[str]:
    from ..config import validate_config

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            validate_config(case.config)
    except AdapterSpecError as exc:
        if case.valid:
            return [f"{case.name}: valid in the corpus, refused by the schema: {exc}"]
        problems = []
        if exc.pointer != case.error_pointer:
            problems.append(f"{case.name}: the schema's error is at {exc.pointer!r}, the corpus says {case.error_pointer!r}")
        if case.error and not any(c.__name__ == case.error for c in type(exc).__mro__):
            problems.append(f"{case.name}: the schema raises {type(exc).__name__}, the corpus says {case.error}")
        if "error_pointers" in case.data:
            problems += _location_problems(case, exc.pointer)
        return problems
    return [] if case.valid else [f"{case.name}: invalid in the corpus, accepted by the schema"]


def _location_problems(case: SchemaCase, reported: str | None) -> list[str]:
    """SPEC.md 10: ``error_pointers`` is every location at which the schema is violated, plus the location the
    reference reports (a version or SPEC 4.2 rule when the schema holds)."""
    from .locations import error_locations

    want = sorted(set(error_locations(case.config)) | ({reported} if reported is not None else set()))
    if list(case.error_pointers) != want:
        return [f"{case.name}: error_pointers {list(case.error_pointers)} differ from the schema's locations {want}"]
    return []


def _module_inputs(case: NumericCase) -> set[str]:
    if case.compute == "modules":
        return set(case.modules)
    return {"inputs_embeds"} if case.compute == "prompt_concat" else set()


def _numeric_problems(case: NumericCase) -> list[str]:
    problems = []
    files = [case.adapter / "adapter_config.json", case.adapter / "adapter_model.safetensors", case.expected]
    files += [p for p in (case.weights, case.inputs) if p is not None]
    missing = [str(p.relative_to(case.root)) for p in files if not p.exists()]
    if missing:
        return [f"{case.name}: missing {missing}"]
    if case.dtype not in ("float32", "float16", "bfloat16"):
        problems.append(f"{case.name}: dtype {case.dtype!r}")
    inputs = set(_io.read_raw(case.inputs)[0]) if case.inputs else set()
    expected = set(_io.read_raw(case.expected)[0])
    if inputs != _module_inputs(case):
        problems.append(f"{case.name}: inputs {sorted(inputs)} do not match the model's modules")
    want = set(case.modules) if case.compute == "modules" else {"past_key_values" if case.compute == "prefix_key_values" else "inputs_embeds"}
    if expected != want:
        problems.append(f"{case.name}: expected outputs {sorted(expected)}, should be {sorted(want)}")
    if case.weights is not None:
        base = _io.read_raw(case.weights)[0]
        for key in base:
            module = key.rsplit(".", 1)[0]
            if module not in case.modules:
                problems.append(f"{case.name}: base weight {key} belongs to no module")
    return problems


def _folder_problems(case: FolderCase) -> list[str]:
    if not case.path.is_dir():
        return [f"{case.name}: {case.data['path']} is not a folder"]
    if not case.valid:
        return []
    from .. import list_adapters, read_adapter

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folders = list_adapters(case.path) if case.multi else {"default": case.path}
            for folder in folders.values():
                read_adapter(folder, verify=bool(case.options.get("verify")),
                             allow_pickle=bool(case.options.get("allow_pickle")))
    except AdapterSpecError as exc:
        return [f"{case.name}: a valid folder that adapterspec.read_adapter refuses: {exc}"]
    return []


def check_corpus(root: str | Path | None = None) -> list[str]:
    """Every broken invariant of the corpus at ``root`` (default: the bundled ``conformance_tests/v1``).

    :returns: one line per problem; ``[]`` when the corpus is sound.

    >>> check_corpus("conformance_tests/v1")                                      # doctest: +SKIP
    []
    """
    root = Path(root) if root is not None else default_corpus_dir()
    if not (root / "case.schema.json").exists():
        return [f"{root}: no case.schema.json (is this a corpus folder?)"]
    if not (root / "corpus.json").is_file():
        return [f"{root}: no corpus.json (regenerate the corpus: conformance_tests/generate.py)"]
    problems = _schema_problems(root)
    if problems:
        return problems  # the rest assumes well-formed files
    corpus = load_corpus(root)
    problems += _file_problems(root, corpus.meta)
    counts = Counter(c.id for c in corpus.cases)
    problems += [f"id {cid!r} is used by {n} cases" for cid, n in sorted(counts.items()) if n > 1]
    problems += _error_problems(root, corpus.cases)
    problems += _profile_problems(corpus)
    for case in corpus.cases:
        if isinstance(case, SchemaCase):
            problems += _schema_case_problems(case)
        elif isinstance(case, NumericCase):
            problems += _numeric_problems(case)
        elif isinstance(case, FolderCase):
            problems += _folder_problems(case)
        elif isinstance(case, RoundtripCase) and case.source is None:
            problems.append(f"{case.name}: source {case.data.get('source')!r} is not a numeric case")
    return problems
