"""OFT and BOFT tensor checks and refused variants (SPEC.md 15.6, 15.7), without a framework."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterspec
from adapterspec._method_checks import METHOD_CHECKS
from adapterspec._rules import unsupported_features
from adapterspec.checks import TensorInfo
from adapterspec.config import AdapterConfig
from adapterspec.errors import MissingTensorError, ShapeMismatchError, UnsupportedError

OFT = {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["q"]}
BOFT = {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": ["q"]}


def _check(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[Any]:
    cfg = AdapterConfig.from_dict(config)
    return METHOD_CHECKS[cfg.peft_type](cfg, "l.q", {k: TensorInfo(v, "F32") for k, v in shapes.items()})


def test_good_shapes_pass() -> None:
    assert _check(OFT, {"oft_R.weight": (2, 6)}) == []
    assert _check(OFT | {"block_share": True}, {"oft_R.weight": (1, 6)}) == []
    assert _check(BOFT, {"boft_R": (1, 2, 4, 4), "boft_s": (3, 1)}) == []
    assert _check(BOFT, {"boft_R": (1, 2, 4, 4), "boft_s": (1, 3)}) == []


@pytest.mark.parametrize(("config", "shapes", "error", "words"), [
    (OFT, {}, MissingTensorError, "oft_R.weight"),
    (OFT, {"oft_R.weight": (2, 5)}, ShapeMismatchError, "5 is not b(b-1)/2"),
    (OFT, {"oft_R.weight": (12,)}, ShapeMismatchError, "2 axes"),
    (OFT | {"block_share": True}, {"oft_R.weight": (2, 6)}, ShapeMismatchError, "block_share"),
    (BOFT, {"boft_R": (1, 2, 4, 4)}, MissingTensorError, "boft_s"),
    (BOFT, {"boft_R": (1, 2, 4, 3), "boft_s": (3, 1)}, ShapeMismatchError, "[factors, blocks, b, b]"),
    (BOFT, {"boft_R": (2, 2, 4, 4), "boft_s": (3, 1)}, ShapeMismatchError, "2 butterfly factors"),
    (BOFT, {"boft_R": (1, 4, 2, 2), "boft_s": (3, 1)}, ShapeMismatchError, "boft_block_size is 4"),
    (BOFT, {"boft_R": (1, 2, 4, 4), "boft_s": (3, 2)}, ShapeMismatchError, "[out, 1]"),
])
def test_bad_shapes_name_the_tensor(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], error: type,
                                    words: str) -> None:
    errors = _check(config, shapes)
    assert len(errors) == 1 and isinstance(errors[0], error)
    assert words in str(errors[0]) and "base_model.model.l.q." in str(errors[0])


@pytest.mark.parametrize(("config", "pointer"), [
    (OFT | {"coft": True}, "/coft"),
    (OFT | {"bias": "oft_only"}, "/bias"),
    (BOFT | {"bias": "all"}, "/bias"),
    (BOFT | {"boft_n_butterfly_factor": 2}, "/boft_n_butterfly_factor"),
])
def test_unsupported_variants_are_listed(config: dict[str, Any], pointer: str) -> None:
    assert [p for p, _ in unsupported_features(config)] == [pointer]


def test_plain_variants_are_portable() -> None:
    assert unsupported_features(OFT) == [] and unsupported_features(BOFT) == []


def test_refused_variant_folder_is_refused_at_read(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps(OFT | {"coft": True}))
    save_file({"base_model.model.l.q.oft_R.weight": np.zeros((2, 6), np.float32)},
              str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedError) as info:
        adapterspec.read_adapter(tmp_path)
    assert info.value.pointer == "/coft"
    assert any("/coft" in str(e) for e in adapterspec.validate_adapter(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps(OFT))
    assert adapterspec.validate_adapter(tmp_path) == []


@pytest.mark.parametrize(("fields", "refused"), [
    ({"peft_version": "0.17.1"}, True),
    ({"peft_version": "0.15.0@abc123"}, True),
    ({"peft_version": "0.17.1", "use_cayley_neumann": False}, False),
    ({"peft_version": "0.18.0"}, False),
    ({"peft_version": "0.21.2"}, False),
    ({"peft_version": None}, False),
])
def test_cayley_neumann_before_peft_0_18_is_refused(fields: dict[str, Any], refused: bool) -> None:
    """PEFT 0.18 changed the Cayley-Neumann series: an adapter trained with the old one is not run with the new."""
    assert [p for p, _ in unsupported_features(OFT | fields)] == (["/peft_version"] if refused else [])


def test_written_oft_config_names_the_peft_version_of_its_math() -> None:
    """PEFT 0.21 fails on an OFT config with use_cayley_neumann and a null peft_version (and warns without one)."""
    written = AdapterConfig.from_dict(OFT).to_dict()
    assert written["peft_version"] == "0.21.2" and written["use_cayley_neumann"] is True
    assert AdapterConfig.from_dict(OFT | {"peft_version": "0.19.0"}).to_dict()["peft_version"] == "0.19.0"
    assert not AdapterConfig.from_dict(OFT | {"use_cayley_neumann": False}).to_dict().get("peft_version")
    assert not AdapterConfig.from_dict(BOFT).to_dict().get("peft_version")


def test_reference_docstring_examples() -> None:
    import doctest

    from adapterspec.conformance import reference_oft

    result = doctest.testmod(reference_oft, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 5
