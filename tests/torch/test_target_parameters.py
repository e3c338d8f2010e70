"""LoRA on parameters (``target_parameters``, SPEC.md 15.1) exact against PEFT 0.21 in both directions.

Architectures: tiny random Mixtral and Qwen3-MoE (``target_modules="all-linear"``: PEFT adds the 3-D expert stacks
``gate_up_proj`` [experts, 2 * inter, hidden] and ``down_proj`` and the router's 2-D ``gate.weight``, nesting two
wrappers on ``mlp.experts``), and a dense Llama with 2-D weights targeted as parameters. Each case: PEFT's folder
loads with PEFT's outputs; our save has byte-equal tensors under the same keys, and PEFT loads it with nothing
missing or unexpected, no warning of its own and the same outputs; merging gives PEFT's merged outputs.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec.errors import TargetNotFoundError, UnsupportedError  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_peft_loads_ours,
    assert_same_snapshot,
    assert_saved_as_peft_saved,
    fresh,
    logits,
    peft_reference,
    snapshot,
)


def _mixtral() -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(5)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


def _qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(6)
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                            max_position_embeddings=64)
    return Qwen3MoeForCausalLM(config).eval()


_MODELS: dict[str, Any] = {}


def _model(kind: str, request: pytest.FixtureRequest) -> Any:
    if kind == "llama":
        return request.getfixturevalue("llama")
    if kind not in _MODELS:
        _MODELS[kind] = _mixtral() if kind == "mixtral" else _qwen3_moe()
    return _MODELS[kind]


def _cases() -> list[Any]:
    from peft import LoraConfig

    return [
        pytest.param("mixtral", lambda: LoraConfig(r=2, lora_alpha=6, target_modules="all-linear"),
                     id="mixtral-all-linear"),
        pytest.param("qwen3_moe", lambda: LoraConfig(r=3, lora_alpha=5, target_modules="all-linear"),
                     id="qwen3-moe-all-linear"),
        pytest.param("qwen3_moe", lambda: LoraConfig(r=2, target_modules=["q_proj"],
                                                     target_parameters=["mlp.experts.down_proj"],
                                                     rank_pattern={"down_proj": 3}, alpha_pattern={"down_proj": 7},
                                                     use_rslora=True),
                     id="qwen3-moe-one-parameter-patterns"),
        pytest.param("llama", lambda: LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                 target_parameters=["self_attn.q_proj.weight", "mlp.down_proj.weight"]),
                     id="llama-2d-parameters"),
        pytest.param("llama", lambda: LoraConfig(r=2, target_modules=["v_proj"], target_parameters=["o_proj.weight"]),
                     id="llama-modules-and-parameters"),
    ]


@pytest.fixture(scope="module")
def moe_inputs() -> dict[str, Any]:
    ids = (torch.arange(2 * 7).reshape(2, 7) * 11) % 128
    return {"input_ids": ids, "attention_mask": torch.ones(2, 7, dtype=torch.long)}


@pytest.mark.parametrize(("kind", "make_config"), _cases())
def test_peft_folder_roundtrip(kind: str, make_config: Any, request: pytest.FixtureRequest, tmp_path: Any,
                               moe_inputs: Any, caplog: pytest.LogCaptureFixture) -> None:
    base = _model(kind, request)
    reference = peft_reference(base, make_config(), tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["target_parameters"], "PEFT must have targeted parameters for the case to mean anything"
    expected = logits(reference, moe_inputs)
    base_out = logits(base, moe_inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    # PEFT folder -> adapterspec
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, moe_inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, moe_inputs), base_out, atol=0)

    # adapterspec -> folder: byte-equal tensors under the same keys, the same config
    adapterspec.save_adapter(model, tmp_path / "ours")
    saved = assert_saved_as_peft_saved(tmp_path / "peft", tmp_path / "ours")

    # folder -> PEFT: no warning of its own, nothing missing or unexpected, the same outputs
    loaded = assert_peft_loads_ours(base, tmp_path / "peft", tmp_path / "ours", caplog, moe_inputs, expected)

    # merge: PEFT's merged outputs; unmerge: the base weights back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = logits(reference, moe_inputs)
    adapterspec.merge_adapters(model)
    assert_close(logits(model, moe_inputs), merged_expected)
    adapterspec.unmerge_adapters(model)
    restored = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_weights" not in k}
    for key, value in base.state_dict().items():
        assert_close(restored[key], value, atol=1e-6)
    assert_close(logits(model, moe_inputs), expected)


def test_keys_follow_peft_nesting(request: pytest.FixtureRequest, tmp_path: Any) -> None:
    """The first targeted parameter in registration order is PEFT's innermost wrapper: ``base_layer.`` once."""
    from peft import LoraConfig

    base = _model("mixtral", request)
    peft_reference(base, LoraConfig(r=2, target_modules=[], target_parameters=["gate_up_proj", "down_proj"]),
                   tmp_path)
    keys = sorted(k for k in load_file(tmp_path / "adapter_model.safetensors") if "layers.0." in k)
    assert keys == [f"base_model.model.model.layers.0.mlp.experts.{p}" for p in (
        "base_layer.lora_A.weight", "base_layer.lora_B.weight", "lora_A.weight", "lora_B.weight")]
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    experts = model.model.layers[0].mlp.experts
    hidden, inter = 32, 48
    shapes = {k: tuple(v.shape) for k, v in experts.adapter_params("default").items()}
    assert shapes == {"base_layer.lora_A.weight": (2 * 4, hidden), "base_layer.lora_B.weight": (2 * inter, 2 * 4),
                      "lora_A.weight": (2 * 4, inter), "lora_B.weight": (hidden, 2 * 4)}


def test_two_adapters_add_up_like_peft(request: pytest.FixtureRequest, tmp_path: Any, moe_inputs: Any) -> None:
    from peft import LoraConfig

    base = _model("qwen3_moe", request)
    config = LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"])
    reference = peft_reference(base, config, tmp_path / "a")
    reference.add_adapter("b", config)
    from torch_helpers import unique_values

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(reference.named_parameters())):
            if ".b." in name:
                param.copy_(unique_values(tuple(param.shape), 100 + index, scale=0.05))
    reference.save_pretrained(str(tmp_path / "both"), selected_adapters=["b"])
    reference.base_model.set_adapter(["default", "b"])
    expected = logits(reference, moe_inputs)
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "a")
    adapterspec.load_adapter(model, tmp_path / "both" / "b", "b")
    adapterspec.set_active_adapters(model, ["default", "b"])
    assert_close(logits(model, moe_inputs), expected)
    adapterspec.delete_adapter(model, "b")
    adapterspec.delete_adapter(model, "default")
    restored = {k: v for k, v in model.state_dict().items()}
    assert sorted(restored) == sorted(base.state_dict())
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"


@pytest.mark.parametrize(("field", "value"), [("lora_dropout", 0.1), ("use_dora", True), ("lora_bias", True),
                                              ("fan_in_fan_out", True)])
def test_options_peft_refuses_with_parameters_are_refused(field: str, value: Any, request: pytest.FixtureRequest,
                                                          tmp_path: Any) -> None:
    from peft import LoraConfig

    base = _model("qwen3_moe", request)
    peft_reference(base, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["down_proj"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match=f"/{field}"):
        adapterspec.load_adapter(model, tmp_path)
    assert_same_snapshot(model, before)
    assert any(f"/{field}" in str(e) for e in adapterspec.validate_adapter(tmp_path))


@pytest.mark.parametrize(("targets", "pointer"), [("all-linear", "/target_modules"),
                                                  (["q_proj", "w1", "w3"], "/target_modules/1")])
def test_configs_peft_rewrites_for_moe_are_refused(targets: Any, pointer: str, request: pytest.FixtureRequest,
                                                   tmp_path: Any) -> None:
    """PEFT 0.21 rewrites these on transformers 5 MoE models (leaf names, v4 expert names to parameters)."""
    from peft import LoraConfig

    base = _model("mixtral", request)
    peft_reference(base, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": targets}))
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, tmp_path)
    assert info.value.pointer == pointer
    assert_same_snapshot(model, before)


def test_a_parameter_that_selects_nothing_is_refused(llama: Any, tmp_path: Any) -> None:
    from peft import LoraConfig

    peft_reference(llama, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["o_proj.weight"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_parameters": ["o_proj.nothing"]}))
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises((TargetNotFoundError, adapterspec.errors.UnexpectedTensorError)):
        adapterspec.load_adapter(model, tmp_path)
    assert_same_snapshot(model, before)


def test_a_module_adapted_and_targeted_by_parameter_is_refused(llama: Any, tmp_path: Any) -> None:
    from peft import LoraConfig

    peft_reference(llama, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["o_proj.weight"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_parameters": ["q_proj.weight"]}))
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match="q_proj"):
        adapterspec.load_adapter(model, tmp_path)
    assert_same_snapshot(model, before)


def test_wrong_expert_count_is_a_shape_error(request: pytest.FixtureRequest, tmp_path: Any) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    base = _model("qwen3_moe", request)
    peft_reference(base, LoraConfig(r=2, target_modules=[], target_parameters=["down_proj"]), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    tensors[key] = tensors[key][:6].contiguous()  # 3 experts' rows instead of 4
    key_b = key.replace("lora_A", "lora_B")
    tensors[key_b] = tensors[key_b][:, :6].contiguous()
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    assert adapterspec.validate_adapter(tmp_path) == []  # consistent on its own: the model decides
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(adapterspec.errors.ShapeMismatchError, match="lora_A"):
        adapterspec.load_adapter(model, tmp_path)
    assert_same_snapshot(model, before)


def test_docstring_examples() -> None:
    import doctest

    from adapterspec_torch import parameters

    result = doctest.testmod(parameters, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0 and result.attempted > 0


def test_unload_with_merge_keeps_the_deltas(request: pytest.FixtureRequest, tmp_path: Any, moe_inputs: Any) -> None:
    from peft import LoraConfig

    base = _model("mixtral", request)
    reference = peft_reference(base, LoraConfig(r=2, target_modules="all-linear"), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = logits(reference.merge_and_unload(), moe_inputs)
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    adapterspec.merge_adapters(model)
    plain = adapterspec.unload(model, merge=True)
    assert type(plain.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert sorted(plain.state_dict()) == sorted(base.state_dict())
    assert_close(logits(plain, moe_inputs), expected)


def test_moe_rewrite_table_is_peft_s() -> None:
    """The model types whose configs PEFT 0.21 rewrites (SPEC.md 15.1) are PEFT's own: those its conversion maps
    to a fused MoE pattern and transformers 5 converts -- qwen2_moe not among them (its gate_proj/up_proj/down_proj
    name the shared expert's linear layers and load as written)."""
    from peft.utils import transformers_weight_conversion as conversion
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from adapterspec._moe import MOE_RENAMED, check_moe_conversion

    rewritten = {model_type: set(conversion._MOE_TARGET_MODULE_MAPPING[pattern])
                 for model_type, pattern in conversion._MODEL_TO_CONVERSION_PATTERN.items()
                 if pattern in conversion._MOE_TARGET_MODULE_MAPPING and conversion._MOE_FUSED_TARGETS.get(pattern)
                 and model_type.islower() and get_checkpoint_conversion_mapping(model_type) is not None}
    assert {model_type: set(names) for model_type, names in MOE_RENAMED.items()} == rewritten
    check_moe_conversion(adapterspec.AdapterConfig.from_dict(
        {"peft_type": "LORA", "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"]}), "qwen2_moe")
