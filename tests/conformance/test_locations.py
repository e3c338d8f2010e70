"""SPEC.md 10's error-location rule: a schema case passes with any location at which the schema is violated."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterspec.conformance import Corpus, Refused, SchemaCase, Status, run_case
from adapterspec.conformance.check import _schema_case_problems
from adapterspec.conformance.locations import error_locations
from adapterspec.conformance.reference import adapted_weight


class RefusesAt:
    """A validator that refuses every config at one fixed location (as another JSON Schema library might)."""

    name = "refuses-at"

    def __init__(self, pointer: str | None, message: str = "invalid") -> None:
        self.pointer, self.message = pointer, message

    def supports(self, case: Any) -> bool:
        return True

    def validate_config(self, config: Any) -> None:
        raise Refused("ConfigError", pointer=self.pointer, message=self.message)


def _status(corpus: Corpus, name: str, impl: RefusesAt, tmp_path: Path) -> Status:
    return run_case(impl, corpus.by_name(name), tmp_path).status


def test_nested_anyof_case_records_both_locations(corpus: Corpus) -> None:
    case = corpus.by_name("schema/location-nested-anyof")
    assert isinstance(case, SchemaCase)
    assert case.error_pointer == "/target_modules/1"  # python-jsonschema's best_match: the deepest
    assert case.error_pointers == ("/target_modules", "/target_modules/1")


@pytest.mark.parametrize(("name", "pointer"), [
    ("schema/location-nested-anyof", "/target_modules/1"),   # the deepest error (best_match)
    ("schema/location-nested-anyof", "/target_modules"),     # the anyOf itself (ajv's first error)
    ("schema/location-two-fields", "/r"),                    # best_match
    ("schema/location-two-fields", "/lora_alpha"),           # the first in document order
])
def test_a_location_another_library_reports_passes(corpus: Corpus, tmp_path: Path, name: str, pointer: str) -> None:
    assert _status(corpus, name, RefusesAt(pointer), tmp_path) is Status.PASSED


@pytest.mark.parametrize(("name", "pointer"), [
    ("schema/location-nested-anyof", "/peft_type"),
    ("schema/location-nested-anyof", ""),
    ("schema/location-two-fields", "/target_modules"),
    ("schema/location-two-fields", "/lora_alpha/0"),
])
def test_a_wrong_location_fails(corpus: Corpus, tmp_path: Path, name: str, pointer: str) -> None:
    # the message names a right location: a refusal that gives a pointer is judged by its pointer alone
    result = run_case(RefusesAt(pointer, message="see /r and /target_modules/1"), corpus.by_name(name), tmp_path)
    assert result.status is Status.FAILED
    assert "must be located at one of" in result.message


def test_a_refusal_without_pointer_is_judged_by_its_message(corpus: Corpus, tmp_path: Path) -> None:
    name = "schema/location-two-fields"
    assert _status(corpus, name, RefusesAt(None, "field /lora_alpha: not a number"), tmp_path) is Status.PASSED
    assert _status(corpus, name, RefusesAt(None, "not valid"), tmp_path) is Status.FAILED


def test_every_invalid_schema_case_has_the_schema_locations(corpus: Corpus) -> None:
    cases = [c for c in corpus.cases if isinstance(c, SchemaCase) and not c.valid]
    assert len(cases) > 40
    for case in cases:
        assert case.error_pointer in case.error_pointers, case.name
        assert set(error_locations(case.config)) <= set(case.error_pointers), case.name
    assert corpus.meta["generated_with"]["jsonschema"].count(".") >= 1  # the library that computed them


def test_check_refuses_wrong_error_pointers(corpus: Corpus) -> None:
    case = corpus.by_name("schema/location-two-fields")
    assert isinstance(case, SchemaCase)
    assert _schema_case_problems(case) == []
    broken = dataclasses.replace(case, data={**case.data, "error_pointers": ["/r"]})
    assert _schema_case_problems(broken) == [
        "schema/location-two-fields: error_pointers ['/r'] differ from the schema's locations ['/lora_alpha', '/r']"]


def test_error_locations() -> None:
    assert error_locations({"peft_type": "IA3", "target_modules": ["q_proj", 5]}) == ["/target_modules",
                                                                                       "/target_modules/1"]
    assert error_locations({"peft_type": "LORA", "rank_pattern": {"": 4}}) == ["/rank_pattern/"]
    assert error_locations([]) == [""]
    assert error_locations({"peft_type": "LORA", "r": 2}) == []


def test_reference_lokr_conv1d_full_w2_is_peft_kron() -> None:
    """SPEC.md 8.7 on a Conv1d with a full 3-axis lokr_w2: kron gives lokr_w1 a *leading* unit axis (PEFT's
    make_kron), then the result is reshaped row-major to the weight's shape."""
    torch = pytest.importorskip("torch")
    w1 = np.arange(1.0, 5.0).reshape(2, 2)
    w2 = np.arange(1.0, 19.0).reshape(3, 2, 3) / 7
    module = {"kind": "conv1d", "in_channels": 4, "out_channels": 6, "kernel_size": [3], "stride": [1],
              "padding": [0], "bias": False}
    config = {"peft_type": "LOKR", "r": 2, "alpha": 4, "target_modules": ["conv"]}
    got = adapted_weight(module, np.zeros((6, 4, 3)), None, config, "conv", {"lokr_w1": w1, "lokr_w2": w2})[0]
    want = (torch.kron(torch.from_numpy(w1), torch.from_numpy(w2)) * 2.0).reshape(6, 4, 3).numpy()
    np.testing.assert_array_equal(got, want)
