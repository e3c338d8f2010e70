"""Mutation testing of the corpus: every single-rule mutant of the reference implementation fails a case.

A mutant that passes the whole corpus is a rule of SPEC.md that no case checks. Each runs with
fail-fast (its expected killers first) over the kinds of case that can observe it; see mutants.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mutants import MUTANTS, Mutant, applied, kill

from adapterspec.conformance import Corpus, run_suite
from adapterspec.conformance.reference_impl import ReferenceImplementation

README = Path(__file__).resolve().parents[2] / "conformance_tests" / "README.md"
LIVE = [m for m in MUTANTS if not m.equivalent]


@pytest.mark.parametrize("mutant", LIVE, ids=[m.id for m in LIVE])
def test_mutant_is_killed(corpus: Corpus, mutant: Mutant) -> None:
    case, ran = kill(mutant, corpus)
    assert case is not None, f"{mutant.id} (SPEC {mutant.section}: {mutant.rule}) passes all {ran} cases"


def test_mutants_are_undone(corpus: Corpus) -> None:
    # the reference passes every case again after the most invasive mutants ran
    for mutant in MUTANTS:
        with applied(mutant):
            pass
    assert run_suite(ReferenceImplementation(), corpus).ok


def test_every_section_has_mutants() -> None:
    sections = {m.section.split(".")[0] for m in MUTANTS}
    assert sections >= {str(n) for n in range(2, 11)}
    assert len({m.id for m in MUTANTS}) == len(MUTANTS)


def test_readme_lists_every_mutant() -> None:
    text = README.read_text("utf-8")
    listed = set(re.findall(r"^\| [\d.]+ \| .* \| `([a-z0-9-]+)` \|", text, re.M))
    assert listed == {m.id for m in MUTANTS}


def test_readmes_state_the_measured_mutant_count() -> None:
    """Both READMEs give the figure test_mutant_is_killed measures: every live mutant killed."""
    live, equivalent = len(LIVE), len(MUTANTS) - len(LIVE)
    assert f"{live} of {live} mutants killed (100%); {equivalent} equivalent." in README.read_text("utf-8")
    top = (README.parents[1] / "README.md").read_text("utf-8")
    assert re.findall(r"\((\d+ of \d+) killed", top) == [f"{live} of {live}"]
