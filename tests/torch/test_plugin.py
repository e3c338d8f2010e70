"""The plugin's contract: cheap imports, claiming torch models only, fresh adapters for training, base weights
from the file (resized embeddings)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import adapterspec  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch_helpers import assert_close, fresh, logits, peft_reference, unique_values  # noqa: E402


@pytest.mark.parametrize("statement", ["import adapterspec", "import adapterspec_torch.plugin",
                                       "import adapterspec; adapterspec.backend_name(object()) if False else None; "
                                       "from adapterspec.plugins import get_plugin_manager; "
                                       "get_plugin_manager().hook.adapterspec_backend_name(model=object())"])
def test_imports_do_not_import_torch(statement: str) -> None:
    code = f"{statement}\nimport sys\nprint(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_claims_torch_modules_only() -> None:
    from adapterspec_torch import plugin

    assert adapterspec.backend_name(torch.nn.Linear(2, 2)) == "torch"
    assert plugin.adapterspec_backend_name(object()) is None
    for hook, kwargs in [("adapterspec_adapter_names", {}), ("adapterspec_active_adapters", {}),
                         ("adapterspec_set_active", {"adapter_names": []}), ("adapterspec_unmerge", {}),
                         ("adapterspec_delete", {"adapter_name": "x", "unloading": False}), ("adapterspec_extract_state", {"adapter_name": "x"})]:
        assert getattr(plugin, hook)(model=object(), **kwargs) is None
    assert plugin.adapterspec_adapter_names(model=torch.nn.Linear(2, 2)) == []
    assert [i.name for i in plugin.adapterspec_conformance_implementations()] == ["torch"]


def test_inject_train_save_load_in_peft(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    model = fresh(llama).requires_grad_(False)  # adapterspec never changes the base's requires_grad
    modules = adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                 "target_modules": ["q_proj", "v_proj"]})
    assert modules == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert_close(logits(model, token_inputs), logits(llama, token_inputs), atol=0)  # B starts at zero
    trainable = [p for p in model.parameters() if p.requires_grad]
    base_count = sum(1 for _ in llama.parameters())
    assert len(trainable) == 8 and len(list(model.parameters())) == base_count + 8
    model.train()
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):
        out = model(**token_inputs, labels=token_inputs["input_ids"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trained = logits(model, token_inputs)
    assert (trained - logits(llama, token_inputs)).abs().max() > 1e-4
    adapterspec.save_adapter(model, tmp_path)

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama), str(tmp_path)).eval()
    assert_close(logits(reference, token_inputs), trained)


def test_base_layer_weight_from_file(llama: Any, token_inputs: Any, tmp_path: Any) -> None:
    """PEFT saves the whole embedding with LoRA on it (``embed_tokens.base_layer.weight``): it is used while the
    adapter is loaded, saved again with it, and the original parameter comes back on delete."""
    from peft import LoraConfig, PeftModel

    peft_reference(llama, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), tmp_path / "peft")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    tensors[key] = unique_values(tuple(tensors[key].shape), 7, scale=1.0)  # a re-trained / resized embedding
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(fresh(llama), str(tmp_path / "peft")).eval()

    model = fresh(llama)
    original = model.model.embed_tokens.weight
    adapterspec.load_adapter(model, tmp_path / "peft")
    assert torch.equal(model.model.embed_tokens.base_layer.weight, tensors[key])
    assert_close(logits(model, token_inputs), logits(reference, token_inputs))
    adapterspec.save_adapter(model, tmp_path / "ours")
    assert torch.equal(load_file(tmp_path / "ours" / "adapter_model.safetensors")[key], tensors[key])
    adapterspec.delete_adapter(model, "default")
    assert model.model.embed_tokens.weight is original
    assert torch.equal(original, llama.model.embed_tokens.weight)


def test_layer_attributes_fall_through(llama: Any, tmp_path: Any) -> None:
    from peft import LoraConfig

    peft_reference(llama, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), tmp_path)
    model = fresh(llama)
    adapterspec.load_adapter(model, tmp_path)
    q = model.model.layers[0].self_attn.q_proj
    assert q.in_features == 64 and q.weight is q.base_layer.weight
    assert model.get_input_embeddings().num_embeddings == 128
