"""GraLoRA (SPEC.md 17.5) exact against PEFT 0.21.2; refusals typed, the model unchanged.

Each case: a PEFT GraLoRA model with element-unique blocks (and hybrid pair) is saved; ``adapterspec.load_adapter``
gives the outputs of PEFT's own ``PeftModel`` of that folder; ``save_adapter`` writes byte-equal tensors and the
same config, which PEFT loads with no warning of its own; merging gives PEFT's merged outputs and unmerging
restores the base weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec.errors import ShapeMismatchError, UnexpectedTensorError, UnsupportedError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch_helpers import assert_close, assert_same_snapshot, fresh, logits, peft_load, snapshot, unique_values  # noqa: E402

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _fill(model: Any) -> None:
    """Element-unique block and hybrid values: a transposed block or a swapped key shows."""
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted(model.named_parameters())):
            if "gralora_" in name:
                tensor.copy_(unique_values(tuple(tensor.shape), index, scale=0.2))


def _peft_folder(base: Any, folder: Path, **fields: Any) -> Any:
    from peft import GraloraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh(base), GraloraConfig(**fields))
        _fill(model)
        model.eval()
        model.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize(("kind", "fields"), [
    pytest.param("llama", dict(r=4, gralora_k=2, hybrid_r=2, alpha=6, target_modules=LLAMA), id="llama-hybrid"),
    pytest.param("gpt2", dict(r=8, gralora_k=4, alpha=16, target_modules=GPT2), id="gpt2-conv1d-k4"),
])
def test_peft_folder_roundtrip(kind: str, fields: dict[str, Any], request: pytest.FixtureRequest, tmp_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    base = request.getfixturevalue(kind)
    inputs = request.getfixturevalue("token_inputs")
    _peft_folder(base, tmp_path / "peft", **fields)
    reference, said_peft = peft_load(base, tmp_path / "peft", caplog)
    expected, base_out = logits(reference, inputs), logits(base, inputs)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    assert adapterspec.validate_adapter(tmp_path / "peft") == []

    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert_close(logits(model, inputs), expected)
    with adapterspec.disabled_adapters(model):
        assert_close(logits(model, inputs), base_out, atol=0)

    adapterspec.save_adapter(model, tmp_path / "ours")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k in peft_config} == peft_config
    loaded, said_ours = peft_load(base, tmp_path / "ours", caplog)
    assert said_ours == said_peft
    assert_close(logits(loaded, inputs), expected)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert_close(logits(model, inputs), logits(reference, inputs))
    adapterspec.unmerge_adapters(model)
    restored = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
    for key, value in base.state_dict().items():
        assert_close(restored[key], value, atol=1e-5)
    adapterspec.delete_adapter(model, "default")
    assert sorted(model.state_dict()) == sorted(base.state_dict())


def test_bf16_unmerged_and_merged_bit_equal_peft(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """bfloat16 model and adapter: PEFT's forward casts and its float32 CPU merge rounded to bfloat16, bit for bit."""
    from peft import PeftModel

    base = fresh(llama).to(torch.bfloat16)
    _peft_folder(base, tmp_path, r=4, gralora_k=2, hybrid_r=1, alpha=5, target_modules=["q_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(base), str(tmp_path), autocast_adapter_dtype=False).eval()
    model = fresh(base)
    adapterspec.load_adapter(model, tmp_path, dtype=torch.bfloat16)
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    adapterspec.merge_adapters(model)
    assert torch.equal(logits(model, token_inputs), logits(reference, token_inputs))


@pytest.mark.parametrize("init_weights", [True, False, None])  # None: PEFT's truth test, B drawn as for false
def test_a_new_adapter_is_peft_init_and_trains_peft_parameters(llama: Any, init_weights: bool | None) -> None:
    """Injected under the same torch seed, every tensor is PEFT's bit for bit (PEFT's draw order, the hybrid
    nn.Linear's own draws included); the trainable parameter count is PEFT's."""
    from peft import GraloraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    fields = dict(r=4, gralora_k=2, hybrid_r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                  init_weights=init_weights)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(fresh(llama), GraloraConfig(**fields))
    theirs = get_peft_model_state_dict(reference)
    torch.manual_seed(5)
    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "GRALORA", **fields}, "default", trainable=True)
    ours = adapterspec.extract_adapter(model, "default").load_tensors("pt")
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in reference.parameters() if p.requires_grad)


def test_training_gradients_and_two_adapters_equal_peft(llama: Any, token_inputs: Any, tmp_path: Path) -> None:
    """Loaded trainable, the gradients of every GraLoRA tensor are PEFT's; two GraLoRA adapters active together
    give PEFT's outputs (PEFT's forward adds each)."""
    from peft import PeftModel

    fields = dict(r=4, gralora_k=2, hybrid_r=2, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])
    _peft_folder(llama, tmp_path / "a", **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama), str(tmp_path / "a"), is_trainable=True)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "a", trainable=True)
    ours = {n.replace(".adapter_weights.default.", ".").replace("_general_weight", "_general"): p
            for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix("base_model.model.").replace(".default.weight", "").removesuffix(".default"): p
              for n, p in reference.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    for net in (model, reference):
        (net(**token_inputs).logits.float() ** 2).mean().backward()
    for name, param in theirs.items():
        assert param.grad.abs().max() > 0
        assert_close(ours[name].grad, param.grad)

    _peft_folder(llama, tmp_path / "b", **(fields | {"hybrid_r": 0, "gralora_k": 4, "alpha": 3}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = PeftModel.from_pretrained(fresh(llama), str(tmp_path / "a"), adapter_name="a").eval()
        both.load_adapter(str(tmp_path / "b"), adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "a", adapter_name="a")
    adapterspec.load_adapter(model, tmp_path / "b", adapter_name="b")
    adapterspec.set_active_adapters(model, ["a", "b"])
    assert_close(logits(model, token_inputs), logits(both, token_inputs))


def test_float_alpha_null_booleans_negative_dropout_train_as_peft(llama: Any, token_inputs: Any,
                                                                  tmp_path: Path) -> None:
    """A config PEFT takes as written (SPEC.md 4.1, 17.5): alpha 5.5 (scaling 5.5 / 5), null fan_in_fan_out and
    init_weights, gralora_dropout -0.5 (PEFT: no dropout, also while training): loaded trainable and in training
    mode, the outputs are PEFT's."""
    from peft import PeftModel

    fields = dict(r=4, gralora_k=2, hybrid_r=1, alpha=5.5, gralora_dropout=-0.5, target_modules=["q_proj", "v_proj"])
    _peft_folder(llama, tmp_path / "a", **fields)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config |= {"fan_in_fan_out": None, "init_weights": None}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama), str(tmp_path / "a"), is_trainable=True).train()
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "a", trainable=True)
    model.train()
    expected = logits(reference, token_inputs)
    assert (expected - logits(llama, token_inputs)).abs().max() > 1e-2
    assert_close(logits(model, token_inputs), expected)


def _refused(base: Any, folder: Path, error: type[Exception], needle: str) -> None:
    model = fresh(base)
    before = snapshot(model)
    with pytest.raises(error) as info:
        adapterspec.load_adapter(model, folder)
    assert needle in str(info.value)
    assert_same_snapshot(model, before)


def test_refusals_name_the_field_or_tensor(llama: Any, tmp_path: Path) -> None:
    """bias (trained base biases), gralora_k not dividing a layer (PEFT refuses it), swapped blocks, a hybrid pair
    under hybrid_r 0, GraLoRA beside LoRA on one layer: typed, the model unchanged."""
    from peft import LoraConfig, get_peft_model

    _peft_folder(llama, tmp_path / "bias", r=2, gralora_k=2, target_modules=["q_proj"], bias="gralora_only")
    _refused(llama, tmp_path / "bias", UnsupportedError, "/bias")

    (tmp_path / "k" / "adapter_config.json").parent.mkdir()
    (tmp_path / "k" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "GRALORA", "r": 3, "gralora_k": 3, "target_modules": ["q_proj"]}))
    save_file({f"{Q}.gralora_A": torch.ones(3, 21, 3), f"{Q}.gralora_B": torch.ones(3, 3, 21)},
              tmp_path / "k" / "adapter_model.safetensors", metadata={"format": "pt"})
    _refused(llama, tmp_path / "k", UnsupportedError, "/gralora_k")

    _peft_folder(llama, tmp_path / "swap", r=2, gralora_k=2, hybrid_r=1, target_modules=["q_proj"])
    tensors = load_file(tmp_path / "swap" / "adapter_model.safetensors")
    tensors[f"{Q}.gralora_A"] = tensors[f"{Q}.gralora_A"].transpose(1, 2).contiguous()
    save_file(tensors, tmp_path / "swap" / "adapter_model.safetensors", metadata={"format": "pt"})
    assert any(f"{Q}.gralora_A" in str(e) for e in adapterspec.validate_adapter(tmp_path / "swap"))
    _refused(llama, tmp_path / "swap", ShapeMismatchError, f"{Q}.gralora_A")

    _peft_folder(llama, tmp_path / "hybrid", r=2, gralora_k=2, hybrid_r=1, target_modules=["q_proj"])
    config = json.loads((tmp_path / "hybrid" / "adapter_config.json").read_text())
    (tmp_path / "hybrid" / "adapter_config.json").write_text(json.dumps(config | {"hybrid_r": 0}))
    _refused(llama, tmp_path / "hybrid", UnexpectedTensorError, "hybrid_r")

    _peft_folder(llama, tmp_path / "g", r=2, gralora_k=2, target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(fresh(llama), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "l"))
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "g", adapter_name="g")
    adapterspec.load_adapter(model, tmp_path / "l", adapter_name="l")
    with pytest.raises(UnsupportedError, match="GraLoRA"):
        adapterspec.set_active_adapters(model, ["g", "l"])
