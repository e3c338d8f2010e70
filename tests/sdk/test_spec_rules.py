"""The reader/validator rules of spec/v1/SPEC.md, one test per rule.

Every refusal asserts the exact error class and that the error names where the problem is (the
config's JSON pointer or the tensor key). The last part builds folders with PEFT 0.21.2 itself
(tiny random models) for every auxiliary-tensor case the spec lists and asserts that
``adapterspec validate`` accepts them unchanged.
"""

from __future__ import annotations

import doctest
import importlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

import adapterspec
from adapterspec import (
    AdapterConfig,
    AdapterSpecError,
    AdapterSpecWarning,
    ConfigError,
    DTypeMismatchError,
    FileFormatError,
    MissingTensorError,
    ShapeMismatchError,
    TensorError,
    TensorInfo,
    UnexpectedTensorError,
    UnsupportedError,
)
from adapterspec.checks import tensor_errors
from adapterspec.cli import main
from adapterspec.config import unsupported_features, validate_config
from adapterspec.naming import parse_key

P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
EMB = "model.embed_tokens"
LORA: dict[str, Any] = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def key(module: str, param: str) -> str:
    return f"{P}{module}.{param}"


def lora_pair(module: str = Q, r: int = 4, out: int = 64, inp: int = 64) -> dict[str, tuple[int, ...]]:
    return {key(module, "lora_A.weight"): (r, inp), key(module, "lora_B.weight"): (out, r)}


def errors_for(config: dict[str, Any], shapes: dict[str, Any]) -> list[AdapterSpecError]:
    """tensor_errors for key -> shape (F32) or key -> (shape, dtype)."""
    infos = {k: TensorInfo(*v) if isinstance(v[0], tuple) else TensorInfo(tuple(v), "F32") for k, v in shapes.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterSpecWarning)
        return tensor_errors(AdapterConfig.from_dict(config), infos)


def only(errors: list[AdapterSpecError], cls: type, where: str) -> AdapterSpecError:
    """The single error, of exactly class ``cls``, naming ``where`` (its key or pointer) in its message."""
    assert [type(e) for e in errors] == [cls], [str(e) for e in errors]
    error = errors[0]
    assert where in (error.key, error.pointer), (where, error.key, error.pointer)
    assert where in str(error)
    return error


def values(shape: tuple[int, ...], offset: float = 0.0) -> np.ndarray:
    """Element-unique deterministic values."""
    n = int(np.prod(shape))
    return np.sin(np.arange(n, dtype=np.float32) + offset).reshape(shape)


def write_folder(folder: Path, config: dict[str, Any], tensors: dict[str, np.ndarray],
                 metadata: dict[str, str] | None = None) -> Path:
    """A folder written byte by byte (no adapterspec writer checks), as a third-party tool could."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=metadata or {"format": "pt"})
    return folder


def lora_tensors() -> dict[str, np.ndarray]:
    return {k: values(s, i) for i, (k, s) in enumerate(lora_pair().items())}


# -- SPEC 5.4: parsing keys --------------------------------------------------------------------------
def test_method_suffixes_parse_with_the_module_before_them() -> None:
    name = parse_key(key("a.lora_B", "lora_B.bias"), "LORA", LORA)  # a module path may contain a suffix's head
    assert (name.module, name.param, name.role) == ("a.lora_B", "lora_B.bias", "adapter")
    name = parse_key(key(Q, "lora_velora_embed"), "LORA", LORA)
    assert (name.module, name.param, name.role) == (Q, "lora_velora_embed", "adapter")
    assert parse_key(key(Q, "lokr_w1_a"), "LOKR", {}).param == "lokr_w1_a"


def test_key_without_prefix_hint_gives_the_fixed_key() -> None:
    bad = f"{Q}.lora_A.weight"
    error = only([_raises(bad, "LORA")], UnexpectedTensorError, bad)
    assert error.hint is not None and repr(P + bad) in error.hint
    assert "Found missing adapter keys" in error.message


@pytest.mark.parametrize(("stored", "fixed"), [
    (key(Q, "lora_A.default.weight"), key(Q, "lora_A.weight")),
    (key(Q, "lora_magnitude_vector.default.weight"), key(Q, "lora_magnitude_vector")),
    (key(EMB, "lora_embedding_A.sql"), key(EMB, "lora_embedding_A")),
    (key(Q, "ia3_l.default"), key(Q, "ia3_l")),
])
def test_key_with_adapter_name_hint_says_strip_it(stored: str, fixed: str) -> None:
    error = only([_raises(stored, "LORA")], UnexpectedTensorError, stored)
    assert "adapter name" in error.message and error.hint is not None
    assert "strip the adapter name" in error.hint and repr(fixed) in error.hint


@pytest.mark.parametrize("module", [".q", "a..q", "a.", ""])
def test_malformed_module_names_are_refused(module: str) -> None:  # check 15
    stored = P + (f"{module}." if module else "") + "lora_A.weight"
    error = only([_raises(stored, "LORA")], UnexpectedTensorError, stored)
    assert "malformed" in error.message


def _raises(stored: str, peft_type: str, config: dict[str, Any] | None = None) -> AdapterSpecError:
    with pytest.raises(AdapterSpecError) as info:
        parse_key(stored, peft_type, config or LORA)
    return info.value


# -- SPEC 5.3: auxiliary tensors ---------------------------------------------------------------------
def test_modules_to_save_tensors_are_accounted_for_by_the_config() -> None:
    cfg = {**LORA, "modules_to_save": ["score"]}
    shapes = {**lora_pair(), key("score", "weight"): (2, 64), key("score", "bias"): (2,),
              key("score", "num_batches"): ((1,), "I64")}  # integer buffers are allowed in modules to save
    assert errors_for(cfg, shapes) == []
    assert parse_key(key("score", "weight"), "LORA", cfg).role == "modules_to_save"
    only(errors_for(LORA, {**lora_pair(), key("score", "weight"): (2, 64)}), UnexpectedTensorError,
         key("score", "weight"))


def test_embedding_base_layer_weight_needs_an_adapted_embedding() -> None:
    cfg = {**LORA, "target_modules": ["embed_tokens"]}
    shapes = {key(EMB, "lora_embedding_A"): (4, 128), key(EMB, "lora_embedding_B"): (64, 4),
              key(EMB, "base_layer.weight"): (128, 64)}
    assert errors_for(cfg, shapes) == []
    stray = key("model.norm", "base_layer.weight")
    only(errors_for(LORA, {**lora_pair(), stray: (64, 64)}), UnexpectedTensorError, stray)


def test_resized_embedding_weight_is_accepted_and_must_be_a_matrix() -> None:
    assert errors_for(LORA, {**lora_pair(), key(EMB, "weight"): (130, 64)}) == []
    only(errors_for(LORA, {**lora_pair(), key(EMB, "weight"): (130,)}), ShapeMismatchError, key(EMB, "weight"))


def test_bias_lora_only_accepts_base_layer_bias_of_targeted_modules() -> None:
    cfg = {**LORA, "bias": "lora_only"}
    assert errors_for(cfg, {**lora_pair(), key(Q, "base_layer.bias"): (64,)}) == []
    other = key("model.layers.0.mlp.up_proj", "bias")
    error = only(errors_for(cfg, {**lora_pair(), other: (128,)}), UnexpectedTensorError, other)
    assert "bias" in (error.hint or "")
    untargeted = key("model.layers.0.mlp.up_proj", "base_layer.bias")
    only(errors_for(cfg, {**lora_pair(), untargeted: (128,)}), UnexpectedTensorError, untargeted)


def test_bias_none_refuses_bias_tensors() -> None:
    error = only(errors_for(LORA, {**lora_pair(), key(Q, "base_layer.bias"): (64,)}), UnexpectedTensorError,
                 key(Q, "base_layer.bias"))
    assert "set bias" in (error.hint or "")


def test_bias_all_accepts_other_modules_biases_and_names_the_adapted_ones() -> None:
    cfg = {**LORA, "bias": "all"}
    other = key("model.layers.0.mlp.up_proj", "bias")
    assert errors_for(cfg, {**lora_pair(), key(Q, "base_layer.bias"): (64,), other: (128,)}) == []
    error = only(errors_for(cfg, {**lora_pair(), key(Q, "bias"): (64,)}), UnexpectedTensorError, key(Q, "bias"))
    assert repr(key(Q, "base_layer.bias")) in (error.hint or "")


def test_bias_tensors_are_1d() -> None:  # check 16
    cfg = {**LORA, "bias": "all"}
    other = key("model.layers.0.mlp.up_proj", "bias")
    only(errors_for(cfg, {**lora_pair(), other: (128, 1)}), ShapeMismatchError, other)


def test_bookkeeping_copies_of_modules_to_save_are_accepted_and_ignored() -> None:
    cfg = {**LORA, "bias": "all", "modules_to_save": ["up_proj"]}
    m = "model.layers.0.mlp.up_proj"
    shapes = {**lora_pair(), key(m, "weight"): (128, 64), key(m, "bias"): (128,),
              key(m, "original_module.bias"): (128,), key(m, "modules_to_save.bias"): (128,)}
    assert errors_for(cfg, shapes) == []
    assert parse_key(key(m, "original_module.bias"), "LORA", cfg).role == "ignored"
    stray = key("model.layers.0.mlp.down_proj", "original_module.bias")
    only(errors_for({**LORA, "modules_to_save": ["up_proj"]}, {**lora_pair(), stray: (64,)}),
         UnexpectedTensorError, stray)


def test_trainable_token_rows_match_the_indices() -> None:  # checks 8 and 16
    rows = key(EMB, "token_adapter.trainable_tokens_delta")
    cfg = {**LORA, "trainable_token_indices": [1, 5, 7]}
    assert errors_for(cfg, {**lora_pair(), rows: (3, 64)}) == []
    only(errors_for(cfg, {**lora_pair(), rows: (2, 64)}), ShapeMismatchError, rows)
    only(errors_for(cfg, {**lora_pair(), rows: (3,)}), ShapeMismatchError, rows)
    by_name = {**LORA, "trainable_token_indices": {"embed_tokens": [1, 2]}}
    assert errors_for(by_name, {**lora_pair(), rows: (2, 64)}) == []
    head = key("lm_head", "token_adapter.trainable_tokens_delta")
    only(errors_for(by_name, {**lora_pair(), rows: (2, 64), head: (2, 64)}), UnexpectedTensorError, head)
    error = only(errors_for(LORA, {**lora_pair(), rows: (3, 64)}), UnexpectedTensorError, rows)
    assert "trainable_token_indices" in (error.hint or "")


# -- check 9: complete tensor sets --------------------------------------------------------------------
@pytest.mark.parametrize(("config", "shapes", "cls", "where"), [
    (LORA, {key(Q, "lora_A.weight"): (4, 64)}, MissingTensorError, key(Q, "lora_B.weight")),
    (LORA, {**lora_pair(), key(Q, "lora_embedding_A"): (4, 128)}, UnexpectedTensorError, key(Q, "lora_embedding_A")),
    (LORA, {**lora_pair(), key(Q, "lora_B.bias"): (64,)}, UnexpectedTensorError, key(Q, "lora_B.bias")),
    ({**LORA, "lora_bias": True}, lora_pair(), MissingTensorError, key(Q, "lora_B.bias")),
    (LORA, {**lora_pair(), key(Q, "lora_magnitude_vector"): (64,)}, UnexpectedTensorError,
     key(Q, "lora_magnitude_vector")),
    ({**LORA, "use_dora": True}, lora_pair(), MissingTensorError, key(Q, "lora_magnitude_vector")),
    (LORA, {**lora_pair(), key(Q, "lora_velora_embed"): (1,)}, UnexpectedTensorError, key(Q, "lora_velora_embed")),
    ({**LORA, "target_modules": ["embed_tokens"], "lora_bias": True},
     {key(EMB, "lora_embedding_A"): (4, 128), key(EMB, "lora_embedding_B"): (64, 4), key(EMB, "lora_B.bias"): (64,)},
     UnexpectedTensorError, key(EMB, "lora_B.bias")),
    ({"peft_type": "LOHA", "r": 2, "target_modules": ["q_proj"]},
     {key(Q, "hada_w1_a"): (64, 2), key(Q, "hada_w1_b"): (2, 64), key(Q, "hada_w2_a"): (64, 2)},
     MissingTensorError, key(Q, "hada_w2_b")),
    ({"peft_type": "LOHA", "r": 2, "target_modules": ["q_proj"]},
     {key(Q, n): s for n, s in [("hada_w1_a", (2, 8)), ("hada_w1_b", (2, 4)), ("hada_w2_a", (2, 8)),
                                ("hada_w2_b", (2, 4)), ("hada_t1", (2, 2, 3, 3))]},
     MissingTensorError, key(Q, "hada_t2")),
    ({"peft_type": "LOKR", "r": 2, "target_modules": ["q_proj"]},
     {key(Q, "lokr_w1"): (8, 8), key(Q, "lokr_w1_a"): (8, 2), key(Q, "lokr_w2"): (8, 8)},
     UnexpectedTensorError, key(Q, "lokr_w1_a")),
    ({"peft_type": "LOKR", "r": 2, "target_modules": ["q_proj"]},
     {key(Q, "lokr_w1_a"): (8, 2), key(Q, "lokr_w2"): (8, 8)}, MissingTensorError, key(Q, "lokr_w1_b")),
    ({"peft_type": "LOKR", "r": 2, "target_modules": ["q_proj"]},
     {key(Q, "lokr_w2"): (8, 8)}, MissingTensorError, key(Q, "lokr_w1")),
    ({"peft_type": "LOKR", "r": 2, "target_modules": ["q_proj"]},
     {key(Q, "lokr_w1"): (8, 8), key(Q, "lokr_w2"): (8, 8), key(Q, "lokr_t2"): (2, 2, 3, 3)},
     UnexpectedTensorError, key(Q, "lokr_t2")),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 64},
     {"prompt_embeddings": (3, 64), key(Q, "lora_A.weight"): (4, 64)}, UnexpectedTensorError, key(Q, "lora_A.weight")),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 64}, {}, MissingTensorError,
     "prompt_embeddings"),
])
def test_incomplete_or_extra_tensor_sets(config: dict[str, Any], shapes: dict[str, Any], cls: type, where: str) -> None:
    only(errors_for(config, shapes), cls, where)


def test_lokr_t2_alone_misses_both_factors() -> None:
    cfg = {"peft_type": "LOKR", "r": 2, "target_modules": ["q_proj"]}
    errors = errors_for(cfg, {key(Q, "lokr_w1"): (8, 8), key(Q, "lokr_t2"): (2, 2, 3, 3)})
    assert {(type(e), e.key) for e in errors} == {(MissingTensorError, key(Q, "lokr_w2_a")),
                                                  (MissingTensorError, key(Q, "lokr_w2_b"))}


# -- check 10: ranks ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "shapes", "where"), [
    (LORA, lora_pair(r=8), key(Q, "lora_A.weight")),
    ({**LORA, "rank_pattern": {"q_proj": 2}}, lora_pair(r=4), key(Q, "lora_A.weight")),
    ({**LORA, "target_modules": ["embed_tokens"]},
     {key(EMB, "lora_embedding_A"): (8, 128), key(EMB, "lora_embedding_B"): (64, 8)}, key(EMB, "lora_embedding_A")),
    ({"peft_type": "LOHA", "r": 2, "target_modules": ["q_proj"]},
     {key(Q, n): s for n, s in [("hada_w1_a", (64, 3)), ("hada_w1_b", (3, 64)), ("hada_w2_a", (64, 3)),
                                ("hada_w2_b", (3, 64))]}, key(Q, "hada_w1_a")),
    ({"peft_type": "LOHA", "r": 2, "target_modules": ["conv"], "use_effective_conv2d": True},
     {key("conv", n): s for n, s in [("hada_w1_a", (3, 12)), ("hada_w1_b", (3, 4)), ("hada_w2_a", (3, 12)),
                                     ("hada_w2_b", (3, 4)), ("hada_t1", (3, 3, 3, 3)), ("hada_t2", (3, 3, 3, 3))]},
     key("conv", "hada_w1_a")),
    ({"peft_type": "LOKR", "r": 2, "target_modules": ["q_proj"]},
     {key(Q, "lokr_w1_a"): (8, 3), key(Q, "lokr_w1_b"): (3, 8), key(Q, "lokr_w2"): (8, 8)}, key(Q, "lokr_w1_a")),
    ({"peft_type": "LOKR", "r": 2, "target_modules": ["conv"]},
     {key("conv", "lokr_w1"): (3, 2), key("conv", "lokr_t2"): (1, 1, 3, 3), key("conv", "lokr_w2_a"): (2, 4),
      key("conv", "lokr_w2_b"): (2, 2)}, key("conv", "lokr_t2")),
])
def test_rank_axes_equal_the_configs_rank(config: dict[str, Any], shapes: dict[str, Any], where: str) -> None:
    error = only(errors_for(config, shapes), ShapeMismatchError, where)
    assert "rank" in error.message


def test_rank_error_names_rank_pattern() -> None:
    error = errors_for({**LORA, "rank_pattern": {"q_proj": 2}}, lora_pair(r=4))[0]
    assert "rank_pattern=2" in error.message


# -- check 11: partner shapes ------------------------------------------------------------------------
CONV = {**LORA, "target_modules": ["conv"]}


@pytest.mark.parametrize(("config", "shapes", "where"), [
    (LORA, {key(Q, "lora_A.weight"): (4, 64), key(Q, "lora_B.weight"): (64, 4, 1, 1)}, key(Q, "lora_B.weight")),
    (LORA, {key(Q, "lora_A.weight"): (4, 64), key(Q, "lora_B.weight"): (4, 64)}, key(Q, "lora_B.weight")),
    (CONV, {key("conv", "lora_A.weight"): (4, 3, 3, 3), key("conv", "lora_B.weight"): (8, 4, 3, 3)},
     key("conv", "lora_B.weight")),
    ({**LORA, "lora_bias": True}, {**lora_pair(), key(Q, "lora_B.bias"): (32,)}, key(Q, "lora_B.bias")),
    ({**LORA, "use_dora": True}, {**lora_pair(), key(Q, "lora_magnitude_vector"): (1, 64)},
     key(Q, "lora_magnitude_vector")),
    ({**CONV, "use_dora": True}, {key("conv", "lora_A.weight"): (4, 3, 3, 3), key("conv", "lora_B.weight"): (8, 4, 1, 1),
                                   key("conv", "lora_magnitude_vector"): (8,)}, key("conv", "lora_magnitude_vector")),
    ({"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []}, {key(Q, "ia3_l"): (1, 64)},
     key(Q, "ia3_l")),
    ({"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": ["q_proj"]}, {key(Q, "ia3_l"): (64, 1)},
     key(Q, "ia3_l")),
    ({"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []}, {key(Q, "ia3_l"): (2, 64)},
     key(Q, "ia3_l")),
    ({"peft_type": "IA3", "target_modules": ["conv"], "feedforward_modules": []}, {key("conv", "ia3_l"): (8, 1, 1, 1)},
     key("conv", "ia3_l")),
    ({"peft_type": "LOHA", "r": 2, "target_modules": ["q_proj"]},
     {key(Q, n): s for n, s in [("hada_w1_a", (64, 2)), ("hada_w1_b", (2, 64)), ("hada_w2_a", (32, 2)),
                                ("hada_w2_b", (2, 64))]}, key(Q, "hada_w2_a")),
    ({"peft_type": "LOKR", "r": 2, "target_modules": ["v_proj"]},  # out 32 factorises as 4 x 8, not 2 x 16
     {key(V, "lokr_w1"): (2, 8), key(V, "lokr_w2"): (16, 8)}, key(V, "lokr_w1")),
])
def test_partner_shapes_agree(config: dict[str, Any], shapes: dict[str, Any], where: str) -> None:
    only(errors_for(config, shapes), ShapeMismatchError, where)


def test_conv_layouts_of_the_spec_are_accepted() -> None:
    dora = {key("conv", "lora_A.weight"): (4, 3, 3, 3), key("conv", "lora_B.weight"): (8, 4, 1, 1),
            key("conv", "lora_magnitude_vector"): (1, 8, 1, 1)}
    assert errors_for({**CONV, "use_dora": True}, dora) == []
    grouped = {key("conv", "lora_A.weight"): (4, 8, 3, 3), key("conv", "lora_B.weight"): (8, 2, 1, 1)}  # r/g
    assert errors_for(CONV, grouped) == []
    ia3 = {"peft_type": "IA3", "target_modules": ["conv"], "feedforward_modules": []}
    assert errors_for(ia3, {key("conv", "ia3_l"): (1, 8, 1, 1)}) == []
    assert errors_for({**LORA, "target_modules": ["v_proj"], "peft_type": "LOKR"},
                      {key(V, "lokr_w1"): (4, 8), key(V, "lokr_w2"): (8, 8)}) == []


# -- check 12: prompt_embeddings ---------------------------------------------------------------------
def test_prompt_tuning_shape_uses_derived_submodules() -> None:
    cfg = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 16, "task_type": "SEQ_2_SEQ_LM"}
    assert errors_for(cfg, {"prompt_embeddings": (6, 16)}) == []
    only(errors_for(cfg, {"prompt_embeddings": (3, 16)}), ShapeMismatchError, "prompt_embeddings")
    prefix = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "token_dim": 16, "num_attention_heads": 2,
              "num_layers": 2}
    only(errors_for(prefix, {"prompt_embeddings": (3, 30)}), ShapeMismatchError, "prompt_embeddings")
    only(errors_for(prefix, {"prompt_embeddings": (4, 64)}), ShapeMismatchError, "prompt_embeddings")
    # d = 8, not token_dim: a model with num_key_value_heads sets it (SPEC 14.3), checked at load (check 20)
    assert errors_for(prefix, {"prompt_embeddings": (3, 32)}) == []


# -- check 13: dtypes --------------------------------------------------------------------------------
def test_dtypes_by_role() -> None:
    bad = key(Q, "lora_A.weight")
    only(errors_for(LORA, {**lora_pair(), bad: ((4, 64), "F8_E4M3")}), DTypeMismatchError, bad)
    only(errors_for(LORA, {**lora_pair(), bad: ((4, 64), "I64")}), DTypeMismatchError, bad)
    rows = key(EMB, "token_adapter.trainable_tokens_delta")
    only(errors_for({**LORA, "trainable_token_indices": [1]}, {**lora_pair(), rows: ((1, 64), "I32")}),
         DTypeMismatchError, rows)
    assert errors_for({**LORA, "modules_to_save": ["score"]}, {**lora_pair(), key("score", "ids"): ((3,), "BOOL")}) == []


# -- check 14: finite values -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_nonfinite_values_are_reported_by_the_validator(tmp_path: Path, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    tensors = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in lora_tensors().items()}
    bad = key(Q, "lora_B.weight")
    tensors[bad][3, 1] = float("nan") if dtype != "float16" else float("inf")
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(LORA))
    save_torch(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    only(adapterspec.validate_adapter(folder), TensorError, bad)
    assert adapterspec.read_adapter(folder).tensors[bad].shape == (64, 4)  # a reader need not read the data


def test_nonfinite_values_in_an_opted_in_pickle(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v) for k, v in lora_tensors().items()}
    bad = key(Q, "lora_A.weight")
    tensors[bad][0, 0] = float("-inf")
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(LORA))
    torch.save(tensors, folder / "adapter_model.bin")
    only(adapterspec.validate_adapter(folder, allow_pickle=True), TensorError, bad)


def test_finite_folder_has_no_errors(tmp_path: Path) -> None:
    assert adapterspec.validate_adapter(write_folder(tmp_path / "a", LORA, lora_tensors())) == []


# -- check 1 and SPEC 11.2: strict JSON --------------------------------------------------------------
def test_duplicate_keys_in_the_config_are_refused(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "a", LORA, lora_tensors())
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "r": 8, "target_modules": ["q_proj"]}')
    errors = adapterspec.validate_adapter(folder)
    assert [type(e) for e in errors] == [FileFormatError]
    assert "duplicate member name 'r'" in str(errors[0]) and errors[0].path == str(folder / "adapter_config.json")


def test_oversized_config_is_refused(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "a", LORA, lora_tensors())
    (folder / "adapter_config.json").write_text(json.dumps({**LORA, "pad": "x" * (16 * 2**20)}))
    with pytest.raises(FileFormatError) as info:
        adapterspec.read_adapter(folder)
    assert type(info.value) is FileFormatError and info.value.path == str(folder / "adapter_config.json")


def test_cli_refuses_duplicate_keys_in_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"peft_type": "LORA", "target_modules": ["q"], "target_modules": ["v"]}')
    assert main(["validate", str(path), "--format", "json"]) == 1
    error = json.loads(capsys.readouterr().out)["results"][0]["errors"][0]
    assert error["type"] == "FileFormatError" and "'target_modules'" in error["message"]


# -- check 6 and SPEC 11.2: no name twice in the safetensors header ----------------------------------
def _rewrite_header(folder: Path, members: Callable[[dict[str, Any]], list[tuple[str, Any]]]) -> None:
    """Write the weights' header as the members ``members(header)`` gives, in that order (a name may repeat; names
    are written between quotes as they are, escapes included, and a ``str`` value as the JSON text it is)."""
    path = folder / "adapter_model.safetensors"
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    text = "{" + ", ".join(f'"{k}": {v if isinstance(v, str) else json.dumps(v)}'
                           for k, v in members(json.loads(blob[8:8 + n]))) + "}"
    raw = text.encode() + b" " * (-len(text) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + n:])


A_KEY, B_KEY = key(Q, "lora_A.weight"), key(Q, "lora_B.weight")
_DUPLICATES = {  # safetensors itself keeps the last of each and says nothing
    "tensor twice, same entry": (lambda h: [("__metadata__", h["__metadata__"]), (A_KEY, h[A_KEY]), (B_KEY, h[B_KEY]),
                                            (A_KEY, h[A_KEY])], A_KEY, f"declares tensor {A_KEY!r} twice"),
    "tensor twice, first elsewhere": (lambda h: [("__metadata__", h["__metadata__"]),
                                                 (A_KEY, h[A_KEY] | {"data_offsets": h[B_KEY]["data_offsets"],
                                                                     "shape": h[B_KEY]["shape"][::-1]}),
                                                 (A_KEY, h[A_KEY]), (B_KEY, h[B_KEY])], A_KEY,
                                      f"declares tensor {A_KEY!r} twice"),
    "tensor twice, spelled with escapes": (lambda h: [("__metadata__", h["__metadata__"]), (A_KEY, h[A_KEY]),
                                                      (B_KEY, h[B_KEY]), (A_KEY.replace(".", "\\u002e"), json.dumps(
                                                          h[A_KEY]).replace("data_offsets", "data\\u005foffsets"))],
                                           A_KEY, f"declares tensor {A_KEY!r} twice"),
    "metadata member twice": (lambda h: [("__metadata__", '{"format": "pt", "format": "pt"}'), (A_KEY, h[A_KEY]),
                                         (B_KEY, h[B_KEY])], None, "__metadata__ names 'format' twice"),
}


@pytest.mark.parametrize("case", sorted(_DUPLICATES))
def test_a_name_twice_in_the_safetensors_header_is_refused(tmp_path: Path, case: str) -> None:
    """Python's json and safetensors keep the last member of a name silently: the file read as the last entry
    says (before: read_adapter loaded it, validate_adapter returned [])."""
    members, where, said = _DUPLICATES[case]
    folder = write_folder(tmp_path / "a", LORA, lora_tensors())
    _rewrite_header(folder, members)
    weights = folder / "adapter_model.safetensors"
    errors = adapterspec.validate_adapter(folder)
    assert [type(e) for e in errors] == [FileFormatError], errors
    assert errors[0].key == where and errors[0].path == str(weights) and said in errors[0].message
    assert "save the file again" in str(errors[0])
    with pytest.raises(FileFormatError, match="twice"):
        adapterspec.read_adapter(folder)


def test_a_header_with_escapes_and_no_name_twice_is_read(tmp_path: Path) -> None:
    """Escapes in the header (a quote in a metadata value, a name spelled with \\u) take the parse, not the count."""
    folder = write_folder(tmp_path / "a", LORA, lora_tensors(), metadata={"format": "pt", "note": 'a "quoted" word'})
    _rewrite_header(folder, lambda h: [(k.replace(".", "\\u002e"), v) for k, v in h.items()])
    assert b"\\u002e" in (folder / "adapter_model.safetensors").read_bytes()
    assert adapterspec.validate_adapter(folder) == []
    loaded = adapterspec.read_adapter(folder).load_tensors()
    assert all(np.array_equal(loaded[k], v) for k, v in lora_tensors().items()) and len(loaded) == 2


# -- check 4: SPEC 4.2 rules beyond the schema -------------------------------------------------------
@pytest.mark.parametrize(("changes", "pointer"), [
    ({"target_modules": ".*(q_proj"}, "/target_modules"),
    ({"exclude_modules": "[a-"}, "/exclude_modules"),
    ({"rank_pattern": {"q(": 2}}, "/rank_pattern/q("),
    ({"alpha_pattern": {"v)": 2}}, "/alpha_pattern/v)"),
    ({"layers_to_transform": [0], "layers_pattern": "lay(ers"}, "/layers_pattern"),
    ({"modules_to_save": ["score", "cls["]}, "/modules_to_save/1"),
])
def test_every_regex_must_compile(changes: dict[str, Any], pointer: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({**LORA, **changes})
    assert type(info.value) is ConfigError and info.value.pointer == pointer and pointer in str(info.value)


def test_ia3_feedforward_regex_must_compile() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"peft_type": "IA3", "target_modules": "q", "feedforward_modules": "(q"})
    assert info.value.pointer == "/feedforward_modules"


def test_ia3_feedforward_modules_are_targeted() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"peft_type": "IA3", "target_modules": ["q_proj", "down_proj"],
                         "feedforward_modules": ["down_proj", "up_proj"]})
    assert type(info.value) is ConfigError and info.value.pointer == "/feedforward_modules/1"
    assert "'up_proj'" in str(info.value)
    validate_config({"peft_type": "IA3", "target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]})


def test_prefix_token_dim_divisible_by_heads() -> None:
    cfg = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "num_layers": 2, "num_attention_heads": 3}
    with pytest.raises(ConfigError) as info:
        validate_config({**cfg, "token_dim": 16})
    assert type(info.value) is ConfigError and info.value.pointer == "/token_dim" and "/token_dim" in str(info.value)
    validate_config({**cfg, "token_dim": 12})


# -- check 5: features no v1 reader implements -------------------------------------------------------
@pytest.mark.parametrize(("changes", "pointer"), [
    ({"alora_invocation_tokens": [5, 6]}, "/alora_invocation_tokens"),
    ({"use_qalora": True}, "/use_qalora"),
    ({"monteclora_config": {}}, "/monteclora_config"),
    ({"layer_replication": [[0, 2]]}, "/layer_replication"),
    ({"use_bdlora": {}}, "/use_bdlora"),
    ({"arrow_config": {}}, "/arrow_config"),
    ({"kasa_config": {}}, "/kasa_config"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"], "use_dora": True}, "/use_dora"),  # PEFT refuses it (15.1)
    ({"target_parameters": ["mlp.experts.gate_up_proj"], "lora_dropout": 0.1}, "/lora_dropout"),
])
def test_unsupported_lora_variants_are_refused_by_readers(tmp_path: Path, changes: dict[str, Any],
                                                          pointer: str) -> None:
    cfg = {**LORA, **changes}
    validate_config(cfg)  # schema-valid: kept and round-tripped, just not applied
    assert [p for p, _ in unsupported_features(cfg)] == [pointer]
    folder = write_folder(tmp_path / "a", cfg, lora_tensors())
    with pytest.raises(UnsupportedError) as info:
        adapterspec.read_adapter(folder)
    assert type(info.value) is UnsupportedError and info.value.pointer == pointer and pointer in str(info.value)
    assert UnsupportedError in [type(e) for e in adapterspec.validate_adapter(folder)]


def test_defaults_are_supported() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterSpecWarning)
        full = AdapterConfig.from_dict(LORA)  # every field at PEFT's default
    assert unsupported_features(full) == []


@pytest.mark.parametrize(("changes", "pointer"), [
    ({"num_transformer_submodules": 2}, "/num_transformer_submodules"),
    ({"task_type": "SEQ_2_SEQ_LM"}, "/task_type"),
])
def test_encoder_decoder_prompt_learning_is_read(tmp_path: Path, changes: dict[str, Any], pointer: str) -> None:
    """Spec 1.1 defines encoder-decoder prompt learning (SPEC.md 15.9): no longer refused by readers (check 5)."""
    cfg = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 16, **changes}
    folder = write_folder(tmp_path / "p", cfg, {"prompt_embeddings": values((6, 16))})
    assert adapterspec.read_adapter(folder).tensors["prompt_embeddings"].shape == (6, 16)
    assert [e for e in adapterspec.validate_adapter(folder) if pointer in str(e)] == []


# -- SPEC 2.3 and 9: metadata ------------------------------------------------------------------------
def test_metadata_version_differing_from_the_config_warns(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "a", {**LORA, "adapterspec_version": "1.0"}, lora_tensors(),
                          metadata={"format": "pt", "adapterspec_version": "0.9"})
    with pytest.warns(AdapterSpecWarning, match=r"metadata records adapterspec_version '0\.9'.*version governs"):
        adapterspec.read_adapter(folder)
    same = write_folder(tmp_path / "b", LORA, lora_tensors(), metadata={"format": "pt", "adapterspec_version": "1.0"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterSpecWarning)
        adapterspec.read_adapter(same)  # absent in the config means 1.0: no warning


def test_malformed_checksum_is_a_file_format_error(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "a", LORA, lora_tensors(),
                          metadata={"format": "pt", "adapterspec_sha256": "ABC"})
    errors = adapterspec.validate_adapter(folder)
    assert [type(e) for e in errors] == [FileFormatError] and "adapterspec_sha256" in errors[0].message


# -- check 17: the manifest --------------------------------------------------------------------------
def _several(tmp_path: Path, manifest: dict[str, Any] | str) -> Path:
    root = tmp_path / "several"
    write_folder(root, LORA, lora_tensors())
    write_folder(root / "sql", LORA, lora_tensors())
    text = manifest if isinstance(manifest, str) else json.dumps({"adapterspec_version": "1.0", **manifest})
    (root / "adapterspec.json").write_text(text)
    return root


def test_manifest_default_must_be_listed(tmp_path: Path) -> None:
    root = _several(tmp_path, {"adapters": {"default": {"path": "."}, "sql": {"path": "sql"}}, "default": "chat"})
    with pytest.raises(ConfigError) as info:
        adapterspec.list_adapters(root)
    assert type(info.value) is ConfigError and info.value.pointer == "/default" and "'chat'" in str(info.value)


def test_manifest_paths_are_distinct(tmp_path: Path) -> None:
    root = _several(tmp_path, {"adapters": {"default": {"path": "."}, "sql": {"path": "sql"}, "sql2": {"path": "sql"}}})
    with pytest.raises(ConfigError) as info:
        adapterspec.list_adapters(root)
    assert type(info.value) is ConfigError and info.value.pointer == "/adapters/sql2/path"


def test_manifest_names_differ_in_more_than_case(tmp_path: Path) -> None:
    (tmp_path / "several" / "SQL").mkdir(parents=True)
    root = _several(tmp_path, {"adapters": {"sql": {"path": "sql"}, "SQL": {"path": "SQL"}}})
    write_folder(root / "SQL", LORA, lora_tensors())
    with pytest.raises(ConfigError) as info:
        adapterspec.list_adapters(root)
    assert info.value.pointer == "/adapters/SQL"


def test_manifest_schema_violation_is_a_config_error_with_pointer(tmp_path: Path) -> None:
    root = _several(tmp_path, {"adapters": {"sql": {"path": 5}}})
    with pytest.raises(ConfigError) as info:
        adapterspec.list_adapters(root)
    assert type(info.value) is ConfigError and info.value.pointer == "/adapters/sql/path"


def test_manifest_duplicate_keys_and_size(tmp_path: Path) -> None:
    root = _several(tmp_path, '{"adapterspec_version": "1.0", "adapters": {"sql": {"path": "sql"}}, '
                              '"adapters": {"x": {"path": "sql"}}}')
    with pytest.raises(FileFormatError, match="duplicate member name 'adapters'"):
        adapterspec.list_adapters(root)
    (root / "adapterspec.json").write_text(" " * (16 * 2**20 + 1))
    with pytest.raises(FileFormatError, match="larger than"):
        adapterspec.list_adapters(root)


def test_peft_folder_skips_subfolders_with_invalid_names(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "peft", LORA, lora_tensors())
    write_folder(root / "fr", LORA, lora_tensors())
    write_folder(root / "bad name", LORA, lora_tensors())
    with pytest.warns(AdapterSpecWarning, match="'bad name' is not a valid adapter name"):
        assert sorted(adapterspec.list_adapters(root)) == ["default", "fr"]


# -- the new core modules' examples ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adapterspec._method_checks", "adapterspec._rules", "adapterspec._finite"])
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0 and result.attempted > 0


# -- PEFT 0.21.2 writes them, adapterspec validate accepts them --------------------------------------
def _peft_configs(peft: Any) -> dict[str, tuple[str, Any]]:
    lora = {"r": 4, "init_lora_weights": False}
    return {
        "bias_lora_only": ("causal", peft.LoraConfig(target_modules=["q_proj", "v_proj"], bias="lora_only", **lora)),
        "bias_all_modules_to_save": ("seq_cls", peft.LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"],
                                                                bias="all", modules_to_save=["up_proj"], **lora)),
        "modules_to_save": ("causal", peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"], **lora)),
        "embed_targeted": ("causal", peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], **lora)),
        "embed_dora": ("causal", peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True, **lora)),
        "trainable_tokens": ("causal", peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7],
                                                       **lora)),
        "trainable_tokens_by_name": ("causal", peft.LoraConfig(target_modules=["q_proj"],
                                                               trainable_token_indices={"embed_tokens": [2, 3]}, **lora)),
        "velora": ("causal", peft.LoraConfig(target_modules=["q_proj"], velora_config=peft.VeloraConfig(), **lora)),
        "rank_pattern": ("causal", peft.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                   rank_pattern={"v_proj": 2}, **lora)),
        "loha": ("causal", peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"])),
        "lokr": ("causal", peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], decompose_both=True)),
        "prompt": ("causal", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        "conv_lora": ("conv", peft.LoraConfig(target_modules=["conv", "gconv", "c1", "lin"], **lora)),
        "conv_dora": ("conv", peft.LoraConfig(target_modules=["conv", "c1", "lin"], use_dora=True, **lora)),
        "conv_ia3": ("conv", peft.IA3Config(target_modules=["conv", "c11", "lin"], feedforward_modules=["conv"])),
        "conv_loha": ("conv", peft.LoHaConfig(r=2, target_modules=["conv", "c1", "c11", "lin"],
                                              use_effective_conv2d=True)),
        "conv_lokr": ("conv", peft.LoKrConfig(r=1, target_modules=["conv", "c1", "c11", "lin"],
                                              use_effective_conv2d=True, decompose_both=True)),
        "conv_lokr_factor": ("conv", peft.LoKrConfig(r=1, target_modules=["conv", "c1", "lin"], decompose_factor=2)),
    }


def _models() -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, attention_bias=True, mlp_bias=True, pad_token_id=0)

    class Conv(torch.nn.Module):  # every conv layout of SPEC 6: kernel 3 and 1, Conv1d, groups
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 12, 3)
            self.gconv = torch.nn.Conv2d(8, 8, 3, groups=2)
            self.c1 = torch.nn.Conv1d(4, 6, 3)
            self.c11 = torch.nn.Conv2d(12, 8, 1)
            self.lin = torch.nn.Linear(16, 10)

    return {"causal": lambda: LlamaForCausalLM(cfg), "seq_cls": lambda: LlamaForSequenceClassification(cfg),
            "conv": Conv}


@pytest.fixture(scope="module")
def more_peft_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("peft_more")
    models, folders, configs = _models(), {}, _peft_configs(peft)
    assert sorted(configs) == sorted(PEFT_FOLDERS)
    for name, (kind, config) in configs.items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(models[kind](), config).save_pretrained(root / name)
        folders[name] = root / name
    return folders


EXPECTED_AUXILIARY = {  # what each PEFT folder must contain, so that the test exercises the rule it names
    "bias_lora_only": ".self_attn.q_proj.base_layer.bias",
    "bias_all_modules_to_save": ".mlp.up_proj.original_module.bias",
    "modules_to_save": "base_model.model.lm_head.weight",
    "embed_targeted": "embed_tokens.base_layer.weight",
    "trainable_tokens": "embed_tokens.token_adapter.trainable_tokens_delta",
    "velora": ".lora_velora_embed",
    "conv_dora": "conv.lora_magnitude_vector",
    "conv_lokr": "conv.lokr_t2",
    "conv_loha": "conv.hada_t1",
}


PEFT_FOLDERS = ["bias_lora_only", "bias_all_modules_to_save", "modules_to_save", "embed_targeted", "embed_dora",
                "trainable_tokens", "trainable_tokens_by_name", "velora", "rank_pattern", "loha", "lokr", "prompt",
                "conv_lora", "conv_dora", "conv_ia3", "conv_loha", "conv_lokr", "conv_lokr_factor"]


@pytest.mark.parametrize("name", PEFT_FOLDERS)
def test_peft_written_folder_validates(more_peft_folders: dict[str, Path], name: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = more_peft_folders[name]
    if name in EXPECTED_AUXILIARY:
        assert any(EXPECTED_AUXILIARY[name] in k for k in adapterspec.read_adapter(folder).tensors)
    assert main(["validate", str(folder)]) == 0, capsys.readouterr().out
    assert "1 valid, 0 invalid" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix"])
def test_shared_peft_folders_still_validate(peft_folders: dict[str, Path], method: str) -> None:
    assert adapterspec.validate_adapter(peft_folders[method]) == []


def test_integral_floats_become_integers_only_where_the_schema_types_an_integer() -> None:
    """SPEC.md 4.1: ``8.0`` is an integer and readers convert it; a number field keeps its float."""
    cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "r": 8.0, "lora_alpha": 16.0,
                                   "rank_pattern": {"q": 2.0}, "layers_to_transform": [0.0, 1],
                                   "lora_dropout": 0.0})
    assert (cfg["r"], cfg["rank_pattern"], cfg["layers_to_transform"]) == (8, {"q": 2}, [0, 1])
    assert all(type(v) is int for v in (cfg["r"], cfg["rank_pattern"]["q"], *cfg["layers_to_transform"]))
    assert type(cfg["lora_alpha"]) is float and type(cfg["lora_dropout"]) is float
    written = json.loads(cfg.to_json())
    assert written["r"] == 8 and type(written["r"]) is int and type(written["lora_alpha"]) is float


def test_pattern_keys_keep_their_order_when_written_the_rest_is_sorted() -> None:
    cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "rank_pattern": {"z": 2, "a": 3},
                                   "alpha_pattern": {"b\\.q": 1, "q": 4}, "loftq_config": {"z": 1, "a": 2}})
    text = cfg.to_json()
    assert list(json.loads(text)["rank_pattern"]) == ["z", "a"]
    assert list(json.loads(text)["alpha_pattern"]) == ["b\\.q", "q"]
    assert list(json.loads(text)["loftq_config"]) == ["a", "z"]
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert AdapterConfig.from_dict(json.loads(text)).to_json() == text


@pytest.mark.parametrize(("task", "listed", "acting"), [
    ("SEQ_CLS", None, ["classifier", "score"]),
    ("TOKEN_CLS", ["dense"], ["dense", "classifier", "score"]),
    ("QUESTION_ANS", ["qa_outputs"], ["qa_outputs"]),
    ("CAUSAL_LM", None, None),
])
def test_a_task_heads_are_modules_to_save_and_written_as_they_were(task: str, listed: Any, acting: Any) -> None:
    cfg = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "task_type": task,
                                   "modules_to_save": listed})
    assert cfg["modules_to_save"] == acting
    assert json.loads(cfg.to_json())["modules_to_save"] == listed
    from adapterspec.targets import is_modules_to_save

    assert is_modules_to_save(cfg, "bert.classifier") is (acting is not None and "classifier" in acting)
