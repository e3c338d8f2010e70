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
    with pytest.raises(UnsupportedError) as info:  # a key that does not compile, reached: PEFT's re.error
        _c3a.block_size_for({"block_size": 4, "block_size_pattern": {"q[": 2}}, "l.q[")
    assert info.value.pointer == "/block_size_pattern" and info.value.key == "l.q["


@pytest.mark.parametrize(("change", "pointer"), [
    ({"init_weights": "orthogonal"}, "/init_weights"),
    ({"init_weights": None}, "/init_weights"),
    ({"block_size": 0}, "/block_size"),
    ({"block_size_pattern": None}, "/block_size_pattern"),
    ({"block_size_pattern": {"q": 1.5}}, "/block_size_pattern/q"),
    ({"block_size_pattern": {"": 2}}, "/block_size_pattern"),  # SPEC.md 11.8: keys bounded as rank_pattern's
    ({"block_size_pattern": {"q" * 4097: 2}}, "/block_size_pattern"),
    ({"target_modules": "q" * 65537}, "/target_modules"),
    ({"target_modules": ["q" * 1025]}, "/target_modules/0"),
    ({"layers_to_transform": [0], "layers_pattern": "l" * 4097}, "/layers_pattern"),
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


def test_pattern_keys_are_reached_lazily_as_peft_reaches_them() -> None:
    """PEFT 0.21.2 evaluates ``re.match(rf".*\\.{k}$", path)`` key by key (``next(filter(...))``): a key whose spliced
    pattern does not compile fails the load only when a targeted module reaches it (no earlier key matched). Measured
    on a toy model: {"v_proj": 2, "q_proj(": 4} with only v_proj targeted loads (v_proj: 2); reversed it raises
    ``re.error``. Keys that do not compile alone but do spliced (``?proj``, ``*``) match as spliced."""
    cfg = {"peft_type": "C3A", "block_size": 8, "block_size_pattern": {"v_proj": 2, "q_proj(": 4}}
    assert _c3a.unsupported(cfg) == []
    assert _c3a.block_size_for(cfg, "model.layers.0.self_attn.v_proj") == 2
    with pytest.raises(UnsupportedError) as info:  # q_proj reaches the key: PEFT raises re.error
        _c3a.block_size_for(cfg, "model.layers.0.self_attn.q_proj")
    assert info.value.pointer == "/block_size_pattern" and info.value.key == "model.layers.0.self_attn.q_proj"
    reversed_ = {"peft_type": "C3A", "block_size": 8, "block_size_pattern": {"q_proj(": 4, "v_proj": 2}}
    with pytest.raises(UnsupportedError):
        _c3a.kernel_shape(8, 8, reversed_, "model.layers.0.self_attn.v_proj")
    spliced = {"block_size": 8, "block_size_pattern": {"?proj": 2, "*": 4}}
    assert [_c3a.block_size_for(spliced, p) for p in ("a.q_proj", "a.v_proj", "a.o")] == [2, 2, 4]  # .*\\.*$ matches all
    assert _c3a.block_size_for({"block_size": 8, "block_size_pattern": {"*": 4}}, "a.q") == 4  # '.*\.*$'


def test_alternation_and_whole_path_keys_match_as_peft_splices_them() -> None:
    r"""The key is spliced without a group: 'q_proj|v_proj' reads '.*\.q_proj' (prefix match) or 'v_proj$' (the
    whole path); an escaped whole path needs a dot before it and is no exact name, so it gives block_size."""
    cfg = {"block_size": 8, "block_size_pattern": {"q_proj|v_proj": 2}}
    assert [_c3a.block_size_for(cfg, p) for p in ("l.q_proj", "l.q_proj_extra", "l.v_proj", "v_proj")] == [2, 2, 8, 2]
    whole = {"block_size": 8, "block_size_pattern": {r"model\.layers\.0\.v_proj": 2, r"layers\.1\.v_proj": 4}}
    assert [_c3a.block_size_for(whole, p) for p in ("model.layers.0.v_proj", "model.layers.1.v_proj")] == [8, 4]
    first = {"block_size": 8, "block_size_pattern": {"model.layers.0.v_proj": 1, "v_proj": 2}}
    assert _c3a.block_size_for(first, "model.layers.0.v_proj") == 2  # a matching regex before the exact name


def test_validator_refuses_a_reached_bad_key_per_module(tmp_path: Path) -> None:
    """Without the model, the file's modules reach the keys: a bad key no module reaches is PEFT-loadable."""
    key = "base_model.model.l.v.c3a_kernel"
    config = {"peft_type": "C3A", "block_size": 4, "target_modules": ["v"]}
    tensors = {key: np.zeros((1, 2, 2), np.float32)}
    assert adapterspec.validate_adapter(_folder(tmp_path, config | {"block_size_pattern": {"v": 2, "q(": 4}},
                                                tensors)) == []
    errors = adapterspec.validate_adapter(_folder(tmp_path, config | {"block_size_pattern": {"q(": 4, "v": 2}},
                                                  tensors))
    assert [(type(e), e.pointer, e.key) for e in errors] == [(UnsupportedError, "/block_size_pattern", "l.v")]


def test_writers_keep_block_size_pattern_order() -> None:
    """SPEC.md 3.1/4.4: the first matching key wins, so the writer keeps the members' order (PEFT's own save sorts
    them: {"v_proj": 2, "proj": 4} is written {"proj": 4, "v_proj": 2})."""
    from adapterspec.conformance.runner import config_differences

    pattern = {"v_proj": 2, ".*_proj": 4}
    cfg = AdapterConfig.from_dict({"peft_type": "C3A", "block_size": 8, "target_modules": ["v_proj"],
                                   "block_size_pattern": pattern})
    assert list(json.loads(cfg.to_json())["block_size_pattern"]) == ["v_proj", ".*_proj"]
    source = {"peft_type": "C3A", "block_size_pattern": pattern}
    assert config_differences(source, {**source, "block_size_pattern": dict(sorted(pattern.items()))})
