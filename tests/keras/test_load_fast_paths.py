"""The keras backend's load fast paths keep its behaviour: keys looked up among the injected parameters
(parsed only when not found there), slot plans shared between modules of one shape, the device memo, and
a deleted adapter's memory given back at once."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import keras
import numpy as np
import pytest

import adapterspec
from keras_helpers import assert_near, unique_values

_MODULES = {"fc1": (6, 6), "fc2": (6, 6), "head": (6, 5)}  # name -> (in, out)


def _model() -> keras.Model:
    inputs = keras.Input((6,))
    x = inputs
    for i, (name, (_, n_out)) in enumerate(_MODULES.items()):
        layer = keras.layers.Dense(n_out, name=name)
        x = layer(x)
        layer.set_weights([unique_values(layer.kernel.shape, 10 + i, scale=0.5), unique_values((n_out,), 20 + i)])
    return keras.Model(inputs, x)


def _tensors(root: str = "", r: int = 2) -> dict[str, np.ndarray]:
    out = {}
    for i, (name, (n_in, n_out)) in enumerate(_MODULES.items()):
        out[f"base_model.model.{root}{name}.lora_A.weight"] = unique_values((r, n_in), 30 + i)
        out[f"base_model.model.{root}{name}.lora_B.weight"] = unique_values((n_out, r), 40 + i)
    return out


def _write(folder: Path, tensors: dict[str, np.ndarray], r: int = 2, *, checked: bool = True) -> Path:
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(_MODULES)}
    if checked:
        return adapterspec.write_adapter(folder, config, tensors)
    from safetensors.numpy import save_file  # a broken file, as write_adapter never writes one

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config), "utf-8")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _expected(x: np.ndarray, model: keras.Model, tensors: dict[str, np.ndarray], root: str = "") -> np.ndarray:
    """The adapted forward pass in NumPy: each Dense plus 2 * B @ A (alpha / r = 2)."""
    for name in _MODULES:
        kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.get_layer(name).weights[:2])
        a, b = tensors[f"base_model.model.{root}{name}.lora_A.weight"], tensors[f"base_model.model.{root}{name}.lora_B.weight"]
        x = x @ kernel + bias + 2.0 * (x @ a.T) @ b.T
    return x


def _adapter_variables(model: keras.Model) -> list[keras.Variable]:
    return [v for v in model.variables if "adapterspec_" in v.path]  # the adapters' bank layers


def test_keys_under_another_module_root_load_and_save_back_under_it(tmp_path: Path) -> None:
    """``outer.fc1`` is not a canonical key of the injected ``fc1``: it takes the parsing path, loads into
    ``fc1`` and saves back as the file named it, exactly as canonical keys do."""
    x = unique_values((3, 6), 5, scale=1.0)
    plain, other = _tensors(), _tensors("outer.")
    a, b = _model(), _model()
    adapterspec.load_adapter(a, _write(tmp_path / "plain", plain))
    adapterspec.load_adapter(b, _write(tmp_path / "other", other))
    assert_near(keras.ops.convert_to_numpy(a(x)), _expected(x, a, plain))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(b(x)), keras.ops.convert_to_numpy(a(x)))
    saved = adapterspec.extract_adapter(b).load_tensors("numpy")
    assert sorted(saved) == sorted(other)
    for key, value in other.items():
        np.testing.assert_array_equal(saved[key], value)


def test_a_file_mixing_both_roots_loads_each_module_once(tmp_path: Path) -> None:
    x = unique_values((3, 6), 6, scale=1.0)
    tensors = _tensors()
    mixed = {k.replace("model.fc2.", "model.outer.fc2."): v for k, v in tensors.items()}
    model = _model()
    adapterspec.load_adapter(model, _write(tmp_path / "mixed", mixed))
    assert_near(keras.ops.convert_to_numpy(model(x)), _expected(x, model, tensors))
    assert sorted(adapterspec.extract_adapter(model).tensors) == sorted(mixed)


@pytest.mark.parametrize("change, error", [
    ("shape", adapterspec.ShapeMismatchError), ("missing", adapterspec.MissingTensorError),
    ("unknown module", adapterspec.UnexpectedTensorError), ("unknown param", adapterspec.UnexpectedTensorError)])
def test_a_bad_tensor_is_refused_naming_it_and_the_model_is_unchanged(tmp_path: Path, change: str,
                                                                      error: type[Exception]) -> None:
    tensors = _tensors()
    key = "base_model.model.fc2.lora_B.weight"
    if change == "shape":
        tensors[key] = unique_values((6, 3), 50)
    elif change == "missing":
        del tensors[key]
    elif change == "unknown module":
        tensors["base_model.model.fc9.lora_A.weight"] = unique_values((2, 6), 51)
    else:
        tensors["base_model.model.fc2.lora_B.bias"] = unique_values((6,), 52)
    model = _model()
    x = unique_values((3, 6), 7, scale=1.0)
    before = keras.ops.convert_to_numpy(model(x))
    variables = len(model.variables)
    with pytest.raises(error) as raised:
        adapterspec.load_adapter(model, _write(tmp_path / "bad", tensors, checked=False))
    assert raised.value.key is not None and ("fc" in raised.value.key)
    assert adapterspec.adapter_names(model) == [] and len(model.variables) == variables
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), before)


def test_modules_of_one_shape_share_bank_groups_and_options_split_them(tmp_path: Path) -> None:
    from adapterspec_keras.switch import get_state

    model = _model()
    folder = _write(tmp_path / "a", _tensors())
    adapterspec.load_adapter(model, folder, "a")
    adapterspec.load_adapter(model, folder, "h", dtype="float16")
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 4, "target_modules": list(_MODULES)}, "t")
    state = get_state(model)
    groups = {name: {(k.param, k.shape, k.dtype, k.trainable, k.init[0]): n for k, n in bank.groups().items()}
              for name, (bank, _) in state.banks.items()}
    assert groups["a"] == {("lora_A.weight", (2, 6), "float32", False, "zeros"): 3,
                           ("lora_B.weight", (6, 2), "float32", False, "zeros"): 2,
                           ("lora_B.weight", (5, 2), "float32", False, "zeros"): 1}
    assert {k[2] for k in groups["h"]} == {"float16"}
    assert groups["t"] == {("lora_A.weight", (4, 6), "float32", True, "uniform"): 3,
                           ("lora_B.weight", (6, 4), "float32", True, "zeros"): 2,
                           ("lora_B.weight", (5, 4), "float32", True, "zeros"): 1}


def test_delete_frees_the_adapter_variables_without_a_garbage_collection(tmp_path: Path) -> None:
    model = _model()
    folder = _write(tmp_path / "a", _tensors())
    adapterspec.load_adapter(model, folder)
    gc.disable()
    try:
        adapterspec.load_adapter(model, folder, "t", trainable=True)  # groups: one variable each
        refs = [weakref.ref(v.value) for v in _adapter_variables(model)]
        assert len(refs) == 1 + 3
        adapterspec.delete_adapter(model, "default")
        adapterspec.delete_adapter(model, "t")
        assert [r() for r in refs] == [None] * 4
        assert _adapter_variables(model) == []
        adapterspec.load_adapter(model, folder)  # and the model takes the adapter again
        assert len(_adapter_variables(model)) == 1
    finally:
        gc.enable()


def test_the_device_memo_forgets_collected_variables() -> None:
    from adapterspec_keras import devices

    variable = keras.Variable(np.zeros(3, "float32"))
    device = devices.device_of(variable)
    key = id(variable)
    assert devices._DEVICES[key][1] == device
    assert devices.device_of(variable) == device
    del variable
    assert key not in devices._DEVICES


def _bank(model: keras.Model, name: str = "default") -> object:
    from adapterspec_keras.switch import get_state

    return get_state(model).banks[name][0]


def test_a_frozen_adapter_is_one_arena_made_of_the_read_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The arena takes the buffer the file was read into (no copy); a trainable adapter keeps a variable per group."""
    from adapterspec_keras import state

    made = []
    shared = state._shared_arena
    monkeypatch.setattr(state, "_shared_arena", lambda *a, **k: made.append(shared(*a, **k)) or made[-1])
    x = unique_values((3, 6), 8, scale=1.0)
    tensors = _tensors()
    folder = _write(tmp_path / "a", tensors)
    frozen, trained = _model(), _model()
    adapterspec.load_adapter(frozen, folder)
    adapterspec.load_adapter(trained, folder, trainable=True)
    assert len(made) == 1 and made[0] is not None  # the frozen load took the file's buffer
    assert [v.path.rsplit("/", 1)[-1] for v in _adapter_variables(frozen)] == ["arena"]
    assert len(_adapter_variables(trained)) == 3
    assert_near(keras.ops.convert_to_numpy(frozen(x)), _expected(x, frozen, tensors))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(frozen(x)), keras.ops.convert_to_numpy(trained(x)))
    saved = adapterspec.extract_adapter(frozen).load_tensors("numpy")
    assert sorted(saved) == sorted(tensors) and all(np.array_equal(saved[k], v) for k, v in tensors.items())


def test_an_arena_never_shares_the_callers_arrays(tmp_path: Path) -> None:
    """An in-memory adapter's arrays, even views of one buffer, are copied: changing them later changes nothing."""
    x = unique_values((3, 6), 9, scale=1.0)
    tensors = _tensors()
    buffer = np.empty(sum(v.nbytes for v in tensors.values()) + 64, np.uint8)
    views, at = {}, 0
    for key, value in tensors.items():
        views[key] = buffer[at:at + value.nbytes].view(np.float32).reshape(value.shape)
        views[key][...] = value
        at += value.nbytes
    adapter = adapterspec.Adapter.from_tensors({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                "target_modules": list(_MODULES)}, views)
    model = _model()
    adapterspec.load_adapter(model, adapter)
    before = keras.ops.convert_to_numpy(model(x))
    assert_near(before, _expected(x, model, tensors))
    buffer[...] = 0
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), before)


def test_the_read_buffer_is_taken_only_when_nothing_else_holds_it() -> None:
    from adapterspec_keras.state import _owned_buffer

    def fresh() -> dict[str, np.ndarray]:
        buffer = np.zeros(64, np.uint8)
        return {"a": buffer[:32].view(np.float32), "b": buffer[32:].view(np.float32)}

    arrays = fresh()
    assert _owned_buffer(arrays) is not None
    arrays = fresh()
    kept = arrays["a"]  # a view held elsewhere
    assert _owned_buffer(arrays) is None
    del kept
    arrays = fresh()
    root = arrays["a"].base  # the buffer held elsewhere
    assert _owned_buffer(arrays) is None
    del root
    arrays = fresh()
    cache = [arrays]  # the dict held elsewhere
    assert _owned_buffer(arrays) is None
    del cache
    arrays = {"a": np.zeros(8, np.float32), "b": np.zeros(8, np.float32)}  # not views of one buffer
    assert _owned_buffer(arrays) is None


def test_an_arena_is_assigned_merged_and_cast(tmp_path: Path) -> None:
    """An arena in float16 (the file's float32 cast: a stacked copy), loaded over again, merged and unmerged."""
    from adapterspec_keras.inject import inject
    from adapterspec_keras.state import load_state

    x = unique_values((3, 6), 11, scale=1.0)
    first, second = _tensors(), {k: v * -2.0 for k, v in _tensors().items()}
    model = _model()
    base = keras.ops.convert_to_numpy(model(x))
    a, b = (adapterspec.read_adapter(_write(tmp_path / n, t)) for n, t in (("a", first), ("b", second)))
    options = adapterspec.LoadOptions(dtype="float16", initialize=False)
    inject(model, a.config, "h", options)
    load_state(model, a, "h", options)
    assert [v.dtype for v in _adapter_variables(model)] == ["float16"]
    load_state(model, b, "h", options)  # a bank made already is assigned
    saved = adapterspec.extract_adapter(model, "h").load_tensors("numpy")
    for key, value in second.items():
        np.testing.assert_array_equal(saved[key], value.astype(np.float16))
    adapterspec.set_active_adapters(model, "h")
    out = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(out, _expected(x, model, {k: v.astype(np.float16).astype(np.float32)
                                                         for k, v in second.items()}), atol=2e-3)
    adapterspec.merge_adapters(model, "h")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), out, atol=2e-3)
    adapterspec.unmerge_adapters(model)
    adapterspec.delete_adapter(model, "h")
    assert_near(keras.ops.convert_to_numpy(model(x)), base)
