"""Keras 3 on JAX under ``keras.distribution`` (SPMD over 8 virtual CPU devices): a keras-hub Llama whose
kernels are sharded by a ``LayoutMap`` (``ModelParallel``), or replicated with the batch split (``DataParallel``),
loads a PEFT LoRA with the unsharded model's logits (and PEFT's), keeps every adapter variable on the model's
whole mesh, and saves the tensors the unsharded model saves, bit for bit (the save gathers).

JAX and its device count are fixed at import, so the model runs in a child process
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, ``KERAS_BACKEND=jax``), bounded in time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
if importlib.util.find_spec("jax") is None:
    pytest.skip("needs JAX (Keras' jax backend)", allow_module_level=True)

import adapterspec  # noqa: E402
from keras_helpers import ARCHS, assert_near, make_peft_adapter, torch_logits  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

REPO = Path(adapterspec.__file__).resolve().parents[2]

CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
import jax, keras, keras_hub
import adapterspec

checkpoint, adapter, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ids = np.load(out / "ids.npy")
inputs = {"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids, dtype="int32")}


def build():
    return keras_hub.models.Llama3CausalLM.from_preset(str(checkpoint), preprocessor=None)


def shardings(model):
    return {v.path: str(v.value.sharding.spec) for v in model.weights}


def adapter_meshes(model):
    # every adapter variable: the devices it is laid out over
    return sorted({len(v.value.sharding.device_set) for v in model.weights if v.path.startswith("adapterspec_")})


report = {"devices": len(jax.devices())}
model = build()
report["loaded"] = sorted(adapterspec.load_adapter(model, adapter))
np.save(out / "plain.npy", np.asarray(model(inputs)))
adapterspec.save_adapter(model, out / "plain", overwrite=True)

devices = keras.distribution.list_devices()
mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
layout = keras.distribution.LayoutMap(mesh)
layout["token_embedding/embeddings"] = ("model", None)
layout[".*self_attention.*(query|key|value).kernel"] = ("model", None, None)
layout[".*attention_output.kernel"] = ("model", None, None)
layout[".*feedforward_(intermediate|gate)_dense.kernel"] = (None, "model")
layout[".*feedforward_output_dense.kernel"] = ("model", None)
for name, distribution in (("model_parallel", keras.distribution.ModelParallel(layout_map=layout,
                                                                                batch_dim_name="batch")),
                           ("data_parallel", keras.distribution.DataParallel(devices=devices))):
    with distribution.scope():
        model = build()
        before = shardings(model)
        report[name + "_sharded_kernels"] = sum("model" in spec for spec in before.values())
        report[name + "_loaded"] = sorted(adapterspec.load_adapter(model, adapter))
        report[name + "_base_layouts_kept"] = all(shardings(model)[k] == s for k, s in before.items())
        report[name + "_adapter_meshes"] = adapter_meshes(model)
        np.save(out / f"{name}.npy", np.asarray(model(inputs)))
        adapterspec.save_adapter(model, out / name, overwrite=True)
        adapterspec.delete_adapter(model, "default")
        report[name + "_restored"] = shardings(model) == before
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def run(checkpoints: Any, token_ids: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("spmd")
    peft_model, adapter = make_peft_adapter(checkpoints["llama"], out / "peft", peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(ARCHS["llama"].linear_targets)))
    np.save(out / "ids.npy", token_ids)
    np.save(out / "peft_logits.npy", torch_logits(peft_model, token_ids))
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
           "PYTHONPATH": os.pathsep.join([str(REPO / "sdk"), str(REPO / "plugins")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(checkpoints["llama"]), str(adapter), str(out)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    report["out"], report["adapter"] = out, adapter
    return report


@pytest.mark.parametrize("name", ["model_parallel", "data_parallel"])
def test_sharded_model_gives_the_unsharded_logits_and_peft_s(run: dict[str, Any], name: str) -> None:
    out = run["out"]
    assert run["devices"] == 8
    if name == "model_parallel":
        assert run[name + "_sharded_kernels"] == 2 * 7 + 1  # 7 kernels per layer and the embedding: really sharded
    assert run[name + "_loaded"] == run["loaded"] and len(run["loaded"]) == 2 * 7
    assert run[name + "_base_layouts_kept"] and run[name + "_restored"]
    assert run[name + "_adapter_meshes"] == [8]  # on the model's whole mesh (replicated: SPEC.md 16)
    plain, peft_logits = np.load(out / "plain.npy"), np.load(out / "peft_logits.npy")
    assert_near(plain, peft_logits, msg="unsharded Keras vs PEFT")
    assert_near(np.load(out / f"{name}.npy"), plain, msg=f"{name} vs unsharded")


@pytest.mark.parametrize("name", ["model_parallel", "data_parallel"])
def test_sharded_save_is_the_unsharded_save(run: dict[str, Any], name: str) -> None:
    peft_file = load_file(str(run["adapter"] / "adapter_model.safetensors"))
    plain = load_file(str(run["out"] / "plain" / "adapter_model.safetensors"))
    sharded = load_file(str(run["out"] / name / "adapter_model.safetensors"))
    assert sharded.keys() == plain.keys() == peft_file.keys()
    for key, value in plain.items():
        assert sharded[key].dtype == value.dtype and np.array_equal(sharded[key], value), key
        assert np.array_equal(value, peft_file[key]), key  # the round trip is exact too
