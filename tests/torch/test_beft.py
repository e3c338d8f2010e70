"""BEFT (SPEC.md 17.8) exact against PEFT 0.21.2 in both directions, merge and unmerge included; refusals typed.

A tiny Llama with attention biases carries a PEFT BEFT adapter (element-unique ``beft_bias`` on q_proj and v_proj):
``adapterspec.load_adapter`` gives PEFT's logits on a fresh copy of the base, ``save_adapter`` writes PEFT's tensors
bit for bit, which PEFT loads silently; merging gives PEFT's merged logits and unmerging its biases.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_peft_loads_ours,
    assert_saved_as_peft_saved,
    assert_same_snapshot,
    fresh,
    logits,
    peft_reference,
    snapshot,
    tiny_llama_config,
    unique_values,
)

TARGETS = ["q_proj", "v_proj"]
V = "base_model.model.model.layers.0.self_attn.v_proj"


@pytest.fixture(scope="module")
def biased() -> Any:
    """The tiny Llama with biases on q/k/v/o (BEFT merges into them); the MLP has none."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    config.attention_bias = True
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.bias"):
                param.copy_(unique_values(tuple(param.shape), len(name), scale=0.3))
    return model


def _fill(model: Any, *, adapter: str = "default", salt: int = 0) -> None:
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted(model.named_parameters())):
            if name.endswith(f"beft_bias.{adapter}"):
                tensor.copy_(unique_values(tuple(tensor.shape), salt + index, scale=0.5))


def _config(**kwargs: Any) -> Any:
    from peft import BeftConfig

    return BeftConfig(**{"target_modules": TARGETS, **kwargs})


@pytest.fixture(scope="module")
def saved(biased: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    folder = tmp_path_factory.mktemp("beft") / "peft"
    return peft_reference(biased, _config(), folder, fill=_fill), folder


def test_peft_folder_roundtrip_merge_unmerge(saved: tuple[Any, Path], biased: Any, token_inputs: Any, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    reference, folder = saved
    expected = logits(reference, token_inputs)
    base_out = logits(biased, token_inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(folder) == []

    model = fresh(biased)
    adapterspec.load_adapter(model, folder)
    assert torch.equal(logits(model, token_inputs), expected)  # PEFT's operations in PEFT's order: bit-equal
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, token_inputs), base_out, atol=0)

    adapterspec.save_adapter(model, tmp_path / "ours")
    assert_saved_as_peft_saved(folder, tmp_path / "ours")
    assert_peft_loads_ours(biased, folder, tmp_path / "ours", caplog, token_inputs, expected)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    try:
        merged_expected = logits(reference, token_inputs)
        adapterspec.merge_adapters(model)
        assert torch.equal(logits(model, token_inputs), merged_expected)
        assert_close(logits(model, token_inputs), expected)
    finally:
        reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    restored = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
    peft_restored = {k.replace(".base_layer.", ".").replace("base_model.model.", "", 1): v
                     for k, v in reference.state_dict().items()}
    for key, value in biased.state_dict().items():
        assert torch.equal(restored[key], peft_restored[key]), key
        assert_close(restored[key], value, atol=1e-6)
    assert_close(logits(model, token_inputs), expected)  # the unmerged bias is PEFT's, rounded twice (as PEFT's)

    # the file decides: a doubled v_proj bias changes the logits
    tensors = load_file(folder / "adapter_model.safetensors")
    (tmp_path / "scaled").mkdir()
    (tmp_path / "scaled" / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file({**tensors, f"{V}.beft_bias": tensors[f"{V}.beft_bias"] * 2}, str(tmp_path / "scaled" /
                                                                                 "adapter_model.safetensors"))
    changed = fresh(biased)
    adapterspec.load_adapter(changed, tmp_path / "scaled")
    assert (logits(changed, token_inputs) - expected).abs().max() > 1e-4


def test_bfloat16_base_equals_peft_unmerged_and_merged(saved: tuple[Any, Path], biased: Any,
                                                       token_inputs: Any) -> None:
    """float32 adapter tensors on a bf16 base; the sum rounded to bf16; a merge rounds the bias once."""
    _, folder = saved
    base = fresh(biased).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(fresh(base), str(folder)).eval()
    model = fresh(base)
    adapterspec.load_adapter(model, folder)
    assert {p.dtype for n, p in model.named_parameters() if "adapter_weights" in n} == {torch.float32}
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
    reference.unmerge_adapter()
    adapterspec.unmerge_adapters(model)
    peft_weights = {k.replace(".base_layer.", ".").replace("base_model.model.", "", 1): v
                    for k, v in reference.state_dict().items()}
    for key, value in model.state_dict().items():
        if "adapter_weights" not in key:
            assert torch.equal(value, peft_weights[key.replace(".base_layer.", ".")]), key


@pytest.mark.parametrize("init_weights", [True, None])
def test_inject_draws_peft_s_values_and_trains_what_peft_trains(init_weights: bool | None, biased: Any,
                                                               token_inputs: Any) -> None:
    """One seed: PEFT's values bit for bit (a standard-normal draw per layer, zeroed for a truthy init_weights; null
    keeps it, PEFT's truth test); the trainable count and the gradients are PEFT's."""
    from peft import get_peft_model

    targets = ["v_proj", "down_proj", "o_proj"]
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(biased), _config(target_modules=targets, init_weights=init_weights))
        after_peft = torch.rand(3)
    model = fresh(biased)
    torch.manual_seed(11)
    adapterspec.inject_adapter(model, {"peft_type": "BEFT", "target_modules": targets, "init_weights": init_weights},
                               trainable=True)
    assert torch.equal(torch.rand(3), after_peft)  # the same draws, in the same order
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == reference.get_nb_trainable_parameters()[0]
    ours = {k.replace(".adapter_weights.default.", "."): v for k, v in model.state_dict().items() if "beft_" in k}
    theirs = {k.removeprefix("base_model.model.").replace(".default", ""): v
              for k, v in reference.state_dict().items() if "beft_" in k}
    assert sorted(ours) == sorted(theirs) and len(ours) == 6
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert (init_weights is None) == any(bool(v.abs().max() > 0) for v in ours.values())
    reference.train()
    model.train()
    reference(**token_inputs).logits.square().mean().backward()
    model(**token_inputs).logits.square().mean().backward()
    expected = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                for n, p in reference.named_parameters() if p.requires_grad}
    got = {n.replace(".adapter_weights.default.", "."): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(expected)
    for key, grad in expected.items():
        assert grad is not None and grad.abs().max() > 0, key
        assert_close(got[key], grad, atol=1e-6 * float(grad.abs().max()))


def test_two_befts_and_one_with_lora_like_peft(saved: tuple[Any, Path], biased: Any, token_inputs: Any,
                                               tmp_path: Path) -> None:
    """Two BEFT adapters active: PEFT's PeftModel with both active (bit-equal). BEFT with LoRA on q_proj: PEFT's
    PeftMixedModel takes no BEFT, so the reference is the BEFT merged into the base under the LoRA (SPEC.md 8.9);
    with DoRA it is refused, the model unchanged."""
    from peft import LoraConfig, PeftModel, get_peft_model

    _, folder = saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(biased), str(folder)).eval()
        reference.add_adapter("b", _config(target_modules=["q_proj", "up_proj"]))
        _fill(reference, adapter="b", salt=5)
        reference.save_pretrained(str(tmp_path / "ab"))
        reference.base_model.set_adapter(["default", "b"])
    model = fresh(biased)
    adapterspec.load_adapter(model, folder)
    adapterspec.load_adapter(model, tmp_path / "ab" / "b", "b")
    adapterspec.set_active_adapters(model, ["default", "b"])
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(fresh(biased), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                 target_modules=["q_proj"])).save_pretrained(str(tmp_path / "l"))
        get_peft_model(fresh(biased), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, use_dora=True,
                                                 target_modules=["q_proj"])).save_pretrained(str(tmp_path / "d"))
        merged = PeftModel.from_pretrained(fresh(biased), str(folder)).merge_and_unload()
        mixed = PeftModel.from_pretrained(merged, str(tmp_path / "l")).eval()
    adapterspec.load_adapter(model, tmp_path / "l", "l")
    adapterspec.set_active_adapters(model, ["default", "l"])
    assert_close(logits(model, token_inputs), logits(mixed, token_inputs))
    adapterspec.load_adapter(model, tmp_path / "d", "d")
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match="DoRA adapter 'd' cannot run together with BEFT adapter 'default'"):
        adapterspec.set_active_adapters(model, ["default", "d"])
    assert_same_snapshot(model, before)


def _folder(tmp_path: Path, name: str, config: dict[str, Any], tensors: dict[str, Any]) -> Path:
    (tmp_path / name).mkdir()
    (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / name / "adapter_model.safetensors"))
    return tmp_path / name


def test_refusals_are_typed_and_change_nothing(saved: tuple[Any, Path], biased: Any, gpt2: Any,
                                               tmp_path: Path) -> None:
    _, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    cases = [
        ("missing", config, {k: v for k, v in tensors.items() if k != f"{V}.beft_bias"},
         adapterspec.MissingTensorError, "v_proj.beft_bias"),
        ("flat", config, {**tensors, f"{V}.beft_bias": tensors[f"{V}.beft_bias"].flatten()},
         adapterspec.ShapeMismatchError, "v_proj.beft_bias"),
    ]
    for name, cfg, changed, error, needle in cases:
        where = _folder(tmp_path, name, cfg, changed)
        if name != "missing":  # without the model, a module with no tensor is not known to be adapted
            assert any(needle in str(e) for e in adapterspec.validate_adapter(where)), name
        model = fresh(biased)
        before = snapshot(model)
        with pytest.raises(error) as info:
            adapterspec.load_adapter(model, where)
        assert needle in str(info.value), (name, info.value)
        assert_same_snapshot(model, before)
    # a v_proj bias of q_proj's width: valid without the model, refused against it
    where = _folder(tmp_path, "width", config, {**tensors, f"{V}.beft_bias": torch.ones(1, 64)})
    model = fresh(biased)
    before = snapshot(model)
    with pytest.raises(adapterspec.ShapeMismatchError, match="v_proj"):
        adapterspec.load_adapter(model, where)
    assert_same_snapshot(model, before)

    # a merge into a layer without a bias (PEFT raises ValueError): refused before any layer changes
    with pytest.raises(ValueError, match="no bias"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(fresh(biased), _config(target_modules=["v_proj", "down_proj"])).merge_adapter()
    model = fresh(biased)
    adapterspec.inject_adapter(model, {"peft_type": "BEFT", "target_modules": ["v_proj", "down_proj"],
                                       "init_weights": False})
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match="without a bias") as refused:
        adapterspec.merge_adapters(model)
    assert refused.value.key is not None and refused.value.key.endswith("down_proj")
    assert_same_snapshot(model, before)

    with pytest.raises(TypeError):  # PEFT refuses GPT-2's Conv1D and every non-Linear layer
        peft.get_peft_model(fresh(gpt2), _config(target_modules=["c_attn"]))
    for base, target in ((gpt2, "c_attn"), (biased, "embed_tokens")):
        model = fresh(base)
        before = snapshot(model)
        with pytest.raises(UnsupportedError, match="BEFT cannot adapt") as info:
            adapterspec.inject_adapter(model, {"peft_type": "BEFT", "target_modules": [target]})
        assert info.value.key is not None and info.value.key.endswith(target)
        assert_same_snapshot(model, before)


def test_reference_equals_peft_float64() -> None:
    """The NumPy reference against PEFT's own BEFT Linear in float64."""
    from peft import get_peft_model

    from adapterspec.conformance.reference import forward

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5)).double()
    peft_model = get_peft_model(model, _config(target_modules=["0"], init_weights=False))
    layer = peft_model.base_model.model[0]
    tensors = {"beft_bias": layer.beft_bias["default"].detach().double().numpy()}
    base = {"weight": layer.base_layer.weight.detach().numpy(), "bias": layer.base_layer.bias.detach().numpy()}
    x = np.linspace(-1, 1, 12).reshape(2, 6)
    ours = forward({"kind": "linear", "in_features": 6, "out_features": 5, "bias": True}, base, x,
                   {"peft_type": "BEFT", "target_modules": ["0"]}, "0", tensors)
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_docstring_examples() -> None:
    import doctest

    from adapterspec import _beft
    from adapterspec_torch import beft

    for module in (beft, _beft):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted >= 1, module
