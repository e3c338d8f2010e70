"""Fixtures for the conformance-suite tests: the corpus, and the known-good reference implementation."""

from __future__ import annotations

import pytest

from adapterspec.conformance import Corpus, load_corpus
from adapterspec.conformance.reference_impl import ReferenceImplementation


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    """The bundled corpus, conformance_tests/v1."""
    return load_corpus()


@pytest.fixture(scope="session")
def reference() -> ReferenceImplementation:
    return ReferenceImplementation()
