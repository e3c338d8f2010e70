"""HRA (SPEC.md 17.3) exact against PEFT 0.21 in both directions, merge and unmerge included; refusals typed.

Each case: a PEFT model with element-unique Householder vectors is saved; ``adapterspec.load_adapter`` gives PEFT's
outputs on a fresh copy of the base; ``save_adapter`` writes byte-equal tensors that PEFT loads with nothing
missing or unexpected and the same outputs; merging gives PEFT's merged outputs and unmerging (the reflections in
reverse order) restores the weights.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_same_snapshot,
    fresh,
    logits,
    peft_load,
    peft_reference,
    snapshot,
)

LLAMA = ["q_proj", "v_proj", "up_proj", "down_proj"]


def vectors(shape: tuple[int, ...], salt: int) -> Any:
    """Element-unique values whose columns are linearly independent (a quadratic phase: ``unique_values``' columns,
    sines of one frequency, span two dimensions only, which Gram-Schmidt cannot orthonormalise stably)."""
    k = torch.arange(math.prod(shape), dtype=torch.float64)
    return torch.sin(1.0 + salt * 0.37 + k * 0.731 + k * k * 0.013).reshape(shape).to(torch.float32)


def _fill(model: Any, *, adapter: str = "", salt: int = 0) -> None:
    """Element-unique Householder vectors (independent columns: the reflections are far from cancelling)."""
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "hra_u" in name and f".{adapter}" in name:
                param.copy_(vectors(tuple(param.shape), salt + index))


def _cases() -> list[Any]:
    from peft import HRAConfig

    return [
        pytest.param("llama", lambda: HRAConfig(r=4, target_modules=LLAMA), id="llama"),
        pytest.param("llama", lambda: HRAConfig(r=3, apply_GS=True, target_modules=["k_proj", "o_proj", "gate_proj"]),
                     id="llama-gs-odd-r"),
        pytest.param("bert", lambda: HRAConfig(r=2, target_modules=["query", "value", "dense"], task_type="SEQ_CLS",
                                               modules_to_save=["classifier"]), id="bert"),
        pytest.param("cnn", lambda: HRAConfig(r=2, target_modules=["conv1", "conv2", "head"]), id="cnn-conv3x3-1x1"),
        pytest.param("cnn", lambda: HRAConfig(r=4, apply_GS=True, target_modules=["conv1", "head"]), id="cnn-gs"),
    ]


def _inputs(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "cnn":
        return {"x": request.getfixturevalue("image_inputs")}
    return request.getfixturevalue("token_inputs")


def _run(model: Any, kind: str, inputs: dict[str, Any]) -> Any:
    if kind == "cnn":
        with torch.no_grad():
            return model(inputs["x"])
    return logits(model, inputs)


@pytest.mark.parametrize(("kind", "make_config"), _cases())
def test_peft_folder_roundtrip(kind: str, make_config: Any, request: pytest.FixtureRequest, tmp_path: Any,
                               caplog: pytest.LogCaptureFixture) -> None:
    base = request.getfixturevalue(kind)
    inputs = _inputs(kind, request)
    reference = peft_reference(base, make_config(), tmp_path / "peft", fill=_fill)
    expected = _run(reference, kind, inputs)
    base_out = _run(base, kind, inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    # PEFT folder -> adapterspec: the same operations as PEFT's (measured equal), fp32 rounding allowed
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(_run(model, kind, inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(_run(model, kind, inputs), base_out, atol=0)

    # adapterspec -> folder: byte-equal tensors, the same config
    adapterspec.save_adapter(model, tmp_path / "ours")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config

    # folder -> PEFT: no warning of its own, nothing missing or unexpected, the same outputs
    from peft.utils import get_peft_model_state_dict

    _, said_peft = peft_load(base, tmp_path / "peft", caplog)
    loaded, said_ours = peft_load(base, tmp_path / "ours", caplog)
    assert said_ours == said_peft
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(saved)
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key]), key
    assert_close(_run(loaded, kind, inputs), expected)

    # merge: PEFT's merged outputs; unmerge (reverse reflections): the base weights back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = _run(reference, kind, inputs)
    adapterspec.merge_adapters(model)
    assert_close(_run(model, kind, inputs), merged_expected)
    assert_close(_run(model, kind, inputs), expected)
    adapterspec.unmerge_adapters(model)
    restored = {k.replace(".base_layer.", ".").replace(".original_module.", "."): v
                for k, v in model.state_dict().items()}
    for key, value in base.state_dict().items():
        assert_close(restored[key], value, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.unmerge_adapter()
    peft_restored = {k.replace(".base_layer.", ".").replace(".original_module.", ".").replace("base_model.model.", "", 1): v
                     for k, v in reference.state_dict().items()}
    for key, value in base.state_dict().items():  # PEFT's unmerge rounds the same way: the same weights
        assert_close(restored[key], peft_restored[key], atol=1e-6)
    assert_close(_run(model, kind, inputs), expected)


def test_a_transposed_or_swapped_tensor_changes_the_output(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """The file's layout [in, r] is read as PEFT's: a square hra_u transposed, or two modules' swapped, differ."""
    from safetensors.torch import save_file

    reference = peft_reference(llama, peft.HRAConfig(r=64, target_modules=["q_proj", "k_proj"]), tmp_path / "a",
                               fill=_fill)
    expected = logits(reference, token_inputs)
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj.hra_u"
    k = "base_model.model.model.layers.0.self_attn.k_proj.hra_u"
    assert tuple(tensors[q].shape) == (64, 64)
    for name, change in (("t", {q: tensors[q].t().contiguous()}), ("s", {q: tensors[k], k: tensors[q]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
        save_file({**tensors, **change}, str(tmp_path / name / "adapter_model.safetensors"))
        model = fresh(llama)
        adapterspec.load_adapter(model, tmp_path / name)
        assert (logits(model, token_inputs) - expected).abs().max() > 1e-3, name


def test_missing_and_unexpected_tensors_are_refused(llama: Any, tmp_path: Any) -> None:
    from safetensors.torch import save_file

    peft_reference(llama, peft.HRAConfig(r=2, target_modules=["q_proj"]), tmp_path / "a", fill=_fill)
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj.hra_u"
    for name, changed, error in (
            ("missing", {k: v for k, v in tensors.items() if k != q}, adapterspec.MissingTensorError),
            ("extra", {**tensors, q.replace("hra_u", "hra_v"): tensors[q].clone()}, adapterspec.AdapterSpecError),
            ("rank", {**tensors, q: torch.ones(64, 3)}, adapterspec.ShapeMismatchError),
            ("rows", {**tensors, q: torch.ones(32, 2)}, adapterspec.ShapeMismatchError)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
        save_file(changed, str(tmp_path / name / "adapter_model.safetensors"))
        model = fresh(llama)
        before = snapshot(model)
        with pytest.raises(error) as info:
            adapterspec.load_adapter(model, tmp_path / name)
        assert "q_proj" in str(info.value), (name, info.value)
        assert_same_snapshot(model, before)


def _refused(base: Any, folder: Any, needle: str) -> UnsupportedError:
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, folder)
    assert needle in str(info.value)
    assert_same_snapshot(model, before)
    return info.value


@pytest.mark.parametrize("bias", ["all", "hra_only"])
def test_bias_is_refused(bias: str, llama: Any, tmp_path: Any) -> None:
    peft_reference(llama, peft.HRAConfig(r=2, target_modules=["q_proj"], bias=bias), tmp_path, fill=_fill)
    assert _refused(llama, tmp_path, "/bias").pointer == "/bias"
    assert any("/bias" in str(e) for e in adapterspec.validate_adapter(tmp_path))


def test_odd_convolutions_and_other_layers_are_refused(tmp_path: Any) -> None:
    """PEFT's unmerged HRA convolution ignores dilation and uses padding[0]/stride[0]: such layers are refused."""
    for name, layer in (("dilated", torch.nn.Conv2d(2, 3, 3, dilation=2)),
                        ("strided", torch.nn.Conv2d(2, 3, 3, stride=(1, 2))),
                        ("reflect", torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")),
                        ("rect", torch.nn.Conv2d(2, 3, (1, 3))), ("conv1d", torch.nn.Conv1d(2, 3, 3)),
                        ("embedding", torch.nn.Embedding(5, 4))):
        model = torch.nn.Sequential()
        model.add_module("layer", layer)
        before = snapshot(model)
        with pytest.raises(UnsupportedError) as info:
            adapterspec.inject_adapter(model, {"peft_type": "HRA", "r": 2, "target_modules": ["layer"]})
        assert info.value.key == "layer", name
        assert_same_snapshot(model, before)


def test_hra_with_gpt2_conv1d_is_refused_as_peft_refuses(gpt2: Any) -> None:
    with pytest.raises(TypeError):
        peft.get_peft_model(fresh(gpt2), peft.HRAConfig(r=2, target_modules=["c_attn"]))
    model = fresh(gpt2)
    with pytest.raises(UnsupportedError, match="HRA cannot adapt"):
        adapterspec.inject_adapter(model, {"peft_type": "HRA", "r": 2, "target_modules": ["c_attn"]})


def test_hra_and_lora_on_one_layer_refuse_to_run_together(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    from peft import HRAConfig, LoraConfig

    peft_reference(llama, HRAConfig(r=2, target_modules=["q_proj"]), tmp_path / "hra", fill=_fill)
    peft_reference(llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "hra", "h")
    adapterspec.load_adapter(model, tmp_path / "lora", "l")
    before = snapshot(model)
    for names in (["h", "l"], ["l", "h"]):
        with pytest.raises(UnsupportedError, match="cannot run together") as info:
            adapterspec.set_active_adapters(model, names)
        assert info.value.key == "model.layers.0.self_attn.q_proj" and "['h']" in info.value.message
        assert_same_snapshot(model, before)


def test_two_hra_adapters_compose_like_peft(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """Active together: ``W @ H_a @ H_b`` in the active order (PEFT's); merged in order, unmerged in reverse."""
    config = peft.HRAConfig(r=2, target_modules=["q_proj", "v_proj"])
    reference = peft_reference(llama, config, tmp_path / "a", fill=_fill)
    reference.add_adapter("b", config)
    _fill(reference, adapter="b", salt=7)
    reference.save_pretrained(str(tmp_path / "ab"))
    reference.base_model.set_adapter(["default", "b"])
    expected = logits(reference, token_inputs)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "ab")
    adapterspec.load_adapter(model, tmp_path / "ab" / "b", "b")
    adapterspec.set_active_adapters(model, ["default", "b"])
    assert_close(logits(model, token_inputs), expected)
    reference.base_model.set_adapter(["b", "default"])
    adapterspec.set_active_adapters(model, ["b", "default"])
    swapped = logits(reference, token_inputs)
    assert (swapped - expected).abs().max() > 1e-4  # the order matters
    assert_close(logits(model, token_inputs), swapped)
    adapterspec.merge_adapters(model)
    assert_close(logits(model, token_inputs), swapped)
    adapterspec.unmerge_adapters(model)
    assert_close(logits(model, token_inputs), swapped)
    adapterspec.set_active_adapters(model, ["default"])
    adapterspec.delete_adapter(model, "b")
    reference.base_model.set_adapter("default")
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))


@pytest.mark.parametrize("config", [
    pytest.param({"peft_type": "HRA", "r": 4, "target_modules": ["q_proj", "down_proj"]}, id="even-r"),
    pytest.param({"peft_type": "HRA", "r": 3, "target_modules": ["v_proj"]}, id="odd-r"),
    pytest.param({"peft_type": "HRA", "r": 2, "apply_GS": True, "init_weights": False,
                  "target_modules": ["v_proj"]}, id="gs-random"),
])
def test_inject_draws_peft_s_values_and_trains_what_peft_trains(config: dict[str, Any], llama: Any,
                                                                token_inputs: Any) -> None:
    """With one seed the fresh hra_u is PEFT's, bit for bit (torch's generator, PEFT's draws in PEFT's order); an
    even r with init_weights starts at the identity (each column repeated: the reflections cancel)."""
    from peft import HRAConfig, get_peft_model

    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), HRAConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    model = fresh(llama)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapterspec.inject_adapter(model, config, trainable=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == reference.get_nb_trainable_parameters()[0]
    ours = {k.replace(".adapter_weights.default.hra_u", ".hra_u"): v for k, v in model.state_dict().items() if "hra_u" in k}
    theirs = {k.removeprefix("base_model.model.").replace(".hra_u.default", ".hra_u"): v
              for k, v in reference.state_dict().items() if "hra_u" in k}
    assert sorted(ours) == sorted(theirs) and ours
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert_close(logits(model, token_inputs), logits(reference.eval(), token_inputs))
    if config["r"] % 2 == 0 and config.get("init_weights", True):
        assert_close(logits(model, token_inputs), logits(llama, token_inputs))


def test_inject_of_gram_schmidt_at_peft_s_identity_init_is_refused(llama: Any) -> None:
    """PEFT repeats each column twice; Gram-Schmidt then normalises a column that is zero up to rounding."""
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.inject_adapter(model, {"peft_type": "HRA", "r": 2, "apply_GS": True, "target_modules": ["q_proj"]})
    assert info.value.pointer == "/apply_GS"
    assert_same_snapshot(model, before)


def _grads_by_key(model: Any, peft_names: bool) -> dict[str, Any]:
    if peft_names:
        return {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                for n, p in model.named_parameters() if p.requires_grad and "hra_u" in n}
    from adapterspec_torch import AdapterLayer

    return {f"{path}.{param}": tensor.grad for path, module in model.named_modules()
            if isinstance(module, AdapterLayer) for param, tensor in module.adapter_params("default").items()}


@pytest.mark.parametrize("apply_gs", [False, True])
def test_gradients_equal_peft(apply_gs: bool, llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    config = peft.HRAConfig(r=2, apply_GS=apply_gs, target_modules=["q_proj", "up_proj"])
    reference = peft_reference(llama, config, tmp_path, fill=_fill).train()
    reference(**token_inputs).logits.square().mean().backward()
    expected = _grads_by_key(reference, True)
    model = fresh(llama).train()
    adapterspec.load_adapter(model, tmp_path, trainable=True)
    model(**token_inputs).logits.square().mean().backward()
    got = _grads_by_key(model, False)
    assert sorted(got) == sorted(expected) and len(got) >= 4
    for key, grad in expected.items():
        assert grad is not None and grad.abs().max() > 0, key
        assert_close(got[key], grad, atol=1e-5 * float(grad.abs().max()))


def test_an_injected_adapter_saved_loads_in_peft_silently(llama: Any, token_inputs: Any, tmp_path: Any,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "HRA", "r": 3, "target_modules": ["q_proj", "up_proj"],
                                       "init_weights": False})
    expected = logits(model, token_inputs)
    assert (expected - logits(llama, token_inputs)).abs().max() > 1e-3
    adapterspec.save_adapter(model, tmp_path)
    loaded, said = peft_load(llama, tmp_path, caplog)
    assert not [m for m in said if "HRA" in m or "Unexpected" in m or "missing" in m.lower()], said
    assert_close(logits(loaded, token_inputs), expected)


def test_bfloat16_base_equals_peft_unmerged_and_merged(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """PEFT's dtype policy (fp32 adapter on a bf16 base, the weight product in fp32, the output cast back)."""
    from peft import PeftModel

    peft_reference(llama, peft.HRAConfig(r=2, target_modules=["q_proj", "up_proj"]), tmp_path, fill=_fill)
    base = fresh(llama).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(base), str(tmp_path)).eval()
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    assert {p.dtype for n, p in model.named_parameters() if "adapter_weights" in n} == {torch.float32}
    assert_close(logits(model, token_inputs).float(), logits(reference, token_inputs).float(), atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert_close(logits(model, token_inputs).float(), logits(reference, token_inputs).float(), atol=0)


def test_docstring_examples() -> None:
    import doctest

    from adapterspec_torch import hra

    result = doctest.testmod(hra, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0 and result.attempted >= 8


def test_null_target_modules_take_peft_default_and_a_dtype_option_is_peft_s(llama: Any, token_inputs: Any,
                                                                            tmp_path: Any) -> None:
    """``target_modules: null`` resolves from PEFT's HRA table (llama: q_proj, v_proj); ``dtype=float64`` keeps the
    adapter in float64 as PEFT's casts do (the weight product in hra_u's dtype, the output cast back)."""
    peft_reference(llama, peft.HRAConfig(r=2, target_modules=None), tmp_path, fill=_fill)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": None}))
    assert adapterspec.validate_adapter(tmp_path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(fresh(llama), str(tmp_path)).eval()
    expected = logits(reference, token_inputs)
    model = fresh(llama)
    modules = adapterspec.load_adapter(model, tmp_path)
    assert sorted(modules) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert_close(logits(model, token_inputs), expected)
    wide = fresh(llama)
    adapterspec.load_adapter(wide, tmp_path, dtype=torch.float64)
    assert {p.dtype for n, p in wide.named_parameters() if "adapter_weights" in n} == {torch.float64}
    for module in reference.modules():
        if hasattr(module, "hra_u"):
            module.hra_u.double()
    assert_close(logits(wide, token_inputs), logits(reference, token_inputs))
