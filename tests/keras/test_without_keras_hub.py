"""The Keras backend without keras-hub (Keras on JAX or torch, installed without TensorFlow): a plain Functional
model loads a LoRA exactly; nothing asks for keras-hub."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import adapterspec

REPO = Path(adapterspec.__file__).resolve().parents[2]

SCRIPT = """
import sys, json
sys.modules["keras_hub"] = None  # import keras_hub now fails, as when it is not installed
import numpy as np
import keras
import adapterspec
inp = keras.Input((4,))
model = keras.Model(inp, keras.layers.Dense(3, name="q")(inp))
x = np.arange(4, dtype="float32").reshape(1, 4) + 1
base = np.asarray(model(x))
loaded = adapterspec.load_adapter(model, sys.argv[1])
print(json.dumps({"loaded": loaded, "delta": (np.asarray(model(x)) - base).tolist()}))
"""


def test_plain_keras_model_loads_without_keras_hub(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    a = np.arange(1, 9, dtype=np.float32).reshape(2, 4) / 8
    b = np.arange(1, 7, dtype=np.float32).reshape(3, 2) / 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "target_modules": ["q"], "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.q.lora_A.weight": a, "base_model.model.q.lora_B.weight": b},
              str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    backend = "jax" if importlib.util.find_spec("jax") else "tensorflow"  # the lightest at hand
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(REPO / "sdk"), str(REPO / "plugins")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    x = np.arange(4, dtype=np.float32).reshape(1, 4) + 1
    assert out["loaded"] == ["q"]
    np.testing.assert_allclose(out["delta"], 2.0 * (x @ a.T @ b.T), rtol=1e-6)  # scaling lora_alpha / r = 2
