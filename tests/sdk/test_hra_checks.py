"""HRA's SDK rules (SPEC.md 17.1): the hra_u tensor against the config, the refusals naming their field, the mix
rule, and the float64 reference against PEFT's own get_delta_weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import adapterspec
from adapterspec._mix import Running, mix_refusal
from adapterspec.errors import MissingTensorError, ShapeMismatchError, UnsupportedError

KEY = "base_model.model.l.0.q_proj.hra_u"


def _write(folder: Path, config: dict[str, object], tensors: dict[str, np.ndarray]) -> Path:
    import json

    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def test_valid_folder_reads(tmp_path: Path) -> None:
    cfg = {"peft_type": "HRA", "r": 2, "target_modules": ["q_proj"]}
    folder = _write(tmp_path / "a", cfg, {KEY: np.arange(16, dtype=np.float32).reshape(8, 2)})
    assert adapterspec.validate_adapter(folder) == []
    assert adapterspec.read_adapter(folder).config.peft_type == "HRA"


@pytest.mark.parametrize(("config", "shape", "error", "needle"), [
    ({"r": 3}, (8, 2), ShapeMismatchError, "config's r=3"),
    ({}, (8, 2), ShapeMismatchError, "config's r=8"),  # PEFT's default r
    ({"r": 2}, (8, 2, 1), ShapeMismatchError, "2 axes"),
    ({"r": 2}, (2, 8), ShapeMismatchError, "rank 8"),  # transposed
])
def test_wrong_shapes_name_the_tensor(tmp_path: Path, config: dict[str, object], shape: tuple[int, ...],
                                      error: type, needle: str) -> None:
    cfg = {"peft_type": "HRA", "target_modules": ["q_proj"], **config}
    folder = _write(tmp_path / "a", cfg, {KEY: np.ones(shape, np.float32)})
    [found] = adapterspec.validate_adapter(folder)
    assert isinstance(found, error) and found.key == KEY and needle in found.message


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    cfg = {"peft_type": "HRA", "r": 2, "target_modules": ["q_proj"]}
    folder = _write(tmp_path / "a", cfg, {"base_model.model.l.0.q_proj.hra_v": np.ones((8, 2), np.float32)})
    assert any(isinstance(e, (MissingTensorError, adapterspec.AdapterSpecError)) and "q_proj" in str(e)
               for e in adapterspec.validate_adapter(folder))


@pytest.mark.parametrize(("field", "value"), [("bias", "all"), ("bias", "hra_only"), ("r", 0)])
def test_unsupported_variants_name_the_field(tmp_path: Path, field: str, value: object) -> None:
    cfg = {"peft_type": "HRA", "r": 2, "target_modules": ["q_proj"], field: value}
    folder = _write(tmp_path / "a", cfg, {KEY: np.ones((8, 2), np.float32)})
    with pytest.raises(UnsupportedError) as info:
        adapterspec.read_adapter(folder)
    assert info.value.pointer == f"/{field}"


def test_hra_runs_only_with_hra() -> None:
    assert mix_refusal("q", [Running("a", "HRA"), Running("b", "HRA")]) is None
    for other in ("LORA", "OFT", "IA3", "LOHA"):
        refusal = mix_refusal("q", [Running("a", "HRA"), Running("b", other)])
        assert refusal is not None and refusal.key == "q" and "one method per layer" in refusal.message


@pytest.mark.parametrize("apply_gs", [False, True])
def test_reference_equals_peft_get_delta_weight(apply_gs: bool) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import HRAConfig
    from peft.tuners.hra.layer import HRALinear

    from adapterspec.conformance.reference_hra import householder

    layer = HRALinear(torch.nn.Linear(7, 3), "default", config=HRAConfig(r=3, apply_GS=apply_gs), r=3).double()
    k = torch.arange(21, dtype=torch.float64)
    u = torch.sin(0.61 * k + 0.013 * k * k).reshape(7, 3)
    with torch.no_grad():
        layer.hra_u["default"].copy_(u)
    expected = layer.get_delta_weight("default").detach().double().numpy()
    assert np.abs(householder(u.numpy(), apply_gs) - expected).max() < 1e-12
    back = layer.get_delta_weight("default", reverse=True).detach().double().numpy()
    assert np.abs(householder(u.numpy(), apply_gs) @ back - np.eye(7)).max() < 1e-12


def test_docstring_examples() -> None:
    import doctest

    from adapterspec import _hra
    from adapterspec.conformance import reference_hra

    for module in (_hra, reference_hra):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted >= 2
