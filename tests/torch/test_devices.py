"""Where adapter tensors go: the meta device, dtype casts, the wrapped layer's dtype, CUDA (marked gpu)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from adapterspec_torch.state import expected_params  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_same_snapshot,
    fresh,
    logits,
    peft_reference,
    snapshot,
    tiny_llama_config,
)


@pytest.fixture(scope="module")
def folder(llama: Any, tmp_path_factory: Any) -> Any:
    from peft import LoraConfig

    path = tmp_path_factory.mktemp("devices")
    reference = peft_reference(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                 use_dora=True), path)
    return path, reference


def _adapter_tensors(model: Any) -> dict[str, Any]:
    return expected_params(model, "default")


def test_meta_device_option(llama: Any, folder: Any) -> None:
    path, _ = folder
    model = fresh(llama)
    before = snapshot(model)
    adapterspec.load_adapter(model, path, device="meta")
    params = _adapter_tensors(model)
    assert params and all(p.is_meta for p in params.values())
    assert not model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight.is_meta
    adapterspec.delete_adapter(model, "default")
    assert_same_snapshot(model, before)


def test_base_model_on_meta(folder: Any) -> None:
    from transformers import LlamaForCausalLM

    path, _ = folder
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config())
    adapterspec.load_adapter(model, path)
    params = _adapter_tensors(model)
    assert all(p.is_meta for p in params.values())
    file = load_file(path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in params.items()} == {k: tuple(v.shape) for k, v in file.items()
                                                             if not k.endswith("base_layer.weight")}


@pytest.mark.parametrize("dtype", [torch.float16, "bfloat16"])
def test_dtype_option_casts(llama: Any, folder: Any, token_inputs: Any, dtype: Any) -> None:
    path, reference = folder
    torch_dtype = torch.float16 if dtype is torch.float16 else torch.bfloat16
    model = fresh(llama)
    adapterspec.load_adapter(model, path, dtype=dtype)
    file = load_file(path / "adapter_model.safetensors")
    for key, param in _adapter_tensors(model).items():
        assert param.dtype == torch_dtype
        assert torch.equal(param, file[key].to(torch_dtype)), key
    # the base stays fp32; PEFT's casts run the adapters in their dtype
    assert model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight.dtype == torch.float32
    assert_close(logits(model, token_inputs), logits(reference, token_inputs), atol=5e-2)


def test_adapters_on_half_layers_stay_float32(llama: Any, folder: Any, token_inputs: Any) -> None:
    path, _ = folder
    model = fresh(llama).to(torch.bfloat16)
    adapterspec.load_adapter(model, path)
    assert {p.dtype for p in _adapter_tensors(model).values()} == {torch.float32}  # SPEC.md 7.5, as PEFT
    assert logits(model, token_inputs).dtype == torch.bfloat16


def test_device_must_be_a_device(llama: Any, folder: Any) -> None:
    path, _ = folder
    with pytest.raises(adapterspec.UnsupportedError, match="int8"):
        adapterspec.load_adapter(fresh(llama), path, dtype="int8")


_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there")


@pytest.mark.parametrize(("option", "value"), [
    ("dtype", torch.int8), ("dtype", torch.uint8), ("dtype", torch.bool), ("dtype", torch.float8_e4m3fn),
    ("dtype", torch.complex64), ("dtype", "int8"),
    ("device", "nonsense"), ("device", 1.5), ("device", "cuda:99"),
    pytest.param("device", "cuda:0", marks=_NO_CUDA), pytest.param("device", 7, marks=_NO_CUDA),
])
@pytest.mark.parametrize("call", ["load", "inject"])
def test_unusable_dtype_or_device_is_refused_up_front(llama: Any, folder: Any, option: str, value: Any,
                                                      call: str) -> None:
    """A dtype that rounds the weights away (int8: the adapter would do nothing) or cannot run (float8, bool),
    and a device this machine lacks, are refused naming the option, and the model is as before."""
    path, _ = folder
    model = fresh(llama)
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["k_proj"]}, "other")
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError) as info:
        if call == "load":
            adapterspec.load_adapter(model, path, **{option: value})
        else:
            adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]},
                                       **{option: value})
    assert info.value.key == option
    assert "fix: pass" in str(info.value)
    assert_same_snapshot(model, before)


@pytest.mark.gpu
def test_cuda_model_loads_straight_to_cuda(llama: Any, folder: Any, token_inputs: Any, monkeypatch: Any) -> None:
    path, reference = folder
    seen = []
    original = adapterspec.Adapter.load_tensors

    def spy(self: Any, framework: str = "numpy", device: str = "cpu") -> Any:
        seen.append(device)
        return original(self, framework, device)

    monkeypatch.setattr(adapterspec.Adapter, "load_tensors", spy)
    model = fresh(llama).to("cuda")
    adapterspec.load_adapter(model, path)
    assert seen == ["cuda:0"]
    assert all(p.is_cuda for p in _adapter_tensors(model).values())
    inputs = {k: v.to("cuda") for k, v in token_inputs.items()}
    assert_close(logits(model, inputs).cpu(), logits(reference, token_inputs), atol=1e-4)


@pytest.mark.gpu
def test_cuda_device_option(llama: Any, folder: Any, tmp_path: Any) -> None:
    path, _ = folder
    model = fresh(llama).to("cuda")
    adapterspec.load_adapter(model, path, device="cuda", dtype=torch.float16)
    assert all(p.is_cuda and p.dtype == torch.float16 for p in _adapter_tensors(model).values())
    adapterspec.save_adapter(model, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    file = load_file(path / "adapter_model.safetensors")
    for key, tensor in saved.items():
        if not key.endswith("base_layer.weight"):
            assert torch.equal(tensor, file[key].half()), key


@pytest.mark.gpu
def test_cuda_device_option_with_base_weights_in_the_file_is_one_transfer(llama: Any, folder: Any,
                                                                          monkeypatch: Any) -> None:
    """``device="cuda"`` (no index) and the model's ``cuda:0`` are one device: the file's tensors, the embedding's
    base weight among them, come over in one copy."""
    from adapterspec import _safetensors

    path, _ = folder
    seen = []
    real = _safetensors._to_device
    monkeypatch.setattr(_safetensors, "_to_device", lambda data, device, where: seen.append(str(device)) or
                        real(data, device, where))
    model = fresh(llama).to("cuda")
    adapterspec.load_adapter(model, path, device="cuda")
    assert seen == ["cuda:0"]
    file = load_file(path / "adapter_model.safetensors")
    for key, param in _adapter_tensors(model).items():
        assert param.is_cuda and torch.equal(param.cpu(), file[key]), key


@pytest.fixture(scope="module")
def saved_classifier(bert: Any, tmp_path_factory: Any) -> Any:
    from peft import LoraConfig

    path = tmp_path_factory.mktemp("classifier")
    reference = peft_reference(bert, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"],
                                                modules_to_save=["classifier"]), path)
    return path, reference


@pytest.mark.parametrize(("options", "device", "dtype"), [
    ({"dtype": "float16"}, "cpu", torch.float16),
    ({"device": "meta"}, "meta", torch.float32),
    ({"device": "meta", "dtype": torch.bfloat16}, "meta", torch.bfloat16),
], ids=["dtype", "device", "both"])
def test_modules_to_save_copies_follow_the_options(bert: Any, saved_classifier: Any, token_inputs: Any,
                                                   options: dict[str, Any], device: str, dtype: Any) -> None:
    path, reference = saved_classifier
    model = fresh(bert)
    adapterspec.load_adapter(model, path, **options)
    layer = model.get_submodule("classifier")
    copy = layer.modules_to_save["default"]
    assert {(p.device.type, p.dtype) for p in copy.parameters()} == {(device, dtype)}
    assert {(p.device.type, p.dtype) for p in layer.original_module.parameters()} == {("cpu", torch.float32)}
    if device == "cpu":
        file = load_file(path / "adapter_model.safetensors")
        assert torch.equal(copy.weight, file["base_model.model.classifier.weight"].to(dtype))
        with torch.no_grad():
            out = model(**token_inputs).logits
        assert_close(out.float(), logits(reference, token_inputs), atol=2e-2)


def test_pinned_read_buffer_only_for_a_gpu(monkeypatch: Any) -> None:
    import numpy as np
    from adapterspec import LoadOptions
    from adapterspec import _safetensors
    from adapterspec_torch.devices import read_buffer

    asked = []
    monkeypatch.setattr(_safetensors, "pinned_allocator",
                        lambda device: asked.append(str(device)) or ((lambda n: np.zeros(n, np.uint8))
                                                                     if str(device).startswith("cuda") else None))
    linear = torch.nn.Linear(2, 2)
    assert read_buffer(linear, 16, LoadOptions()) is None  # a CPU model keeps its tensors in the buffer
    assert read_buffer(linear, 16, LoadOptions(device="cuda:1")).shape == (16,)
    assert read_buffer(torch.nn.ReLU(), 16, LoadOptions()) is None  # no parameters
    assert asked == ["cpu", "cuda:1"]
