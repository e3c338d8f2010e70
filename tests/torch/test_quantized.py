"""Adapters on a quantized base (SPEC.md 6.8): bitsandbytes 4-bit and 8-bit models loaded by transformers (QLoRA),
compared with PEFT's own ``bnb`` layers on the same quantized model; what needs the base weight's values or would
write them is refused with a typed error and the model left as it was."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import adapterspec  # noqa: E402
from adapterspec.identity import FINGERPRINT_KEY  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_close,
    assert_same_snapshot,
    fill_adapter_weights,
    fresh,
    logits,
    peft_reference,
    snapshot,
    unique_values,
)

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(llama: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("quantized") / "llama"
    llama.save_pretrained(folder)
    return folder


def quantized(checkpoint: Path, bits: int) -> nn.Module:
    """The checkpoint loaded by transformers with bitsandbytes ``load_in_4bit`` (NF4, float32 compute) or
    ``load_in_8bit``: every Linear but ``lm_head`` quantized."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32) if bits == 4 else \
        BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, device_map="cpu",
                                                     dtype=torch.float32).eval()
    return model


def _peft_on(model: nn.Module, folder: Path) -> nn.Module:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, str(folder)).eval()


def _configs() -> dict[str, Any]:
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, VeraConfig

    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True),
        "ia3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": LoHaConfig(r=4, target_modules=TARGETS),
        "lokr": LoKrConfig(r=4, target_modules=TARGETS),
        "vera": VeraConfig(r=4, target_modules=["q_proj", "o_proj"], save_projection=True),
        "oft": OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"]),
        "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]),
    }


def _fill(model: nn.Module) -> None:
    """Element-unique values in every adapter tensor (VeRA's lambdas and projections and OFT's too)."""
    fill_adapter_weights(model)
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted(list(model.named_parameters()) + list(model.named_buffers()))):
            if "vera_lambda" in name:
                tensor.copy_(unique_values(tuple(tensor.shape), index, around=1.0, scale=0.5))
            elif "vera_A" in name or "vera_B" in name or "oft_R" in name:
                tensor.copy_(unique_values(tuple(tensor.shape), index, scale=0.3))


# PEFT 0.21.2's LoHa and LoKr take a 4-bit layer for a plain Linear and fail on its packed weight: compared below
CASES = [(bits, method) for method in _configs() for bits in (4, 8) if not (bits == 4 and method in ("loha", "lokr"))]


@pytest.mark.parametrize(("bits", "method"), CASES)
def test_loads_onto_a_quantized_model_as_peft_does(bits: int, method: str, llama: nn.Module, checkpoint: Path,
                                                   tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    """PEFT's adapter on transformers' bitsandbytes model: ours gives PEFT's ``bnb`` layers' logits to the bit (DoRA's
    norm from bitsandbytes' dequantized weight, as PEFT's), and deleting it gives the quantized model back.

    Both run in train mode (no dropout anywhere): in eval, bitsandbytes' CPU inference repacks a 4-bit weight at its
    first forward, after which PEFT's DoRA dequantizes the packed bytes as if they were not (and a ``state_dict()``
    changes the layer's later outputs, bitsandbytes 0.50) -- :func:`test_dora_reads_a_repacked_4bit_weight`."""
    peft_reference(llama, _configs()[method], tmp_path / "peft", fill=_fill)
    expected = logits(_peft_on(quantized(checkpoint, bits), tmp_path / "peft").train(), token_inputs)
    model = quantized(checkpoint, bits).train()
    before = snapshot(model)
    base = logits(model, token_inputs)
    adapterspec.load_adapter(model, tmp_path / "peft")
    got = logits(model, token_inputs)
    assert torch.equal(got, expected)
    assert float((got - base).abs().max()) > 1e-4  # the adapter does something
    adapterspec.delete_adapter(model, "default")
    assert torch.equal(logits(model, token_inputs), base)
    assert_same_snapshot(model, before)


def test_dora_reads_a_repacked_4bit_weight(checkpoint: Path) -> None:
    """After bitsandbytes' CPU inference repacked a 4-bit weight (eval, first forward), DoRA still reads its values:
    those of the standard layout up to the bfloat16 scales the packing keeps, and reading them changes nothing."""
    from adapterspec_torch.quantized import dense_weight

    layer = quantized(checkpoint, 4).get_submodule("model.layers.0.mlp.down_proj")
    standard = dense_weight(layer, "down_proj").clone()
    x = torch.sin(torch.arange(2 * 5 * 128, dtype=torch.float32)).reshape(2, 5, 128)
    with torch.no_grad():
        out = layer(x)
        if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            pytest.skip("this CPU runs bitsandbytes without its packed 4-bit format (no AVX512-BF16)")
        packed = dense_weight(layer, "down_proj")
        assert torch.equal(layer(x), out)
    assert float((packed - standard).abs().max()) <= 2 ** -8 * float(standard.abs().max())
    assert_close(out, x @ packed.T, atol=4e-3 * float(out.abs().max()))  # the kernel's bfloat16 arithmetic


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_4bit_lycoris_adds_its_delta_to_the_quantized_output(method: str, llama: nn.Module, checkpoint: Path,
                                                            tmp_path: Path, token_inputs: dict[str, Any]) -> None:
    """Where PEFT fails (LoHa/LoKr read the packed 4-bit weight's shape), ours adds the delta PEFT computes on a
    float model of the dequantized weights: same change of every adapted layer's output."""
    import bitsandbytes as bnb

    peft_reference(llama, _configs()[method], tmp_path / "peft")
    model = quantized(checkpoint, 4)
    adapterspec.load_adapter(model, tmp_path / "peft")
    dense = fresh(llama)  # the float model of the dequantized weights
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                dense.get_submodule(name.removesuffix(".base_layer")).weight.copy_(bnb.functional.dequantize_4bit(module.weight.data,
                                                                                      module.weight.quant_state))
    reference = _peft_on(dense, tmp_path / "peft")
    x = torch.sin(torch.arange(2 * 5 * 64, dtype=torch.float32)).reshape(2, 5, 64)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        ours, theirs = model.get_submodule(name), reference.base_model.model.get_submodule(name)
        with torch.no_grad():
            delta = ours(x) - ours.base_layer(x)
            expected = theirs(x) - theirs.base_layer(x)
        assert float(expected.abs().max()) > 1e-2
        assert_close(delta, expected)


def test_merge_into_a_quantized_weight_is_refused_and_changes_nothing(llama: nn.Module, checkpoint: Path,
                                                                      tmp_path: Path,
                                                                      token_inputs: dict[str, Any]) -> None:
    """Merging would round the sum to the 4-bit grid: refused (merge, unload(merge=True)) before any weight moves."""
    from peft import LoraConfig

    peft_reference(llama, LoraConfig(r=4, target_modules=TARGETS), tmp_path / "peft")
    model = quantized(checkpoint, 4).train()  # train mode: no CPU repacking (see the first test)
    adapterspec.load_adapter(model, tmp_path / "peft")
    before, out = snapshot(model), logits(model, token_inputs)
    for call in (lambda: adapterspec.merge_adapters(model), lambda: adapterspec.unload(model, merge=True)):
        with pytest.raises(adapterspec.UnsupportedError, match=r"quantized base weight \(uint8 bitsandbytes"):
            call()
        assert_same_snapshot(model, before)
        assert torch.equal(logits(model, token_inputs), out)


def test_a_refused_merge_leaves_every_layer_unmerged(tmp_path: Path) -> None:
    """A layer that cannot merge (lora_bias without a base bias) is found before any other layer merges."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8, bias=False))
    config = adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "lora_bias": True,
                                                  "target_modules": ["0", "1"]})
    adapterspec.inject_adapter(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.linspace(0.1, 0.9, param.numel()).reshape(param.shape))
    x = torch.linspace(-1, 1, 16).reshape(2, 8)
    before, out = snapshot(model), model(x)
    with pytest.raises(adapterspec.UnsupportedError, match="lora_bias cannot be merged"):
        adapterspec.merge_adapters(model)
    assert_same_snapshot(model, before)
    assert torch.equal(model(x), out)


@pytest.mark.parametrize(("config", "needle"), [
    ({"init_lora_weights": "pissa"}, "PEFT decomposes float32, float16 or bfloat16 weights only, not uint8"),
    ({"modules_to_save": ["model.layers.0.mlp.up_proj"]}, "modules_to_save"),
])
def test_what_would_write_a_quantized_weight_is_refused(config: dict[str, Any], needle: str, llama: nn.Module,
                                                        checkpoint: Path, tmp_path: Path) -> None:
    """PiSSA's residual base and a module saved whole cannot live in a 4-bit weight: refused typed, nothing changed."""
    from peft import LoraConfig

    folder = tmp_path / "peft"
    peft_reference(llama, LoraConfig(r=4, target_modules=TARGETS, **config), folder)
    model = quantized(checkpoint, 4)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match=needle):
        adapterspec.load_adapter(model, folder)
    assert_same_snapshot(model, before)


class _Float8Linear(nn.Linear):
    """A Linear whose weight is stored in float8 (a quantization this backend cannot dequantize exactly)."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__(dense.in_features, dense.out_features, bias=False)
        self.weight = nn.Parameter(dense.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)

    def forward(self, x: Any) -> Any:
        return nn.functional.linear(x, self.weight.to(x.dtype))


def test_other_quantizations_run_lora_and_refuse_dora(tmp_path: Path) -> None:
    """A weight the backend cannot read (float8 here): LoRA runs as base(x) + its term, its save records no base
    fingerprint; DoRA, which reads the weight, is refused at load with the model unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(_Float8Linear(nn.Linear(16, 8)))
    x = torch.linspace(-1, 1, 32).reshape(2, 16)
    for use_dora in (False, True):
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0"], "use_dora": use_dora}
        a = torch.sin(torch.arange(32, dtype=torch.float32)).reshape(2, 16)
        b = torch.cos(torch.arange(16, dtype=torch.float32)).reshape(8, 2)
        tensors = {"base_model.model.0.lora_A.weight": a, "base_model.model.0.lora_B.weight": b}
        if use_dora:
            tensors["base_model.model.0.lora_magnitude_vector"] = torch.ones(8)
        folder = tmp_path / f"dora{use_dora}"
        adapterspec.write_adapter(folder, adapterspec.AdapterConfig.from_dict(config), tensors)
        before = snapshot(model)
        if use_dora:
            with pytest.raises(adapterspec.UnsupportedError, match="float8_e4m3fn"):
                adapterspec.load_adapter(model, folder)
            assert_same_snapshot(model, before)
            continue
        base = model(x)
        adapterspec.load_adapter(model, folder)
        assert_close(model(x), base + (x @ a.T @ b.T) * 2.0)
        adapterspec.save_adapter(model, tmp_path / "saved")
        assert FINGERPRINT_KEY not in adapterspec.read_adapter(tmp_path / "saved").metadata
        adapterspec.delete_adapter(model, "default")


def test_qlora_training_and_peft_reload(llama: nn.Module, checkpoint: Path, tmp_path: Path,
                                        token_inputs: dict[str, Any]) -> None:
    """QLoRA with adapterspec: a new DoRA adapter on the 4-bit model starts from PEFT's magnitude (bitsandbytes'
    dequantized norm); three optimiser steps train the adapter only; PEFT loads the saved folder onto its own 4-bit
    model with our logits, and the save records no fingerprint of the quantized base."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(quantized(checkpoint, 4), config)
    model = quantized(checkpoint, 4)
    adapterspec.inject_adapter(model, adapterspec.AdapterConfig.from_dict(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS, "use_dora": True}))
    ours = adapterspec.extract_adapter(model).load_tensors("pt")
    for key, value in ours.items():
        if "magnitude" in key:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
            expected = theirs.base_model.model.get_submodule(module).lora_magnitude_vector["default"].weight
            assert torch.equal(value, expected.detach()), key
    model.train()
    packed = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimiser = torch.optim.SGD(trainable, lr=0.05)
    ids = token_inputs["input_ids"]
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in packed.items())
    adapterspec.save_adapter(model, tmp_path / "trained")
    assert FINGERPRINT_KEY not in adapterspec.read_adapter(tmp_path / "trained").metadata
    # train mode for both (no dropout): PEFT's DoRA misreads a weight bitsandbytes repacked for CPU inference
    assert torch.equal(logits(_peft_on(quantized(checkpoint, 4), tmp_path / "trained").train(), token_inputs),
                       logits(model, token_inputs))


def test_a_quantized_embedding_is_refused() -> None:
    """Only quantized Linear layers take adapters (as on Keras: Dense and EinsumDense); an embedding whose weight is
    quantized is refused typed, the model unchanged."""
    import bitsandbytes as bnb

    model = nn.Sequential(bnb.nn.Embedding8bit(16, 8))  # bitsandbytes cannot give its state_dict()
    config = adapterspec.AdapterConfig.from_dict({"peft_type": "LORA", "r": 2, "target_modules": ["0"]})
    layer, weight = model[0], model[0].weight.detach().clone()
    with pytest.raises(adapterspec.UnsupportedError, match="runs adapters on quantized Linear layers only"):
        adapterspec.inject_adapter(model, config)
    assert model[0] is layer and torch.equal(model[0].weight, weight) and adapterspec.adapter_names(model) == []
