"""Adapters on a model whose layers accelerate offloads (``dispatch_model`` with ``"disk"`` entries, as
``from_pretrained(device_map=...)`` does when the model does not fit): the adapter's tensors live where the
layer computes, outputs are PEFT's on the model in place; what would write or copy offloaded weights is refused,
typed, with the model as it was; tensors offloaded after the load are refused at the forward, not computed with.

(The adapter tensors of an offloaded layer went to the meta device with its weight: LoRA computed with
uninitialised memory -- NaN, then 0.86 off -- and DoRA and IA3 raised torch's device RuntimeError.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
accelerate = pytest.importorskip("accelerate")

import adapterspec  # noqa: E402
from adapterspec.errors import UnsupportedError  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import assert_close, fresh, logits, peft_reference  # noqa: E402

#: layer 1 and the output layer on disk, the rest in place (what device_map="auto" makes of a model too large)
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "disk"}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=[*ALL, "embed_tokens"], use_dora=True),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "hra": lambda: peft.HRAConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj"]),  # odd r: random, not H = I
}


def _dispatched(model: nn.Module, tmp_path: Path) -> Any:
    return accelerate.dispatch_model(model, device_map=DEVICE_MAP, offload_dir=str(tmp_path / "offload"))


def _offloaded_weight(model: Any) -> Any:
    return model.model.layers[1].self_attn.v_proj.base_layer.weight


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_an_adapter_loaded_onto_offloaded_layers_computes_peft_outputs(llama: nn.Module, token_inputs: dict[str, Any],
                                                                      tmp_path: Path, method: str) -> None:
    reference = peft_reference(llama, CONFIGS[method](), tmp_path / "adapter")
    expected = logits(reference, token_inputs)
    assert (expected - logits(llama, token_inputs)).abs().max() > 1e-2
    model = _dispatched(fresh(llama), tmp_path)
    adapterspec.load_adapter(model, tmp_path / "adapter")
    assert _offloaded_weight(model).device.type == "meta"
    devices = {p.device.type for n, p in model.named_parameters() if "adapter_weights" in n}
    assert devices == {"cpu"}  # the execution device, not the offloaded weight's meta
    for _ in range(2):  # the weights go back to meta after each call
        assert_close(logits(model, token_inputs), expected)
    adapterspec.save_adapter(model, tmp_path / "saved")
    again = fresh(llama)
    adapterspec.load_adapter(again, tmp_path / "saved")
    assert torch.equal(logits(again, token_inputs), logits(model, token_inputs))


@pytest.mark.parametrize(("what", "call"), [
    ("merge", lambda m, folder: adapterspec.merge_adapters(m)),
    ("modules_to_save", lambda m, folder: adapterspec.load_adapter(m, folder / "saved_whole", adapter_name="whole")),
    ("pissa", lambda m, folder: adapterspec.load_adapter(m, folder / "pissa", adapter_name="pissa")),
])
def test_what_writes_or_copies_offloaded_weights_is_refused(llama: nn.Module, token_inputs: dict[str, Any],
                                                            tmp_path: Path, what: str, call: Any) -> None:
    peft_reference(llama, CONFIGS["lora"](), tmp_path / "adapter")
    peft_reference(llama, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                   tmp_path / "saved_whole")
    peft_reference(llama, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
                   tmp_path / "pissa")
    model = _dispatched(fresh(llama), tmp_path)
    adapterspec.load_adapter(model, tmp_path / "adapter")
    before = logits(model, token_inputs)
    with pytest.raises(UnsupportedError, match="accelerate offloads") as info:
        call(model, tmp_path)
    assert "load the model without offloading" in str(info.value)
    assert adapterspec.adapter_names(model) == ["default"]
    assert torch.equal(logits(model, token_inputs), before)


def test_adapter_tensors_offloaded_after_the_load_are_refused_at_the_forward(llama: nn.Module,
                                                                             token_inputs: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    """Dispatching after the load offloads the adapter's own tensors, which the adapter layer reads without a
    hook to bring them back: the forward refuses instead of computing with the meta device's no-values."""
    peft_reference(llama, CONFIGS["lora"](), tmp_path / "adapter")
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path / "adapter")
    model = _dispatched(model, tmp_path)
    with pytest.raises(UnsupportedError, match="load the adapter after dispatch_model"):
        logits(model, token_inputs)
