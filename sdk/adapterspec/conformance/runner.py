"""Run the corpus against an implementation and judge each case: passed, failed, unsupported, xfailed, xpassed.

>>> from adapterspec.conformance import load_corpus, run_suite
>>> from adapterspec.conformance.reference_impl import ReferenceImplementation
>>> report = run_suite(ReferenceImplementation(), load_corpus(), include=["^numeric/lora-"])  # doctest: +SKIP
>>> report.counts()["failed"]                                                                # doctest: +SKIP
0
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from . import _io
from .cases import Case, Corpus, FolderCase, NumericCase, RoundtripCase, SchemaCase, load_corpus
from ..config import ORDERED_FIELDS
from ..spec import SPEC_VERSION
from .contract import Refusal, Unsupported, call

__all__ = ["CaseFailed", "Report", "Result", "Status", "compare_folders", "compare_outputs",
           "config_differences", "derived_sizes", "error_is_a", "integers_written_as_floats", "load_error_hierarchy",
           "run_case", "run_suite", "select", "warning_matches"]


class Status(str, Enum):
    """A case's outcome. Only FAILED and (with ``strict_xfail``) XPASSED make a run fail."""

    PASSED = "passed"
    FAILED = "failed"
    UNSUPPORTED = "unsupported"
    XFAILED = "xfailed"
    XPASSED = "xpassed"


@dataclass
class Result:
    """The outcome of one case: its status, a one-line reason, the time it took, and measured details."""

    name: str
    kind: str
    status: Status
    message: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    profiles: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "status": self.status.value, "message": self.message,
                "seconds": round(self.seconds, 4), "details": self.details, "profiles": list(self.profiles)}


@dataclass
class Report:
    """All results of one run, with what was run against what."""

    implementation: str
    corpus: str
    results: list[Result]
    strict_xfail: bool = False
    #: The profile the implementation claims (``--profile``), or ``None``.
    profile: str | None = None
    #: Profile name -> the names of all its cases in the corpus (selected or not).
    profile_cases: dict[str, list[str]] = field(default_factory=dict)

    def counts(self, profile: str | None = None) -> dict[str, int]:
        """``{"passed": n, "failed": n, "unsupported": n, "xfailed": n, "xpassed": n, "total": n}``.

        :param profile: count only the results of this profile's cases.
        """
        results = [r for r in self.results if profile is None or profile in r.profiles]
        c = Counter(r.status.value for r in results)
        return {s.value: c.get(s.value, 0) for s in Status} | {"total": len(results)}

    def profile_counts(self) -> dict[str, dict[str, int]]:
        """:meth:`counts` per profile of the corpus, plus ``"cases"``: how many cases the profile has in all.

        >>> report.profile_counts()["core"]["unsupported"]                              # doctest: +SKIP
        0
        """
        return {name: self.counts(name) | {"cases": len(cases)} for name, cases in self.profile_cases.items()}

    def claim_problems(self) -> list[str]:
        """Why the claimed :attr:`profile` does not hold: cases of it not run, or not passed (``[]``: it holds)."""
        if self.profile is None:
            return []
        status = {r.name: r.status for r in self.results}
        wanted = self.profile_cases.get(self.profile, [])
        not_run = [name for name in wanted if name not in status]
        problems = [f"profile {self.profile!r} claimed, but {len(not_run)} of its cases were not run "
                    f"(--include/--exclude): {', '.join(not_run[:5])}{' ...' if len(not_run) > 5 else ''}"] if not_run else []
        for s in (Status.FAILED, Status.UNSUPPORTED, Status.XFAILED):
            names = [name for name in wanted if status.get(name) is s]
            if names:
                problems.append(f"profile {self.profile!r} claimed, but {len(names)} of its cases are {s.value}: "
                                f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
        if not wanted:
            problems.append(f"profile {self.profile!r} has no case in this corpus")
        return problems

    @property
    def ok(self) -> bool:
        """Whether some case passed and none failed (nor, with ``strict_xfail``, unexpectedly passed), and the
        claimed profile, if any, holds: all its cases ran and passed (an UNSUPPORTED or XFAILED one fails it)."""
        counts = self.counts()
        return (counts["failed"] == 0 and counts["passed"] + counts["xpassed"] > 0
                and not (self.strict_xfail and counts["xpassed"])
                and not self.claim_problems())

    def by_status(self, status: Status | str) -> list[str]:
        """The names of the cases with this status."""
        return [r.name for r in self.results if r.status == Status(status)]

    def to_json(self) -> dict[str, Any]:
        return {"implementation": self.implementation, "corpus": self.corpus, "summary": self.counts(),
                "profile": self.profile, "profiles": self.profile_counts(), "claim_problems": self.claim_problems(),
                "ok": self.ok, "results": [r.to_json() for r in self.results]}


# -- the error hierarchy, from the corpus -----------------------------------------------------------

def load_error_hierarchy(root: Path) -> dict[str, str | None]:
    """Error class name -> its parent's name, from the corpus' ``errors.json``.

    >>> load_error_hierarchy(default_corpus_dir())["IntegrityError"]               # doctest: +SKIP
    'FileFormatError'
    """
    data = json.loads((root / "errors.json").read_text("utf-8"))
    return {name: entry.get("parent") for name, entry in data["errors"].items()}


def error_is_a(refusal: Refusal, expected: str, hierarchy: Mapping[str, str | None]) -> bool:
    """Whether ``refusal`` is of class ``expected`` or a subclass of it (by its MRO or the corpus' hierarchy).

    >>> error_is_a(Refusal("IntegrityError"), "FileFormatError", {"IntegrityError": "FileFormatError"})
    True
    """
    if expected in refusal.ancestors:
        return True
    name: str | None = refusal.error
    seen = set()
    while name is not None and name not in seen:
        if name == expected:
            return True
        seen.add(name)
        name = hierarchy.get(name)
    return False


# -- judging one case ---------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CaseFailed(AssertionError):
    """A case's check did not hold; ``details`` holds what was measured."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


def _names(refusal: Refusal, attr: str, expected: str | list[str] | None) -> bool:
    """Whether the refusal names ``expected`` (one of them, for a list) as its ``key`` / ``pointer``.

    A refusal that carries the attribute is judged by it alone: naming another tensor or field fails, whatever
    the message says. Only a refusal without it is judged by its message (the expected name appearing in it);
    for the root pointer ``""``, a refusal without a pointer passes.

    >>> _names(Refusal("ShapeMismatchError", key="m.lora_A.weight", message="see m.lora_B.weight"), "key",
    ...        "m.lora_B.weight")
    False
    >>> _names(Refusal("ShapeMismatchError", message="m.lora_B.weight: [2, 4]"), "key", "m.lora_B.weight")
    True
    """
    if expected is None:
        return True
    wanted = [expected] if isinstance(expected, str) else expected
    value = getattr(refusal, attr)
    if value is not None:
        return value in wanted
    if attr == "pointer" and "" in wanted:
        return True
    return any(want and want in refusal.message for want in wanted)


def _check_refusal(impl: Any, refusal: Refusal, error: str | None, key: str | list[str] | None, pointer: str | None,
                   hierarchy: Mapping[str, str | None]) -> str:
    if not getattr(impl, "checks_error_class", True):
        return f"refused ({refusal.error}; class and location not checked)"
    got = f"{refusal.error}: {refusal.message}"[:300]
    if error and not error_is_a(refusal, error, hierarchy):
        raise CaseFailed(f"refused with {got}; expected {error}", refusal=refusal.to_json())
    if not _names(refusal, "key", key):
        raise CaseFailed(f"the error must name key {key!r}; got key={refusal.key!r} ({got})", refusal=refusal.to_json())
    if not _names(refusal, "pointer", pointer):
        raise CaseFailed(f"the error must name pointer {pointer!r}; got pointer={refusal.pointer!r} ({got})",
                    refusal=refusal.to_json())
    return f"refused: {refusal.error}"


def _outcome(fn: Any, *args: Any, expected: str | None = None) -> tuple[Any, Refusal | None]:
    """Run an implementation call: (its result, None) or (None, the refusal it raised).

    An ``UnsupportedError`` -- raised, or a :class:`Refused` / protocol reply ``refused`` with that error -- means
    the implementation does not claim the case, unless the case expects one (a method the spec recognises but does
    not define: refusing it is the right answer). README section 2.
    """
    try:
        return fn(*args), None
    except (Unsupported, NotImplementedError, CaseFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - any exception from the implementation is its refusal
        refusal = Refusal.from_exception(exc)
        if refusal.error == "UnsupportedError" and expected != "UnsupportedError":
            raise Unsupported(refusal.message or str(exc)) from exc
        return None, refusal


def _schema(impl: Any, case: SchemaCase, hierarchy: Mapping[str, str | None], workdir: Path) -> str:
    _, refusal = _outcome(call, impl, "validate_config", case.config)
    if case.valid:
        if refusal is not None:
            raise CaseFailed(f"refused a valid config: {refusal.error}: {refusal.message}"[:400], refusal=refusal.to_json())
        return "accepted"
    if refusal is None:
        raise CaseFailed(f"accepted an invalid config (expected {case.error} at {case.error_pointer!r})")
    verdict = _check_refusal(impl, refusal, case.error, None, None, hierarchy)
    if getattr(impl, "checks_error_class", True) and not _locates(refusal, case.error_pointers):
        raise CaseFailed(f"the error must be located at one of {list(case.error_pointers)}; got pointer="
                         f"{refusal.pointer!r} ({refusal.error}: {refusal.message})"[:400], refusal=refusal.to_json())
    return verdict


def _locates(refusal: Refusal, pointers: tuple[str, ...]) -> bool:
    """SPEC.md 10: a schema error's reported location passes when it is one of the case's ``error_pointers``.
    A refusal without a pointer passes when its message names one of them (or the root is among them)."""
    if not pointers:
        return True
    if refusal.pointer is not None:
        return refusal.pointer in pointers
    return "" in pointers or any(p and p in refusal.message for p in pointers)


def _folder(impl: Any, case: FolderCase, hierarchy: Mapping[str, str | None], workdir: Path) -> str:
    # Work on a copy: an implementation must not be able to change the corpus (nor see another case's leftovers).
    path = workdir / "folder"
    shutil.copytree(case.path, path, symlinks=True)
    _, refusal = _outcome(call, impl, "load_folder", case, path, expected=None if case.valid else case.error)
    if case.valid:
        if refusal is not None:
            raise CaseFailed(f"refused a valid adapter: {refusal.error}: {refusal.message}"[:400], refusal=refusal.to_json())
        return "loaded"
    if refusal is None:
        raise CaseFailed(f"loaded an adapter it must refuse (expected {case.error}"
                    + (f" naming {case.key or case.pointer!r})" if case.key or case.pointer else ")"))
    return _check_refusal(impl, refusal, case.error, case.key, case.pointer, hierarchy)


def compare_outputs(outputs: Mapping[str, Any], expected_file: Path, atol: float, rtol: float) -> dict[str, Any]:
    """Compare an implementation's outputs with the expected file; raise :class:`CaseFailed` naming the worst element.

    :returns: measured details: the largest absolute error and the largest error relative to the tolerance.

    >>> compare_outputs({"layer": y}, case.expected, 1e-5, 1e-5)                    # doctest: +SKIP
    {'max_abs_error': 4.2e-07, 'max_error_ratio': 0.021}
    """
    expected = _io.read_arrays(expected_file)
    missing = sorted(set(expected) - set(outputs))
    if missing:
        raise CaseFailed(f"no output for {missing} (returned: {sorted(outputs)})")
    worst_abs, worst_ratio = 0.0, 0.0
    for key in sorted(expected):
        want = expected[key].astype(np.float64)
        got = _io.to_float64(outputs[key])
        if got.shape != want.shape:
            raise CaseFailed(f"output {key!r} has shape {list(got.shape)}, expected {list(want.shape)}")
        err = np.abs(got - want)
        bound = atol + rtol * np.abs(want)
        if not np.all(np.isfinite(got)):
            raise CaseFailed(f"output {key!r} has non-finite values")
        ratio = err / bound
        worst_abs, worst_ratio = max(worst_abs, float(err.max(initial=0))), max(worst_ratio, float(ratio.max(initial=0)))
        if np.any(ratio > 1):
            idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
            raise CaseFailed(f"output {key!r} differs at {list(map(int, idx))}: got {got[idx]:.7g}, expected {want[idx]:.7g} "
                        f"(|err| {err[idx]:.3g} > atol {atol:g} + rtol {rtol:g} * |expected|; "
                        f"{int(np.sum(ratio > 1))}/{ratio.size} elements out of tolerance)",
                        max_abs_error=float(err.max()), max_error_ratio=float(ratio.max()))
    return {"max_abs_error": worst_abs, "max_error_ratio": worst_ratio}


def _numeric(impl: Any, case: NumericCase, hierarchy: Mapping[str, str | None], workdir: Path) -> tuple[str, dict[str, Any]]:
    outputs, refusal = _outcome(call, impl, "run_numeric", case, case.dir)
    if refusal is not None:
        raise CaseFailed(f"failed to run: {refusal.error}: {refusal.message}"[:400], refusal=refusal.to_json())
    if not isinstance(outputs, Mapping):
        raise CaseFailed(f"run_numeric returned {type(outputs).__name__}, not a mapping of outputs")
    tol = case.tolerance
    details = compare_outputs(outputs, case.expected, tol.atol, tol.rtol)
    return f"max |err| {details['max_abs_error']:.3g} ({details['max_error_ratio']:.2f} of tolerance)", details


#: Config fields a writer may add or change without changing the adapter (PEFT writes them on save).
#: ``adapterspec_version`` is one of them in the source config (a spec 1.0 writer put it there), never in the
#: saved one (SPEC.md 2.2: a 1.1 writer records it in the safetensors metadata only).
INFORMATIONAL_FIELDS = frozenset({"inference_mode", "adapterspec_version", "peft_version", "base_model_name_or_path",
                                  "revision", "auto_mapping", "task_type"})
#: List fields PEFT holds as sets (their order is not kept on save).
SET_FIELDS = frozenset({"target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"})


def _schema_defaults(peft_type: str) -> dict[str, Any]:
    from ..config import load_schema

    schema = load_schema()
    props = {**schema.get("properties", {}), **schema.get("$defs", {}).get(peft_type, {}).get("properties", {})}
    return {k: v["default"] for k, v in props.items() if isinstance(v, dict) and "default" in v}


@functools.cache
def _strict_integer_validator() -> Any:
    """The config schema's validator with ``integer`` meaning a JSON integer as written (no fraction): JSON
    Schema counts ``4.0`` as an integer, which readers accept and writers must not write (SPEC.md 4.1)."""
    import jsonschema

    from ..config import load_schema

    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema)
    checker = cls.TYPE_CHECKER.redefine("integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
    return jsonschema.validators.extend(cls, type_checker=checker)(schema)


def integers_written_as_floats(config: Any) -> list[str]:
    """The JSON pointers of the integer fields (per the spec's schema) ``config`` holds as numbers with a fraction
    (``"r": 4.0``), sorted.

    >>> integers_written_as_floats({"peft_type": "LORA", "r": 4.0, "lora_alpha": 8.0, "rank_pattern": {"q": 2.0}})
    ['/r', '/rank_pattern/q']
    """
    found: set[str] = set()
    pending = list(_strict_integer_validator().iter_errors(config))
    while pending:
        error = pending.pop()
        pending.extend(error.context or ())
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        if error.validator == "type" and "integer" in types and isinstance(error.instance, float) \
                and error.instance.is_integer():
            found.add("".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in error.absolute_path))
    return sorted(found)


def config_differences(source: Mapping[str, Any], saved: Mapping[str, Any],
                       derived: Mapping[str, Any] | None = None) -> list[str]:
    """How ``saved`` differs from ``source`` beyond what a faithful writer may change (empty: equivalent).

    Every field of ``source`` must be in ``saved`` with an equal value (list fields PEFT holds as sets
    compare as sets; ``rank_pattern`` and ``alpha_pattern`` keep their member order, SPEC.md 4.4), except
    informational fields (:data:`INFORMATIONAL_FIELDS`); a field only in ``saved`` must hold the schema's
    default. ``saved`` must hold no ``adapterspec_version`` (SPEC.md 2.2) and write integer fields as
    integers (``4``, not ``4.0``: SPEC.md 4.1).

    :param derived: field -> the value the model gives it, which a writer may write instead of the source's
        (prefix tuning's sizes on a model with key/value heads, as PEFT saves them: SPEC.md 14.3).

    >>> config_differences({"peft_type": "LORA", "r": 4, "target_modules": ["q", "v"]},
    ...                    {"peft_type": "LORA", "r": 4, "target_modules": ["v", "q"], "inference_mode": True})
    []
    >>> [d.split(":")[0] for d in config_differences({"peft_type": "LORA", "r": 4, "rank_pattern": {"a": 2, "b": 3}},
    ...     {"peft_type": "LORA", "r": 4.0, "rank_pattern": {"b": 3, "a": 2}, "adapterspec_version": "1.1"})]
    ['rank_pattern', 'adapterspec_version', '/r']
    """
    def same(field_: str, a: Any, b: Any) -> bool:
        if field_ in SET_FIELDS and isinstance(a, list) and isinstance(b, list):
            return sorted(map(str, a)) == sorted(map(str, b))
        return bool(a == b)

    diffs = []
    for k, v in source.items():
        if k in INFORMATIONAL_FIELDS:
            continue
        if k not in saved:
            diffs.append(f"{k}: missing from the saved config (source: {v!r})")
        elif not same(k, v, saved[k]) and not (derived and k in derived and same(k, derived[k], saved[k])):
            diffs.append(f"{k}: saved {saved[k]!r}, source {v!r}")
        elif k in ORDERED_FIELDS and isinstance(v, dict) and isinstance(saved[k], dict) and list(v) != list(saved[k]):
            diffs.append(f"{k}: saved with its members in another order ({list(saved[k])}, source {list(v)}); the "
                         "first matching key wins, so writers keep the order (SPEC 4.4)")
    defaults = _schema_defaults(str(source.get("peft_type")))
    for k, v in saved.items():
        if k in source or k in INFORMATIONAL_FIELDS:
            continue
        if k not in defaults:
            diffs.append(f"{k}: added by the writer ({v!r}) and unknown to the schema")
        elif not same(k, defaults[k], v):
            diffs.append(f"{k}: added with {v!r}, not the default {defaults[k]!r}")
    if "adapterspec_version" in saved:
        diffs.append(f"adapterspec_version: written into adapter_config.json ({saved['adapterspec_version']!r}); a "
                     "1.1 writer records it in the safetensors metadata only (SPEC 2.2)")
    for pointer in integers_written_as_floats(saved):
        value = _at(saved, pointer)
        diffs.append(f"{pointer}: an integer field written as {value!r}; writers write integers without a fraction "
                     "(SPEC 4.1)")
    return diffs


def _at(document: Any, pointer: str) -> Any:
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


def _check_written_metadata(dst: Path, tensors: Mapping[str, _io.RawTensor], metadata: Mapping[str, str],
                            spec_version: str) -> None:
    """SPEC.md 9: a writer records ``adapterspec_version`` (this spec's, ``MAJOR.MINOR``) and the tensors'
    ``adapterspec_sha256`` in the safetensors metadata."""
    version = metadata.get("adapterspec_version")
    match = re.fullmatch(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)", version) if isinstance(version, str) else None
    major, minor = (int(p) for p in spec_version.split("."))
    if match is None or int(match[1]) != major or int(match[2]) < minor:
        raise CaseFailed(f"the saved safetensors metadata has adapterspec_version {version!r}; a writer of spec "
                         f"{spec_version} records {spec_version!r} there (SPEC 2.2, 9)", metadata=dict(metadata))
    digest = hashlib.sha256()
    for key in sorted(tensors, key=lambda k: k.encode("utf-8")):
        digest.update(tensors[key].data)
    checksum = metadata.get("adapterspec_sha256")
    if checksum != digest.hexdigest():
        raise CaseFailed(f"the saved safetensors metadata has adapterspec_sha256 {checksum!r}; the saved tensors' "
                         f"is {digest.hexdigest()!r} (writers MUST record it, SPEC 9)", metadata=dict(metadata))


def _read_back(dst: Path) -> None:
    """Read the saved folder as a reader would (versions, checksum verified, every check without a model)."""
    from .. import read_adapter
    from ..errors import AdapterSpecError

    try:
        with warnings.catch_warnings():  # the reader's warnings are not the implementation's
            warnings.simplefilter("ignore")
            read_adapter(dst, verify=True)
    except AdapterSpecError as exc:
        raise CaseFailed(f"the saved folder does not read: {type(exc).__name__}: {exc}"[:400]) from exc


def compare_folders(src: Path, dst: Path, spec_version: str | None = None,
                    derived: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`CaseFailed` unless ``dst`` holds ``src``'s tensors bit for bit, an equivalent config
    (:func:`config_differences`), and the metadata a writer records (``adapterspec_version`` and a right
    ``adapterspec_sha256``), and reads back as a reader reads it (sha256 verified).

    :param spec_version: the spec version the writer writes for (default: this package's, ``1.2``).
    :param derived: config values the model gives, which the writer may write instead (:func:`config_differences`).

    >>> compare_folders(Path("adapter"), Path("saved"))                             # doctest: +SKIP
    """
    if not (dst / "adapter_config.json").exists() or not (dst / "adapter_model.safetensors").exists():
        raise CaseFailed(f"the saved folder lacks adapter_config.json or adapter_model.safetensors: {sorted(p.name for p in dst.iterdir()) if dst.exists() else 'no folder'}")
    a, _ = _io.read_raw(src / "adapter_model.safetensors")
    b, metadata = _io.read_raw(dst / "adapter_model.safetensors")
    if set(a) != set(b):
        raise CaseFailed(f"saved keys differ: missing {sorted(set(a) - set(b))}, unexpected {sorted(set(b) - set(a))}")
    for key in sorted(a):
        if (a[key].dtype, a[key].shape) != (b[key].dtype, b[key].shape):
            raise CaseFailed(f"{key}: saved as {b[key].dtype}{list(b[key].shape)}, source {a[key].dtype}{list(a[key].shape)}")
        if a[key].data != b[key].data:
            diff = np.abs(a[key].to_numpy().astype(np.float64) - b[key].to_numpy().astype(np.float64))
            raise CaseFailed(f"{key}: saved values differ from the source (max |diff| {diff.max():.3g}); a round trip must be exact")
    source = json.loads((src / "adapter_config.json").read_text("utf-8"))
    saved = json.loads((dst / "adapter_config.json").read_text("utf-8"))
    diffs = config_differences(source, saved, derived)
    if diffs:
        raise CaseFailed("saved config differs: " + "; ".join(diffs))
    _check_written_metadata(dst, b, metadata, spec_version or SPEC_VERSION)
    _read_back(dst)


def _roundtrip(impl: Any, case: RoundtripCase, hierarchy: Mapping[str, str | None], workdir: Path) -> str:
    if case.source is None:
        raise CaseFailed(f"the corpus names no numeric case {case.data.get('source')!r}")
    src = workdir / "source"
    shutil.copytree(case.source.adapter, src)
    dst = workdir / "saved"
    _, refusal = _outcome(call, impl, "roundtrip", case, src, dst)
    if refusal is not None:
        raise CaseFailed(f"failed: {refusal.error}: {refusal.message}"[:400], refusal=refusal.to_json())
    source = json.loads((src / "adapter_config.json").read_text("utf-8"))
    compare_folders(src, dst, _corpus_spec_version(case.root), derived_sizes(source, case.source.model))
    return "same tensors, equivalent config"


def derived_sizes(config: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    """Prefix tuning on a decoder with key/value heads: the ``token_dim`` and ``num_attention_heads`` PEFT recomputes
    from the model and saves (SPEC.md 14.3), which a writer may write instead of the config's; ``{}`` otherwise.

    >>> derived_sizes({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "token_dim": 8, "num_attention_heads": 4,
    ...                "num_layers": 2}, {"decoder": {"hidden_size": 16, "num_attention_heads": 4,
    ...                                               "num_key_value_heads": 2, "num_hidden_layers": 2}})
    {'token_dim': 8, 'num_attention_heads': 2}
    """
    from .reference_impl import prefix_sizes

    decoder = model.get("decoder") or {}
    if config.get("peft_type") != "PREFIX_TUNING" or decoder.get("num_key_value_heads") is None:
        return {}
    sizes = prefix_sizes(config, decoder)
    return {k: sizes[k] for k in ("token_dim", "num_attention_heads") if k in sizes}


@functools.cache
def _corpus_spec_version(root: Path) -> str | None:
    """The spec version ``corpus.json`` names (``None`` if it names none)."""
    try:
        version = json.loads((root / "corpus.json").read_text("utf-8")).get("spec_version")
    except (OSError, ValueError):
        return None
    return version if isinstance(version, str) else None


#: kind -> the judge of its cases (each takes its own Case subclass): a message, or a message and details.
_JUDGES: dict[str, Callable[[Any, Any, Mapping[str, str | None], Path], str | tuple[str, dict[str, Any]]]] = {"schema": _schema, "folder": _folder, "numeric": _numeric, "roundtrip": _roundtrip}


def run_case(impl: Any, case: Case, workdir: Path, hierarchy: Mapping[str, str | None] | None = None) -> Result:
    """Run one case against ``impl`` in the empty folder ``workdir`` and judge it (xfail not applied).

    >>> run_case(impl, corpus.by_name("folder/truncated-data"), Path(tmp)).status    # doctest: +SKIP
    <Status.PASSED: 'passed'>
    """
    hierarchy = hierarchy if hierarchy is not None else load_error_hierarchy(case.root)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, message, details = _judge(impl, case, workdir, hierarchy)
    reported = [_python_warning(w) for w in caught]
    take = getattr(impl, "take_warnings", None)
    if take is not None:  # a driver process reports its warnings in its replies
        reported += list(take())
    if reported:
        details = {**details, "warnings": reported[:20]}
    if status is Status.PASSED and isinstance(case, FolderCase) and case.warnings:
        status, message = _judge_warnings(impl, case.warnings, reported, message)
    message = _ANSI.sub("", message)  # TensorFlow colours its messages
    return Result(case.name, case.kind, status, message, time.perf_counter() - start, details, case.profiles)


def _python_warning(w: warnings.WarningMessage) -> dict[str, Any]:
    """A caught Python warning as the protocol reports one: category (and its ancestors), message, pointer."""
    return {"category": w.category.__name__, "ancestors": [c.__name__ for c in w.category.__mro__],
            "message": str(w.message), "pointer": getattr(w.message, "pointer", None)}


def warning_matches(expected: Mapping[str, Any], reported: Mapping[str, Any]) -> bool:
    """Whether a reported warning is the expected one: its category or one above it, and the expected pointer
    (the warning's ``pointer``; for a warning without one, the pointer or its last token in the message).

    >>> warning_matches({"category": "AdapterSpecWarning", "pointer": "/target_modules/2"},
    ...                 {"category": "AdapterSpecWarning", "message": "/target_modules/2: 'q_proj' is listed twice"})
    True
    >>> warning_matches({"category": "AdapterSpecWarning", "pointer": "/r"}, {"category": "UserWarning", "pointer": "/r"})
    False
    """
    category = expected["category"]
    if category != reported.get("category") and category not in (reported.get("ancestors") or ()):
        return False
    pointer = expected.get("pointer")
    if pointer is None:
        return True
    if reported.get("pointer") is not None:
        return bool(reported["pointer"] == pointer)
    message = str(reported.get("message") or "")
    last = pointer.rsplit("/", 1)[-1].replace("~1", "/").replace("~0", "~")
    return pointer in message or bool(last) and last in message


def _judge_warnings(impl: Any, expected: Sequence[Mapping[str, Any]], reported: Sequence[Mapping[str, Any]],
                    message: str) -> tuple[Status, str]:
    if not getattr(impl, "reports_warnings", True):
        return Status.UNSUPPORTED, (f"expects {len(expected)} warning(s); the implementation does not report "
                                    "warnings (a driver says \"reports_warnings\": true in its hello reply)")
    missing = [w for w in expected if not any(warning_matches(w, r) for r in reported)]
    if missing:
        got = "; ".join(f"{r.get('category')}: {str(r.get('message'))[:120]}" for r in reported[:5]) or "none"
        want = ", ".join(f"{w['category']}" + (f" at {w['pointer']}" if w.get("pointer") else "") for w in missing)
        return Status.FAILED, f"{message}, but without the expected warning(s) {want} (reported: {got})"
    return Status.PASSED, f"{message}, with {len(expected)} expected warning(s)"


def _judge(impl: Any, case: Case, workdir: Path, hierarchy: Mapping[str, str | None]) -> tuple[Status, str, dict[str, Any]]:
    status, message = Status.PASSED, ""
    details: dict[str, Any] = {}
    try:
        claim = impl.supports(case)
        if claim is not True:
            raise Unsupported(claim if isinstance(claim, str) and claim else f"not claimed by {impl.name}")
        judged = _JUDGES[case.kind](impl, case, hierarchy, workdir)
        message, details = judged if isinstance(judged, tuple) else (judged, details)
    except (Unsupported, NotImplementedError) as exc:
        status, message = Status.UNSUPPORTED, str(exc) or type(exc).__name__
    except CaseFailed as f:
        status, message, details = Status.FAILED, str(f), f.details
    except Exception as exc:  # noqa: BLE001 - a crash of the implementation (or its driver) fails the case
        status = Status.FAILED
        message = f"crashed: {type(exc).__name__}: {exc}"[:500]
        details = {"traceback": traceback.format_exc(limit=6)}
    return status, message, details


def select(cases: Iterable[Case], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Case]:
    """The cases whose name (``kind/id``) matches an ``include`` regex (all if none) and no ``exclude`` regex.

    Patterns are searched (``re.search``), so ``"dora"`` selects every case with ``dora`` in its name.

    >>> [c.name for c in select(load_corpus().cases, ["^numeric/dora-linear"])]     # doctest: +SKIP
    ['numeric/dora-linear-f32', 'numeric/dora-linear-bf16']
    """
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    return [c for c in cases
            if (not inc or any(p.search(c.name) for p in inc)) and not any(p.search(c.name) for p in exc)]


def run_suite(impl: Any, corpus: Corpus | str | Path | None = None, *, include: Sequence[str] = (),
              exclude: Sequence[str] = (), xfail: Sequence[str] = (), strict_xfail: bool = False,
              profile: str | None = None, progress: Any = None) -> Report:
    """Run the (selected) corpus against ``impl``.

    :param impl: an object following :class:`~adapterspec.conformance.Implementation`.
    :param corpus: a :class:`Corpus` or its folder; default: :func:`~adapterspec.conformance.default_corpus_dir`.
    :param include, exclude: regexes selecting cases by name (``kind/id``).
    :param xfail: regexes of cases expected to fail: a failure is XFAILED, a pass XPASSED.
    :param strict_xfail: count an XPASSED case as a failure of the run.
    :param profile: the profile the implementation claims: the run fails unless every case of it runs and
        passes (an UNSUPPORTED or XFAILED case of it fails the run).
    :raises KeyError: the corpus has no profile ``profile``.
    :param progress: called with each :class:`Result` as it is known (the CLI prints the table row).

    >>> run_suite(MyImpl(), include=["^numeric/"], xfail=["lokr"]).ok               # doctest: +SKIP
    True
    """
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    if profile is not None and profile not in corpus.profiles:
        raise KeyError(f"the corpus has no profile {profile!r} (it has {', '.join(sorted(corpus.profiles))})")
    hierarchy = load_error_hierarchy(corpus.root)
    xf = [re.compile(p) for p in xfail]
    results = []
    begin = getattr(impl, "begin", None)
    if begin is not None:
        begin(corpus)
    try:
        with tempfile.TemporaryDirectory(prefix="adapterspec-conformance-") as tmp:
            for i, case in enumerate(select(corpus.cases, include, exclude)):
                workdir = Path(tmp) / f"{i:04d}"
                workdir.mkdir()
                result = _apply_xfail(run_case(impl, case, workdir, hierarchy), xf)
                results.append(result)
                if progress is not None:
                    progress(result)
    finally:
        close = getattr(impl, "close", None)
        if close is not None:
            close()
    return Report(getattr(impl, "name", str(impl)), str(corpus.root), results, strict_xfail, profile,
                  {name: [c.name for c in corpus.in_profile(name)] for name in sorted(corpus.profiles)})


def _apply_xfail(result: Result, patterns: Sequence[re.Pattern[str]]) -> Result:
    if any(p.search(result.name) for p in patterns):
        if result.status is Status.FAILED:
            result.status, result.message = Status.XFAILED, f"xfail: {result.message}"
        elif result.status is Status.PASSED:
            result.status, result.message = Status.XPASSED, f"xpass: {result.message}"
    return result
