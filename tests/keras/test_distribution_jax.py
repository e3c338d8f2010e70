"""Keras 3 on JAX under ``keras.distribution`` (SPMD over 8 virtual CPU devices): a keras-hub Llama whose
kernels are sharded by a ``LayoutMap`` (``ModelParallel``), or replicated with the batch split (``DataParallel``),
loads a PEFT LoRA with the unsharded model's logits (and PEFT's), keeps every adapter variable on the model's
whole mesh, and saves the tensors the unsharded model saves, bit for bit (the save gathers).

Under ``ModelParallel`` each adapter variable is laid out like its base kernel (SPEC.md 16,
:mod:`adapterspec_keras.sharding`): ``lora_A`` split on its input axis where the kernel is split on its input
features (row parallel: q/k/v, o, down), ``lora_B`` on its output axis where the kernel is split on its output
features (column parallel: gate, up), the rest whole -- for a frozen load (no arena then) and for trainable groups;
one ``fit`` step of a trainable adapter equals the unsharded step. Under ``DataParallel`` nothing changes (one
replicated arena, as on one device).

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

#: Further adapters the child loads (folder name -> PEFT config), for the layouts of other tensors.
EXTRAS = {"emb": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
          "dora": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"], use_dora=True),
          "ia3": dict(target_modules=["k_proj", "gate_proj", "down_proj"], feedforward_modules=["down_proj"])}

CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
import jax, keras, keras_hub
import adapterspec

checkpoint, adapter, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
EXTRAS = json.loads(sys.argv[4])
ids = np.load(out / "ids.npy")
inputs = {"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids, dtype="int32")}


def build():
    return keras_hub.models.Llama3CausalLM.from_preset(str(checkpoint), preprocessor=None)


def shardings(model):
    return {v.path: spec_of(v) for v in model.weights}


def adapter_meshes(model):
    # every adapter variable: the devices it is laid out over
    return sorted({len(v.value.sharding.device_set) for v in model.weights if v.path.startswith("adapterspec_")})


def spec_of(variable):
    # the PartitionSpec, written out for each axis (JAX may leave out trailing whole axes, or write a one-name tuple)
    spec = [e[0] if isinstance(e, tuple) and len(e) == 1 else e
            for e in getattr(variable.value.sharding, "spec", ())]  # one device: SingleDeviceSharding, no spec
    return spec + [None] * (len(variable.shape) - len(spec))


def adapter_specs(model, name="default"):
    # module kind (q_proj...) -> parameter -> the PartitionSpecs of the variables holding it ([count, *stored])
    from adapterspec_keras.switch import get_state

    out = {}
    for layer in get_state(model).adapter_layers.values():
        if name not in layer.adapter_names():
            continue
        path, _, refs = layer.parameters(name)
        for param, ref in refs.items():
            specs = out.setdefault(path.rsplit(".", 1)[-1], {}).setdefault(param, [])
            bank = layer.bank(name)
            spec = spec_of(bank._arena if bank._arena is not None else bank.variable(ref.key))
            if spec not in specs:
                specs.append(spec)
    return out


def fit_one_step(model, lr=0.5):
    model.compile(optimizer=keras.optimizers.SGD(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(inputs, np.roll(ids, -1, axis=1).astype("int32"), epochs=1, batch_size=len(ids), shuffle=False,
              verbose=0)


report = {"devices": len(jax.devices())}
model = build()
report["loaded"] = sorted(adapterspec.load_adapter(model, adapter))
np.save(out / "plain.npy", np.asarray(model(inputs)))
adapterspec.save_adapter(model, out / "plain", overwrite=True)
config = json.loads((adapter / "adapter_config.json").read_text())


def adopt(model, name, folder):
    # the values of a saved adapter into adapter `name`'s variables, row by row (bank.assign; the layouts stay)
    from adapterspec.naming import make_key
    from adapterspec_keras.switch import get_state
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for layer in get_state(model).adapter_layers.values():
        path, layouts, refs = layer.parameters(name)
        for param, ref in refs.items():
            layer.bank(name).assign(ref, layouts[param].to_stored(tensors[make_key(path, param)]))


def trained(model, tag):
    # a trainable inject and a trainable load (the file's values: A and B both get gradients), one fit step each;
    # saved. The sharded inject starts from the unsharded one's random draw (JAX draws another one for a sharded
    # variable), written in row by row.
    keras.utils.set_random_seed(7)
    adapterspec.inject_adapter(model, config, "fresh", trainable=True)
    if tag != "plain_train":
        adopt(model, "fresh", out / "plain_train_fresh_init")
    adapterspec.load_adapter(model, adapter, "loaded", trainable=True)
    specs = {name: adapter_specs(model, name) for name in ("fresh", "loaded")}
    for name in ("fresh", "loaded"):
        adapterspec.set_active_adapters(model, name)
        adapterspec.save_adapter(model, out / f"{tag}_{name}_init", name, overwrite=True)
        fit_one_step(model)
        adapterspec.save_adapter(model, out / f"{tag}_{name}_step", name, overwrite=True)
    return specs


trained(build(), "plain_train")

# more layouts: a LoRA on the (vocab-split) embedding, DoRA on a column- and a row-parallel kernel
extras = {name: out / "peft_extra" / name for name in EXTRAS}


def load_extras(model):
    active = adapterspec.active_adapters(model)
    for name, folder in extras.items():
        adapterspec.load_adapter(model, folder, name)
    outputs = {}
    for name in extras:
        adapterspec.set_active_adapters(model, name)
        outputs[name] = np.asarray(model(inputs))
    if active:
        adapterspec.set_active_adapters(model, active)
    return outputs


model = build()
for name, logits in load_extras(model).items():
    np.save(out / f"plain_{name}.npy", logits)

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
        report[name + "_adapter_specs"] = {v.path: spec_of(v) for v in model.weights
                                           if v.path.startswith("adapterspec_")}
        if name == "model_parallel":
            report[name + "_module_specs"] = adapter_specs(model)
            for extra, logits in load_extras(model).items():
                np.save(out / f"{name}_{extra}.npy", logits)
                report[name + "_specs_" + extra] = adapter_specs(model, extra)
                adapterspec.delete_adapter(model, extra)
            # merging into sharded kernels: the same logits, the kernels' layouts kept
            adapterspec.merge_adapters(model, "default")
            np.save(out / f"{name}_merged.npy", np.asarray(model(inputs)))
            report[name + "_merged_layouts_kept"] = all(shardings(model)[k] == s for k, s in before.items())
            adapterspec.unmerge_adapters(model)
        np.save(out / f"{name}.npy", np.asarray(model(inputs)))
        adapterspec.save_adapter(model, out / name, overwrite=True)
        adapterspec.delete_adapter(model, "default")
        report[name + "_restored"] = shardings(model) == before
    if name == "model_parallel":
        with distribution.scope():
            report[name + "_train_specs"] = trained(build(), name + "_train")
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def run(checkpoints: Any, token_ids: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("spmd")
    peft_model, adapter = make_peft_adapter(checkpoints["llama"], out / "peft", peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(ARCHS["llama"].linear_targets)))
    np.save(out / "ids.npy", token_ids)
    np.save(out / "peft_logits.npy", torch_logits(peft_model, token_ids))
    for i, (name, kwargs) in enumerate(EXTRAS.items()):
        kind = peft.IA3Config if name == "ia3" else peft.LoraConfig
        extra, _ = make_peft_adapter(checkpoints["llama"], out / "peft_extra" / name, kind(**kwargs), salt=i + 1)
        np.save(out / f"peft_{name}.npy", torch_logits(extra, token_ids))
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
           "PYTHONPATH": os.pathsep.join([str(REPO / "sdk"), str(REPO / "plugins")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(checkpoints["llama"]), str(adapter), str(out),
                           json.dumps(list(EXTRAS))],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
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


#: The PartitionSpec of each adapter variable ([count, *stored]: lora_A [count, r, in], lora_B [count, out, r]) under
#: the LayoutMap above: q/k/v ([hidden, heads, head_dim] split on hidden), o ([heads, head_dim, hidden] split on
#: heads) and down ([intermediate, hidden] split on intermediate) are row parallel: lora_A split on its input axis,
#: lora_B whole; gate/up ([hidden, intermediate] split on intermediate) are column parallel: lora_B split on its
#: output axis, lora_A whole.
_ROW = {"lora_A.weight": [[None, None, "model"]], "lora_B.weight": [[None, None, None]]}
_COLUMN = {"lora_A.weight": [[None, None, None]], "lora_B.weight": [[None, "model", None]]}
EXPECTED_SPECS = {"q_proj": _ROW, "k_proj": _ROW, "v_proj": _ROW, "o_proj": _ROW, "down_proj": _ROW,
                  "gate_proj": _COLUMN, "up_proj": _COLUMN}


def test_model_parallel_adapter_variables_are_laid_out_like_their_kernels(run: dict[str, Any]) -> None:
    assert run["model_parallel_module_specs"] == EXPECTED_SPECS
    for name in ("fresh", "loaded"):  # trainable groups too (an inject, a trainable load)
        assert run["model_parallel_train_specs"][name] == EXPECTED_SPECS, name
    # no arena: one variable per (parameter, shape, layout) group
    assert all(len(spec) == 3 for spec in run["model_parallel_adapter_specs"].values())


def test_data_parallel_adapter_variables_stay_replicated(run: dict[str, Any]) -> None:
    specs = run["data_parallel_adapter_specs"]
    assert specs and all(all(axis is None for axis in spec) for spec in specs.values())
    assert list(specs) == [next(iter(specs))] and len(next(iter(specs.values()))) == 1  # one arena, as on one device


@pytest.mark.parametrize("name", ["fresh", "loaded"])
def test_model_parallel_fit_step_is_the_unsharded_step(run: dict[str, Any], name: str) -> None:
    out = run["out"]
    plain_init = load_file(str(out / f"plain_train_{name}_init" / "adapter_model.safetensors"))
    plain = load_file(str(out / f"plain_train_{name}_step" / "adapter_model.safetensors"))
    sharded_init = load_file(str(out / f"model_parallel_train_{name}_init" / "adapter_model.safetensors"))
    sharded = load_file(str(out / f"model_parallel_train_{name}_step" / "adapter_model.safetensors"))
    assert plain.keys() == sharded.keys() == plain_init.keys() and len(plain) == 2 * 2 * 7
    moved = 0
    for key, value in plain.items():
        assert np.array_equal(sharded_init[key], plain_init[key]), key  # the same start
        moved += not np.array_equal(value, plain_init[key])
        assert_near(sharded[key], value, msg=key)
    assert moved >= len(plain) // 2  # the step changed the adapter (B at least; A too where B is not zero)


_EMB = {"lora_embedding_A": [[None, None, "model"]], "lora_embedding_B": [[None, None, None]]}
EXTRA_SPECS = {"emb": {"embed_tokens": _EMB, "q_proj": _ROW},
               "dora": {"gate_proj": {**_COLUMN, "lora_magnitude_vector": [[None, "model"]]},
                        "down_proj": {**_ROW, "lora_magnitude_vector": [[None, None]]}},
               # IA3's vector: over outputs (k: whole, its kernel split on inputs; gate: split), over inputs for the
               # feedforward down (split)
               "ia3": {"k_proj": {"ia3_l": [[None, None]]}, "gate_proj": {"ia3_l": [[None, "model"]]},
                       "down_proj": {"ia3_l": [[None, "model"]]}}}


@pytest.mark.parametrize("name", list(EXTRAS))
def test_model_parallel_embedding_dora_and_ia3_layouts(run: dict[str, Any], name: str) -> None:
    out = run["out"]
    assert run["model_parallel_specs_" + name] == EXTRA_SPECS[name]
    plain = np.load(out / f"plain_{name}.npy")
    assert_near(plain, np.load(out / f"peft_{name}.npy"), msg=f"{name}: unsharded Keras vs PEFT")
    assert_near(np.load(out / f"model_parallel_{name}.npy"), plain, msg=f"{name}: model_parallel vs unsharded")


def test_model_parallel_merge_keeps_the_kernels_layouts(run: dict[str, Any]) -> None:
    assert run["model_parallel_merged_layouts_kept"]
    assert_near(np.load(run["out"] / "model_parallel_merged.npy"), np.load(run["out"] / "plain.npy"), msg="merged")
