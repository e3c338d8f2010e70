"""``write_adapter`` / ``write_adapters`` with bad tensors, configs and metadata: a typed error naming the
key or field, and nothing on disk (no folder, no temp litter); good-but-awkward tensors (non-contiguous,
sharing memory, needing grad) are written correctly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hardening_harness import LORA_CONFIG, SCALE, STATS, expect_clean, lora_tensors, probe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterspec

pytestmark = pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning")

A, B = "base_model.model.l.0.q.lora_A.weight", "base_model.model.l.0.q.lora_B.weight"
CFG = {"peft_type": "LORA", "target_modules": ["q"], "r": 2}


def good() -> dict[str, np.ndarray]:
    return {k: v for k, v in lora_tensors().items() if ".q." in k}


def _torch() -> Any:
    return pytest.importorskip("torch")


BAD_TENSORS: dict[str, tuple[Any, type, str]] = {  # name -> (tensors, error, text the message must hold)
    "a list": (lambda: list(good().values()), adapterspec.TensorError, "mapping"),
    "None": (lambda: None, adapterspec.TensorError, "mapping"),
    "value None": (lambda: {**good(), A: None}, adapterspec.TensorError, A),
    "value a list": (lambda: {**good(), A: [[1.0] * 3] * 2}, adapterspec.TensorError, A),
    "value a string": (lambda: {**good(), A: "x"}, adapterspec.TensorError, A),
    "value a dict": (lambda: {**good(), A: {"shape": (2, 3)}}, adapterspec.TensorError, A),
    "int key": (lambda: {**good(), 7: good()[A]}, adapterspec.TensorError, "7"),
    "bytes key": (lambda: {**good(), A.encode(): good()[A]}, adapterspec.TensorError, "lora_A"),
    "object dtype": (lambda: {**good(), A: np.array([[None] * 3] * 2)}, adapterspec.DTypeMismatchError, A),
    "int dtype": (lambda: {**good(), A: np.ones((2, 3), np.int64)}, adapterspec.DTypeMismatchError, A),
    "complex dtype": (lambda: {**good(), A: np.ones((2, 3), np.complex64)}, adapterspec.DTypeMismatchError, A),
    "bool dtype": (lambda: {**good(), A: np.ones((2, 3), bool)}, adapterspec.DTypeMismatchError, A),
    "0-d": (lambda: {**good(), A: np.float32(1.0)}, adapterspec.ShapeMismatchError, "lora_"),
    "rank mismatch": (lambda: {**good(), A: np.ones((3, 3), np.float32)}, adapterspec.ShapeMismatchError, A),
    "transposed B": (lambda: {**good(), B: np.ones((2, 4), np.float32)}, adapterspec.ShapeMismatchError, "lora_"),
    "missing B": (lambda: {A: good()[A]}, adapterspec.MissingTensorError, B),
    "unexpected key": (lambda: {**good(), "base_model.model.l.0.q.evil": np.ones(2, np.float32)},
                       adapterspec.UnexpectedTensorError, "evil"),
    "key without prefix": (lambda: {"l.0.q.lora_A.weight": good()[A], B: good()[B]}, adapterspec.UnexpectedTensorError,
                           "l.0.q.lora_A.weight"),
    "key 5000 chars": (lambda: {**good(), "base_model.model." + "a." * 2500 + "q.lora_A.weight": good()[A]},
                       adapterspec.UnexpectedTensorError, "characters long"),
    "empty": (lambda: {}, adapterspec.MissingTensorError, "no LORA adapter tensor"),
    "torch and numpy mixed": (lambda: {A: _torch().ones(2, 3), B: np.ones((4, 2), np.float32)}, adapterspec.TensorError,
                              "several frameworks"),
    "meta tensors": (lambda: {A: _torch().ones(2, 3, device="meta"), B: _torch().ones(4, 2, device="meta")},
                     adapterspec.TensorError, "meta"),
    "torch int": (lambda: {A: _torch().ones(2, 3, dtype=_torch().int32), B: _torch().ones(4, 2)},
                  adapterspec.DTypeMismatchError, A),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensors(tmp_path: Path, case: str) -> None:
    make, error, text = BAD_TENSORS[case]
    values = make()
    outcome = probe(f"write {case}", lambda: adapterspec.write_adapter(tmp_path / "out", CFG, values))
    STATS.count("write-bad-tensors")
    expect_clean([outcome], allow_ok=False)
    assert isinstance(outcome.error, error), f"{type(outcome.error).__name__}: {outcome.error}"
    assert text in str(outcome.error), outcome.error
    assert list(tmp_path.iterdir()) == [], "something was written"


BAD_METADATA = {"int value": {"x": 1}, "None value": {"x": None}, "int key": {1: "x"}, "a string": "x", "a list": [("a", "b")]}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata(tmp_path: Path, case: str) -> None:
    outcome = probe(f"metadata {case}", lambda: adapterspec.write_adapter(tmp_path / "out", CFG, good(),
                                                                          metadata=BAD_METADATA[case]))  # type: ignore[arg-type]
    STATS.count("write-bad-metadata")
    expect_clean([outcome], allow_ok=False)
    assert isinstance(outcome.error, adapterspec.FileFormatError) and "metadata" in str(outcome.error)
    assert list(tmp_path.iterdir()) == []


def test_reserved_metadata_cannot_forge_the_checksum(tmp_path: Path) -> None:
    folder = adapterspec.write_adapter(tmp_path / "out", CFG, good(), metadata={"adapterspec_sha256": "0" * 64,
                                                                              "adapterspec_version": "9.9"})
    assert adapterspec.validate_adapter(folder) == []
    assert adapterspec.read_adapter(folder).metadata["adapterspec_version"] == adapterspec.SPEC_VERSION


def test_awkward_torch_tensors_are_written_exactly(tmp_path: Path) -> None:
    torch = _torch()
    storage = torch.arange(14, dtype=torch.float32) / 7
    values = {
        A: storage[:6].reshape(3, 2).T,                  # non-contiguous view of a shared storage
        B: storage[6:].reshape(4, 2).requires_grad_(),   # same storage, needs grad
    }
    folder = adapterspec.write_adapter(tmp_path / "out", CFG, values)
    loaded = adapterspec.read_adapter(folder, verify=True).load_tensors("pt")
    for key, value in values.items():
        assert torch.equal(loaded[key], value.detach())
    assert adapterspec.validate_adapter(folder) == []


_bad_fields = st.dictionaries(
    st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "use_dora", "modules_to_save", "peft_type",
                     "layers_to_transform", "exclude_modules", "x_unknown"]),
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([math.nan, math.inf, 1e300, 2**70]),
              st.text(max_size=6), st.sampled_from(["(a+)+", "q(", ".*", "LORA"]), st.lists(st.text(max_size=3), max_size=3),
              st.dictionaries(st.text(max_size=3), st.integers(0, 4), max_size=2)),
    min_size=1, max_size=3)


@settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(changes=_bad_fields)
def test_generated_configs_write_or_refuse_cleanly(tmp_path_factory: pytest.TempPathFactory, changes: dict) -> None:
    """Whatever config is passed: a typed refusal with nothing written, or a folder that validates."""
    out = tmp_path_factory.mktemp("w") / "out"
    config = {**LORA_CONFIG, "target_modules": ["q"], **changes}
    outcome = probe(f"write config {changes!r}"[:300], lambda: adapterspec.write_adapter(out, config, good()))
    STATS.count("write-generated-config")
    expect_clean([outcome])
    if outcome.kind == "typed":
        assert not out.exists() and list(out.parent.iterdir()) == []
    else:
        assert adapterspec.validate_adapter(out) == [], "write_adapter wrote a folder that does not validate"
