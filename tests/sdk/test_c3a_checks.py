"""C3A in the SDK (SPEC.md 17.7): the block size of each module as PEFT 0.21.2 picks it, the kernel's shape and the
refusals naming the field, the validator's shape check, the schema's limits, and the float64 reference against
PEFT's own ``get_circulant_fast``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterspec
from adapterspec import _c3a
from adapterspec.config import AdapterConfig
from adapterspec.errors import ConfigError, ShapeMismatchError, UnsupportedError


def test_block_size_is_peft_s_choice() -> None:
    """PEFT's C3AModel builds each layer with the block size of the first pattern key matching after a dot (file
    order), else the exact name, else block_size: the kernels it makes have our shapes."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32))
    pattern = {"proj": 8, "q_proj": 4, "model.layers.1.self_attn.k_proj": 2, "layers.0.mlp.up_proj": 32,
               "model.layers.0.self_attn.v_proj": 8}  # 'proj' matches nothing ('.*\\.proj$'); the exact key does
    config = {"peft_type": "C3A", "block_size": 16, "block_size_pattern": pattern,
              "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}
    peft_model = peft.get_peft_model(model, peft.C3AConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    shapes = {name.removeprefix("base_model.model.").removesuffix(".c3a_kernel.default"): tuple(p.shape)
              for name, p in peft_model.named_parameters() if "c3a_kernel" in name}
    assert len(shapes) == 10
    cfg = AdapterConfig.from_dict(config)
    seen = set()
    for path, shape in shapes.items():
        assert shape[2] == _c3a.block_size_for(cfg, path), path
        seen.add(shape[2])
    assert seen == {4, 16, 2, 32, 8}


def test_kernel_shape_refusals_name_the_field() -> None:
    cfg = {"peft_type": "C3A", "block_size": 16, "block_size_pattern": {"v": 3}}
    assert _c3a.kernel_shape(64, 32, cfg, "l.q") == (2, 4, 16)
    with pytest.raises(UnsupportedError) as info:
        _c3a.kernel_shape(64, 24, cfg, "l.q")
    assert info.value.pointer == "/block_size" and info.value.key == "l.q"
    with pytest.raises(UnsupportedError) as info:
        _c3a.kernel_shape(64, 32, cfg, "l.v")
    assert info.value.pointer == "/block_size_pattern"
    assert _c3a.unsupported({"peft_type": "C3A", "bias": "c3a_only"})[0][0] == "/bias"
    assert _c3a.unsupported({"peft_type": "C3A", "block_size_pattern": {"q[": 2}})[0][0] == "/block_size_pattern"
    assert _c3a.block_size_for({"block_size": 4, "block_size_pattern": {"q[": 2}}, "l.q[") == 4  # no regex: no match


@pytest.mark.parametrize(("change", "pointer"), [
    ({"init_weights": "orthogonal"}, "/init_weights"),
    ({"init_weights": None}, "/init_weights"),
    ({"block_size": 0}, "/block_size"),
    ({"block_size_pattern": None}, "/block_size_pattern"),
    ({"block_size_pattern": {"q": 1.5}}, "/block_size_pattern/q"),
])
def test_schema_refuses_what_peft_cannot_load(change: dict[str, Any], pointer: str) -> None:
    config = {"peft_type": "C3A", "block_size": 4, "target_modules": ["q"]} | change
    with pytest.raises(ConfigError) as info:
        AdapterConfig.from_dict(config)
    assert pointer in str(info.value)


def _folder(tmp_path: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


def test_validator_checks_the_kernel_per_module(tmp_path: Path) -> None:
    q, v = "base_model.model.layers.0.q_proj.c3a_kernel", "base_model.model.layers.0.v_proj.c3a_kernel"
    config = {"peft_type": "C3A", "block_size": 4, "block_size_pattern": {"v_proj": 2},
              "target_modules": ["q_proj", "v_proj"]}
    tensors = {q: np.ones((2, 2, 4), np.float32), v: np.ones((1, 4, 2), np.float32)}
    assert adapterspec.validate_adapter(_folder(tmp_path, config, tensors)) == []
    tensors[v] = np.ones((1, 2, 4), np.float32)
    errors = adapterspec.validate_adapter(_folder(tmp_path, config, tensors))
    assert [(type(e), e.key) for e in errors] == [(ShapeMismatchError, v)]
    del tensors[v]
    errors = adapterspec.validate_adapter(_folder(tmp_path, config | {"target_modules": ["q_proj"]},
                                                  {q: np.ones((2, 8), np.float32)}))
    assert [(type(e), e.key) for e in errors] == [(ShapeMismatchError, q)]


def test_reference_is_peft_s_circulant() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.tuners.c3a.utils import get_circulant_fast

    from adapterspec.conformance.reference_c3a import c3a_delta

    kernel = torch.from_numpy(np.sin(np.arange(3 * 2 * 5) * 0.7 + 0.3).reshape(3, 2, 5))
    assert np.abs(get_circulant_fast(kernel).numpy() - c3a_delta(kernel.numpy())).max() < 1e-12
