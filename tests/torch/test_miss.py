"""MiSS (SPEC.md 17.2) exact against PEFT 0.21.2 in both directions, its three modes, merge included; refusals typed.

Each case: a PEFT model with element-unique ``miss_block`` values is saved; ``adapterspec.load_adapter`` gives
PEFT's outputs on a fresh copy of the base; ``save_adapter`` writes byte-equal tensors that PEFT loads with nothing
missing or unexpected and the same outputs; merging gives PEFT's merged outputs and unmerging restores the weights.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import ShapeMismatchError, UnsupportedError  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_peft_loads_ours,
    assert_same_snapshot,
    assert_saved_as_peft_saved,
    fresh,
    logits,
    peft_reference,
    snapshot,
    unique_values,
)


def _fill(model: Any, *, adapter: str = "", salt: int = 0) -> None:
    """Element-unique blocks far from zero (bat: tiles around 0 with scale 0.1, so I + B stays invertible)."""
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "miss_block" in name and f".{adapter}" in name:
                param.copy_(unique_values(tuple(param.shape), salt + index, scale=0.1 if param.dim() == 3 else 0.05))


def _cases() -> list[Any]:
    from peft import MissConfig

    return [
        pytest.param("llama", lambda: MissConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]), id="block"),
        pytest.param("llama", lambda: MissConfig(r=6, target_modules=["q_proj", "up_proj", "down_proj"],
                                                 init_weights=False), id="block-padded"),
        pytest.param("llama", lambda: MissConfig(r=8, mini_r=4, init_weights="mini",
                                                 target_modules=["k_proj", "o_proj", "gate_proj"]), id="mini"),
        pytest.param("llama", lambda: MissConfig(r=5, mini_r=16, init_weights="mini", target_modules=["q_proj", "up_proj"]),
                     id="mini-padded"),
        pytest.param("llama", lambda: MissConfig(r=8, init_weights="bat", target_modules=["q_proj", "k_proj", "down_proj"]),
                     id="bat"),
        pytest.param("bert", lambda: MissConfig(r=16, init_weights="bat", target_modules=["query", "value", "dense"],
                                                task_type="SEQ_CLS", modules_to_save=["classifier"]), id="bert-bat"),
        pytest.param("bert", lambda: MissConfig(r=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS",
                                                modules_to_save=["classifier"]), id="bert-block"),
    ]


@pytest.mark.parametrize(("kind", "make_config"), _cases())
def test_peft_folder_roundtrip(kind: str, make_config: Any, request: pytest.FixtureRequest, tmp_path: Any,
                               token_inputs: Any, caplog: pytest.LogCaptureFixture) -> None:
    base = request.getfixturevalue(kind)
    reference = peft_reference(base, make_config(), tmp_path / "peft", fill=_fill)
    expected = logits(reference, token_inputs)
    base_out = logits(base, token_inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, token_inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, token_inputs), base_out, atol=0)

    adapterspec.save_adapter(model, tmp_path / "ours")
    assert_saved_as_peft_saved(tmp_path / "peft", tmp_path / "ours")
    assert_peft_loads_ours(base, tmp_path / "peft", tmp_path / "ours", caplog, token_inputs, expected)

    # merge: PEFT's merged outputs; unmerge: the base weights back (bat through a float32 inverse: its rounding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged_expected = logits(reference, token_inputs)
    adapterspec.merge_adapters(model)
    assert_close(logits(model, token_inputs), merged_expected)
    assert_close(logits(model, token_inputs), expected, atol=1e-4)
    peft_weights = {k.replace(".base_layer.", "."): v for k, v in reference.base_model.model.state_dict().items()
                    if "miss_block" not in k and "modules_to_save" not in k and "original_module" not in k}
    ours = {k.replace(".base_layer.", ".").replace(".original_module.", "."): v for k, v in model.state_dict().items()}
    for key, value in peft_weights.items():
        assert torch.equal(ours[key], value), key  # the same operations: the merged weights are PEFT's bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    restored = {k.replace(".base_layer.", ".").replace(".original_module.", "."): v
                for k, v in model.state_dict().items()}
    peft_restored = {k.replace(".base_layer.", "."): v for k, v in reference.base_model.model.state_dict().items()}
    for key, value in base.state_dict().items():
        if key not in peft_restored:  # a module saved whole (PEFT's copy under modules_to_save)
            continue
        assert torch.equal(restored[key], peft_restored[key]), key  # PEFT's unmerge, bit for bit
        assert_close(restored[key], value, atol=1e-5)
    assert_close(logits(model, token_inputs), expected)


def _refused(base: Any, folder: Any, needle: str) -> UnsupportedError:
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, folder)
    assert needle in str(info.value)
    assert_same_snapshot(model, before)
    return info.value


@pytest.mark.parametrize("bias", ["all", "miss_only"])
def test_trained_biases_are_refused(bias: str, llama: Any, tmp_path: Any) -> None:
    peft_reference(llama, peft.MissConfig(r=8, target_modules=["q_proj"], bias=bias), tmp_path, fill=_fill)
    _refused(llama, tmp_path, "/bias")
    assert any("/bias" in str(e) for e in adapterspec.validate_adapter(tmp_path))


@pytest.mark.parametrize(("config", "needle"), [
    pytest.param({"r": 12, "init_weights": "bat", "target_modules": ["k_proj"]}, "/r", id="bat-r-not-dividing"),
    pytest.param({"r": 65, "target_modules": ["q_proj"]}, "/r", id="r-over-in"),
    pytest.param({"r": 4, "init_weights": "mini", "mini_r": 3, "target_modules": ["q_proj"]}, "/mini_r",
                 id="mini-r-not-dividing"),
])
def test_layers_peft_refuses_are_refused(config: dict[str, Any], needle: str, llama: Any) -> None:
    from peft import MissConfig, get_peft_model

    with pytest.raises(ValueError), warnings.catch_warnings():  # PEFT refuses these layers too
        warnings.simplefilter("ignore")
        get_peft_model(fresh(llama), MissConfig(**config))
    model = fresh(llama)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.inject_adapter(model, {"peft_type": "MISS", **config})
    assert info.value.pointer == needle
    assert_same_snapshot(model, before)


def test_a_gpt2_conv1d_is_refused(gpt2: Any) -> None:
    """PEFT's MiSS adapts torch.nn.Linear only (TypeError on transformers' Conv1D)."""
    model = fresh(gpt2)
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match="MISS cannot adapt"):
        adapterspec.inject_adapter(model, {"peft_type": "MISS", "r": 8, "target_modules": ["c_attn"]})
    assert_same_snapshot(model, before)


def test_tensor_shapes_are_checked(llama: Any, tmp_path: Any) -> None:
    """A transposed block, a block of another mode, a missing and an unexpected tensor: named errors."""
    import json

    from safetensors.torch import load_file, save_file

    peft_reference(llama, peft.MissConfig(r=8, target_modules=["q_proj", "k_proj"]), tmp_path, fill=_fill)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.k_proj.miss_block"
    transposed = dict(tensors, **{key: tensors[key].T.contiguous()})
    save_file(transposed, tmp_path / "adapter_model.safetensors")
    errors = adapterspec.validate_adapter(tmp_path)
    assert [e.key for e in errors] == [key] and isinstance(errors[0], ShapeMismatchError)
    _refused_any(llama, tmp_path, key)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"init_weights": "bat"}))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    assert {e.key for e in adapterspec.validate_adapter(tmp_path)} == {k for k in tensors}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if k != key} | {key.replace("miss_block", "miss_b"): tensors[key]},
              tmp_path / "adapter_model.safetensors")
    found = {(type(e).__name__, e.key) for e in adapterspec.validate_adapter(tmp_path)}
    assert ("UnexpectedTensorError", key.replace("miss_block", "miss_b")) in found


def _refused_any(base: Any, folder: Any, needle: str) -> None:
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(adapterspec.AdapterSpecError) as info:
        adapterspec.load_adapter(model, folder)
    assert needle in str(info.value)
    assert_same_snapshot(model, before)


def test_two_modes_on_one_layer_are_refused(llama: Any, tmp_path: Any) -> None:
    """PEFT 0.21.2 sets a layer's MiSS mode from its first adapter and runs later ones in it (a bat block read as a
    plain one): refused, the model unchanged."""
    peft_reference(llama, peft.MissConfig(r=8, init_weights="bat", target_modules=["q_proj"]), tmp_path / "bat",
                   fill=_fill)
    peft_reference(llama, peft.MissConfig(r=8, target_modules=["q_proj"]), tmp_path / "block", fill=_fill)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "bat", "a")
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        adapterspec.load_adapter(model, tmp_path / "block", "b")
    assert info.value.pointer == "/init_weights"
    assert_same_snapshot(model, before)


def test_miss_and_lora_on_one_layer_refuse_to_run_together(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    peft_reference(llama, peft.MissConfig(r=8, target_modules=["q_proj"]), tmp_path / "miss", fill=_fill)
    peft_reference(llama, peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "miss", "m")
    adapterspec.load_adapter(model, tmp_path / "lora", "l")
    before = snapshot(model)
    for names in (["m", "l"], ["l", "m"]):
        with pytest.raises(UnsupportedError, match="cannot run together") as info:
            adapterspec.set_active_adapters(model, names)
        assert info.value.key == "model.layers.0.self_attn.q_proj"
        assert_same_snapshot(model, before)
    assert logits(model, token_inputs).shape == (2, 9, 128)


@pytest.mark.parametrize("make_config", [
    pytest.param(lambda: peft.MissConfig(r=6, target_modules=["q_proj", "v_proj"]), id="block"),
    pytest.param(lambda: peft.MissConfig(r=8, init_weights="bat", target_modules=["q_proj", "v_proj"]), id="bat"),
])
def test_two_adapters_compose_like_peft(make_config: Any, llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """Active together: block terms add up (on the input padded by each in turn); bat blocks transform the weight
    one after the other, each from the weight the previous one made; merged and unmerged as PEFT."""
    reference = peft_reference(llama, make_config(), tmp_path / "a", fill=_fill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.add_adapter("b", make_config())
    _fill(reference, adapter="b", salt=7)
    reference.save_pretrained(str(tmp_path / "ab"))
    reference.base_model.set_adapter(["default", "b"])
    expected = logits(reference, token_inputs)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "ab")
    adapterspec.load_adapter(model, tmp_path / "ab" / "b", "b")
    adapterspec.set_active_adapters(model, ["default", "b"])
    assert_close(logits(model, token_inputs), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))


@pytest.mark.parametrize("config", [
    pytest.param({"r": 8, "target_modules": ["q_proj", "down_proj"]}, id="block"),
    pytest.param({"r": 6, "init_weights": "mini", "mini_r": 8, "target_modules": ["q_proj", "down_proj"]}, id="mini"),
    pytest.param({"r": 8, "init_weights": "bat", "target_modules": ["q_proj", "down_proj"]}, id="bat"),
])
def test_inject_starts_at_the_identity_and_trains_what_peft_trains(config: dict[str, Any], llama: Any,
                                                                   token_inputs: Any) -> None:
    from peft import MissConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), MissConfig(**config))
    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "MISS", **config})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == reference.get_nb_trainable_parameters()[0]
    assert_close(logits(model, token_inputs), logits(llama, token_inputs), atol=1e-6)


def test_init_weights_false_draws_peft_s_noise(llama: Any, tmp_path: Any) -> None:
    """A falsy init_weights: kaiming-uniform blocks from torch's generator, in PEFT's order -- the same tensors."""
    from peft import MissConfig, get_peft_model

    config = {"r": 8, "init_weights": False, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), MissConfig(**config))
    model = fresh(llama)
    torch.manual_seed(11)
    adapterspec.inject_adapter(model, {"peft_type": "MISS", **config})
    adapterspec.save_adapter(model, tmp_path)
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "adapter_model.safetensors")
    theirs = get_peft_model_state_dict(reference)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert value.abs().max() > 0 and torch.equal(ours[key], value), key


def _grads(model: Any, peft_names: bool) -> dict[str, Any]:
    if peft_names:
        return {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                for n, p in model.named_parameters() if p.requires_grad and "miss_block" in n}
    from adapterspec_torch import AdapterLayer

    return {f"{path}.{param}": tensor.grad for path, module in model.named_modules()
            if isinstance(module, AdapterLayer) for param, tensor in module.adapter_params("default").items()}


@pytest.mark.parametrize("make_config", [
    pytest.param(lambda: peft.MissConfig(r=6, target_modules=["q_proj", "up_proj"]), id="block"),
    pytest.param(lambda: peft.MissConfig(r=8, mini_r=4, init_weights="mini", target_modules=["q_proj", "up_proj"]),
                 id="mini"),
    pytest.param(lambda: peft.MissConfig(r=8, init_weights="bat", target_modules=["q_proj", "up_proj"]), id="bat"),
])
def test_gradients_equal_peft(make_config: Any, llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    reference = peft_reference(llama, make_config(), tmp_path, fill=_fill).train()
    reference(**token_inputs).logits.square().mean().backward()
    expected = _grads(reference, True)
    model = fresh(llama).train()
    adapterspec.load_adapter(model, tmp_path, trainable=True)
    model(**token_inputs).logits.square().mean().backward()
    got = _grads(model, False)
    assert sorted(got) == sorted(expected) and len(got) >= 4
    for key, grad in expected.items():
        assert grad is not None and grad.abs().max() > 0, key
        assert_close(got[key], grad, atol=1e-5 * float(grad.abs().max()))


def test_miss_dropout_while_training_is_peft_s(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """miss_dropout drops entries of the padded input, PEFT's draws in PEFT's order: one seed, the same outputs."""
    reference = peft_reference(llama, peft.MissConfig(r=6, miss_dropout=0.3, target_modules=["q_proj", "up_proj"]),
                               tmp_path, fill=_fill)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))
    reference.train()
    model.train()
    outputs = []
    for run in (reference, model):
        torch.manual_seed(7)
        outputs.append(logits(run, token_inputs))
    assert_close(outputs[1], outputs[0])
    torch.manual_seed(8)
    assert (logits(model, token_inputs) - outputs[1]).abs().max() > 1e-4


@pytest.mark.parametrize("config", [
    pytest.param({"r": 6, "target_modules": ["q_proj", "up_proj"]}, id="block"),
    pytest.param({"r": 8, "init_weights": "bat", "target_modules": ["q_proj", "up_proj"]}, id="bat"),
])
def test_an_injected_adapter_saved_loads_in_peft_silently(config: dict[str, Any], llama: Any, token_inputs: Any,
                                                           tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    from torch_helpers import peft_load

    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "MISS", **config})
    for layer in model.modules():
        for name, param in layer.named_parameters(recurse=False):
            if "miss_block" in name:
                with torch.no_grad():
                    param.copy_(unique_values(tuple(param.shape), len(name), scale=0.1))
    expected = logits(model, token_inputs)
    adapterspec.save_adapter(model, tmp_path)
    loaded, said = peft_load(llama, tmp_path, caplog)
    assert said == []
    assert_close(logits(loaded, token_inputs), expected)


def test_docstring_examples() -> None:
    import doctest

    from adapterspec import _miss
    from adapterspec_torch import miss

    for module, least in ((miss, 8), (_miss, 5)):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
        assert result.failed == 0 and result.attempted >= least


@pytest.mark.parametrize("init", [True, "bat"])
def test_a_bfloat16_base_runs_like_peft(init: Any, llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """On a bfloat16 base PEFT keeps the blocks in float32 (autocast_adapter_dtype) and computes the term (block
    mode) or the transformed weight (bat) in float32: the same operations, the same bfloat16 logits."""
    peft_reference(llama, peft.MissConfig(r=8, init_weights=init, target_modules=["q_proj", "up_proj"]), tmp_path,
                   fill=_fill)
    base = fresh(llama).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(fresh(base), str(tmp_path)).eval()
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    blocks = [p for n, p in model.named_parameters() if "miss_block" in n]
    assert blocks and all(p.dtype == torch.float32 for p in blocks)
    expected = logits(reference, token_inputs)
    assert (logits(model, token_inputs).float() - expected.float()).abs().max() <= 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    theirs = {k.replace(".base_layer.", "."): v for k, v in reference.base_model.model.state_dict().items()}
    ours = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
    assert {k for k in ours if "miss_block" not in k} == {k for k in theirs if "miss_block" not in k}
    for name, value in ours.items():
        if "miss_block" not in name:
            assert torch.equal(value, theirs[name]), name  # PEFT's merge into bfloat16, bit for bit


def test_switch_and_delete(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """Two MiSS adapters of one mode: each alone gives its PEFT logits; deleting both gives the base back."""
    expected = {}
    for name, salt, r in (("a", 0, 8), ("b", 5, 6)):
        reference = peft_reference(llama, peft.MissConfig(r=r, target_modules=["q_proj", "down_proj"]),
                                   tmp_path / name, fill=lambda m, s=salt: _fill(m, salt=s))
        expected[name] = logits(reference, token_inputs)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "a", "a")
    adapterspec.load_adapter(model, tmp_path / "b", "b")
    for name in ("b", "a", "b"):
        adapterspec.set_active_adapters(model, [name])
        assert_close(logits(model, token_inputs), expected[name])
    adapterspec.delete_adapter(model, "a")
    adapterspec.delete_adapter(model, "b")
    assert_close(logits(model, token_inputs), logits(llama, token_inputs), atol=0)


def test_null_target_modules_take_peft_default_for_the_architecture(llama: Any, token_inputs: Any,
                                                                    tmp_path: Any) -> None:
    """PEFT's MiSS table is a copy of LoRA's (llama: q_proj, v_proj); a null target_modules loads as PEFT loads it."""
    import json

    peft_reference(llama, peft.MissConfig(r=8), tmp_path, fill=_fill)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    path.write_text(json.dumps({**config, "target_modules": None}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = logits(peft.PeftModel.from_pretrained(fresh(llama), str(tmp_path)).eval(), token_inputs)
    model = fresh(llama)
    modules = adapterspec.load_adapter(model, tmp_path)
    assert sorted(modules) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert_close(logits(model, token_inputs), expected)
