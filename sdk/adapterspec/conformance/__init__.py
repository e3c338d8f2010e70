"""The conformance suite: run the corpus in ``conformance_tests/v1`` against any implementation of the spec.

An implementation plugs in three ways (see ``conformance_tests/README.md``):

1. an adapterspec backend plugin offering objects through the ``adapterspec_conformance_implementations`` hook
   (the built-in ``torch`` and ``keras`` backends);
2. a driver process in any language, speaking the JSON-lines protocol (``--impl cmd:"./my-driver"``);
3. a Python object following :class:`Implementation` (``--impl my_module:MyImplementation``).

>>> from adapterspec.conformance import load_corpus, resolve_implementation, run_suite
>>> report = run_suite(resolve_implementation("reference"), load_corpus())      # doctest: +SKIP
>>> report.counts()                                                            # doctest: +SKIP
{'passed': 212, 'failed': 0, 'unsupported': 0, 'xfailed': 0, 'xpassed': 0, 'total': 212}
"""

from .cases import (
    Case,
    Corpus,
    FolderCase,
    NumericCase,
    RoundtripCase,
    SchemaCase,
    Tolerance,
    default_corpus_dir,
    load_corpus,
)
from .check import check_corpus
from .contract import Implementation, Refusal, Refused, Unsupported
from .implementations import available_implementations, resolve_implementation
from .runner import CaseFailed, Report, Result, Status, run_case, run_suite, select

__all__ = [
    "Case",
    "CaseFailed",
    "Corpus",
    "FolderCase",
    "Implementation",
    "NumericCase",
    "Refusal",
    "Refused",
    "Report",
    "Result",
    "RoundtripCase",
    "SchemaCase",
    "Status",
    "Tolerance",
    "Unsupported",
    "available_implementations",
    "check_corpus",
    "default_corpus_dir",
    "load_corpus",
    "resolve_implementation",
    "run_case",
    "run_suite",
    "select",
]
