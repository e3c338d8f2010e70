"""The plugin's contract: importing it imports no framework; it claims Keras models and layers only."""

from __future__ import annotations

import subprocess
import sys

import keras
import pytest

import adapterspec


@pytest.mark.parametrize("statement", ["import adapterspec_keras.plugin", "import adapterspec_keras",
                                       "from adapterspec.plugins import get_plugin_manager; "
                                       "get_plugin_manager().hook.adapterspec_backend_name(model=object())"])
def test_imports_do_not_import_keras(statement: str) -> None:
    code = f"{statement}\nimport sys\nprint(sorted(m for m in ('torch', 'tensorflow', 'keras', 'keras_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_claims_keras_models_and_layers_only() -> None:
    from adapterspec_keras import plugin

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")])
    assert adapterspec.backend_name(model) == "keras"
    assert plugin.adapterspec_backend_name(keras.layers.Dense(2)) == "keras"
    assert plugin.adapterspec_backend_name(object()) is None
    for hook, kwargs in [("adapterspec_adapter_names", {}), ("adapterspec_active_adapters", {}),
                         ("adapterspec_set_active", {"adapter_names": []}), ("adapterspec_unmerge", {}),
                         ("adapterspec_delete", {"adapter_name": "x"}), ("adapterspec_extract_state", {"adapter_name": "x"})]:
        assert getattr(plugin, hook)(model=object(), **kwargs) is None
    assert plugin.adapterspec_adapter_names(model=model) == []
    assert plugin.adapterspec_active_adapters(model=model) == []
    assert isinstance(plugin.adapterspec_conformance_implementations(), list)
    with pytest.raises(adapterspec.AdapterNotFoundError):
        adapterspec.extract_adapter(model, "nothing")


def test_torch_modules_are_not_claimed() -> None:
    torch = pytest.importorskip("torch")
    from adapterspec_keras import plugin

    assert plugin.adapterspec_backend_name(torch.nn.Linear(2, 2)) is None


def test_hand_built_model_uses_its_own_layer_names() -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="up"), keras.layers.Dense(2, name="down")])
    modules = adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 1, "target_modules": ["up", "down"]})
    assert modules == ["up", "down"]
    assert sorted(adapterspec.extract_adapter(model).tensors) == [
        "base_model.model.down.lora_A.weight", "base_model.model.down.lora_B.weight",
        "base_model.model.up.lora_A.weight", "base_model.model.up.lora_B.weight"]
