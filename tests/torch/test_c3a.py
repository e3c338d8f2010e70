"""C3A (SPEC.md 17.7) exact against PEFT 0.21.2 in both directions, merge included; refusals typed, model unchanged.

A PEFT model with element-unique ``c3a_kernel`` values is saved; ``adapterspec.load_adapter`` gives PEFT's outputs
on a fresh copy of the base (the same float32 FFT operations: bit-equal); ``save_adapter`` writes byte-equal tensors
that PEFT loads silently; merging gives PEFT's merged weights bit for bit, unmerging PEFT's restored ones.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import ConfigError, ShapeMismatchError, UnsupportedError  # noqa: E402
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
    """Element-unique kernels, large enough that the term (divided by ``in``) moves the logits."""
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "c3a_kernel" in name and f".{adapter}" in name:
                param.copy_(unique_values(tuple(param.shape), salt + index, scale=2.0))


def _state(model: Any) -> dict[str, Any]:
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "c3a_kernel" not in k}


@pytest.mark.parametrize("make_config", [
    pytest.param(lambda: peft.C3AConfig(block_size=16, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"]),
                 id="block16"),
    pytest.param(lambda: peft.C3AConfig(block_size=8, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"],
                                        block_size_pattern={"k_proj": 32, "layers.1.self_attn.q_proj": 4,
                                                            "model.layers.0.self_attn.o_proj": 64}),
                 id="pattern"),
])
def test_peft_folder_roundtrip(make_config: Any, llama: Any, tmp_path: Any, token_inputs: Any,
                               caplog: pytest.LogCaptureFixture) -> None:
    reference = peft_reference(llama, make_config(), tmp_path / "peft", fill=_fill)
    expected = logits(reference, token_inputs)
    base_out = logits(llama, token_inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert torch.equal(logits(model, token_inputs), expected)  # PEFT's operations: bit-equal
    with adapterspec.disabled_adapters(model):
        assert torch.equal(logits(model, token_inputs), base_out)

    adapterspec.save_adapter(model, tmp_path / "ours")
    assert_saved_as_peft_saved(tmp_path / "peft", tmp_path / "ours")
    assert_peft_loads_ours(llama, tmp_path / "peft", tmp_path / "ours", caplog, token_inputs, expected)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
    assert_close(logits(model, token_inputs), expected, atol=1e-4)
    theirs, ours = _state(reference.base_model.model), _state(model)
    assert theirs.keys() == ours.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key  # PEFT's merged weights, bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    theirs, ours = _state(reference.base_model.model), _state(model)
    for key, value in llama.state_dict().items():
        assert torch.equal(ours[key], theirs[key]), key  # PEFT's unmerge (the same rounded delta subtracted)
        assert_close(ours[key], value, atol=1e-6)


def _refused(base: Any, folder: Any, pointer: str | None = None, *, kind: type = UnsupportedError) -> Any:
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(kind) as info:
        adapterspec.load_adapter(model, folder)
    if pointer is not None:
        assert info.value.pointer == pointer, str(info.value)
    assert_same_snapshot(model, before)
    return info.value


def test_refusals_name_the_field(llama: Any, gpt2: Any, tmp_path: Any) -> None:
    """Trained biases (/bias), a block size PEFT refuses on a layer (/block_size, /block_size_pattern), a GPT-2 Conv1D
    (PEFT: TypeError), a kernel of another block size (ShapeMismatchError naming the key): refused, model unchanged."""
    from peft import C3AConfig, get_peft_model

    peft_reference(llama, C3AConfig(block_size=16, target_modules=["q_proj"], bias="all"), tmp_path / "b", fill=_fill)
    _refused(llama, tmp_path / "b", "/bias")
    assert any(e.pointer == "/bias" for e in adapterspec.validate_adapter(tmp_path / "b"))
    for config, pointer in (({"block_size": 24, "target_modules": ["q_proj"]}, "/block_size"),
                            ({"block_size": 16, "block_size_pattern": {"q_proj": 48}, "target_modules": ["q_proj"]},
                             "/block_size_pattern")):
        with pytest.raises(ValueError), warnings.catch_warnings():  # PEFT refuses these layers too
            warnings.simplefilter("ignore")
            get_peft_model(fresh(llama), C3AConfig(**config))
        model = fresh(llama)
        before = snapshot(model)
        with pytest.raises(UnsupportedError) as info:
            adapterspec.inject_adapter(model, {"peft_type": "C3A", **config})
        assert info.value.pointer == pointer and info.value.key == "model.layers.0.self_attn.q_proj"
        assert_same_snapshot(model, before)
    model = fresh(gpt2)
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match="C3A cannot adapt a .*Conv1D"):
        adapterspec.inject_adapter(model, {"peft_type": "C3A", "block_size": 16, "target_modules": ["c_fc"]})
    assert_same_snapshot(model, before)
    with pytest.raises(ConfigError, match="init_weights"):  # PEFT raises on it at load too
        adapterspec.inject_adapter(fresh(llama), {"peft_type": "C3A", "init_weights": "orthogonal",
                                                  "target_modules": ["q_proj"], "block_size": 16})

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "s"
    peft_reference(llama, C3AConfig(block_size=16, target_modules=["q_proj", "k_proj"]), folder, fill=_fill)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"block_size": 8}))
    errors = adapterspec.validate_adapter(folder)
    assert errors and all(isinstance(e, ShapeMismatchError) and e.key.endswith("c3a_kernel") for e in errors)
    _refused(llama, folder, kind=adapterspec.AdapterSpecError)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.k_proj.c3a_kernel"
    save_file(dict(tensors, **{key: tensors[key].transpose(0, 1).contiguous()}), folder / "adapter_model.safetensors")
    error = _refused(llama, folder, kind=adapterspec.AdapterSpecError)
    assert key in str(error) or "k_proj" in str(error)


def test_block_size_pattern_order_and_lazy_keys_as_peft(llama: Any, tmp_path: Any, token_inputs: Any) -> None:
    """block_size_pattern as PEFT 0.21.2 reads it: the first key in the file's order wins ({"v_proj": 8, ".*_proj":
    16}: v_proj 8, q_proj 16); a key that does not compile fails only where a module reaches it ("q_proj(" after
    ".*_proj" loads in PEFT, first it raises). PEFT's save sorts the members (".*_proj" first: v_proj would reload
    as 16); save_adapter keeps the order it loaded, and PEFT reloads that file with the same outputs."""
    from peft import C3AConfig, PeftModel

    pattern = {"v_proj": 8, ".*_proj": 16, "q_proj(": 4}
    reference = peft_reference(llama, C3AConfig(block_size=32, target_modules=["q_proj", "v_proj"],
                                                block_size_pattern=pattern), tmp_path / "peft", fill=_fill)
    assert reference.base_model.model.model.layers[0].self_attn.v_proj.block_size["default"] == 8
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert list(config["block_size_pattern"]) == sorted(pattern)  # PEFT's save sorts them
    config_path.write_text(json.dumps(config | {"block_size_pattern": pattern}))  # the in-memory order
    expected = logits(reference, token_inputs)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, token_inputs), expected, atol=1e-6)
    saved = adapterspec.save_adapter(model, tmp_path / "ours")
    assert list(json.loads((saved / "adapter_config.json").read_text())["block_size_pattern"]) == list(pattern)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(fresh(llama), str(saved)).eval()
    assert_close(logits(reloaded, token_inputs), expected, atol=1e-6)
    config_path.write_text(json.dumps(config | {"block_size_pattern": {"q_proj(": 4, **pattern}}))
    _refused(llama, tmp_path / "peft", "/block_size_pattern")


def test_two_c3a_adapters_or_c3a_with_lora_on_one_layer_are_refused(llama: Any, token_inputs: Any,
                                                                    tmp_path: Any) -> None:
    """PEFT's C3A forward feeds one active adapter's term into the next (its unmerged result differs from its merged
    one); C3A with another method: PEFT holds one method per layer. Refused at activation, model unchanged; each
    adapter alone gives its PEFT logits."""
    expected = {}
    for name, salt in (("a", 0), ("b", 5)):
        ref = peft_reference(llama, peft.C3AConfig(block_size=16, target_modules=["q_proj"]), tmp_path / name,
                             fill=lambda m, s=salt: _fill(m, salt=s))
        expected[name] = logits(ref, token_inputs)
    peft_reference(llama, peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora")
    model = fresh(llama)
    for name in ("a", "b", "lora"):
        adapterspec.load_adapter(model, tmp_path / name, name)
    before = snapshot(model)
    for names in (["a", "b"], ["b", "a"], ["a", "lora"], ["lora", "b"]):
        with pytest.raises(UnsupportedError, match="cannot run together") as info:
            adapterspec.set_active_adapters(model, names)
        assert info.value.key == "model.layers.0.self_attn.q_proj"
        assert_same_snapshot(model, before)
    for name in ("a", "b"):
        adapterspec.set_active_adapters(model, [name])
        assert torch.equal(logits(model, token_inputs), expected[name])
    adapterspec.delete_adapter(model, "a")
    adapterspec.delete_adapter(model, "b")
    adapterspec.delete_adapter(model, "lora")
    assert torch.equal(logits(model, token_inputs), logits(llama, token_inputs))


@pytest.mark.parametrize("init", ["xavier_uniform", "gaussian", "kaiming_uniform", False, True])
def test_inject_draws_peft_s_values_and_trains_what_peft_trains(init: Any, llama: Any, tmp_path: Any) -> None:
    from peft import C3AConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    config = {"block_size": 16, "init_weights": init, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), C3AConfig(**config))
    model = fresh(llama)
    torch.manual_seed(11)
    adapterspec.inject_adapter(model, {"peft_type": "C3A", **config})
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        reference.get_nb_trainable_parameters()[0]
    adapterspec.save_adapter(model, tmp_path)
    ours = load_file(tmp_path / "adapter_model.safetensors")
    theirs = get_peft_model_state_dict(reference)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert (value.abs().max() > 0) == (init is not True) and torch.equal(ours[key], value), key


def test_gradients_equal_peft(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """PEFT's hand-written backward, operation for operation: the kernels' gradients equal PEFT's. Its input gradient
    is not its forward's (SPEC.md 17.7), so layer 0's kernels (upstream of layer 1's C3A layers) differ under plain
    autograd: this test fails with an autograd-only forward."""
    reference = peft_reference(llama, peft.C3AConfig(block_size=16, target_modules=["q_proj", "up_proj"]), tmp_path,
                               fill=_fill).train()
    reference(**token_inputs).logits.square().mean().backward()
    expected = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                for n, p in reference.named_parameters() if p.requires_grad}
    model = fresh(llama).train()
    adapterspec.load_adapter(model, tmp_path, trainable=True)
    model(**token_inputs).logits.square().mean().backward()
    from adapterspec_torch import AdapterLayer

    got = {f"{path}.{param}": tensor.grad for path, module in model.named_modules()
           if isinstance(module, AdapterLayer) for param, tensor in module.adapter_params("default").items()}
    assert sorted(got) == sorted(expected) and len(got) == 4
    for key, grad in expected.items():
        assert grad is not None and grad.abs().max() > 0, key
        assert_close(got[key], grad, atol=1e-6 * float(grad.abs().max()))


def test_a_bfloat16_base_runs_like_peft(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """On a bfloat16 base PEFT keeps the kernel float32 (autocast_adapter_dtype), computes the term in float32 and
    merges the circulant rounded to bfloat16: the same logits and merged weights, bit for bit."""
    peft_reference(llama, peft.C3AConfig(block_size=16, target_modules=["q_proj", "up_proj"]), tmp_path, fill=_fill)
    base = fresh(llama).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(fresh(base), str(tmp_path)).eval()
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path)
    kernels = [p for n, p in model.named_parameters() if "c3a_kernel" in n]
    assert kernels and all(p.dtype == torch.float32 for p in kernels)
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    theirs, ours = _state(reference.base_model.model), _state(model)
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name


def test_docstring_examples() -> None:
    import doctest

    from adapterspec import _c3a
    from adapterspec.conformance import reference_c3a
    from adapterspec_torch import c3a

    for module, least in ((c3a, 8), (_c3a, 8), (reference_c3a, 3)):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
        assert result.failed == 0 and result.attempted >= least
