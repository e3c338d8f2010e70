"""HRA's SDK rules (SPEC.md 17.3): the hra_u tensor against the config, the refusals naming their field, the mix
rule, and the float64 reference against PEFT's own get_delta_weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def test_null_booleans_read_as_false() -> None:
    """SPEC 4.1 (1.2): PEFT reads apply_GS and init_weights with truth tests: null is false (the schema accepts it)."""
    from adapterspec import _hra

    cfg = adapterspec.AdapterConfig.from_dict({"peft_type": "HRA", "r": 2, "target_modules": ["q"], "apply_GS": None,
                                               "init_weights": None})
    assert cfg.get("apply_GS") is False and cfg.get("init_weights") is False
    assert _hra.reflections_of(cfg).apply_gs is False and _hra.inject_refusal(cfg) is None
    assert cfg.to_dict()["apply_GS"] is None


@pytest.mark.parametrize("field", [{"layers_to_transform": [0]}, {"layers_pattern": "layers", "layers_to_transform": None}])
def test_regex_target_modules_take_no_layer_fields(field: dict[str, object]) -> None:
    """PEFT's HRAConfig raises on layers_to_transform / layers_pattern with a string target_modules (SPEC 4.2)."""
    from adapterspec.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        adapterspec.AdapterConfig.from_dict({"peft_type": "HRA", "r": 2, "target_modules": ".*q", **field})
    assert info.value.pointer in {"/layers_to_transform", "/layers_pattern", ""}
    if field.get("layers_to_transform"):  # a list target_modules takes them
        adapterspec.AdapterConfig.from_dict({"peft_type": "HRA", "r": 2, "target_modules": ["q"], **field})


@pytest.mark.parametrize(("r", "apply_gs", "refused"), [(5, True, True), (4, True, False), (9, False, False)])
def test_gram_schmidt_beyond_the_input_features_is_refused(r: int, apply_gs: bool, refused: bool) -> None:
    """SPEC 17.3: apply_GS with r > F has no defined result (PEFT: rounding noise): UnsupportedError naming /r."""
    from adapterspec import _hra

    refusal = _hra.layer_refusal(4, {"peft_type": "HRA", "r": r, "apply_GS": apply_gs})
    assert (refusal is not None) == refused
    if refusal is not None:
        assert refusal[0] == "/r"


def test_peft_gram_schmidt_beyond_the_input_features_is_rounding_noise() -> None:
    """The measurement behind the refusal: PEFT's apply_GS H for r > F depends on float rounding (float32 and
    float64 disagree far beyond their rounding), while r = F agrees to rounding."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import HRAConfig
    from peft.tuners.hra.layer import HRALinear

    def h(r: int, dtype: Any) -> Any:
        torch.manual_seed(0)
        layer = HRALinear(torch.nn.Linear(4, 3), "a", HRAConfig(r=r, apply_GS=True, init_weights=False), r=r)
        return layer.to(dtype).get_delta_weight("a").double()

    assert (h(4, torch.float32) - h(4, torch.float64)).abs().max() < 1e-5
    assert (h(6, torch.float32) - h(6, torch.float64)).abs().max() > 1e-2
