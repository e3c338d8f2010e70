"""The plugin's contract: importing it imports no framework; it claims Keras models and layers only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

import adapterspec

REPO = Path(adapterspec.__file__).resolve().parents[2]


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
                         ("adapterspec_delete", {"adapter_name": "x", "unloading": False}), ("adapterspec_extract_state", {"adapter_name": "x"})]:
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


KERAS_ON_TORCH = """
import json, sys
import numpy as np
import torch
import keras
import adapterspec
from adapterspec_torch import plugin as torch_plugin
inp = keras.Input((4,))
model = keras.Model(inp, keras.layers.Dense(3, name="q")(inp))
assert isinstance(model, torch.nn.Module)  # why ownership can be ambiguous at all
x = np.arange(4, dtype="float32").reshape(1, 4) + 1
base = keras.ops.convert_to_numpy(model(x))
loaded = adapterspec.load_adapter(model, sys.argv[1])
delta = keras.ops.convert_to_numpy(model(x)) - base
adapterspec.save_adapter(model, sys.argv[2])
claimed = [h for h, kw in [("adapterspec_backend_name", {}), ("adapterspec_adapter_names", {}),
                           ("adapterspec_active_adapters", {}), ("adapterspec_base_identity", {"adapter_name": "default"}),
                           ("adapterspec_extract_state", {"adapter_name": "default"}),
                           ("adapterspec_reads_slices", {"options": None}), ("adapterspec_write", {"write": None}),
                           ("adapterspec_read_buffer", {"nbytes": 1, "options": None})]
           if getattr(torch_plugin, h)(model=model, **kw) is not None]
print(json.dumps({"backend": adapterspec.backend_name(model), "loaded": loaded, "delta": delta.tolist(),
                  "claimed_by_torch": claimed}))
"""


def test_keras_model_on_keras_torch_backend_is_the_keras_backends(tmp_path: Path) -> None:
    """On Keras' torch backend a Keras model is also a ``torch.nn.Module``: the torch backend must not claim it
    (save_adapter crashed in the torch backend's identity hook: 'ModelState' object has no attribute 'base_weights')."""
    pytest.importorskip("torch")
    import numpy as np
    from safetensors.numpy import load_file, save_file

    a = np.arange(1, 9, dtype=np.float32).reshape(2, 4) / 8
    b = np.arange(1, 7, dtype=np.float32).reshape(3, 2) / 4
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "target_modules": ["q"], "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.q.lora_A.weight": a, "base_model.model.q.lora_B.weight": b},
              str(src / "adapter_model.safetensors"), metadata={"format": "pt"})
    env = {**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(REPO / "sdk"), str(REPO / "plugins")])}
    proc = subprocess.run([sys.executable, "-c", KERAS_ON_TORCH, str(src), str(out)], capture_output=True, text=True,
                          env=env, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == "keras" and result["claimed_by_torch"] == []
    assert result["loaded"] == ["q"]
    x = np.arange(4, dtype=np.float32).reshape(1, 4) + 1
    np.testing.assert_allclose(result["delta"], 2.0 * (x @ a.T @ b.T), rtol=1e-6)  # scaling lora_alpha / r = 2
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(saved) == ["base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"]
    np.testing.assert_array_equal(saved["base_model.model.q.lora_A.weight"], a)
    np.testing.assert_array_equal(saved["base_model.model.q.lora_B.weight"], b)
