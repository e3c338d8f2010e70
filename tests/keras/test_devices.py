"""Where adapter variables live: ``device=`` places them, ``dtype=`` casts them; default: the wrapped kernel's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import adapterspec
from keras_helpers import unique_values



def _gpu() -> str | None:
    """The first GPU as the Keras backend in use names it (``device=`` takes that name); ``None`` without one."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return "/GPU:0" if tf.config.list_physical_devices("GPU") else None
    if backend == "jax":
        import jax

        return "gpu:0" if any(d.platform == "gpu" for d in jax.devices()) else None
    if backend == "torch":
        import torch

        return "cuda:0" if torch.cuda.is_available() else None
    return None


def _on_gpu(variable: keras.Variable) -> bool:
    value = variable.value
    if keras.backend.backend() == "jax":
        return all(d.platform == "gpu" for d in value.devices())
    if keras.backend.backend() == "torch":
        return bool(value.is_cuda)
    return "GPU:0" in value.device


def _model() -> keras.Model:
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(5, name="fc")(inputs))
    model.get_layer("fc").set_weights([unique_values((6, 5), 1, scale=0.5), unique_values((5,), 2)])
    return model


def _adapter(tmp_path: Path) -> Path:
    return adapterspec.write_adapter(tmp_path / "a", {"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                      "target_modules": ["fc"]},
                                     {"base_model.model.fc.lora_A.weight": unique_values((2, 6), 3),
                                      "base_model.model.fc.lora_B.weight": unique_values((5, 2), 4)})


def _adapter_variables(model: keras.Model) -> list[keras.Variable]:
    return [v for v in model.variables if "adapterspec_" in v.path]  # the adapter's bank layer


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="device strings are TensorFlow's")
def test_device_and_dtype_options(tmp_path: Path) -> None:
    model = _model()
    x = unique_values((3, 6), 5, scale=1.0)
    adapterspec.load_adapter(model, _adapter(tmp_path), device="/CPU:0", dtype="float16")
    variables = _adapter_variables(model)
    assert len(variables) == 1  # a frozen adapter: one arena variable
    assert all(v.dtype == "float16" for v in variables)
    assert all("CPU:0" in v.value.device for v in variables)
    saved = adapterspec.extract_adapter(model).load_tensors("numpy")
    a, b = (saved[f"base_model.model.fc.lora_{x}.weight"].astype(np.float32) for x in "AB")
    assert a.dtype == b.dtype == np.float32 and saved["base_model.model.fc.lora_A.weight"].dtype == np.float16
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.get_layer("fc").weights[:2])
    expected = x @ kernel + bias + (x @ a.T) @ b.T
    assert np.abs(keras.ops.convert_to_numpy(model(x)) - expected).max() <= 1e-3  # float16 adapter, float32 model


def test_default_dtype_is_the_kernels(tmp_path: Path) -> None:
    model = _model()
    adapterspec.load_adapter(model, _adapter(tmp_path))
    assert all(v.dtype == "float32" for v in _adapter_variables(model))
    saved = adapterspec.extract_adapter(model)
    assert {info.dtype for info in saved.tensors.values()} == {"F32"}


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="device strings are TensorFlow's")
@pytest.mark.parametrize(("option", "value"), [
    ("dtype", "int8"), ("dtype", np.uint8), ("dtype", "bool"), ("dtype", "float8_e4m3fn"), ("dtype", np.complex64),
    ("device", "nonsense"), ("device", 7), ("device", "/CPU:5"), ("device", "/GPU:99"),
    pytest.param("device", "/GPU:0", marks=pytest.mark.skipif(_gpu() is not None, reason="a GPU is there")),
])
def test_unusable_dtype_or_device_is_refused_up_front(tmp_path: Path, option: str, value: Any) -> None:
    """TensorFlow would put a variable meant for a device it lacks on another one without a word: refused, naming
    the option, as is a dtype adapters cannot compute in; the model is as before."""
    model = _model()
    folder = _adapter(tmp_path)
    x = unique_values((3, 6), 5, scale=1.0)
    before = keras.ops.convert_to_numpy(model(x))
    with pytest.raises(adapterspec.UnsupportedError) as info:
        adapterspec.load_adapter(model, folder, **{option: value})
    assert info.value.key == option and "fix: pass" in str(info.value)
    assert adapterspec.adapter_names(model) == [] and not hasattr(model, "_adapterspec_state")
    assert not _adapter_variables(model)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), before)


def test_meta_device_is_refused_on_every_backend(tmp_path: Path) -> None:
    """torch's meta device holds no values: on Keras' torch backend the adapter loaded there and the forward ran on
    uninitialised memory (outputs changing from run to run, once -2.7e33), the save raised a raw NotImplementedError."""
    model = _model()
    x = unique_values((3, 6), 5, scale=1.0)
    before = keras.ops.convert_to_numpy(model(x))
    with pytest.raises(adapterspec.UnsupportedError) as info:
        adapterspec.load_adapter(model, _adapter(tmp_path), device="meta")
    assert info.value.key == "device"
    assert adapterspec.adapter_names(model) == [] and not _adapter_variables(model)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), before)


def test_adapters_go_to_their_kernels_device_by_default(tmp_path: Path) -> None:
    """On the torch backend the kernel's device is a ``torch.device``, which was not read: the adapters went to Keras'
    default device instead of their kernel's (on a GPU machine, a model built on the CPU got adapters on the GPU)."""
    from adapterspec_keras.devices import device_of

    model = _model()
    adapterspec.load_adapter(model, _adapter(tmp_path))
    kernel = next(v for v in model.weights if v.path.endswith("kernel"))
    assert device_of(kernel) is not None or keras.backend.backend() == "jax"  # JAX: placed by its sharding
    for variable in _adapter_variables(model):
        assert device_of(variable) == device_of(kernel), variable.path


@pytest.mark.gpu
@pytest.mark.skipif(_gpu() is None, reason="needs a GPU the Keras backend can use")
def test_gpu_placement(tmp_path: Path) -> None:
    """On any Keras backend (TensorFlow, JAX, torch): ``device=`` puts the adapter on the GPU, and the output
    is the layer's plus the LoRA term, computed in float64 here."""
    model = _model()
    folder = _adapter(tmp_path)
    adapterspec.load_adapter(model, folder, device=_gpu())
    variables = _adapter_variables(model)
    assert variables and all(_on_gpu(v) for v in variables)
    x = unique_values((3, 6), 5, scale=1.0).astype(np.float64)
    kernel, bias = (keras.ops.convert_to_numpy(w).astype(np.float64) for w in model.get_layer("fc").weights[:2])
    saved = adapterspec.read_adapter(folder).load_tensors("numpy")
    a, b = (saved[f"base_model.model.fc.lora_{x}.weight"].astype(np.float64) for x in "AB")
    expected = x @ kernel + bias + (x @ a.T) @ b.T  # lora_alpha / r = 1
    got = keras.ops.convert_to_numpy(model(x.astype(np.float32))).astype(np.float64)
    # float32 products of 6 terms, then a sum of three: a few ulps of the largest magnitude
    assert np.abs(got - expected).max() <= 16 * np.finfo(np.float32).eps * max(np.abs(expected).max(), 1.0)


def test_as_tensor_shares_aligned_arrays_and_copies_others() -> None:
    """DLPack hand-over only for 64-byte-aligned arrays: TensorFlow's kernels abort on unaligned buffers."""
    from adapterspec_keras.bank import as_tensor
    from adapterspec_keras.state import _aligned_empties

    _, (aligned,) = _aligned_empties([((4, 8), "float32")])
    aligned[...] = np.arange(32, dtype=np.float32).reshape(4, 8)
    raw = np.empty(4 * 8 * 4 + 4, np.uint8)
    start = 4 if raw.ctypes.data % 64 == 0 else 0
    unaligned = raw[start:start + 128].view(np.float32).reshape(4, 8)
    unaligned[...] = aligned
    assert unaligned.ctypes.data % 64 != 0
    a, u = as_tensor(aligned, "float32"), as_tensor(unaligned, "float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(a[1:3]), aligned[1:3])  # a strided slice runs
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(u[1:3]), aligned[1:3])
    if keras.backend.backend() == "tensorflow":
        aligned[0, 0] = -1.0  # shared memory: the aligned array was not copied
        unaligned[0, 0] = -1.0
        assert float(keras.ops.convert_to_numpy(a)[0, 0]) == -1.0
        assert float(keras.ops.convert_to_numpy(u)[0, 0]) == 0.0


@pytest.mark.parametrize("trainable", [False, True], ids=["arena", "groups"])
def test_saved_tensors_keep_their_values_when_the_variables_change_after(tmp_path: Path, trainable: bool) -> None:
    """A save reads the adapter's variables without copying them where the backend allows (``host_array``); what
    it read must stay a snapshot while the file is written, whatever assigns the variables meanwhile (a training
    step in another thread)."""
    from adapterspec_keras.devices import host_array
    from adapterspec_keras.state import extract_state

    model = _model()
    if trainable:
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["fc"],
                                           "init_lora_weights": False})
    else:
        adapterspec.load_adapter(model, _adapter(tmp_path))
    _, tensors = extract_state(model, "default")
    before = {key: value.copy() for key, value in tensors.items()}
    variables = _adapter_variables(model)
    assert variables and len(variables) == (2 if trainable else 1)
    read = [host_array(v, snapshot=True) for v in variables]
    kept = [r.copy() for r in read]
    for v in variables:
        v.assign(keras.ops.add(v, 1.0))
    assert all(np.array_equal(r, k) for r, k in zip(read, kept))
    assert sorted(tensors) == sorted(before)
    for key, value in tensors.items():
        assert np.array_equal(value, before[key]), key
    _, after = extract_state(model, "default")  # and a new read sees the new values
    assert all(np.array_equal(after[key], before[key] + 1.0) for key in before)
