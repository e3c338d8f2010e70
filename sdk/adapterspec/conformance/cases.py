"""The corpus' cases as Python objects, read from the JSON files of ``conformance_tests/v1/``.

The corpus is data only; this module just reads it. Each case keeps its JSON object in ``data``
(what the process protocol sends to a driver), and exposes the fields an implementation needs.

>>> corpus = load_corpus()                                     # doctest: +SKIP
>>> [c.name for c in corpus.cases][:2]                         # doctest: +SKIP
['schema/lora-minimal', 'schema/lora-r-zero']
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

from ..errors import AdapterSpecError

__all__ = [
    "CORPUS_ENV",
    "FULL_PROFILE",
    "Case",
    "Corpus",
    "CorpusNotFoundError",
    "FolderCase",
    "NumericCase",
    "RoundtripCase",
    "SchemaCase",
    "Tolerance",
    "default_corpus_dir",
    "load_corpus",
]

#: The profile that holds every case; the corpus' ``corpus.json`` names the others (``core``...).
FULL_PROFILE = "full"
#: Environment variable naming the corpus folder (the ``v1`` folder), when not given on the command line.
CORPUS_ENV = "ADAPTERSPEC_CONFORMANCE_CORPUS"


class CorpusNotFoundError(AdapterSpecError, FileNotFoundError):
    """The corpus folder is missing, or is not a corpus (no ``corpus.json``); ``path`` names it."""


def default_corpus_dir() -> Path:
    """The corpus: ``$ADAPTERSPEC_CONFORMANCE_CORPUS``, else the copy installed with the package, else the checkout's.

    The wheel and sdist carry ``conformance_tests/v1`` as ``adapterspec/conformance/v1`` (package data);
    a source checkout run with ``PYTHONPATH=sdk`` has no such folder and reads ``conformance_tests/v1``.

    >>> default_corpus_dir().name
    'v1'
    """
    if os.environ.get(CORPUS_ENV):
        return Path(os.environ[CORPUS_ENV])
    installed = Path(__file__).resolve().parent / "v1"
    if (installed / "corpus.json").is_file():
        return installed
    return Path(__file__).resolve().parents[3] / "conformance_tests" / "v1"


@dataclass(frozen=True)
class Tolerance:
    """Outputs pass when ``|actual - expected| <= atol + rtol * |expected|`` elementwise (NumPy's ``isclose``)."""

    atol: float
    rtol: float


@dataclass(frozen=True)
class Case:
    """One conformance case.

    :param id: unique in the corpus.
    :param description: what it checks, in one sentence.
    :param data: the case's JSON object, as in the corpus file (the properties ``cast`` its JSON values to
        the types the corpus' format gives them).
    :param root: the corpus folder (``.../v1``); paths in ``data`` are relative to it.
    """

    kind: ClassVar[str] = ""
    id: str
    description: str
    data: Mapping[str, Any] = field(repr=False)
    root: Path = field(repr=False)

    @property
    def name(self) -> str:
        """``kind/id``: what the report prints and the ``--include``/``--exclude``/``--xfail`` patterns match."""
        return f"{self.kind}/{self.id}"

    @property
    def tags(self) -> tuple[str, ...]:
        """Feature tags (``"dora"``, ``"bf16"``, ``"conv2d"``...), for an implementation's ``supports``."""
        return tuple(self.data.get("tags", ()))

    @property
    def profiles(self) -> tuple[str, ...]:
        """The profiles the case belongs to (``("core", "full")``); an implementation claiming one must pass it."""
        return tuple(self.data.get("profiles", (FULL_PROFILE,)))

    def to_json(self) -> dict[str, Any]:
        """The case as the process protocol sends it: its JSON object plus ``kind``, ``name`` and absolute paths."""
        return {**self.data, "kind": self.kind, "name": self.name}


@dataclass(frozen=True)
class SchemaCase(Case):
    """A config that the spec's schema accepts (``valid``) or refuses at ``error_pointer``."""

    kind: ClassVar[str] = "schema"

    @property
    def config(self) -> Any:
        return self.data["config"]

    @property
    def valid(self) -> bool:
        return bool(self.data["valid"])

    @property
    def error(self) -> str | None:
        """The expected error class name, for an invalid config (``ConfigError`` unless said otherwise)."""
        return None if self.valid else self.data.get("error", "ConfigError")

    @property
    def error_pointer(self) -> str | None:
        """The location python-jsonschema's ``best_match`` reports (informative since corpus 1.2)."""
        return self.data.get("error_pointer")

    @property
    def error_pointers(self) -> tuple[str, ...]:
        """Every location a conforming validator may report (SPEC.md 10): each instance location at which the
        schema is violated, nested ``anyOf``/``oneOf`` branches included; ``(error_pointer,)`` in older corpora."""
        pointers = self.data.get("error_pointers")
        if pointers is None:
            return () if self.error_pointer is None else (self.error_pointer,)
        return tuple(pointers)


@dataclass(frozen=True)
class ModelCase(Case):
    """A case that builds a tiny model (``data["model"]``) to load an adapter into."""

    @property
    def model(self) -> Mapping[str, Any]:
        """``{"dtype": ..., "weights": file or None, "modules": {path: {"kind": ..., sizes...}}, ...}``."""
        return cast("Mapping[str, Any]", self.data["model"])

    @property
    def modules(self) -> Mapping[str, Mapping[str, Any]]:
        return cast("Mapping[str, Mapping[str, Any]]", self.model.get("modules", {}))

    @property
    def dtype(self) -> str:
        """The dtype the model is built and run in: ``float32``, ``float16`` or ``bfloat16``."""
        return cast(str, self.model.get("dtype", "float32"))


@dataclass(frozen=True)
class FolderCase(ModelCase):
    """An adapter folder that must load into ``model`` (``valid``), or be refused with ``error`` naming ``key``/``pointer``."""

    kind: ClassVar[str] = "folder"

    @property
    def path(self) -> Path:
        return self.root / cast(str, self.data["path"])

    @property
    def valid(self) -> bool:
        return bool(self.data["valid"])

    @property
    def error(self) -> str | None:
        return self.data.get("error")

    @property
    def key(self) -> str | list[str] | None:
        """The key or module path the error must name (any one of them, for a list)."""
        return self.data.get("key")

    @property
    def pointer(self) -> str | None:
        return self.data.get("pointer")

    @property
    def options(self) -> Mapping[str, Any]:
        """Load options: ``verify`` (check the sha256), ``allow_pickle``; ``{}`` by default."""
        return cast("Mapping[str, Any]", self.data.get("options", {}))

    @property
    def warnings(self) -> list[Mapping[str, Any]]:
        """The warnings the load must give: ``[{"category": "AdapterSpecWarning", "pointer"?: "/field"}]``
        (SPEC.md: unknown fields kept, duplicate ``target_modules`` entries, versions that differ)."""
        return list(self.data.get("warnings", ()))

    @property
    def multi(self) -> bool:
        """Whether ``path`` holds several adapters (a manifest or PEFT subfolders): load them all."""
        return bool(self.data.get("multi", False))


@dataclass(frozen=True)
class NumericCase(ModelCase):
    """Load ``adapter`` into ``model``, run ``inputs`` through it, and compare with ``expected``."""

    kind: ClassVar[str] = "numeric"

    @property
    def dir(self) -> Path:
        return self.root / cast(str, self.data["dir"])

    @property
    def method(self) -> str:
        return cast(str, self.data["method"])

    @property
    def layer(self) -> str:
        return cast(str, self.data["layer"])

    @property
    def compute(self) -> str:
        """``"modules"`` (run each module on its input), ``"prefix_key_values"`` or ``"prompt_concat"``."""
        return cast(str, self.data["compute"])

    @property
    def adapter(self) -> Path:
        return self.dir / cast(str, self.data["adapter"])

    @property
    def weights(self) -> Path | None:
        name = self.model.get("weights")
        return self.dir / name if name else None

    @property
    def inputs(self) -> Path | None:
        return self.dir / self.data["inputs"] if self.data.get("inputs") else None

    @property
    def expected(self) -> Path:
        return self.dir / cast(str, self.data["expected"])

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance(float(self.data["tolerance"]["atol"]), float(self.data["tolerance"]["rtol"]))


@dataclass(frozen=True)
class RoundtripCase(Case):
    """Load ``source``'s adapter into its model and save it: the same tensors, bit for bit, and an equivalent config."""

    kind: ClassVar[str] = "roundtrip"
    source: NumericCase | None = field(default=None, repr=False)

    @property
    def dtype(self) -> str:
        return self.source.dtype if self.source else "float32"


_KINDS: dict[str, type[Case]] = {"schema": SchemaCase, "folder": FolderCase, "numeric": NumericCase,
                                 "roundtrip": RoundtripCase}


@dataclass
class Corpus:
    """All cases of a corpus folder, in file order."""

    root: Path
    cases: list[Case]
    meta: dict[str, Any]

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    @property
    def profiles(self) -> dict[str, str]:
        """Profile name -> what it covers, from ``corpus.json`` (``full`` at least).

        >>> sorted(load_corpus().profiles)                                       # doctest: +SKIP
        ['core', 'full']
        """
        return dict(self.meta.get("profiles") or {FULL_PROFILE: "every case"})

    def in_profile(self, profile: str) -> list[Case]:
        """The cases of ``profile``, in corpus order.

        :raises KeyError: the corpus has no such profile.

        >>> len(load_corpus().in_profile("core")) < len(load_corpus().cases)     # doctest: +SKIP
        True
        """
        if profile not in self.profiles:
            raise KeyError(profile)
        return [case for case in self.cases if profile in case.profiles]

    def by_name(self, name: str) -> Case:
        """The case named ``kind/id``.

        :raises KeyError: no such case.

        >>> corpus.by_name("folder/missing-tensor").error                           # doctest: +SKIP
        'MissingTensorError'
        """
        for case in self.cases:
            if case.name == name:
                return case
        raise KeyError(name)


def _read(path: Path) -> Any:
    return json.loads(path.read_text("utf-8"))


def load_corpus(root: str | Path | None = None) -> Corpus:
    """Read every case file of the corpus folder ``root`` (default: :func:`default_corpus_dir`).

    Reading does not check the corpus; :func:`adapterspec.conformance.check.check_corpus` does.

    :raises CorpusNotFoundError: ``root`` is missing or holds no ``corpus.json``.

    >>> load_corpus().by_name("numeric/lora-linear-f32").tolerance               # doctest: +SKIP
    Tolerance(atol=1e-05, rtol=1e-05)
    """
    root = Path(root) if root is not None else default_corpus_dir()
    if not (root / "corpus.json").is_file():
        where = "missing" if not root.exists() else "not a corpus folder (no corpus.json)"
        raise CorpusNotFoundError(f"the conformance corpus is {where}", path=root,
                                  hint=f"pass --corpus DIR (or set ${CORPUS_ENV}) to a corpus' v1 folder, "
                                       "or reinstall adapterspec: the package carries it")
    meta = _read(root / "corpus.json")
    cases: list[Case] = []
    for file in sorted((root / "schema").glob("*.json")):
        cases.extend(SchemaCase(c["id"], c.get("description", ""), c, root) for c in _read(file))
    for kind, index in (("folder", "folders.json"), ("numeric", "numeric.json")):
        if (root / index).exists():
            cls = _KINDS[kind]
            cases.extend(cls(c["id"], c.get("description", ""), c, root) for c in _read(root / index))
    numeric = {c.id: c for c in cases if isinstance(c, NumericCase)}
    if (root / "roundtrip.json").exists():
        for c in _read(root / "roundtrip.json"):
            cases.append(RoundtripCase(c["id"], c.get("description", ""), c, root, numeric.get(c["source"])))
    return Corpus(root, cases, meta)
